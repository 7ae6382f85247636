//! What the SQL-level tests share: running a statement that should fail, reading
//! constraints and deliveries.

use pgrx::prelude::*;

/// Runs `sql` and returns the error message it raised, or None when it succeeded.
pub fn error_of(sql: &str) -> Option<String> {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
         BEGIN EXECUTE sql; RETURN NULL;
         EXCEPTION WHEN OTHERS THEN RETURN SQLERRM; END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()]).unwrap()
}

pub fn assert_refused(sql: &str, expected: &str) {
    match error_of(sql) {
        Some(message) => assert!(message.contains(expected), "{sql}\n  gave: {message}\n  expected: {expected}"),
        None => panic!("{sql}\n  was accepted, expected an error containing {expected}"),
    }
}

/// The quoted values of a CHECK constraint's `IN (…)` list, in order.
pub fn check_values(table: &str, constraint: &str) -> Vec<String> {
    let def = Spi::get_one_with_args::<String>(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2",
        &[table.into(), constraint.into()],
    )
    .unwrap()
    .unwrap_or_else(|| panic!("no constraint {constraint} on {table}"));
    def.split('\'').skip(1).step_by(2).map(str::to_string).collect()
}

pub fn insert_endpoint(name: &str) -> i64 {
    Spi::get_one_with_args::<i64>(
        "INSERT INTO postback.endpoints (name, url_template) VALUES ($1, 'https://example.com/pb?cid={click_id}') RETURNING id",
        &[name.into()],
    )
    .unwrap()
    .unwrap()
}

pub fn count(sql: &str) -> i64 {
    Spi::get_one::<i64>(sql).unwrap().unwrap_or(0)
}

pub fn delivered_to(transaction_id: &str) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT coalesce(string_agg(e.name, ',' ORDER BY e.name), '')
           FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
           JOIN postback.conversions c ON c.id = d.conversion_id WHERE c.transaction_id = $1",
        &[transaction_id.into()],
    )
    .unwrap()
    .unwrap_or_default()
}

pub fn url_for(endpoint: &str, transaction_id: &str) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT d.url FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
           JOIN postback.conversions c ON c.id = d.conversion_id WHERE e.name = $1 AND c.transaction_id = $2",
        &[endpoint.into(), transaction_id.into()],
    )
    .unwrap()
    .unwrap_or_default()
}

pub fn three_endpoints() {
    Spi::run(
        "INSERT INTO postback.endpoints (name, url_template, events) VALUES
             ('sales', 'https://n.test/pb?cid={click_id}&a={amount}', '{sale}'),
             ('leads', 'https://n.test/pb?cid={click_id}', '{lead}');
         INSERT INTO postback.endpoints (name, kind, url_template, active) VALUES
             ('off', 'webhook', 'https://n.test/hook', false);
         INSERT INTO postback.endpoints (name, kind, url_template, statuses) VALUES
             ('hook', 'webhook', 'https://n.test/hook', '{approved,reversed}')",
    )
    .unwrap();
}
