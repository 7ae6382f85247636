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
}
