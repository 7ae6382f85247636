-- Operating pg_postback from SQL: retry, replay, test, pause, retention, and
-- the views operators and analysts read. The functions that write deliveries
-- or endpoints run as the owner (SECURITY DEFINER, pinned search_path) and
-- are granted to operators by postback.grant_operator.

-- The endpoint named `endpoint`, or a clear error.
CREATE FUNCTION postback.endpoint_id(endpoint text) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found bigint;
BEGIN
    IF endpoint IS NULL THEN
        RAISE EXCEPTION 'endpoint must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT e.id INTO found FROM postback.endpoints e WHERE e.name = endpoint_id.endpoint;
    IF found IS NULL THEN
        RAISE EXCEPTION 'unknown endpoint "%"', endpoint
            USING ERRCODE = 'no_data_found', HINT = 'SELECT name FROM postback.endpoints lists them.';
    END IF;
    RETURN found;
END
$$;

-- Sends finished deliveries again now. Attempts are kept and numbering
-- continues; the delivery gets a fresh attempt budget and max_age. One that
-- never rendered, or whose endpoint's request settings were edited since it
-- was rendered, is rendered again from its conversion first (and stays dead
-- with the reason if it still does not render). A test delivery has no
-- conversion: it is resent only as it was, while its endpoint is unchanged.
CREATE FUNCTION postback.resend(ids bigint[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    PERFORM postback.rerender(ARRAY(
        SELECT d.id FROM postback.deliveries d JOIN postback.endpoints e ON e.id = d.endpoint_id
         WHERE d.id = ANY (ids) AND d.state IN ('succeeded', 'dead') AND d.conversion_id IS NOT NULL
           AND (NOT d.rendered OR d.rendered_at < e.revised_at)));
    UPDATE postback.deliveries d
       SET state = 'pending', next_attempt_at = now(), completed_at = NULL, last_error = NULL,
           attempt_offset = d.attempts, age_credit = now() - d.created_at
      FROM postback.endpoints e
     WHERE d.id = ANY (ids) AND d.state IN ('succeeded', 'dead') AND d.rendered
       AND e.id = d.endpoint_id AND d.rendered_at >= e.revised_at;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM postback.wake_worker();
    END IF;
    RETURN n;
END
$$;

CREATE FUNCTION postback.retry(delivery_id bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current text;
    is_test boolean;
    why text;
BEGIN
    IF postback.is_distributed() THEN
        -- Citus locks no rows of a query across shards; resend's UPDATE
        -- still takes each delivery only in a state it may leave
        SELECT d.state, d.conversion_id IS NULL INTO current, is_test
          FROM postback.deliveries d WHERE d.id = retry.delivery_id;
    ELSE
        SELECT d.state, d.conversion_id IS NULL INTO current, is_test
          FROM postback.deliveries d WHERE d.id = retry.delivery_id FOR UPDATE;
    END IF;
    IF current IS NULL THEN
        RAISE EXCEPTION 'unknown delivery id %', delivery_id USING ERRCODE = 'no_data_found';
    ELSIF current NOT IN ('succeeded', 'dead') THEN
        RAISE EXCEPTION 'delivery % is % already; only succeeded or dead deliveries are retried', delivery_id, current
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF postback.resend(ARRAY[delivery_id]) = 0 THEN
        SELECT d.last_error INTO why FROM postback.deliveries d WHERE d.id = retry.delivery_id;
        IF is_test THEN
            RAISE EXCEPTION 'test delivery % cannot be sent again: its endpoint was edited since, or it never rendered (%)',
                            delivery_id, coalesce(why, 'no error recorded')
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Run postback.send_test(endpoint) for a new test request.';
        END IF;
        RAISE EXCEPTION 'delivery % does not render, so there is nothing to send: %', delivery_id, why
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Fix the endpoint or the conversion; postback.preview(endpoint, conversion_id) shows what would be sent now.';
    END IF;
    RETURN delivery_id;
END
$$;

CREATE FUNCTION postback.retry_dead(endpoint text, since timestamptz DEFAULT now() - interval '1 day')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- looked up once (on Citus a look-up inside the shards' query is refused)
    eid bigint := postback.endpoint_id(endpoint);
BEGIN
    IF since IS NULL OR since > now() THEN
        RAISE EXCEPTION 'since must be a time in the past (got %)', since USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN postback.resend(ARRAY(
        SELECT d.id FROM postback.deliveries d
         WHERE d.endpoint_id = eid AND d.state = 'dead' AND d.completed_at >= since));
END
$$;

-- Re-sends what was sent in a window, with the same idempotency keys so the
-- partner can deduplicate, and the same requests unless the endpoint was
-- edited since (then as it renders them now). Test deliveries are left out.
CREATE FUNCTION postback.replay(endpoint text, since timestamptz, until timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    eid bigint := postback.endpoint_id(endpoint);
BEGIN
    IF since IS NULL OR until IS NULL OR since >= until THEN
        RAISE EXCEPTION 'replay needs since < until (got % and %)', since, until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- test deliveries (no conversion) are never replayed to the partner
    RETURN postback.resend(ARRAY(
        SELECT d.id FROM postback.deliveries d
         WHERE d.endpoint_id = eid AND d.state = 'succeeded'
           AND d.conversion_id IS NOT NULL AND d.created_at >= since AND d.created_at < until));
END
$$;

-- Enqueues a test request with clearly marked sample values (click id
-- TEST-CLICK, amount 0.00, …; `sample` overrides any of them), delivered by
-- the worker like any other. Test deliveries have no conversion.
CREATE FUNCTION postback.send_test(endpoint text, sample jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e postback.endpoints;
    r record;
    made bigint;
BEGIN
    IF sample IS NULL OR jsonb_typeof(sample) <> 'object' THEN
        RAISE EXCEPTION 'sample must be a JSON object of values to override (got %)', coalesce(jsonb_typeof(sample), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO e FROM postback.endpoints WHERE id = postback.endpoint_id(endpoint);
    SELECT * INTO r FROM postback.test_request(e.id, sample);
    -- a request that could not be rendered is kept dead with its reason and
    -- nothing to send (rendered = false: no retry can ever send it)
    INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, body,
                                     state, completed_at, last_error, success_pattern, url_hashes, rendered)
    VALUES (e.id, NULL, r.event, r.status, r.idempotency_key, e.method, coalesce(r.url, ''), r.body,
            CASE WHEN r.error IS NULL THEN 'pending' ELSE 'dead' END, CASE WHEN r.error IS NOT NULL THEN now() END,
            r.error, r.success_pattern, r.url_hashes, r.error IS NULL)
    RETURNING id INTO made;
    PERFORM postback.wake_worker();
    RETURN made;
END
$$;

-- Pausing keeps deliveries waiting without spending attempts or max_age.
CREATE FUNCTION postback.pause(endpoint text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    eid bigint := postback.endpoint_id(endpoint);
BEGIN
    -- (no coalesce: Citus refuses now() inside one on a reference table)
    UPDATE postback.endpoints SET paused_at = now() WHERE id = eid AND paused_at IS NULL;
END
$$;

CREATE FUNCTION postback.resume(endpoint text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    eid bigint := postback.endpoint_id(endpoint);
    was timestamptz;
BEGIN
    SELECT paused_at INTO was FROM postback.endpoints WHERE id = eid FOR UPDATE;
    IF was IS NULL THEN
        RETURN;
    END IF;
    -- (the endpoint first: on Citus a reference table cannot be written after
    -- a parallel write to the shards in one transaction)
    UPDATE postback.endpoints SET paused_at = NULL WHERE id = eid;
    -- the time spent paused does not count against max_age
    UPDATE postback.deliveries d
       SET age_credit = coalesce(d.age_credit, interval '0') + (now() - greatest(was, d.created_at))
     WHERE d.endpoint_id = eid AND d.state = 'pending';
    PERFORM postback.wake_worker();
END
$$;

-- Deletes finished deliveries (and their attempts) that completed before
-- now() - older_than, `batch` rows per statement, never waiting on a row the
-- worker holds. Dead deliveries only with include_dead. max_batches bounds one
-- call (the worker calls it one batch per transaction).
CREATE FUNCTION postback.purge(older_than interval, batch integer DEFAULT 10000,
                               include_dead boolean DEFAULT false, max_batches integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    total bigint := 0;
    n integer;
    rounds integer := 0;
    distributed boolean := postback.is_distributed();
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a positive interval (got %)', older_than USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch IS NULL OR batch < 1 OR batch > 1000000 THEN
        RAISE EXCEPTION 'batch must be between 1 and 1000000 (got %)', batch USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        -- by primary key (= ANY of an array): an IN (subquery) became a hash
        -- join over every delivery, so a batch cost the table, not the batch.
        -- Citus locks no rows of a query across shards: there finished
        -- deliveries, nobody's to hold anyway, are deleted without the lock
        EXECUTE pg_catalog.format($q$
            DELETE FROM postback.deliveries d
             WHERE d.id = ANY (ARRAY(SELECT x.id FROM postback.deliveries x
                                      WHERE x.completed_at < now() - $1
                                        AND (x.state = 'succeeded' OR ($2 AND x.state = 'dead'))
                                      LIMIT $3%s))$q$,
            CASE WHEN distributed THEN '' ELSE ' FOR UPDATE SKIP LOCKED' END)
        USING older_than, include_dead, batch;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        rounds := rounds + 1;
        EXIT WHEN n < batch OR rounds >= coalesce(max_batches, rounds + 1);
    END LOOP;
    RETURN total;
END
$$;

-- Deletes finished test deliveries (send_test: no conversion) created before
-- now() - older_than, with their attempts; real postbacks are never touched.
-- Operators may call it.
CREATE FUNCTION postback.purge_tests(older_than interval DEFAULT '0') RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a positive interval (got %)', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM postback.deliveries d
     WHERE d.conversion_id IS NULL AND d.state IN ('succeeded', 'dead') AND d.created_at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- ---------------------------------------------------------------------------
-- Views
-- ---------------------------------------------------------------------------

-- Why an endpoint's deliveries are not being sent now, if anything holds
-- them (one definition, read by endpoint_health and explain). It runs as the
-- owner (analysts read endpoint_health) and says only whether a live secret
-- exists, never what it is.
CREATE FUNCTION postback.held_by(endpoint_id bigint) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
             WHEN NOT e.active THEN 'inactive: set active = true to enqueue and send again'
             WHEN e.paused_at IS NOT NULL THEN 'paused: postback.resume(endpoint) sends again'
             WHEN postback.needs_secret(e.signing_scheme, e.url_template)
                  AND NOT EXISTS (SELECT 1 FROM postback.endpoint_secrets k
                                   WHERE k.endpoint_id = e.id AND (k.expires_at IS NULL OR k.expires_at > now()))
                 THEN 'no live secret: its deliveries wait until one is inserted into postback.endpoint_secrets'
             WHEN s.breaker = 'open' THEN 'circuit breaker open: a probe request goes out after the cooldown'
           END
      FROM postback.endpoints e
      LEFT JOIN postback.endpoint_state s ON s.endpoint_id = e.id
     WHERE e.id = held_by.endpoint_id
$$;

-- Per endpoint, the last hour and the last 24 hours, and now.
-- Attempt durations per endpoint for endpoint_health: p50/p95 over the last
-- hour, exact, from the attempts; over the last 24 hours (from the hour) from
-- attempt_rollup's histograms plus the minutes not rolled up yet, so the cost
-- follows the last hour, not the day or the history. Each attempt finds its
-- delivery's endpoint by one primary-key probe (a hash of every delivery read
-- the whole table). Runs without JIT: the planner prices those probes above
-- jit_optimize_above_cost and compiled the query for 600 ms to run it in 150.
CREATE FUNCTION postback.attempt_latency()
RETURNS TABLE (endpoint_id bigint, p50_ms_1h double precision, p95_ms_1h double precision,
               p50_ms_24h double precision, p95_ms_24h double precision)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    RETURN QUERY EXECUTE pg_catalog.format($q$
    WITH bounds AS (
        SELECT date_trunc('hour', now() - interval '24 hours', 'UTC') AS day_since,
               greatest(date_trunc('hour', now() - interval '24 hours', 'UTC'),
                        coalesce((SELECT s.attempts_until FROM postback.rollup_state s), '-infinity')) AS rolled),
    recent AS (
        SELECT d.endpoint_id, a.started_at, a.duration_ms
          FROM bounds b, postback.attempts a
          %s
         WHERE a.started_at >= least(now() - interval '1 hour', b.rolled) AND a.status_code IS NOT NULL),
    hour AS (
        SELECT r.endpoint_id,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY r.duration_ms) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms) AS p95
          FROM recent r WHERE r.started_at > now() - interval '1 hour'
         GROUP BY r.endpoint_id),
    day AS (
        SELECT h.endpoint_id, postback.histogram_sum(h.hist) AS hist
          FROM (SELECT r.endpoint_id, r.duration_hist AS hist
                  FROM bounds b, postback.attempt_rollup r
                 WHERE r.hour >= b.day_since AND r.hour < b.rolled
                UNION ALL
                SELECT r.endpoint_id, postback.latency_histogram(array_agg(r.duration_ms))
                  FROM bounds b, recent r
                 WHERE r.started_at >= b.rolled
                 GROUP BY r.endpoint_id) h
         GROUP BY h.endpoint_id)
    SELECT coalesce(h.endpoint_id, d.endpoint_id), h.p50, h.p95,
           postback.histogram_quantile(d.hist, 0.5), postback.histogram_quantile(d.hist, 0.95)
      FROM hour h FULL JOIN day d ON d.endpoint_id = h.endpoint_id$q$,
        CASE WHEN postback.is_distributed()
             -- on Citus the delivery is in the shard beside its attempt's (by click_id)
             THEN 'JOIN postback.deliveries d ON d.click_id = a.click_id AND d.id = a.delivery_id'
             ELSE 'CROSS JOIN LATERAL (SELECT x.endpoint_id FROM postback.deliveries x
                                       WHERE x.id = a.delivery_id LIMIT 1) d' END);
END
$$;

-- Each endpoint's failure record and breaker, as endpoint_health shows them.
-- On one node: postback.endpoint_state. On Citus with the tables distributed
-- every node's worker keeps its own (for the deliveries of its shards): the
-- nodes' rows merged per endpoint, from any node: the worst breaker (open,
-- then half-open), the most consecutive failures, the earliest failing_since
-- and slow_since, the latest success, and the error of the latest failure.
-- A node that cannot be reached adds nothing.
CREATE FUNCTION postback.cluster_endpoint_state() RETURNS SETOF postback.endpoint_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT postback.is_distributed() THEN
        RETURN QUERY SELECT * FROM postback.endpoint_state;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE $q$
    WITH s AS (
        SELECT x.*, CASE x.breaker WHEN 'open' THEN 0 WHEN 'half_open' THEN 1 ELSE 2 END AS worst
          FROM run_command_on_all_nodes(
                   'SELECT coalesce(pg_catalog.json_agg(s), ''[]'') FROM postback.endpoint_state s') r
         CROSS JOIN LATERAL pg_catalog.json_populate_recordset(
                   NULL::postback.endpoint_state, CASE WHEN r.success THEN r.result::json ELSE '[]' END) x)
    SELECT s.endpoint_id, max(s.consecutive_failures), max(s.last_success_at), max(s.last_failure_at),
           min(s.failing_since), (array_agg(s.last_error ORDER BY s.last_failure_at DESC NULLS LAST))[1],
           max(s.updated_at), (array_agg(s.breaker ORDER BY s.worst, s.breaker_since))[1],
           (array_agg(s.breaker_since ORDER BY s.worst, s.breaker_since))[1],
           (array_agg(s.breaker_reason ORDER BY s.worst, s.breaker_since))[1], min(s.slow_since)
      FROM s GROUP BY s.endpoint_id$q$;
END
$$;

CREATE VIEW postback.endpoint_health AS
WITH recent AS (
    SELECT d.endpoint_id,
           count(*) FILTER (WHERE d.created_at > now() - interval '1 hour')                              AS deliveries_1h,
           count(*) FILTER (WHERE d.created_at > now() - interval '1 hour' AND d.state = 'succeeded')    AS succeeded_1h,
           count(*) FILTER (WHERE d.created_at > now() - interval '1 hour' AND d.state = 'dead')         AS dead_1h,
           count(*)                                                                                      AS deliveries_24h,
           count(*) FILTER (WHERE d.state = 'succeeded')                                                 AS succeeded_24h,
           count(*) FILTER (WHERE d.state = 'dead')                                                      AS dead_24h
      FROM postback.deliveries d
     WHERE d.created_at > now() - interval '24 hours' AND d.conversion_id IS NOT NULL
     GROUP BY d.endpoint_id),
latency AS (
    SELECT * FROM postback.attempt_latency()),
backlog AS (
    -- each state through its partial index (one `state IN (…)` read the whole table)
    SELECT b.endpoint_id, count(*) AS pending, min(b.created_at) AS oldest_pending_at,
           count(*) FILTER (WHERE b.state = 'in_flight') AS in_flight
      FROM (SELECT d.endpoint_id, d.created_at, d.state FROM postback.deliveries d WHERE d.state = 'pending'
            UNION ALL
            SELECT d.endpoint_id, d.created_at, d.state FROM postback.deliveries d WHERE d.state = 'in_flight') b
     GROUP BY b.endpoint_id)
SELECT e.id AS endpoint_id, e.name AS endpoint, e.active, e.paused_at IS NOT NULL AS paused, e.paused_at,
       coalesce(r.deliveries_1h, 0) AS deliveries_1h, coalesce(r.succeeded_1h, 0) AS succeeded_1h,
       coalesce(r.dead_1h, 0) AS dead_1h,
       round(r.succeeded_1h::numeric / nullif(r.succeeded_1h + r.dead_1h, 0), 4) AS success_rate_1h,
       coalesce(r.deliveries_24h, 0) AS deliveries_24h, coalesce(r.succeeded_24h, 0) AS succeeded_24h,
       coalesce(r.dead_24h, 0) AS dead_24h,
       round(r.succeeded_24h::numeric / nullif(r.succeeded_24h + r.dead_24h, 0), 4) AS success_rate_24h,
       round(l.p50_ms_1h::numeric, 1) AS p50_ms_1h, round(l.p95_ms_1h::numeric, 1) AS p95_ms_1h,
       round(l.p50_ms_24h::numeric, 1) AS p50_ms_24h, round(l.p95_ms_24h::numeric, 1) AS p95_ms_24h,
       coalesce(s.consecutive_failures, 0) AS consecutive_failures, s.failing_since, s.last_success_at,
       CASE WHEN coalesce(s.consecutive_failures, 0) > 0 THEN s.last_error END AS last_error,
       coalesce(s.breaker, 'closed') AS breaker, s.breaker_since, s.breaker_reason,
       coalesce(b.pending, 0) AS pending, now() - b.oldest_pending_at AS oldest_pending_age,
       -- (held_by reads this node's breaker; on Citus another node's may be open)
       coalesce(postback.held_by(e.id), CASE WHEN s.breaker = 'open'
                THEN 'circuit breaker open: a probe request goes out after the cooldown' END) AS held_by,
       coalesce(b.in_flight, 0) AS in_flight, s.slow_since
  FROM postback.endpoints e
  LEFT JOIN recent r ON r.endpoint_id = e.id
  LEFT JOIN latency l ON l.endpoint_id = e.id
  LEFT JOIN backlog b ON b.endpoint_id = e.id
  LEFT JOIN postback.cluster_endpoint_state() s ON s.endpoint_id = e.id;

-- Finished deliveries (succeeded or dead) of conversions, counted per hour of
-- completion (UTC), endpoint, event and partner ('' for none), with their
-- commit-to-success latency (deliveries resent by hand left out): what
-- roll_up stores and what metrics adds for the hours not rolled up yet.
CREATE FUNCTION postback.finished_between(since timestamptz, until timestamptz)
RETURNS TABLE (hour timestamptz, endpoint_id bigint, event text, partner text, succeeded bigint, dead bigint,
               timed bigint, latency_ms_sum double precision, latency_hist bigint[], attempts bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- on Citus a conversion is found in the shard beside its delivery's (by click_id)
    RETURN QUERY EXECUTE pg_catalog.format($q$
    SELECT date_trunc('hour', d.completed_at, 'UTC'), d.endpoint_id, d.event, coalesce(c.partner, ''),
           count(*) FILTER (WHERE d.state = 'succeeded'),
           count(*) FILTER (WHERE d.state = 'dead'),
           count(*) FILTER (WHERE d.state = 'succeeded' AND d.attempt_offset = 0),
           coalesce(sum(extract(epoch FROM d.completed_at - d.created_at)::float8 * 1000.0)
                        FILTER (WHERE d.state = 'succeeded' AND d.attempt_offset = 0), 0),
           postback.latency_histogram(coalesce(
               array_agg(extract(epoch FROM d.completed_at - d.created_at)::float8 * 1000.0)
                   FILTER (WHERE d.state = 'succeeded' AND d.attempt_offset = 0), '{}')),
           sum(d.attempts - d.attempt_offset)::bigint
      FROM postback.deliveries d
      JOIN postback.conversions c ON c.id = d.conversion_id%s
     WHERE d.completed_at >= $1 AND d.completed_at < $2
       AND d.state IN ('succeeded', 'dead')
     GROUP BY 1, 2, 3, 4$q$,
        CASE WHEN postback.is_distributed() THEN ' AND c.click_id = d.click_id' ELSE '' END)
        USING since, until;
END
$$;

CREATE AGGREGATE postback.histogram_sum(bigint[]) (SFUNC = postback.histogram_add, STYPE = bigint[]);

-- Moves finished deliveries into delivery_rollup, at most max_span of history
-- per call (one transaction each); hours older than 8 days are merged into
-- days. The worker calls it every minute until it says nothing is left.
CREATE FUNCTION postback.roll_up(max_span interval DEFAULT '1 day') RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    since timestamptz;
    target timestamptz := date_trunc('minute', now()) - interval '1 minute';
    until timestamptz;
BEGIN
    SELECT s.rolled_until INTO since FROM postback.rollup_state s FOR UPDATE;
    IF since IS NULL OR since = '-infinity' THEN
        SELECT coalesce(date_trunc('hour', min(d.completed_at), 'UTC'), target) INTO since
          FROM postback.deliveries d WHERE d.completed_at IS NOT NULL;
    END IF;
    until := least(target, since + max_span);
    IF until > since THEN
        INSERT INTO postback.delivery_rollup AS r
               (span, hour, endpoint_id, event, partner, succeeded, dead, timed, latency_ms_sum, latency_hist, attempts)
        SELECT 'hour', f.* FROM postback.finished_between(since, until) f
        ON CONFLICT (span, hour, endpoint_id, event, partner) DO UPDATE
           SET succeeded = r.succeeded + excluded.succeeded, dead = r.dead + excluded.dead,
               timed = r.timed + excluded.timed, latency_ms_sum = r.latency_ms_sum + excluded.latency_ms_sum,
               latency_hist = postback.histogram_add(r.latency_hist, excluded.latency_hist),
               attempts = r.attempts + excluded.attempts;
    END IF;
    WITH old AS (
        DELETE FROM postback.delivery_rollup r
         WHERE r.span = 'hour' AND r.hour < date_trunc('day', now() - interval '8 days', 'UTC')
        RETURNING r.*)
    INSERT INTO postback.delivery_rollup AS r
           (span, hour, endpoint_id, event, partner, succeeded, dead, timed, latency_ms_sum, latency_hist, attempts)
    SELECT 'day', date_trunc('day', o.hour, 'UTC'), o.endpoint_id, o.event, o.partner, sum(o.succeeded),
           sum(o.dead), sum(o.timed), sum(o.latency_ms_sum), postback.histogram_sum(o.latency_hist), sum(o.attempts)
      FROM old o GROUP BY 2, 3, 4, 5
    ON CONFLICT (span, hour, endpoint_id, event, partner) DO UPDATE
       SET succeeded = r.succeeded + excluded.succeeded, dead = r.dead + excluded.dead,
           timed = r.timed + excluded.timed, latency_ms_sum = r.latency_ms_sum + excluded.latency_ms_sum,
           latency_hist = postback.histogram_add(r.latency_hist, excluded.latency_hist),
           attempts = r.attempts + excluded.attempts;
    INSERT INTO postback.rollup_state AS s (rolled_until) VALUES (greatest(until, since))
    ON CONFLICT (singleton) DO UPDATE SET rolled_until = excluded.rolled_until;
    PERFORM postback.roll_up_conversions(max_span);
    PERFORM postback.roll_up_attempts();
    RETURN until < target
        OR (SELECT s.conversions_until < date_trunc('hour', now() - interval '1 hour', 'UTC')
              FROM postback.rollup_state s);
END
$$;

-- Counts conversions into conversion_rollup by the hour they were created, at
-- most max_span of them per call, an hour behind (rows inserted later with an
-- earlier created_at are counted by the enqueue trigger, changes to counted rows
-- by count_conversion_changes), then merges the changes appended; hours older than 8 days become days.
CREATE FUNCTION postback.roll_up_conversions(max_span interval) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    since timestamptz;
    target timestamptz := date_trunc('hour', now() - interval '1 hour', 'UTC');
    until timestamptz;
    old_day timestamptz := date_trunc('day', now() - interval '8 days', 'UTC');
BEGIN
    SELECT s.conversions_until INTO since FROM postback.rollup_state s FOR UPDATE;
    IF since IS NULL THEN
        SELECT coalesce(date_trunc('hour', min(c.created_at), 'UTC'), target) INTO since FROM postback.conversions c;
    END IF;
    until := greatest(least(target, since + max_span), since);
    WITH moved AS (
        DELETE FROM postback.conversion_rollup_changes x
        RETURNING x.hour, x.partner, x.status, x.matched, x.conversions)
    INSERT INTO postback.conversion_rollup AS r (span, hour, partner, status, matched, conversions)
    SELECT CASE WHEN h.hour < old_day THEN 'day' ELSE 'hour' END,
           CASE WHEN h.hour < old_day THEN date_trunc('day', h.hour, 'UTC') ELSE h.hour END,
           h.partner, h.status, h.matched, sum(h.conversions)
      FROM (SELECT date_trunc('hour', c.created_at, 'UTC') AS hour, coalesce(c.partner, '') AS partner, c.status,
                   k.click_id IS NOT NULL AS matched, count(*) AS conversions
              FROM postback.conversions c
              LEFT JOIN postback.clicks k ON k.click_id = c.click_id
             WHERE c.created_at >= since AND c.created_at < until
             GROUP BY 1, 2, 3, 4
            UNION ALL
            SELECT m.hour, m.partner, m.status, m.matched, m.conversions FROM moved m) h
     GROUP BY 1, 2, 3, 4, 5
    ON CONFLICT (span, hour, partner, status, matched) DO UPDATE SET conversions = r.conversions + excluded.conversions;
    WITH old AS (
        DELETE FROM postback.conversion_rollup r WHERE r.span = 'hour' AND r.hour < old_day RETURNING r.*)
    INSERT INTO postback.conversion_rollup AS r (span, hour, partner, status, matched, conversions)
    SELECT 'day', date_trunc('day', o.hour, 'UTC'), o.partner, o.status, o.matched, sum(o.conversions)
      FROM old o GROUP BY 2, 3, 4, 5
    ON CONFLICT (span, hour, partner, status, matched) DO UPDATE SET conversions = r.conversions + excluded.conversions;
    INSERT INTO postback.rollup_state AS s (rolled_until, conversions_until) VALUES ('-infinity', until)
    ON CONFLICT (singleton) DO UPDATE SET conversions_until = excluded.conversions_until;
END
$$;

-- Counts the durations of attempts that got a response into attempt_rollup,
-- up to six minutes ago (an attempt is recorded when its answer came, at most
-- its endpoint's timeout of 5 minutes after it started), from a day back at
-- most; drops hours older than two days (endpoint_health reads the last day).
CREATE FUNCTION postback.roll_up_attempts() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    since timestamptz;
    until timestamptz := date_trunc('minute', now() - interval '6 minutes');
BEGIN
    SELECT greatest(s.attempts_until, date_trunc('hour', now() - interval '24 hours', 'UTC')) INTO since
      FROM postback.rollup_state s FOR UPDATE;
    since := coalesce(since, date_trunc('hour', now() - interval '24 hours', 'UTC'));
    IF until > since THEN
        EXECUTE pg_catalog.format($q$
        INSERT INTO postback.attempt_rollup AS r (hour, endpoint_id, attempts, duration_hist)
        SELECT date_trunc('hour', a.started_at, 'UTC'), d.endpoint_id, count(*),
               postback.latency_histogram(array_agg(a.duration_ms))
          FROM postback.attempts a
          %s
         WHERE a.started_at >= $1 AND a.started_at < $2 AND a.status_code IS NOT NULL
         GROUP BY 1, 2
        ON CONFLICT (hour, endpoint_id) DO UPDATE
           SET attempts = r.attempts + excluded.attempts,
               duration_hist = postback.histogram_add(r.duration_hist, excluded.duration_hist)$q$,
            CASE WHEN postback.is_distributed()
                 -- on Citus the delivery is in the shard beside the attempt's: a join on
                 -- its key (click_id, id), which Citus runs shard by shard
                 THEN 'JOIN postback.deliveries d ON d.click_id = a.click_id AND d.id = a.delivery_id'
                 ELSE 'CROSS JOIN LATERAL (SELECT x.endpoint_id FROM postback.deliveries x
                                            WHERE x.id = a.delivery_id LIMIT 1) d' END)
        USING since, until;
        INSERT INTO postback.rollup_state AS s (rolled_until, attempts_until) VALUES ('-infinity', until)
        ON CONFLICT (singleton) DO UPDATE SET attempts_until = excluded.attempts_until;
    END IF;
    DELETE FROM postback.attempt_rollup r WHERE r.hour < date_trunc('hour', now() - interval '2 days', 'UTC');
END
$$;

-- Keeps conversion_rollup true when conversions it already counts change: an
-- UPDATE's or DELETE's rows created before rollup_state.conversions_until are
-- counted out as they were (old rows) and in as they are (new rows), appended
-- to conversion_rollup_changes. Other rows cost one comparison each. (Inserted
-- rows created before it are counted by the enqueue trigger: the validation
-- trigger notes them as it reads each row, so an INSERT scans nothing more.)
CREATE FUNCTION postback.count_conversion_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mark timestamptz := (SELECT s.conversions_until FROM postback.rollup_state s);
BEGIN
    IF mark IS NULL THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO postback.conversion_rollup_changes (hour, partner, status, matched, conversions)
        SELECT date_trunc('hour', o.created_at, 'UTC'), coalesce(o.partner, ''), o.status,
               EXISTS (SELECT 1 FROM postback.clicks k WHERE k.click_id = o.click_id), -count(*)
          FROM old_rows o WHERE o.created_at < mark GROUP BY 1, 2, 3, 4;
    ELSE
        INSERT INTO postback.conversion_rollup_changes (hour, partner, status, matched, conversions)
        SELECT v.hour, v.partner, v.status, v.matched, sum(v.n)
          FROM (SELECT date_trunc('hour', o.created_at, 'UTC') AS hour, coalesce(o.partner, '') AS partner,
                       o.status, EXISTS (SELECT 1 FROM postback.clicks k WHERE k.click_id = o.click_id) AS matched,
                       -1 AS n
                  FROM old_rows o WHERE o.created_at < mark
                UNION ALL
                SELECT date_trunc('hour', n.created_at, 'UTC'), coalesce(n.partner, ''), n.status,
                       EXISTS (SELECT 1 FROM postback.clicks k WHERE k.click_id = n.click_id), 1
                  FROM new_rows n WHERE n.created_at < mark) v
         GROUP BY 1, 2, 3, 4 HAVING sum(v.n) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER conversions_count_updated
    AFTER UPDATE ON postback.conversions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postback.count_conversion_changes();
CREATE TRIGGER conversions_count_deleted
    AFTER DELETE ON postback.conversions REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postback.count_conversion_changes();

-- The standard postback metrics, per window, in total and per event, per
-- endpoint and per partner (rows with event, endpoint and partner NULL are
-- the totals; `breakdown` says which a row is). Deliveries count in the hour
-- (UTC) they finished: windows start on the hour. Delivery figures come from
-- delivery_rollup plus the minutes not rolled up yet, so they stay cheap as
-- history grows and survive the purge. Conversion figures (dedup, reversal,
-- match) are the window's totals, only on the total rows.
CREATE VIEW postback.metrics AS
WITH windows (name, since) AS (
    VALUES ('24h', date_trunc('hour', now() - interval '24 hours', 'UTC')),
           ('7d', date_trunc('hour', now() - interval '7 days', 'UTC')),
           ('all', '-infinity'::timestamptz)),
finished AS (
    SELECT r.hour, r.endpoint_id, r.event, r.partner, r.succeeded, r.dead, r.timed, r.latency_ms_sum, r.latency_hist
      FROM postback.delivery_rollup r
    UNION ALL
    SELECT f.hour, f.endpoint_id, f.event, f.partner, f.succeeded, f.dead, f.timed, f.latency_ms_sum, f.latency_hist
      FROM (SELECT coalesce((SELECT s.rolled_until FROM postback.rollup_state s), '-infinity') AS since) u,
           postback.finished_between(u.since, 'infinity') f),
delivered AS (
    SELECT w.name AS window_name, f.event, coalesce(e.name, 'deleted endpoint ' || f.endpoint_id) AS endpoint,
           nullif(f.partner, '') AS partner,
           CASE WHEN grouping(f.event) = 0 THEN 'event'
                WHEN grouping(coalesce(e.name, 'deleted endpoint ' || f.endpoint_id)) = 0 THEN 'endpoint'
                WHEN grouping(f.partner) = 0 THEN 'partner' ELSE 'total' END AS breakdown,
           sum(f.succeeded)::bigint AS succeeded, sum(f.dead)::bigint AS dead,
           sum(f.succeeded + f.dead)::bigint AS finished,
           sum(f.latency_ms_sum) / nullif(sum(f.timed), 0) AS avg_ms,
           postback.histogram_quantile(postback.histogram_sum(f.latency_hist), 0.95) AS p95_ms
      FROM windows w
      JOIN finished f ON f.hour >= w.since
      LEFT JOIN postback.endpoints e ON e.id = f.endpoint_id
     GROUP BY GROUPING SETS ((w.name), (w.name, f.event), (w.name, coalesce(e.name, 'deleted endpoint ' || f.endpoint_id)),
                            (w.name, f.partner))),
conversions_by_hour AS (
    -- conversion_rollup, the changes not merged yet, and the hours not rolled up yet
    SELECT r.hour, r.status, r.matched, r.conversions FROM postback.conversion_rollup r
    UNION ALL
    SELECT x.hour, x.status, x.matched, x.conversions FROM postback.conversion_rollup_changes x
    UNION ALL
    SELECT date_trunc('hour', c.created_at, 'UTC'), c.status, k.click_id IS NOT NULL, 1
      FROM postback.conversions c
      LEFT JOIN postback.clicks k ON k.click_id = c.click_id
     WHERE c.created_at >= coalesce((SELECT s.conversions_until FROM postback.rollup_state s), '-infinity')),
conversion_figures AS (
    -- one pass for the three windows
    SELECT coalesce(sum(c.conversions) FILTER (WHERE c.hour >= w.h24), 0)::bigint AS n_24h,
           coalesce(sum(c.conversions) FILTER (WHERE c.hour >= w.d7), 0)::bigint AS n_7d,
           coalesce(sum(c.conversions), 0)::bigint AS n_all,
           coalesce(sum(c.conversions) FILTER (WHERE c.status = 'approved' AND c.hour >= w.h24), 0)::bigint AS a_24h,
           coalesce(sum(c.conversions) FILTER (WHERE c.status = 'approved' AND c.hour >= w.d7), 0)::bigint AS a_7d,
           coalesce(sum(c.conversions) FILTER (WHERE c.status = 'approved'), 0)::bigint AS a_all,
           coalesce(sum(c.conversions) FILTER (WHERE c.status IN ('reversed', 'refunded', 'chargeback')
                                                AND c.hour >= w.h24), 0)::bigint AS r_24h,
           coalesce(sum(c.conversions) FILTER (WHERE c.status IN ('reversed', 'refunded', 'chargeback')
                                                AND c.hour >= w.d7), 0)::bigint AS r_7d,
           coalesce(sum(c.conversions) FILTER (WHERE c.status IN ('reversed', 'refunded', 'chargeback')), 0)::bigint AS r_all,
           coalesce(sum(c.conversions) FILTER (WHERE c.matched AND c.hour >= w.h24), 0)::bigint AS m_24h,
           coalesce(sum(c.conversions) FILTER (WHERE c.matched AND c.hour >= w.d7), 0)::bigint AS m_7d,
           coalesce(sum(c.conversions) FILTER (WHERE c.matched), 0)::bigint AS m_all,
           w.h24, w.d7
      FROM (SELECT date_trunc('hour', now() - interval '24 hours', 'UTC') AS h24,
                   date_trunc('hour', now() - interval '7 days', 'UTC') AS d7) w
      LEFT JOIN conversions_by_hour c ON true
     GROUP BY w.h24, w.d7),
converted AS (
    SELECT v.window_name, v.conversions, v.approved, v.reversed, v.matched,
           (SELECT coalesce(sum(x.duplicates), 0) FROM postback.conversion_duplicates x WHERE x.seen_at >= v.since)
               AS duplicates
      FROM conversion_figures f,
           LATERAL (VALUES ('24h', f.h24, f.n_24h, f.a_24h, f.r_24h, f.m_24h),
                           ('7d', f.d7, f.n_7d, f.a_7d, f.r_7d, f.m_7d),
                           ('all', '-infinity'::timestamptz, f.n_all, f.a_all, f.r_all, f.m_all))
               AS v (window_name, since, conversions, approved, reversed, matched))
SELECT d.window_name AS period, d.event, CASE WHEN d.breakdown = 'endpoint' THEN d.endpoint END AS endpoint,
       d.finished AS deliveries_finished, d.succeeded AS deliveries_succeeded,
       round(d.succeeded::numeric / nullif(d.finished, 0), 4) AS success_rate,
       round(d.avg_ms::numeric, 1) AS avg_commit_to_success_ms,
       round(d.p95_ms::numeric, 1) AS p95_commit_to_success_ms,
       CASE WHEN d.breakdown = 'total' THEN c.conversions END AS conversions,
       CASE WHEN d.breakdown = 'total' THEN round(c.duplicates::numeric / nullif(c.conversions + c.duplicates, 0), 4) END
           AS dedup_rate,
       CASE WHEN d.breakdown = 'total' THEN round(c.reversed::numeric / nullif(c.approved + c.reversed, 0), 4) END
           AS reversal_rate,
       CASE WHEN d.breakdown = 'total' THEN round(c.matched::numeric / nullif(c.conversions, 0), 4) END AS match_rate,
       d.partner, d.breakdown, d.dead AS deliveries_dead
  FROM delivered d JOIN converted c USING (window_name);

-- Dead deliveries, newest first, with what is needed to review and retry them.
CREATE VIEW postback.dead_letters AS
SELECT d.id AS delivery_id, e.name AS endpoint, d.conversion_id, c.transaction_id, c.partner, d.event, d.status,
       d.attempts, d.completed_at AS died_at, d.last_error,
       (SELECT a.status_code FROM postback.attempts a
         WHERE a.delivery_id = d.id ORDER BY a.attempt_no DESC LIMIT 1) AS last_status_code,
       d.created_at
  FROM postback.deliveries d
  JOIN postback.endpoints e ON e.id = d.endpoint_id
  LEFT JOIN postback.conversions c ON c.id = d.conversion_id
 WHERE d.state = 'dead';

-- After an edit of what an endpoint's requests are made of (revised_at, set
-- by endpoints_fill_defaults), its queued deliveries are rendered again from
-- their conversions, in the same transaction: none goes out as the old
-- endpoint rendered it, and none dies because the endpoint changed. Finished
-- ones are rendered again when resent. A queued test has no conversion to
-- render from: it is dead with a reason that says to send a new one.
CREATE FUNCTION postback.rerender_queue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    shard text;
BEGIN
    IF TG_TABLE_NAME <> 'endpoints' THEN
        -- Citus: a placement of the endpoints reference table, on every node.
        -- A statement there may name only this node's shards: its queued
        -- postbacks are rendered again there, its queued tests die as below
        PERFORM postback.rerender_queued_here(NEW.id);
        FOR shard IN SELECT postback.local_shards('deliveries') LOOP
            EXECUTE pg_catalog.format(
                'UPDATE %s d SET state = ''dead'', completed_at = now(), rendered = false,
                        last_error = ''the endpoint was edited after this test was queued; run postback.send_test again''
                  WHERE d.endpoint_id = $1 AND d.state = ''pending'' AND d.conversion_id IS NULL', shard) USING NEW.id;
        END LOOP;
        RETURN NULL;
    END IF;
    PERFORM postback.rerender(ARRAY(
        SELECT d.id FROM postback.deliveries d
         WHERE d.endpoint_id = NEW.id AND d.state IN ('pending', 'in_flight') AND d.conversion_id IS NOT NULL));
    UPDATE postback.deliveries d
       SET state = 'dead', completed_at = now(), rendered = false,
           last_error = 'the endpoint was edited after this test was queued; run postback.send_test again'
     WHERE d.endpoint_id = NEW.id AND d.state = 'pending' AND d.conversion_id IS NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER endpoints_rerender_queue
    AFTER UPDATE ON postback.endpoints
    FOR EACH ROW WHEN (NEW.revised_at IS DISTINCT FROM OLD.revised_at)
    EXECUTE FUNCTION postback.rerender_queue();

-- "Why didn't it fire?": for every endpoint, whether it received the
-- conversion and, if not, the reason (inactive, a filter naming what it wants
-- and what the conversion has, created after the conversion); for those that
-- did, the deliveries, their states, attempts, next attempt and last error,
-- and what holds the endpoint now. Operators and analysts may call it.
CREATE FUNCTION postback.explain(conversion_id bigint)
RETURNS TABLE (endpoint text, fired boolean, reason text, delivery_ids bigint[], announced text[],
               states text[], attempts integer, next_attempt_at timestamptz, last_error text, held_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c postback.conversions;
BEGIN
    SELECT * INTO c FROM postback.conversions x WHERE x.id = explain.conversion_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown conversion id %', conversion_id
            USING ERRCODE = 'no_data_found', HINT = 'postback.explain(transaction_id) takes a transaction id.';
    END IF;
    RETURN QUERY
    -- the conversion's deliveries per endpoint first, then the endpoints (on
    -- Citus a lateral outer join of a reference table with shards is refused)
    WITH d AS MATERIALIZED (
           SELECT x.endpoint_id, array_agg(x.id ORDER BY x.id) AS ids, array_agg(x.status ORDER BY x.id) AS announced,
                  array_agg(x.state ORDER BY x.id) AS states, sum(x.attempts)::integer AS attempts,
                  min(x.next_attempt_at) FILTER (WHERE x.state = 'pending') AS next_at,
                  (array_agg(x.last_error ORDER BY x.id DESC))[1] AS last_error
             FROM postback.deliveries x
            WHERE x.conversion_id = c.id
            GROUP BY x.endpoint_id)
    SELECT e.name,
           d.ids IS NOT NULL,
           CASE
             WHEN d.ids IS NOT NULL AND r.filtered_out_by IS NOT NULL
                 THEN 'fired for an earlier status; not for the current one: ' || r.filtered_out_by
             WHEN d.ids IS NOT NULL THEN 'fired'
             WHEN NOT e.active THEN 'not fired: the endpoint is inactive (active = false)'
             WHEN r.filtered_out_by IS NOT NULL THEN 'not fired: ' || r.filtered_out_by
             WHEN e.created_at > c.created_at
                 THEN format('not fired: the endpoint was created at %s, after the conversion (%s)', e.created_at, c.created_at)
             ELSE format('not fired: its filters match now but did not when the conversion was written '
                         '(the endpoint was last changed at %s)', e.updated_at)
           END,
           d.ids, d.announced, d.states, d.attempts, d.next_at, d.last_error,
           postback.held_by(e.id)
      FROM postback.endpoints e
      LEFT JOIN postback.explain_routing(c.id) r ON r.endpoint_id = e.id
      LEFT JOIN d ON d.endpoint_id = e.id
     ORDER BY d.ids IS NULL, e.name;
END
$$;

CREATE FUNCTION postback.explain(transaction_id text)
RETURNS TABLE (endpoint text, fired boolean, reason text, delivery_ids bigint[], announced text[],
               states text[], attempts integer, next_attempt_at timestamptz, last_error text, held_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found bigint;
BEGIN
    SELECT c.id INTO found FROM postback.conversions c WHERE c.transaction_id = explain.transaction_id;
    IF found IS NULL THEN
        RAISE EXCEPTION 'no conversion has transaction_id "%"', transaction_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'A duplicate insert skipped by ON CONFLICT is counted in postback.conversion_duplicates, not stored.'
                         || CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgname = 'postback_watch_insert')
                                 THEN ' A row of a watched table becomes a conversion only where its mapping''s "when" '
                                      'holds, under the transaction_id its mapping computes (postback.watches).'
                                 ELSE '' END;
    END IF;
    RETURN QUERY SELECT * FROM postback.explain(found);
END
$$;

-- A delivery's request as a curl command line a person can run to reproduce
-- it: method, URL, headers (with a fresh signature where the endpoint signs),
-- body, the endpoint's timeout. The endpoint's own header values (credentials)
-- are shown to the extension's owner only; others see [redacted]. Nothing of
-- it is logged.
CREATE FUNCTION postback.curl(delivery_id bigint) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d postback.deliveries;
    e postback.endpoints;
    f record;
    shown jsonb;
BEGIN
    SELECT * INTO d FROM postback.deliveries x WHERE x.id = curl.delivery_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown delivery id %', delivery_id USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT d.rendered THEN
        RAISE EXCEPTION 'delivery % has no request to show: %', delivery_id, d.last_error
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Fix the endpoint or the conversion; postback.retry renders it again from the conversion.';
    END IF;
    SELECT * INTO e FROM postback.endpoints x WHERE x.id = d.endpoint_id;
    SELECT * INTO f FROM postback.sign_request(
        e.id, e.kind, e.signing_scheme, e.signature_header, e.timestamp_param, e.signature_param,
        d.url, d.url_hashes, nullif(e.headers, '{}'), d.body, d.idempotency_key);
    shown := CASE
        WHEN pg_has_role(session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'postback.endpoints'::regclass), 'USAGE')
            THEN f.headers
        ELSE (SELECT jsonb_object_agg(h.key, CASE WHEN e.headers ? h.key THEN to_jsonb('[redacted]'::text) ELSE h.value END)
                FROM jsonb_each(f.headers) h)
    END;
    RETURN postback.curl_command(d.method, f.url, coalesce(shown, '{}'), d.body,
                                 (extract(epoch FROM e.timeout) * 1000)::bigint);
END
$$;
