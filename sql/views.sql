-- Views and functions for operators and analysts.

-- SECURITY DEFINER: reading shared_preload_libraries needs pg_read_all_settings,
-- and analysts should get the hint too.
CREATE FUNCTION postback.worker_status(
    OUT running        boolean,
    OUT pid            integer,
    OUT started_at     timestamptz,
    OUT database       name,
    OUT last_wake      timestamptz,
    OUT sent           bigint,
    OUT succeeded      bigint,
    OUT failed         bigint,
    OUT in_flight      integer,
    OUT last_error     text,
    OUT last_error_at  timestamptz,
    OUT hint           text,
    OUT concurrency    integer,
    OUT slow_endpoints integer,
    OUT in_flight_slow integer,
    OUT worker         integer,
    OUT workers        integer,
    OUT state          text,
    OUT role           text)
RETURNS SETOF record
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    -- one row per worker the launcher runs (every database's, this one's
    -- first); and when none serves this database, one row saying why
    WITH s AS (SELECT * FROM postback.worker_stats()),
         listed AS (SELECT btrim(x, ' "') AS name
                      FROM regexp_split_to_table(current_setting('postback.database_name', true), ',') AS x),
         rows AS (
             SELECT a.pid IS NOT NULL AS running, a.pid, coalesce(s.started_at, a.backend_start) AS started_at,
                    s.database::name AS database, s.last_wake, s.sent, s.succeeded, s.failed, s.in_flight,
                    s.last_error, s.last_error_at,
                    CASE WHEN a.pid IS NULL THEN coalesce(s.state, 'not running: see the server log') END AS hint,
                    s.concurrency, s.slow_endpoints, s.in_flight_slow, s.worker, s.workers, s.state, s.role
               FROM s
               LEFT JOIN pg_catalog.pg_stat_activity a
                      ON a.pid = s.pid AND a.backend_type IN ('pg_postback worker', 'pg_postback maintenance')
             UNION ALL
             SELECT false, NULL, NULL, current_database(), NULL, 0, 0, 0, 0, NULL, NULL,
                    CASE
                        WHEN current_setting('shared_preload_libraries') !~ '(^|[\s,])pg_postback($|[\s,])'
                        THEN 'pg_postback is not in shared_preload_libraries: add it and restart PostgreSQL. '
                             'Deliveries are queued and wait until the worker runs.'
                        WHEN NOT EXISTS (SELECT 1 FROM listed l
                                          JOIN pg_catalog.pg_database x ON x.datname = l.name)
                        THEN format('postback.database_name = %L names no database, so no worker runs for it: '
                                    'create it, or set postback.database_name = %L (or add %L to the list) and '
                                    'reload. Deliveries queued here wait.',
                                    current_setting('postback.database_name', true), current_database(),
                                    current_database())
                        WHEN NOT EXISTS (SELECT 1 FROM listed l WHERE l.name = current_database())
                        THEN format('the workers serve postback.database_name = %L, not this database (%L): '
                                    'deliveries queued here wait, and NOTIFY postback_alerts is sent there. Set '
                                    'postback.database_name = %L (or add it to the list) and reload to serve this one.',
                                    current_setting('postback.database_name', true), current_database(),
                                    current_database())
                             || coalesce(' Listed but no database: '
                                         || (SELECT string_agg(quote_literal(l.name), ', ') FROM listed l
                                              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database x
                                                                 WHERE x.datname = l.name)) || '.', '')
                        ELSE 'no worker runs for this database yet: the pg_postback launcher starts one within '
                             'seconds (and again after a crash); if none comes, check the server log and '
                             'max_worker_processes.'
                    END,
                    NULL, 0, 0, NULL, NULL, NULL, NULL
              WHERE NOT EXISTS (SELECT 1 FROM s WHERE s.database = current_database()))
    SELECT * FROM rows r ORDER BY r.database <> current_database(), r.database, r.role, r.worker
$$;

CREATE VIEW postback.delivery_summary AS
SELECT e.id                                                    AS endpoint_id,
       e.name                                                  AS endpoint,
       e.active,
       count(d.id) FILTER (WHERE d.state = 'pending')          AS pending,
       count(d.id) FILTER (WHERE d.state = 'in_flight')        AS in_flight,
       count(d.id) FILTER (WHERE d.state = 'succeeded')        AS succeeded,
       count(d.id) FILTER (WHERE d.state = 'dead')             AS dead,
       min(d.created_at) FILTER (WHERE d.state IN ('pending', 'in_flight')) AS oldest_unfinished_at
  FROM postback.endpoints e
  LEFT JOIN postback.deliveries d ON d.endpoint_id = e.id
 GROUP BY e.id, e.name, e.active;

-- How many conversions could be attributed to a recorded click: per partner
-- (NULL = conversions with no known partner) and overall, last 24 h (from the
-- hour) and all time. From conversion_rollup plus the hours not rolled up yet:
-- a click recorded after its conversion was rolled up is not counted.
CREATE VIEW postback.match_rate AS
WITH by_hour AS (
    SELECT r.hour, r.partner, r.matched, r.conversions FROM postback.conversion_rollup r
    UNION ALL
    SELECT x.hour, x.partner, x.matched, x.conversions FROM postback.conversion_rollup_changes x
    UNION ALL
    SELECT date_trunc('hour', c.created_at, 'UTC'), coalesce(c.partner, ''), k.click_id IS NOT NULL, 1
      FROM postback.conversions c
      LEFT JOIN postback.clicks k ON k.click_id = c.click_id
     WHERE c.created_at >= coalesce((SELECT s.conversions_until FROM postback.rollup_state s), '-infinity')),
windowed AS (
    SELECT nullif(b.partner, '') AS partner, b.matched, b.conversions,
           b.hour >= date_trunc('hour', now() - interval '24 hours', 'UTC') AS recent
      FROM by_hour b)
SELECT w.partner,
       coalesce(sum(w.conversions) FILTER (WHERE w.recent), 0)::bigint                           AS conversions_24h,
       coalesce(sum(w.conversions) FILTER (WHERE w.recent AND w.matched), 0)::bigint             AS matched_24h,
       round(sum(w.conversions) FILTER (WHERE w.recent AND w.matched)
             / nullif(sum(w.conversions) FILTER (WHERE w.recent), 0), 4)                        AS match_rate_24h,
       coalesce(sum(w.conversions), 0)::bigint                                                   AS conversions,
       coalesce(sum(w.conversions) FILTER (WHERE w.matched), 0)::bigint                          AS matched,
       round(sum(w.conversions) FILTER (WHERE w.matched) / nullif(sum(w.conversions), 0), 4)    AS match_rate,
       grouping(w.partner) = 1                                                                   AS overall
  FROM windowed w
 GROUP BY GROUPING SETS ((w.partner), ());
