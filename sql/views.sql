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
    OUT in_flight_slow integer)
RETURNS record
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    -- running: a worker serves this database (one serving another does not)
    SELECT a.pid IS NOT NULL AND a.datname = current_database(),
           a.pid,
           coalesce(s.started_at, a.backend_start),
           a.datname,
           s.last_wake, coalesce(s.sent, 0), coalesce(s.succeeded, 0), coalesce(s.failed, 0),
           coalesce(s.in_flight, 0), s.last_error, s.last_error_at,
           CASE
               WHEN a.pid IS NOT NULL AND a.datname = current_database() THEN NULL
               WHEN current_setting('shared_preload_libraries') !~ '(^|[\s,])pg_postback($|[\s,])'
               THEN 'pg_postback is not in shared_preload_libraries: add it and restart PostgreSQL. '
                    'Deliveries are queued and wait until the worker runs.'
               WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database x WHERE x.datname = served.name)
               THEN format('postback.database_name = %L names no database, so no worker runs: create it, or '
                           'set postback.database_name = %L and reload. Deliveries queued here wait.',
                           served.name, current_database())
               WHEN served.name <> current_database()
               THEN format('the worker serves database %L (postback.database_name), not this one (%L): '
                           'deliveries queued here wait, and NOTIFY postback_alerts is sent there. Set '
                           'postback.database_name = %L and reload to serve this one.',
                           served.name, current_database(), current_database())
               ELSE 'the worker is not running; the postmaster restarts it within seconds after a '
                    'crash. Check the server log (postback.database_name = '
                    || quote_literal(served.name) || ').'
           END,
           s.concurrency, coalesce(s.slow_endpoints, 0), coalesce(s.in_flight_slow, 0)
      FROM (SELECT current_setting('postback.database_name', true) AS name) AS served
      LEFT JOIN pg_catalog.pg_stat_activity a ON a.backend_type = 'pg_postback worker'
      LEFT JOIN postback.worker_stats() s ON true
     LIMIT 1
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
-- (NULL = conversions with no known partner) and overall, last 24 h and all time.
CREATE VIEW postback.match_rate AS
SELECT c.partner,
       count(*) FILTER (WHERE c.created_at > now() - interval '24 hours')                        AS conversions_24h,
       count(k.click_id) FILTER (WHERE c.created_at > now() - interval '24 hours')               AS matched_24h,
       round(count(k.click_id) FILTER (WHERE c.created_at > now() - interval '24 hours')::numeric
             / nullif(count(*) FILTER (WHERE c.created_at > now() - interval '24 hours'), 0), 4) AS match_rate_24h,
       count(*)                                                                                  AS conversions,
       count(k.click_id)                                                                         AS matched,
       round(count(k.click_id)::numeric / nullif(count(*), 0), 4)                                AS match_rate,
       grouping(c.partner) = 1                                                                   AS overall
  FROM postback.conversions c
  LEFT JOIN postback.clicks k ON k.click_id = c.click_id
 GROUP BY GROUPING SETS ((c.partner), ());
