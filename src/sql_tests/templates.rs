//! Rendering, signing and preview as SQL sees them.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[allow(unused_imports)]
    use crate::sql_tests::helpers::*;

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
            "invalid signing_scheme: a postback (GET) is signed with hmac-sha256-hex or hmac-sha256-base64, not \"stripe\"",
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
    fn render_refuses_a_hash_over_the_secret_instead_of_leaving_it_out() {
        assert_refused(
            "SELECT postback.render('https://x.test/?h={hash:md5:click_id,secret}&c=1', '{\"click_id\": \"a\"}')",
            "{hash:…} over the secret is computed when the request is sent",
        );
    }
}
