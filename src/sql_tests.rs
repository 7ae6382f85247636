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

    /// The quoted values of a CHECK constraint's `IN (…)` list, in order.
    fn check_values(table: &str, constraint: &str) -> Vec<String> {
        let def = Spi::get_one_with_args::<String>(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2",
            &[table.into(), constraint.into()],
        )
        .unwrap()
        .unwrap_or_else(|| panic!("no constraint {constraint} on {table}"));
        def.split('\'').skip(1).step_by(2).map(str::to_string).collect()
    }

    #[pg_test]
    fn worker_status_looks_for_the_worker_type_the_worker_registers() {
        let body =
            Spi::get_one::<String>("SELECT prosrc FROM pg_proc WHERE oid = 'postback.worker_status()'::regprocedure")
                .unwrap()
                .unwrap();
        assert!(body.contains(&format!("'{}'", crate::worker::WORKER_TYPE)), "{body}");
    }

    #[pg_test]
    fn a_bad_conversion_names_its_column_in_the_detail() {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.detail_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE d text;
             BEGIN EXECUTE sql; RETURN NULL;
             EXCEPTION WHEN OTHERS THEN GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL; RETURN d; END $$",
        )
        .unwrap();
        let detail = Spi::get_one_with_args::<String>(
            "SELECT pg_temp.detail_of($1)",
            &["INSERT INTO postback.conversions (click_id, transaction_id, currency) VALUES ('c', 'detail-1', 'eur')"
                .into()],
        );
        assert_eq!(detail.unwrap().as_deref(), Some("column: currency"));
    }

    #[pg_test]
    fn rust_enumerations_and_check_constraints_agree() {
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_values("postback.conversions", "status_must_be_a_known_conversion_status"),
            owned(crate::rules::conversion_rules::STATUSES)
        );
        assert_eq!(
            check_values("postback.deliveries", "delivery_method_must_be_get_post_put_or_patch"),
            owned(crate::rules::outgoing::METHODS)
        );
        assert_eq!(
            check_values("postback.endpoints", "endpoint_method_must_be_get_post_put_or_patch"),
            owned(crate::rules::outgoing::METHODS)
        );
        let mut schemes = vec!["none".to_string()];
        schemes.extend(owned(crate::rules::signing::SCHEME_NAMES));
        assert_eq!(check_values("postback.endpoints", "endpoint_signing_scheme_must_be_known"), schemes);
        for name in crate::rules::signing::SCHEME_NAMES {
            crate::rules::signing::Scheme::parse(name).unwrap();
        }
        assert_eq!(
            check_values("postback.deliveries", "delivery_state_must_be_pending_in_flight_succeeded_or_dead"),
            owned(&["pending", "in_flight", "succeeded", "dead"])
        );
        assert_eq!(
            check_values("postback.attempts", "attempt_outcome_must_be_succeeded_retry_or_dead"),
            crate::rules::retry::Outcome::ALL.iter().map(|o| o.as_str().to_string()).collect::<Vec<_>>()
        );
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
    fn conversion_errors_name_the_column_and_transaction_id() {
        let ok = "INSERT INTO postback.conversions (click_id, transaction_id, status, currency)";
        assert_eq!(error_of(&format!("{ok} VALUES ('c1', 't1', 'approved', 'EUR')")), None);
        for (values, expected) in [
            (
                "('c', 't2', 'paid', 'EUR')",
                "conversion with transaction_id \"t2\": column status \"paid\" must be one of",
            ),
            ("('c', 't3', 'approved', 'eur')", "transaction_id \"t3\": column currency \"eur\""),
            ("('', 't5', 'approved', 'EUR')", "transaction_id \"t5\": column click_id must be 1 to 512 characters"),
            ("('c', '', 'approved', 'EUR')", "column transaction_id must be 1 to 256 characters"),
            (
                "(repeat('x', 600), 't6', 'approved', 'EUR')",
                "transaction_id \"t6\": column click_id must be 1 to 512 characters (got 600)",
            ),
        ] {
            assert_refused(&format!("{ok} VALUES {values}"), expected);
        }
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, event) VALUES ('c', 't7', 'Big Sale')",
            "transaction_id \"t7\": column event",
        );
        assert_refused(&format!("{ok} VALUES ('c', 't1', 'approved', 'EUR')"), "transaction_id_is_unique");
        assert_refused(
            "UPDATE postback.conversions SET status = 'paid' WHERE transaction_id = 't1'",
            "transaction_id \"t1\": column status",
        );
    }

    /// The CHECK constraints stay as a backstop when triggers are bypassed.
    #[pg_test]
    fn conversion_constraints_refuse_bad_rows() {
        Spi::run("ALTER TABLE postback.conversions DISABLE TRIGGER conversions_validate").unwrap();
        let ok = "INSERT INTO postback.conversions (click_id, transaction_id, status, currency)";
        assert_refused(&format!("{ok} VALUES ('c', 't2', 'paid', 'EUR')"), "status_must_be_a_known_conversion_status");
        assert_refused(
            &format!("{ok} VALUES ('c', 't3', 'approved', 'eur')"),
            "currency_must_be_an_iso_4217_uppercase_code",
        );
        assert_refused(
            &format!("{ok} VALUES ('c', 't4', 'approved', 'EURO')"),
            "currency_must_be_an_iso_4217_uppercase_code",
        );
        assert_refused(&format!("{ok} VALUES ('', 't5', 'approved', 'EUR')"), "click_id_must_be_1_to_512_characters");
        assert_refused(
            &format!("{ok} VALUES ('c', '', 'approved', 'EUR')"),
            "transaction_id_must_be_1_to_256_characters",
        );
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
        assert_refused(
            &format!("{ins} VALUES ('a', 'sms', 'https://x.test/', 'none')"),
            "endpoint_kind_must_be_postback_or_webhook",
        );
        assert_refused(
            &format!("{ins} VALUES ('b', 'webhook', 'https://x.test/', 'md5')"),
            "endpoint_signing_scheme_must_be_known",
        );
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
        let pb = Spi::get_two::<String, i32>("SELECT method, max_attempts FROM postback.endpoints WHERE name = 'pb'")
            .unwrap();
        assert_eq!(pb, (Some("GET".into()), Some(6)));
        let wh = Spi::get_two::<String, i32>("SELECT method, max_attempts FROM postback.endpoints WHERE name = 'wh'")
            .unwrap();
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
        Spi::run(
            "INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, outcome)
                  SELECT id, 1, now(), 'retry' FROM postback.deliveries WHERE idempotency_key = 'k-guard';
                  DELETE FROM postback.deliveries WHERE idempotency_key = 'k-guard'",
        )
        .unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM postback.attempts").unwrap(), Some(0));
        assert_eq!(error_of("DELETE FROM postback.endpoints WHERE name = 'guarded'"), None);
    }

    #[pg_test]
    fn delivery_state_constraints_hold() {
        let ins = "INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, state";
        assert_refused(
            &format!("{ins}) VALUES (1, 1, 'e', 'approved', 'k1', 'GET', 'u', 'sent')"),
            "delivery_state_must_be_pending_in_flight_succeeded_or_dead",
        );
        assert_refused(
            &format!("{ins}) VALUES (1, 1, 'e', 'approved', 'k2', 'GET', 'u', 'in_flight')"),
            "delivery_in_flight_has_a_lease",
        );
        assert_refused(
            &format!("{ins}) VALUES (1, 1, 'e', 'approved', 'k3', 'GET', 'u', 'succeeded')"),
            "delivery_completed_at_set_when_finished",
        );
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

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap().unwrap_or(0)
    }

    #[pg_test]
    fn render_encodes_values_for_where_they_stand() {
        let url = Spi::get_one::<String>(
            r#"SELECT postback.render('https://n.test/c/{p}?v={v}&d={missing|default:0}&r={r|raw}',
                                      '{"p": "a/b", "v": "x&y=z #%", "r": "a%20b"}')"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(url, "https://n.test/c/a%2Fb?v=x%26y%3Dz%20%23%25&d=0&r=a%20b");
        assert_refused(
            "SELECT postback.render('https://n.test/?a={x', '{}')",
            "unclosed '{' (write '{{' for a literal brace) at position 19",
        );
    }

    #[pg_test]
    fn bad_templates_are_refused_when_the_endpoint_is_created_or_changed() {
        let ins = "INSERT INTO postback.endpoints (name, url_template) VALUES";
        assert_refused(&format!("{ins} ('a', 'https://n.test/?c={{clickid}}')"), "unknown variable \"clickid\"");
        assert_refused(&format!("{ins} ('a', 'https://n.test/?c={{click_id')"), "unclosed '{'");
        assert_refused(&format!("{ins} ('a', 'ftp://n.test/{{click_id}}')"), "scheme \"ftp\" is not allowed");
        assert_refused(&format!("{ins} ('a', 'https://{{click_id}}.n.test/')"), "scheme or host");
        assert_refused(&format!("{ins} ('a', 'https://n.test/' || repeat('a', 9000))"), "limit is 8192");
        assert_refused(&format!("{ins} ('a', E'https://n.test/\\n')"), "control character");
        insert_endpoint("ok");
        assert_refused(
            "UPDATE postback.endpoints SET url_template = 'https://n.test/?x={nope}' WHERE name = 'ok'",
            "unknown variable \"nope\"",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, kind, url_template, body_template) VALUES ('w', 'webhook', 'https://n.test/', '{\"a\": \"{bogus}\"}')",
            "invalid body_template",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, signing_scheme) VALUES ('p', 'https://n.test/', 'stripe')",
            "endpoint_postback_signs_only_with_hmac_sha256_hex_or_base64",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, success_body_pattern) VALUES ('q', 'https://n.test/', '(')",
            "invalid regular expression",
        );
        assert_eq!(
            error_of("SELECT postback.validate_template('https://n.test/p?a={attributes.sub1}&b={amount|default:0}')"),
            None
        );
    }

    #[pg_test]
    fn sign_and_verify_in_sql() {
        let sig = Spi::get_one::<String>(
            "SELECT postback.sign('{\"test\": 2432232314}', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'standard-webhooks', 'msg_p5jXN8AQM9LWM0D4loKWxJek', 1614265330)",
        )
        .unwrap();
        assert_eq!(sig.as_deref(), Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="));
        let fresh =
            Spi::get_one::<bool>("SELECT postback.verify('p', 'k', 'stripe', postback.sign('p', 'k', 'stripe'))")
                .unwrap();
        assert_eq!(fresh, Some(true));
        let stale = Spi::get_one::<bool>(
            "SELECT postback.verify('p', 'k', 'stripe', postback.sign('p', 'k', 'stripe', ts => 1000), tolerance => '1 minute')",
        )
        .unwrap();
        assert_eq!(stale, Some(false));
        assert_refused("SELECT postback.sign('p', 'k', 'md5')", "unknown signing scheme \"md5\"");
        assert_refused("SELECT postback.sign('p', '', 'github')", "must not be empty");
        assert_refused("SELECT postback.sign('p', 'nope', 'standard-webhooks', 'm')", "whsec_");
        assert_refused(
            "SELECT postback.sign('p', 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'standard-webhooks')",
            "message id",
        );
    }

    fn three_endpoints() {
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

    #[pg_test]
    fn a_multi_row_insert_fans_out_once_per_matching_endpoint() {
        three_endpoints();
        Spi::run(
            "INSERT INTO postback.conversions (click_id, transaction_id, event, amount, currency)
             SELECT 'c' || g, 't' || g, 'sale', g, 'EUR' FROM generate_series(1, 1000) g",
        )
        .unwrap();
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 2000);
        assert_eq!(
            count("SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name IN ('sales', 'hook')"),
            2000
        );
        assert_eq!(count("SELECT count(DISTINCT (conversion_id, endpoint_id)) FROM postback.deliveries"), 2000);
        assert_eq!(count("SELECT count(*) FROM postback.deliveries WHERE state = 'pending'"), 2000);
        let url = Spi::get_one::<String>(
            "SELECT d.url FROM postback.deliveries d JOIN postback.conversions c ON c.id = d.conversion_id
              JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE c.transaction_id = 't7' AND e.name = 'sales'",
        )
        .unwrap();
        assert_eq!(url.as_deref(), Some("https://n.test/pb?cid=c7&a=7"));
        let body = Spi::get_one::<pgrx::JsonB>(
            "SELECT d.body::jsonb FROM postback.deliveries d JOIN postback.conversions c ON c.id = d.conversion_id
              JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE c.transaction_id = 't7' AND e.name = 'hook'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(body.0["type"], "sale");
        assert_eq!(body.0["data"]["transaction_id"], "t7");
        assert_eq!(body.0["data"]["amount"].to_string(), "7");
    }

    #[pg_test]
    fn status_changes_are_announced_once_and_in_order() {
        three_endpoints();
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id, event, status) VALUES ('c', 'lc', 'sale', 'pending')").unwrap();
        // pending: only 'sales' (no status filter); 'hook' wants approved/reversed
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 1);
        Spi::run("UPDATE postback.conversions SET status = 'approved' WHERE transaction_id = 'lc'").unwrap();
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 3);
        Spi::run("UPDATE postback.conversions SET status = 'approved', amount = 5 WHERE transaction_id = 'lc'")
            .unwrap();
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 3, "a no-op status update announces nothing");
        Spi::run("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = 'lc'").unwrap();
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 5);
        // each later delivery of an (endpoint, conversion) waits behind the one before
        assert_eq!(
            count(
                "SELECT count(*) FROM postback.deliveries d
                   JOIN postback.deliveries p ON p.id = d.predecessor_id
                  WHERE p.endpoint_id = d.endpoint_id AND p.conversion_id = d.conversion_id AND p.id < d.id"
            ),
            3
        );
        assert_eq!(count("SELECT count(*) FROM postback.deliveries WHERE predecessor_id IS NULL"), 2);
        let statuses = Spi::get_one::<String>(
            "SELECT string_agg(d.status, ',' ORDER BY d.id) FROM postback.deliveries d
               JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = 'sales'",
        )
        .unwrap();
        assert_eq!(statuses.as_deref(), Some("pending,approved,reversed"));
    }

    #[pg_test]
    fn a_render_failure_is_recorded_dead_and_the_insert_succeeds() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template) VALUES
                 ('blob', 'https://n.test/pb?x={attributes.blob}'),
                 ('ok2', 'https://n.test/pb?c={click_id}')",
        )
        .unwrap();
        // a 20 kB attribute makes a URL no receiver accepts
        assert_eq!(
            error_of(
                "INSERT INTO postback.conversions (click_id, transaction_id, attributes)
                 VALUES ('c', 'rf', jsonb_build_object('blob', repeat('x', 20000)))"
            ),
            None
        );
        assert_eq!(count("SELECT count(*) FROM postback.conversions WHERE transaction_id = 'rf'"), 1);
        assert_eq!(count("SELECT count(*) FROM postback.deliveries WHERE state = 'pending'"), 1);
        let dead = Spi::get_two::<String, String>(
            "SELECT state, last_error FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = 'blob'",
        )
        .unwrap();
        assert_eq!(dead.0.as_deref(), Some("dead"));
        assert!(dead.1.unwrap().contains("the limit is 16384"));
    }

    #[pg_test]
    fn duplicates_error_by_default_and_are_counted_when_skipped() {
        insert_endpoint("dups");
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'd1'), ('c', 'd2')")
            .unwrap();
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'd1')",
            "transaction_id_is_unique",
        );
        Spi::run(
            "INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'd1'), ('c', 'd2'), ('c', 'd3')
             ON CONFLICT (transaction_id) DO NOTHING",
        )
        .unwrap();
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 3);
        assert_eq!(count("SELECT sum(duplicates)::bigint FROM postback.conversion_duplicates"), 2);
        Spi::run(
            "INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'd1') ON CONFLICT DO NOTHING",
        )
        .unwrap();
        assert_eq!(count("SELECT sum(duplicates)::bigint FROM postback.conversion_duplicates"), 3);
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 3);
    }

    #[pg_test]
    fn preview_shows_the_signed_request() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme, headers)
                  VALUES ('wh', 'webhook', 'https://n.test/hook?c={click_id}', 'github', '{\"X-Team\": \"growth\"}');
             INSERT INTO postback.endpoint_secrets (endpoint_id, secret) SELECT id, 'It''s a Secret to Everybody' FROM postback.endpoints;
             INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c9', 'pv')",
        )
        .unwrap();
        let ok = Spi::get_one::<bool>(
            "SELECT p.method = 'POST' AND p.url = 'https://n.test/hook?c=c9' AND p.headers->>'X-Team' = '[redacted]'
                    AND p.headers->>'X-Hub-Signature-256' = postback.sign(p.body, 'It''s a Secret to Everybody', 'github')
                    AND p.body::jsonb->'data'->>'click_id' = 'c9' AND p.error IS NULL
               FROM postback.conversions c, postback.preview('wh', c.id) p WHERE c.transaction_id = 'pv'",
        )
        .unwrap();
        assert_eq!(ok, Some(true));
    }

    /// Supabase's linter calls a function without a pinned search_path
    /// `function_search_path_mutable`: every SQL and PL/pgSQL function of the
    /// schema, and every SECURITY DEFINER one whatever its language, pins it.
    #[pg_test]
    fn every_function_pins_its_search_path() {
        let unpinned = Spi::get_one::<String>(
            "SELECT string_agg(p.oid::regprocedure::text, ', ')
               FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
              WHERE p.pronamespace = 'postback'::regnamespace
                AND (l.lanname IN ('sql', 'plpgsql') OR p.prosecdef)
                AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)",
        )
        .unwrap();
        assert_eq!(unpinned, None, "functions without a pinned search_path");
        let definers =
            count("SELECT count(*) FROM pg_proc WHERE pronamespace = 'postback'::regnamespace AND prosecdef");
        assert!(definers >= 3, "the enqueue triggers and preview run as the owner");
    }

    #[pg_test]
    fn internal_functions_are_not_executable_by_public() {
        for f in [
            "postback.sign_request(bigint, text, text, text, text, text, text, jsonb, jsonb, text, text)",
            "postback.render_request(bigint, text, text, text, jsonb, jsonb, boolean, bigint, text, text, text, text, text, text, jsonb, timestamptz)",
            "postback.preview(text, bigint)",
            "postback.grant_operator(regrole)",
            "postback.grant_analyst(regrole)",
            "postback.wake_worker()",
        ] {
            let public = Spi::get_one_with_args::<bool>(
                "SELECT coalesce(bool_or(a.grantee = 0), false)
                   FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                  WHERE p.oid = $1::regprocedure AND a.privilege_type = 'EXECUTE'",
                &[f.into()],
            )
            .unwrap();
            assert_eq!(public, Some(false), "{f} is executable by PUBLIC");
        }
    }

    #[pg_test]
    fn endpoint_headers_are_checked_when_given() {
        for (headers, expected) in [
            (r#"{"Host": "evil.test"}"#, "header \"Host\" is set by the HTTP client"),
            (r#"{"Content-Length": "5"}"#, "\"Content-Length\""),
            (r#"{"Transfer-Encoding": "chunked"}"#, "\"Transfer-Encoding\""),
            (r#"{"connection": "close"}"#, "\"connection\""),
            (r#"{"X-Key": "a\r\nX-Injected: 1"}"#, "control character (U+000D)"),
            (r#"{"X Key": "v"}"#, "is not an HTTP token"),
            (r#"{"X-Key": 5}"#, "the value of \"X-Key\" must be a string"),
            (r#"["X-Key"]"#, "must be a JSON object"),
        ] {
            let sql = format!(
                "INSERT INTO postback.endpoints (name, url_template, headers) VALUES ('h', 'https://n.test/pb', '{}')",
                headers.replace('\'', "''")
            );
            assert_refused(&sql, expected);
        }
        insert_endpoint("hdr");
        assert_refused(
            "UPDATE postback.endpoints SET headers = '{\"Upgrade\": \"h2c\"}' WHERE name = 'hdr'",
            "\"Upgrade\"",
        );
        assert_eq!(
            error_of("UPDATE postback.endpoints SET headers = '{\"Authorization\": \"Bearer t\"}' WHERE name = 'hdr'"),
            None
        );
    }

    #[pg_test]
    fn templates_that_could_move_the_host_are_refused() {
        for template in [
            "http:///{click_id}:56002/pb",
            "https:{click_id}/pb",
            "http:\\\\{click_id}\\pb",
            "https://{click_id}/pb",
            "https://n.test:{attributes.port}/pb",
        ] {
            let sql = format!(
                "INSERT INTO postback.endpoints (name, url_template) VALUES ('mv', '{}')",
                template.replace('\'', "''")
            );
            assert_refused(&sql, "invalid url_template");
        }
    }

    #[pg_test]
    fn delivery_methods_are_constrained() {
        insert_endpoint("m");
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'mt')").unwrap();
        assert_refused(
            "UPDATE postback.deliveries SET method = E'GET / HTTP/1.1\\r\\nX: y'",
            "delivery_method_must_be_get_post_put_or_patch",
        );
    }

    #[pg_test]
    fn oversized_webhook_bodies_are_dead_with_the_limit_named() {
        Spi::run(
            "SET LOCAL postback.max_body_bytes = '2kB';
             INSERT INTO postback.endpoints (name, kind, url_template) VALUES ('big', 'webhook', 'https://n.test/hook');
             INSERT INTO postback.conversions (click_id, transaction_id, attributes)
             VALUES ('c', 'small', '{}'), ('c', 'large', jsonb_build_object('blob', repeat('x', 5000)))",
        )
        .unwrap();
        let states = Spi::get_one::<String>(
            "SELECT string_agg(c.transaction_id || '=' || d.state, ',' ORDER BY c.transaction_id)
               FROM postback.deliveries d JOIN postback.conversions c ON c.id = d.conversion_id",
        )
        .unwrap();
        assert_eq!(states.as_deref(), Some("large=dead,small=pending"));
        let reason =
            Spi::get_one::<String>("SELECT last_error FROM postback.deliveries WHERE state = 'dead'").unwrap().unwrap();
        assert!(reason.contains("the limit is 2048 (postback.max_body_bytes)"), "{reason}");
    }

    #[pg_test]
    fn pg_dump_keeps_every_table_with_user_data_and_its_sequence() {
        let dumped = Spi::get_one::<String>(
            "SELECT string_agg(c.relname, ',' ORDER BY c.relname)
               FROM pg_extension x, unnest(x.extconfig) AS t(oid) JOIN pg_class c ON c.oid = t.oid
              WHERE x.extname = 'pg_postback'",
        )
        .unwrap();
        assert_eq!(
            dumped.as_deref(),
            Some(
                "attempts,attempts_id_seq,clicks,conversion_duplicates,conversion_duplicates_id_seq,conversions,\
                 conversions_id_seq,deliveries,deliveries_id_seq,endpoint_secrets,endpoint_secrets_id_seq,\
                 endpoints,endpoints_id_seq"
            )
        );
    }

    fn delivered_to(transaction_id: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT coalesce(string_agg(e.name, ',' ORDER BY e.name), '')
               FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
               JOIN postback.conversions c ON c.id = d.conversion_id WHERE c.transaction_id = $1",
            &[transaction_id.into()],
        )
        .unwrap()
        .unwrap_or_default()
    }

    #[pg_test]
    fn a_conversion_goes_to_its_partner_and_the_global_endpoints_only() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template, partners) VALUES
                 ('net-a', 'https://a.test/pb?c={click_id}&s1={click.sub1}&p={partner}', '{network-a}'),
                 ('net-b', 'https://b.test/pb?c={click_id}', '{network-b}'),
                 ('offer-12', 'https://b.test/offer?c={click_id}', '{network-b}');
             UPDATE postback.endpoints SET conditions = '{\"offer_id\": \"12\"}' WHERE name = 'offer-12';
             INSERT INTO postback.endpoints (name, kind, url_template) VALUES ('crm', 'webhook', 'https://crm.test/hook');
             INSERT INTO postback.clicks (click_id, partner, attributes) VALUES
                 ('clk-a', 'network-a', '{\"sub1\": \"x y&z\"}'), ('clk-b', 'network-b', '{}');
             INSERT INTO postback.conversions (click_id, transaction_id, partner, attributes) VALUES
                 ('clk-a', 'ta', NULL, '{}'),
                 ('clk-b', 'tb', NULL, '{\"offer_id\": \"12\"}'),
                 ('clk-b', 'tb2', NULL, '{\"offer_id\": \"13\"}'),
                 ('unknown', 'tu', NULL, '{}'),
                 ('unknown', 'tx', 'network-a', '{}')",
        )
        .unwrap();
        assert_eq!(delivered_to("ta"), "crm,net-a");
        assert_eq!(delivered_to("tb"), "crm,net-b,offer-12");
        assert_eq!(delivered_to("tb2"), "crm,net-b");
        assert_eq!(delivered_to("tu"), "crm");
        assert_eq!(delivered_to("tx"), "crm,net-a");
        // the partner came from the click, the sub-id from its attributes, encoded
        assert_eq!(
            Spi::get_one::<String>("SELECT partner FROM postback.conversions WHERE transaction_id = 'ta'")
                .unwrap()
                .as_deref(),
            Some("network-a")
        );
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT d.url FROM postback.deliveries d JOIN postback.conversions c ON c.id = d.conversion_id
                  JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE c.transaction_id = 'ta' AND e.name = 'net-a'"
            )
            .unwrap()
            .as_deref(),
            Some("https://a.test/pb?c=clk-a&s1=x%20y%26z&p=network-a")
        );
        // the webhook envelope names the partner
        assert_eq!(
            Spi::get_one::<String>(
                "SELECT d.body::jsonb->'data'->>'partner' FROM postback.deliveries d
                   JOIN postback.conversions c ON c.id = d.conversion_id
                   JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE c.transaction_id = 'tb' AND e.name = 'crm'"
            )
            .unwrap()
            .as_deref(),
            Some("network-b")
        );
        // a status change follows the partner, and the partner cannot change
        Spi::run("UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = 'ta'").unwrap();
        assert_eq!(
            count(
                "SELECT count(*) FROM postback.deliveries d JOIN postback.conversions c ON c.id = d.conversion_id
                    WHERE c.transaction_id = 'ta' AND d.status = 'reversed'"
            ),
            2
        );
        assert_eq!(delivered_to("ta"), "crm,crm,net-a,net-a");
        assert_refused(
            "UPDATE postback.conversions SET partner = 'network-b' WHERE transaction_id = 'ta'",
            "column partner cannot change after insert (from \"network-a\" to \"network-b\")",
        );
        assert_refused(
            "UPDATE postback.conversions SET partner = 'network-b' WHERE transaction_id = 'tu'",
            "(from NULL to \"network-b\")",
        );
        // the match rate: 3 of 5 conversions had a known click
        let overall =
            Spi::get_two::<i64, i64>("SELECT matched, conversions FROM postback.match_rate WHERE overall").unwrap();
        assert_eq!(overall, (Some(3), Some(5)));
        let b =
            Spi::get_one::<pgrx::AnyNumeric>("SELECT match_rate FROM postback.match_rate WHERE partner = 'network-b'")
                .unwrap();
        assert_eq!(b.map(|n| n.to_string()).as_deref(), Some("1.0000"));
        // preview knows partners, clicks and whether the endpoint is routed
        let (url, routed) = Spi::get_two::<String, bool>(
            "SELECT p.url, p.routed FROM postback.conversions c, postback.preview('net-b', c.id) p WHERE c.transaction_id = 'ta'",
        )
        .unwrap();
        assert_eq!((url.as_deref(), routed), (Some("https://b.test/pb?c=clk-a"), Some(false)));
    }

    #[pg_test]
    fn partners_and_conditions_are_checked_when_given() {
        for (set, expected) in [
            ("partners = '{}'", "invalid partners: the list is empty"),
            ("partners = '{a,NULL}'", "invalid partners: the list holds NULL"),
            ("partners = ARRAY[repeat('p', 101)]", "must be 1 to 100 characters (got 101)"),
            ("conditions = '[1]'", "invalid conditions: must be a JSON object"),
            ("conditions = '{}'", "invalid conditions: must not be empty"),
            ("url_template = 'https://n.test/?x={clck.sub1}'", "unknown variable \"clck.sub1\""),
        ] {
            let id = insert_endpoint(&format!("ep-{}", set.len()));
            assert_refused(&format!("UPDATE postback.endpoints SET {set} WHERE id = {id}"), expected);
        }
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, partner) VALUES ('c', 'pp', E'a\\nb')",
            "transaction_id \"pp\": column partner",
        );
        assert_refused(
            "INSERT INTO postback.clicks (click_id, partner) VALUES ('c', '')",
            "click_partner_must_be_1_to_100_printable_characters",
        );
    }

    #[pg_test]
    fn a_thousand_partner_endpoints_fan_out_exactly() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template, partners)
             SELECT 'aff-' || g, 'https://aff' || g || '.test/pb?c={click_id}&s={click.sub1}', ARRAY['p' || g]
               FROM generate_series(1, 1000) g;
             INSERT INTO postback.endpoints (name, url_template) VALUES ('g1', 'https://g.test/1'), ('g2', 'https://g.test/2');
             INSERT INTO postback.clicks (click_id, partner, attributes)
             SELECT 'k' || g, 'p' || (g % 1000 + 1), jsonb_build_object('sub1', g) FROM generate_series(1, 5000) g;
             INSERT INTO postback.conversions (click_id, transaction_id)
             SELECT 'k' || g, 'f' || g FROM generate_series(1, 5000) g",
        )
        .unwrap();
        assert_eq!(count("SELECT count(*) FROM postback.deliveries"), 15_000);
        // each partner endpoint got exactly its own conversions
        assert_eq!(
            count(
                "SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
                   JOIN postback.conversions c ON c.id = d.conversion_id
                  WHERE e.partners IS NOT NULL AND NOT (c.partner = ANY (e.partners))"
            ),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id WHERE e.name = 'aff-7'"),
            5
        );
        assert_eq!(count("SELECT count(*) FROM postback.deliveries WHERE url = 'https://aff7.test/pb?c=k6&s=6'"), 1);
    }

    fn url_for(endpoint: &str, transaction_id: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT d.url FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
               JOIN postback.conversions c ON c.id = d.conversion_id WHERE e.name = $1 AND c.transaction_id = $2",
            &[endpoint.into(), transaction_id.into()],
        )
        .unwrap()
        .unwrap_or_default()
    }

    /// Real networks' documented conventions, each rendered exactly (expected URLs written by hand).
    #[pg_test]
    fn networks_conventions_render_exactly() {
        Spi::run(
            r#"INSERT INTO postback.endpoints (name, url_template, events) VALUES
                 ('zeydoo', 'https://zeydoo.example/pb?subid={click_id}&payout={amount|mul:0.5|round:2}', '{conv}'),
                 ('keitaro', 'https://keitaro.example/postback?subid={click_id}&status={status|map:pending=lead,approved=sale,*=rejected}&date={occurred_at|tz:Europe/Kyiv|format:%Y-%m-%d %H:%M:%S}', '{conv}'),
                 ('branch', 'https://branch.example/v2/event?ts={occurred_at|unix_ms}&id={transaction_id|upper}', '{conv}'),
                 ('adjust', 'https://adjust.example/callback?cb={attributes.cb|twice}', '{conv}'),
                 ('pap', 'https://pap.example/scripts/sale.php?data={attributes|json}', '{conv}'),
                 ('verifier', 'https://tapjoy.example/pb?id={transaction_id}&verifier={transaction_id|md5}', '{conv}'),
                 ('singular', 'https://singular.example/api/v1/conv?app={{attributes.app_id}}&amount={{amount|default:0}}', '{conv}')"#,
        )
        .unwrap();
        Spi::run(
            r#"INSERT INTO postback.conversions (click_id, transaction_id, event, status, amount, currency, occurred_at, attributes)
               VALUES ('clk 1', 'tx-1', 'conv', 'approved', 49.90, 'EUR', '2024-03-31 01:30:00+00',
                       '{"cb": "https://x.test/?a=1&b=2", "app_id": "com.app", "n": 3}')"#,
        )
        .unwrap();
        assert_eq!(url_for("zeydoo", "tx-1"), "https://zeydoo.example/pb?subid=clk%201&payout=24.95");
        assert_eq!(
            url_for("keitaro", "tx-1"),
            "https://keitaro.example/postback?subid=clk%201&status=sale&date=2024-03-31%2004%3A30%3A00"
        );
        assert_eq!(url_for("branch", "tx-1"), "https://branch.example/v2/event?ts=1711848600000&id=TX-1");
        assert_eq!(
            url_for("adjust", "tx-1"),
            "https://adjust.example/callback?cb=https%253A%252F%252Fx.test%252F%253Fa%253D1%2526b%253D2"
        );
        assert_eq!(
            url_for("pap", "tx-1"),
            "https://pap.example/scripts/sale.php?data=%7B%22app_id%22%3A%22com.app%22%2C%22cb%22%3A%22https%3A%2F%2Fx.test%2F%3Fa%3D1%26b%3D2%22%2C%22n%22%3A3%7D"
        );
        assert_eq!(
            url_for("verifier", "tx-1"),
            "https://tapjoy.example/pb?id=tx-1&verifier=81ef69113ef435274e91cda4e73c5058"
        );
        assert_eq!(url_for("singular", "tx-1"), "https://singular.example/api/v1/conv?app=com.app&amount=49.90");
        // a filter that cannot apply: the delivery is dead with the reason, the insert succeeds
        Spi::run("INSERT INTO postback.endpoints (name, url_template, events) VALUES ('bad', 'https://b.example/?p={currency|mul:2}', '{conv}')").unwrap();
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id, event, currency) VALUES ('c', 'tx-2', 'conv', 'USD')").unwrap();
        let reason = Spi::get_one::<String>(
            "SELECT d.last_error FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
              JOIN postback.conversions c ON c.id = d.conversion_id WHERE e.name = 'bad' AND c.transaction_id = 'tx-2'",
        )
        .unwrap()
        .unwrap_or_default();
        assert!(reason.contains("{currency}: arithmetic: \"USD\" is not a number"), "{reason}");
    }

    #[pg_test]
    fn filters_statuses_and_delays_are_checked_when_given() {
        let id = insert_endpoint("chk");
        for (set, expected) in [
            ("url_template = 'https://n.test/?p={amount|mul:x}'", "mul: \"x\" is not a decimal number"),
            ("url_template = 'https://n.test/?p={amount|div:0}'", "division by zero"),
            ("url_template = 'https://n.test/?t={occurred_at|tz:Mars/Base}'", "not an IANA time zone"),
            ("url_template = 'https://n.test/?t={occurred_at|format:%Q}'", "\"%Q\" is not a supported specifier"),
            ("url_template = 'https://n.test/?t={{order.number}}'", "unknown variable \"order.number\""),
            ("url_template = 'https://n.test/?t={click_id|shout}'", "unknown filter \"shout\""),
            ("success_statuses = '{200-abc}'", "invalid success_statuses: \"200-abc\""),
            ("retry_statuses = '{}'", "invalid retry_statuses: the list is empty"),
            ("initial_delay = '2 days'", "endpoint_initial_delay_must_be_between_0_and_1_day"),
            ("success_body_pattern = '^{transaction_id}:OK($'", "invalid regular expression"),
        ] {
            assert_refused(&format!("UPDATE postback.endpoints SET {set} WHERE id = {id}"), expected);
        }
        assert_eq!(
            error_of(&format!(
                "UPDATE postback.endpoints SET success_statuses = '{{200-302}}', retry_statuses = '{{409,500-599}}',
                        initial_delay = '10 minutes', success_body_pattern = '^{{transaction_id}}:OK$' WHERE id = {id}"
            )),
            None
        );
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'a.b+c')").unwrap();
        let (pattern, delayed) = Spi::get_two::<String, bool>(
            "SELECT success_pattern, next_attempt_at > now() + interval '9 minutes' FROM postback.deliveries",
        )
        .unwrap();
        assert_eq!(pattern.as_deref(), Some("^a\\.b\\+c:OK$"));
        assert_eq!(delayed, Some(true));
    }
}
