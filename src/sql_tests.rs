//! SQL-level tests run by `cargo pgrx test` inside a transaction that is rolled back.


#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Runs `sql` and returns the error message it raised, or None when it succeeded.
    fn error_of(sql: &str) -> Option<String> {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE sql; RETURN NULL;
             EXCEPTION WHEN OTHERS THEN RETURN SQLERRM; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()]).unwrap()
    }

    fn assert_refused(sql: &str, expected: &str) {
        match error_of(sql) {
            Some(message) => assert!(message.contains(expected), "{sql}\n  gave: {message}\n  expected: {expected}"),
            None => panic!("{sql}\n  was accepted, expected an error containing {expected}"),
        }
    }

    fn insert_endpoint(name: &str) -> i64 {
        Spi::get_one_with_args::<i64>(
            "INSERT INTO postback.endpoints (name, url_template) VALUES ($1, 'https://example.com/pb?cid={click_id}') RETURNING id",
            &[name.into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn conversion_constraints_refuse_bad_rows() {
        let ok = "INSERT INTO postback.conversions (click_id, transaction_id, status, currency)";
        assert_eq!(error_of(&format!("{ok} VALUES ('c1', 't1', 'approved', 'EUR')")), None);
        assert_refused(&format!("{ok} VALUES ('c', 't2', 'paid', 'EUR')"), "status_must_be_a_known_conversion_status");
        assert_refused(&format!("{ok} VALUES ('c', 't3', 'approved', 'eur')"), "currency_must_be_an_iso_4217_uppercase_code");
        assert_refused(&format!("{ok} VALUES ('c', 't4', 'approved', 'EURO')"), "currency_must_be_an_iso_4217_uppercase_code");
        assert_refused(&format!("{ok} VALUES ('', 't5', 'approved', 'EUR')"), "click_id_must_be_1_to_512_characters");
        assert_refused(&format!("{ok} VALUES ('c', '', 'approved', 'EUR')"), "transaction_id_must_be_1_to_256_characters");
        assert_refused(&format!("{ok} VALUES ('c', 't1', 'approved', 'EUR')"), "transaction_id_is_unique");
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', 't6', 'Big Sale')",
            "event_must_be_a_lowercase_word_of_1_to_64_characters",
        );
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, attributes) VALUES ('c', 't7', '[1]')",
            "attributes_must_be_a_json_object",
        );
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, amount) VALUES ('c', 't8', 'NaN')",
            "amount_must_be_a_finite_number",
        );
    }

    #[pg_test]
    fn endpoint_constraints_refuse_bad_rows() {
        let ins = "INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme)";
        assert_refused(&format!("{ins} VALUES ('a', 'sms', 'https://x.test/', 'none')"), "endpoint_kind_must_be_postback_or_webhook");
        assert_refused(&format!("{ins} VALUES ('b', 'webhook', 'https://x.test/', 'md5')"), "endpoint_signing_scheme_must_be_known");
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, statuses) VALUES ('c', 'https://x.test/', '{approved,paid}')",
            "endpoint_statuses_must_be_known_conversion_statuses",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, retry_schedule) VALUES ('d', 'https://x.test/', '{1 minute,-1 second}')",
            "endpoint_retry_schedule_must_hold_positive_intervals",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, timeout) VALUES ('e', 'https://x.test/', '1 hour')",
            "endpoint_timeout_must_be_between_1ms_and_5min",
        );
        insert_endpoint("dup");
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template) VALUES ('dup', 'https://x.test/')",
            "endpoint_name_is_unique",
        );
    }

    #[pg_test]
    fn endpoint_defaults_follow_kind_and_schedule() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, kind, url_template) VALUES ('pb', 'postback', 'https://x.test/');
             INSERT INTO postback.endpoints (name, kind, url_template, retry_schedule)
                  VALUES ('wh', 'webhook', 'https://x.test/', '{1 second,2 seconds}')",
        )
        .unwrap();
        let pb = Spi::get_two::<String, i32>("SELECT method, max_attempts FROM postback.endpoints WHERE name = 'pb'").unwrap();
        assert_eq!(pb, (Some("GET".into()), Some(6)));
        let wh = Spi::get_two::<String, i32>("SELECT method, max_attempts FROM postback.endpoints WHERE name = 'wh'").unwrap();
        assert_eq!(wh, (Some("POST".into()), Some(3)));
    }

    #[pg_test]
    fn deleting_referenced_rows_is_refused() {
        let endpoint = insert_endpoint("guarded");
        let conversion = Spi::get_one::<i64>(
            "INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'guard-1') RETURNING id",
        )
        .unwrap()
        .unwrap();
        Spi::run_with_args(
            "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url)
             VALUES ($1, $2, 'conversion', 'approved', 'k-guard', 'GET', 'https://x.test/')",
            &[endpoint.into(), conversion.into()],
        )
        .unwrap();
        assert_refused("DELETE FROM postback.endpoints WHERE name = 'guarded'", "it still has deliveries");
        assert_refused("DELETE FROM postback.conversions WHERE transaction_id = 'guard-1'", "it still has deliveries");
        Spi::run("INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, outcome)
                  SELECT id, 1, now(), 'retry' FROM postback.deliveries WHERE idempotency_key = 'k-guard';
                  DELETE FROM postback.deliveries WHERE idempotency_key = 'k-guard'")
            .unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM postback.attempts").unwrap(), Some(0));
        assert_eq!(error_of("DELETE FROM postback.endpoints WHERE name = 'guarded'"), None);
    }

    #[pg_test]
    fn delivery_state_constraints_hold() {
        let ins = "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, state";
        assert_refused(&format!("{ins}) VALUES (1, 1, 'e', 'approved', 'k1', 'GET', 'u', 'sent')"), "delivery_state_must_be_pending_in_flight_succeeded_or_dead");
        assert_refused(&format!("{ins}) VALUES (1, 1, 'e', 'approved', 'k2', 'GET', 'u', 'in_flight')"), "delivery_in_flight_has_a_lease");
        assert_refused(&format!("{ins}) VALUES (1, 1, 'e', 'approved', 'k3', 'GET', 'u', 'succeeded')"), "delivery_completed_at_set_when_finished");
    }

    /// Every table, view, column and function of the extension carries a COMMENT.
    #[pg_test]
    fn every_object_is_commented() {
        let missing = Spi::get_one::<String>(
            "WITH members AS (
                 SELECT classid, objid FROM pg_depend d
                  JOIN pg_extension e ON e.oid = d.refobjid AND d.refclassid = 'pg_extension'::regclass
                 WHERE e.extname = 'pg_postback' AND d.deptype = 'e'),
             objects AS (
                 SELECT c.oid::regclass::text AS name, obj_description(c.oid, 'pg_class') AS comment
                   FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
                  WHERE c.relkind IN ('r', 'v', 'm')
                 UNION ALL
                 SELECT c.oid::regclass::text || '.' || a.attname, col_description(c.oid, a.attnum)
                   FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE c.relkind IN ('r', 'v', 'm')
                 UNION ALL
                 SELECT p.oid::regprocedure::text, obj_description(p.oid, 'pg_proc')
                   FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid)
             SELECT string_agg(name, ', ' ORDER BY name) FROM objects WHERE (comment IS NULL OR comment = '') AND name NOT LIKE 'tests.%'",
        )
        .unwrap();
        assert_eq!(missing, None, "objects without COMMENT: {missing:?}");
    }

    #[pg_test]
    fn worker_status_explains_a_missing_worker() {
        let (running, hint) =
            Spi::get_two::<bool, String>("SELECT running, hint FROM postback.worker_status()").unwrap();
        assert_eq!(running, Some(false));
        assert!(hint.unwrap().contains("shared_preload_libraries"));
    }
}
