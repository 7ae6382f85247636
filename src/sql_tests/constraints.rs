//! What the tables and validators refuse, and how the refusal reads (message, SQLSTATE, DETAIL, HINT).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[allow(unused_imports)]
    use crate::sql_tests::helpers::*;

    /// `sqlstate | detail | hint` of the error `sql` raises.
    fn diagnostics_of(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.diagnostics_of(sql text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE s text; d text; h text;
             BEGIN EXECUTE sql; RETURN 'accepted';
             EXCEPTION WHEN OTHERS THEN
               GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
               RETURN concat_ws(' | ', s, d, nullif(h, '')); END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.diagnostics_of($1)", &[sql.into()]).unwrap().unwrap()
    }

    #[pg_test]
    fn a_bad_conversion_names_its_column_in_the_detail() {
        let sql =
            "INSERT INTO postback.conversions (click_id, transaction_id, currency) VALUES ('c', 'detail-1', 'eur')";
        assert_eq!(diagnostics_of(sql), "23514 | column: currency");
    }

    #[pg_test]
    fn each_refusal_has_the_sqlstate_of_its_kind_the_field_and_a_hint() {
        let d = diagnostics_of(
            "INSERT INTO postback.endpoints (name, url_template, headers) VALUES ('h', 'https://n.test/', '[1]')",
        );
        assert!(d.starts_with("22023 | column: headers | headers is a JSON object"), "{d}");
        // a bounded setting names its column, never the whole row (whose headers are credentials)
        let d = diagnostics_of(
            "INSERT INTO postback.endpoints (name, url_template, headers, max_in_flight)
             VALUES ('m', 'https://n.test/', '{\"Authorization\": \"Bearer tok\"}', 0)",
        );
        assert_eq!(d, "22023 | column: max_in_flight");
        let d = diagnostics_of("SELECT postback.sign('x', 'k', 'md5')");
        assert!(d.starts_with("22023 | argument: scheme | one of hmac-sha256-hex"), "{d}");
        let d = diagnostics_of("SELECT postback.sign('x', '', 'github')");
        assert_eq!(d, "22023 | argument: secret");
        let d = diagnostics_of(
            "INSERT INTO postback.endpoints (name, url_template) VALUES ('u', 'https://{click_id}.n.test/')",
        );
        assert!(d.starts_with("22023 | column: url_template | Write the scheme and host literally"), "{d}");
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let d = diagnostics_of(&format!(
            "INSERT INTO postback.clicks (click_id, attributes) VALUES ('deep', '{{\"a\": {deep}}}')"
        ));
        assert!(d.starts_with("23514 | column: clicks.attributes | Store deeply nested data elsewhere"), "{d}");
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id, partner) VALUES ('c', 'moves', 'net-a')")
            .unwrap();
        let d = diagnostics_of("UPDATE postback.conversions SET partner = 'net-b' WHERE transaction_id = 'moves'");
        assert!(d.starts_with("23001 | column: partner | Insert a conversion with another transaction_id"), "{d}");
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
            "invalid kind: \"sms\" is not one of postback, webhook",
        );
        assert_refused(
            &format!("{ins} VALUES ('b', 'webhook', 'https://x.test/', 'md5')"),
            "invalid signing_scheme: \"md5\" is not one of none, hmac-sha256-hex",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, statuses) VALUES ('c', 'https://x.test/', '{approved,paid}')",
            "invalid statuses: \"paid\" is not one of pending, approved",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, retry_schedule) VALUES ('d', 'https://x.test/', '{1 minute,-1 second}')",
            "invalid retry_schedule: step 2 is -1 s; every step must be positive",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, timeout) VALUES ('e', 'https://x.test/', '1 hour')",
            "invalid timeout: 3600 is outside 1 millisecond to 5 minutes (seconds)",
        );
        insert_endpoint("dup");
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template) VALUES ('dup', 'https://x.test/')",
            "endpoint_name_is_unique",
        );
    }

    #[pg_test]
    fn secrets_status_maps_events_and_amounts_are_checked_when_given() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, kind, url_template, signing_scheme)
             VALUES ('sw', 'webhook', 'https://x.test/', 'standard-webhooks'),
                    ('hx', 'webhook', 'https://x.test/', 'hmac-sha256-hex')",
        )
        .unwrap();
        let secret = |endpoint: &str, secret: &str| {
            format!(
                "INSERT INTO postback.endpoint_secrets (endpoint_id, secret)
                 SELECT id, '{secret}' FROM postback.endpoints WHERE name = '{endpoint}'"
            )
        };
        let e = error_of(&secret("sw", "my-plain-secret")).expect("a plain secret is refused for standard-webhooks");
        assert!(e.contains("invalid secret: standard-webhooks secret must start with \"whsec_\""), "{e}");
        assert!(!e.contains("my-plain-secret"), "the secret is never quoted: {e}");
        assert_eq!(error_of(&secret("sw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")), None);
        assert_eq!(error_of(&secret("hx", "my-plain-secret")), None);
        // a scheme change must fit the live secrets
        assert_refused(
            "UPDATE postback.endpoints SET signing_scheme = 'standard-webhooks' WHERE name = 'hx'",
            "invalid secret: standard-webhooks secret must start with",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, status_map) VALUES ('sm', 'https://x.test/', '{\"aproved\": \"1\"}')",
            "invalid status_map: \"aproved\" is not a conversion status (one of pending, approved",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, status_map) VALUES ('sm', 'https://x.test/', '{\"approved\": null}')",
            "invalid status_map: the value of \"approved\" must be a string or a number",
        );
        assert_refused(
            "INSERT INTO postback.endpoints (name, url_template, events) VALUES ('ev', 'https://x.test/', '{Sale}')",
            "invalid events: \"Sale\" can never match a conversion's event",
        );
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, amount) VALUES ('c', 'inf', 'Infinity')",
            "amount_must_be_a_finite_number",
        );
        assert_refused(
            "INSERT INTO postback.conversions (click_id, transaction_id, amount) VALUES ('c', 'ninf', '-Infinity')",
            "amount_must_be_a_finite_number",
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
        assert_refused(
            "DELETE FROM postback.endpoints WHERE name = 'guarded'",
            "cannot delete endpoint 'guarded': it still has deliveries",
        );
        assert_refused(
            "DELETE FROM postback.conversions WHERE transaction_id = 'guard-1'",
            "cannot delete conversion 'guard-1': it still",
        );
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
    fn delivery_methods_are_constrained() {
        insert_endpoint("m");
        Spi::run("INSERT INTO postback.conversions (click_id, transaction_id) VALUES ('c', 'mt')").unwrap();
        assert_refused(
            "UPDATE postback.deliveries SET method = E'GET / HTTP/1.1\\r\\nX: y'",
            "delivery_method_must_be_get_post_put_or_patch",
        );
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
            ("initial_delay = '2 days'", "invalid initial_delay: 172800 is outside 0 to 1 day (seconds)"),
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
