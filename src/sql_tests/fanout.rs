//! Which deliveries a conversion creates: fan-out, routing by partner, statuses, duplicates, render failures.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[allow(unused_imports)]
    use crate::sql_tests::helpers::*;

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
            "violates unique constraint \"transaction_id_is_unique_use_on_conflict_do_nothing_to_skip\"",
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

    #[pg_test]
    fn explain_says_for_every_endpoint_whether_it_fired_and_why_not() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template, partners, events, conditions, active) VALUES
                 ('x-fired', 'https://n.test/a?c={click_id}', '{net-a}', '{sale}', NULL, true),
                 ('x-inactive', 'https://n.test/b', NULL, NULL, NULL, false),
                 ('x-partner', 'https://n.test/c', '{net-b}', NULL, NULL, true),
                 ('x-event', 'https://n.test/d', NULL, '{sales}', NULL, true),
                 ('x-condition', 'https://n.test/e', NULL, NULL, '{\"offer_id\": \"12\"}', true);
             INSERT INTO postback.conversions (click_id, transaction_id, event, partner, attributes, created_at)
             VALUES ('c-x', 'tx-explain', 'sale', 'net-a', '{\"offer_id\": 12}', now() - interval '1 hour');
             INSERT INTO postback.endpoints (name, url_template) VALUES ('x-later', 'https://n.test/f');",
        )
        .unwrap();
        let reason = |endpoint: &str| {
            Spi::get_one_with_args::<String>(
                "SELECT coalesce(fired::text || ' | ' || reason, 'no row')
                   FROM postback.explain('tx-explain') WHERE endpoint = $1",
                &[endpoint.into()],
            )
            .unwrap()
            .unwrap_or_default()
        };
        assert_eq!(reason("x-fired"), "true | fired");
        assert_eq!(reason("x-inactive"), "false | not fired: the endpoint is inactive (active = false)");
        assert_eq!(reason("x-partner"), "false | not fired: partner \"net-a\" is not in partners {net-b}");
        assert_eq!(reason("x-event"), "false | not fired: event \"sale\" is not in events {sales}");
        assert_eq!(
            reason("x-condition"),
            "false | not fired: condition offer_id = \"12\" does not match: the attributes have offer_id = 12"
        );
        assert!(
            reason("x-later").starts_with("false | not fired: the endpoint was created at"),
            "{}",
            reason("x-later")
        );
        let (states, announced) = Spi::get_two::<Vec<String>, Vec<String>>(
            "SELECT states, announced FROM postback.explain('tx-explain') WHERE endpoint = 'x-fired'",
        )
        .unwrap();
        assert_eq!((states.unwrap(), announced.unwrap()), (vec!["pending".to_string()], vec!["approved".to_string()]));
        // a later status the endpoint does not announce
        Spi::run(
            "UPDATE postback.endpoints SET statuses = '{approved}' WHERE name = 'x-fired';
                  UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id = 'tx-explain'",
        )
        .unwrap();
        assert_eq!(
            reason("x-fired"),
            "true | fired for an earlier status; not for the current one: status \"reversed\" is not in statuses {approved}"
        );
        assert_refused(
            "SELECT * FROM postback.explain('no-such-tx')",
            "no conversion has transaction_id \"no-such-tx\"",
        );
        assert_refused("SELECT * FROM postback.explain(-1::bigint)", "unknown conversion id -1");
    }
}
