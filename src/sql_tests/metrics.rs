//! postback.metrics from delivery_rollup: the same figures before and after a
//! roll-up, and after the deliveries are purged.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn figures() -> String {
        Spi::get_one::<String>(
            "SELECT string_agg(format('%s/%s/%s/%s/%s/%s', period, breakdown, coalesce(event, endpoint, partner, '-'),
                                      deliveries_finished, deliveries_succeeded, deliveries_dead), ' '
                               ORDER BY period, breakdown, coalesce(event, endpoint, partner, '-'))
               FROM postback.metrics",
        )
        .unwrap()
        .unwrap_or_default()
    }

    #[pg_test]
    fn metrics_are_the_same_before_and_after_a_roll_up_and_after_the_purge() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template, paused_at) VALUES ('m1', 'https://m.test/a', now());
             INSERT INTO postback.conversions (click_id, transaction_id, event, partner, created_at)
             SELECT 'c' || g, 'mx-' || g, (ARRAY['sale', 'lead'])[1 + g % 2], 'net-' || (g % 3),
                    now() - interval '10 minutes' - (g % 300) * interval '1 hour'
               FROM generate_series(1, 600) g;
             UPDATE postback.deliveries d
                SET state = CASE WHEN c.id % 10 = 0 THEN 'dead' ELSE 'succeeded' END,
                    created_at = c.created_at, completed_at = c.created_at + interval '150 ms'
               FROM postback.conversions c WHERE c.id = d.conversion_id",
        )
        .unwrap();
        let before = figures();
        assert!(before.contains("all/total/-/600/"), "{before}");
        assert!(before.contains("all/partner/net-0/200/"), "{before}");
        assert_eq!(Spi::get_one::<bool>("SELECT postback.roll_up('1 year')").unwrap(), Some(false));
        assert!(
            Spi::get_one::<i64>("SELECT count(*) FROM postback.delivery_rollup WHERE span = 'day'").unwrap() > Some(0)
        );
        assert_eq!(figures(), before);
        let p95 = Spi::get_one::<f64>(
            "SELECT p95_commit_to_success_ms::float8 FROM postback.metrics WHERE period = 'all' AND breakdown = 'total'",
        )
        .unwrap()
        .unwrap();
        assert!((p95 / 150.0 - 1.0).abs() < 0.09, "{p95}");
        // the rollup keeps the history once the deliveries are gone (all finished before the last minute)
        Spi::run("DELETE FROM postback.deliveries").unwrap();
        assert_eq!(figures(), before);
        // a second roll-up adds nothing twice
        Spi::run("SELECT postback.roll_up('1 year')").unwrap();
        assert_eq!(figures(), before);
    }

    // Conversion figures (metrics' total rows and match_rate) come from
    // conversion_rollup: equal to counting the conversions themselves, before and
    // after a roll-up, after status changes, deletes and back-dated inserts of rows
    // it already counts.

    /// What the views say, one string.
    fn said() -> String {
        Spi::get_one::<String>(
            "SELECT (SELECT string_agg(format('%s:%s/%s/%s', period, conversions, reversal_rate, match_rate), ' '
                                       ORDER BY period)
                       FROM postback.metrics WHERE breakdown = 'total')
                    || ' | ' ||
                    (SELECT string_agg(format('%s:%s/%s/%s/%s', coalesce(partner, '-'), conversions_24h, matched_24h,
                                              conversions, matched), ' ' ORDER BY overall, partner)
                       FROM postback.match_rate)",
        )
        .unwrap()
        .unwrap_or_default()
    }

    /// The same figures counted from the conversions and clicks.
    fn counted() -> String {
        Spi::get_one::<String>(
            "WITH c AS (SELECT c.*, k.click_id IS NOT NULL AS matched,
                               date_trunc('hour', c.created_at, 'UTC') AS hour
                          FROM postback.conversions c LEFT JOIN postback.clicks k ON k.click_id = c.click_id),
                  w (period, since) AS (VALUES ('24h', date_trunc('hour', now() - interval '24 hours', 'UTC')),
                                               ('7d', date_trunc('hour', now() - interval '7 days', 'UTC')),
                                               ('all', '-infinity'::timestamptz)),
                  m AS (SELECT w.period, count(c.id) AS n,
                               round(count(c.id) FILTER (WHERE c.status IN ('reversed', 'refunded', 'chargeback'))::numeric
                                     / nullif(count(c.id) FILTER (WHERE c.status IN ('approved', 'reversed', 'refunded',
                                                                                    'chargeback')), 0), 4) AS rr,
                               round(count(c.id) FILTER (WHERE c.matched)::numeric / nullif(count(c.id), 0), 4) AS mr
                          FROM w LEFT JOIN c ON c.hour >= w.since GROUP BY w.period),
                  r AS (SELECT c.partner, grouping(c.partner) = 1 AS overall,
                               count(*) FILTER (WHERE c.hour >= date_trunc('hour', now() - interval '24 hours', 'UTC')) AS n24,
                               count(*) FILTER (WHERE c.matched AND c.hour >= date_trunc('hour', now() - interval '24 hours', 'UTC')) AS m24,
                               count(*) AS n, count(*) FILTER (WHERE c.matched) AS m
                          FROM c GROUP BY GROUPING SETS ((c.partner), ()))
             SELECT (SELECT string_agg(format('%s:%s/%s/%s', period, n, rr, mr), ' ' ORDER BY period) FROM m)
                    || ' | ' ||
                    (SELECT string_agg(format('%s:%s/%s/%s/%s', coalesce(partner, '-'), n24, m24, n, m), ' '
                                       ORDER BY overall, partner) FROM r)",
        )
        .unwrap()
        .unwrap_or_default()
    }

    #[pg_test]
    fn conversion_figures_stay_true_through_roll_ups_and_changes() {
        // 400 conversions over the last 20 days, half with a recorded click, three partners and none
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template, paused_at) VALUES ('m2', 'https://m.test/a', now());
             INSERT INTO postback.clicks (click_id) SELECT 'k' || g FROM generate_series(1, 400, 2) g;
             INSERT INTO postback.conversions (click_id, transaction_id, event, status, partner, created_at)
             SELECT 'k' || g, 'cr-' || g, 'sale', CASE WHEN g % 7 = 0 THEN 'reversed' ELSE 'approved' END,
                    CASE WHEN g % 4 = 0 THEN NULL ELSE 'net-' || (g % 3) END,
                    now() - (g % 480) * interval '1 hour' - interval '5 minutes'
               FROM generate_series(1, 400) g;
             UPDATE postback.deliveries d SET state = 'succeeded', created_at = c.created_at,
                    completed_at = c.created_at + interval '150 ms'
               FROM postback.conversions c WHERE c.id = d.conversion_id",
        )
        .unwrap();
        let truth = counted();
        assert!(truth.contains("all:400/"), "{truth}");
        assert_eq!(said(), truth);
        assert_eq!(Spi::get_one::<bool>("SELECT postback.roll_up('1 year')").unwrap(), Some(false));
        assert!(
            Spi::get_one::<i64>("SELECT sum(conversions)::bigint FROM postback.conversion_rollup").unwrap() > Some(300),
            "most conversions are rolled up (those over an hour old)"
        );
        assert!(
            Spi::get_one::<i64>("SELECT count(*) FROM postback.conversion_rollup WHERE span = 'day'").unwrap()
                > Some(0)
        );
        assert_eq!(said(), truth);
        // rows the rollup already counts change: status, deleted, back-dated inserts
        Spi::run(
            "UPDATE postback.conversions SET status = 'reversed' WHERE transaction_id IN ('cr-10', 'cr-11', 'cr-200');
             INSERT INTO postback.conversions (click_id, transaction_id, event, partner, created_at)
             VALUES ('k1', 'late-1', 'sale', 'net-1', now() - interval '3 days'),
                    ('nope', 'late-2', 'sale', NULL, now() - interval '30 days')",
        )
        .unwrap();
        Spi::run(
            "DELETE FROM postback.deliveries d USING postback.conversions c
                  WHERE c.id = d.conversion_id AND c.transaction_id IN ('cr-12', 'cr-399')",
        )
        .unwrap();
        Spi::run("DELETE FROM postback.conversions WHERE transaction_id IN ('cr-12', 'cr-399')").unwrap();
        let changed = counted();
        assert_ne!(changed, truth);
        assert_eq!(said(), changed, "changes appended, not merged yet");
        // a back-dated row skipped by ON CONFLICT DO NOTHING is not counted
        Spi::run(
            "INSERT INTO postback.conversions (click_id, transaction_id, event, created_at)
             VALUES ('k1', 'late-1', 'sale', now() - interval '3 days') ON CONFLICT (transaction_id) DO NOTHING",
        )
        .unwrap();
        assert_eq!(said(), changed, "a skipped duplicate is not counted");
        Spi::run("SELECT postback.roll_up('1 year')").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM postback.conversion_rollup_changes").unwrap(), Some(0));
        assert_eq!(said(), changed, "changes merged");
    }

    /// endpoint_health's 24-hour attempt percentiles: from the attempts before a
    /// roll-up, from attempt_rollup after it, and close to the exact percentiles.
    #[pg_test]
    fn endpoint_health_day_percentiles_are_the_same_from_attempt_rollup() {
        Spi::run(
            "INSERT INTO postback.endpoints (name, url_template, paused_at) VALUES ('h1', 'https://h.test/a', now());
             INSERT INTO postback.conversions (click_id, transaction_id, event)
             SELECT 'c' || g, 'hx-' || g, 'sale' FROM generate_series(1, 300) g;
             INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, duration_ms, status_code, outcome)
             SELECT d.id, 1, now() - interval '3 hours' - (d.id % 120) * interval '1 minute',
                    5 + (d.id % 100) * 3, 200, 'succeeded'
               FROM postback.deliveries d",
        )
        .unwrap();
        let day = || {
            Spi::get_two::<f64, f64>(
                "SELECT p50_ms_24h::float8, p95_ms_24h::float8 FROM postback.endpoint_health WHERE endpoint = 'h1'",
            )
            .unwrap()
        };
        let (exact50, exact95) = Spi::get_two::<f64, f64>(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) FROM postback.attempts",
        )
        .unwrap();
        let before = day();
        let (p50, p95) = (before.0.unwrap(), before.1.unwrap());
        assert!((p50 / exact50.unwrap() - 1.0).abs() < 0.1, "{p50} vs {exact50:?}");
        assert!((p95 / exact95.unwrap() - 1.0).abs() < 0.1, "{p95} vs {exact95:?}");
        Spi::run("SELECT postback.roll_up('1 year')").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT sum(attempts)::bigint FROM postback.attempt_rollup").unwrap(),
            Some(300)
        );
        assert_eq!(day(), before);
        // the last hour's figures come from the attempts (none in the last hour here)
        assert_eq!(
            Spi::get_one::<bool>("SELECT p50_ms_1h IS NULL FROM postback.endpoint_health WHERE endpoint = 'h1'")
                .unwrap(),
            Some(true)
        );
    }
}
