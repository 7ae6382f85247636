-- pg_postback 0.1.0 → 0.2.0. Applied by ALTER EXTENSION pg_postback UPDATE.
-- Everything that changed since 0.1.0, in one step; tests/e2e/test_upgrade.py
-- checks that the result has the same objects as a fresh 0.2.0 install.

-- New functions of the 0.2.0 library ---------------------------------------

CREATE FUNCTION postback."validate_headers"("headers" jsonb) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_headers_wrapper';
CREATE FUNCTION postback."validate_partners"("partners" TEXT[]) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_partners_wrapper';
CREATE FUNCTION postback."validate_conditions"("conditions" jsonb) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_conditions_wrapper';
CREATE FUNCTION postback."render_preview"("endpoint_id" bigint, "conversion_id" bigint) RETURNS TEXT[]
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'render_preview_wrapper';
CREATE FUNCTION postback."enqueue_conversions"() RETURNS TRIGGER
LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_conversions_wrapper';
CREATE FUNCTION postback."validate_statuses"("statuses" TEXT[], "column" TEXT) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_statuses_wrapper';
CREATE FUNCTION postback."render_test"("endpoint_id" bigint, "sample" jsonb) RETURNS TEXT[]
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'render_test_wrapper';

-- Trust: every SQL and PL/pgSQL function pins its search_path --------------

ALTER FUNCTION postback.refuse_delete_with_deliveries() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION postback.delete_attempts_of_deleted_deliveries() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION postback.worker_status() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Endpoints: partners and conditions; headers checked when given ------------

ALTER TABLE postback.endpoints
    ADD COLUMN partners text[],
    ADD COLUMN conditions jsonb
        CONSTRAINT endpoint_conditions_must_be_a_json_object
            CHECK (jsonb_typeof(conditions) = 'object'),
    ADD COLUMN paused_at timestamptz,
    ADD COLUMN max_in_flight integer NOT NULL DEFAULT 8
        CONSTRAINT endpoint_max_in_flight_must_be_between_1_and_256
            CHECK (max_in_flight BETWEEN 1 AND 256),
    ADD COLUMN rate_limit numeric
        CONSTRAINT endpoint_rate_limit_must_be_positive_requests_per_second
            CHECK (rate_limit > 0 AND rate_limit <= 100000),
    ADD COLUMN success_statuses text[],
    ADD COLUMN retry_statuses text[],
    ADD COLUMN initial_delay interval NOT NULL DEFAULT '0'
        CONSTRAINT endpoint_initial_delay_must_be_between_0_and_1_day
            CHECK (initial_delay BETWEEN '0' AND '1 day');

CREATE OR REPLACE FUNCTION postback.endpoints_fill_defaults() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.headers IS DISTINCT FROM OLD.headers THEN
        PERFORM postback.validate_headers(NEW.headers);
    END IF;
    IF TG_OP = 'INSERT' OR NEW.url_template IS DISTINCT FROM OLD.url_template THEN
        PERFORM postback.validate_template(NEW.url_template);
    END IF;
    IF NEW.body_template IS NOT NULL
       AND (TG_OP = 'INSERT' OR NEW.body_template IS DISTINCT FROM OLD.body_template) THEN
        PERFORM postback.validate_body_template(NEW.body_template);
    END IF;
    IF NEW.partners IS NOT NULL THEN
        PERFORM postback.validate_partners(NEW.partners);
    END IF;
    IF NEW.conditions IS NOT NULL THEN
        PERFORM postback.validate_conditions(NEW.conditions);
    END IF;
    IF NEW.success_statuses IS NOT NULL THEN
        PERFORM postback.validate_statuses(NEW.success_statuses, 'success_statuses');
    END IF;
    IF NEW.retry_statuses IS NOT NULL THEN
        PERFORM postback.validate_statuses(NEW.retry_statuses, 'retry_statuses');
    END IF;
    IF NEW.success_body_pattern IS NOT NULL THEN
        PERFORM postback.validate_success_pattern(NEW.success_body_pattern);
    END IF;
    NEW.method := pg_catalog.upper(coalesce(NEW.method,
                                 CASE NEW.kind WHEN 'webhook' THEN 'POST' ELSE 'GET' END));
    NEW.max_attempts := coalesce(NEW.max_attempts, coalesce(pg_catalog.cardinality(NEW.retry_schedule), 0) + 1);
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

-- Existing endpoints are not changed, but the DBA hears of what 0.2.0 refuses:
-- their deliveries would be recorded dead with the reason at send time.
DO $$
DECLARE
    bad record;
BEGIN
    FOR bad IN
        SELECT e.name, x.problem
          FROM postback.endpoints e
         CROSS JOIN LATERAL (
               SELECT CASE
                   WHEN EXISTS (SELECT 1 FROM pg_catalog.jsonb_object_keys(e.headers) k
                                 WHERE pg_catalog.lower(k) IN ('host', 'content-length', 'transfer-encoding', 'connection',
                                                               'upgrade', 'te', 'trailer', 'keep-alive',
                                                               'proxy-connection', 'expect'))
                   THEN 'sets a header the HTTP client owns (Host, Content-Length, Transfer-Encoding, …)'
                   WHEN e.headers::text ~ '\\[rn]|\\u0000'
                   THEN 'has a header value with CR, LF or NUL'
                   WHEN e.url_template !~* '^https?://[^/?#{}\\]+([/?#]|$)' OR e.url_template ~ '\\'
                   THEN 'has a url_template whose scheme, host or port is not literal'
               END AS problem) x
         WHERE x.problem IS NOT NULL
    LOOP
        RAISE WARNING 'pg_postback 0.2.0: endpoint "%" %; its deliveries will be dead until it is fixed',
                      bad.name, bad.problem;
    END LOOP;
END
$$;

-- Conversions: partner; clicks ----------------------------------------------

ALTER TABLE postback.conversions
    ADD COLUMN partner text
        CONSTRAINT partner_must_be_1_to_100_printable_characters
            CHECK (length(partner) BETWEEN 1 AND 100 AND partner !~ '[[:cntrl:]]');
DROP TRIGGER conversions_validate ON postback.conversions;
CREATE TRIGGER conversions_validate
    BEFORE INSERT OR UPDATE OF click_id, transaction_id, event, status, currency, partner ON postback.conversions
    FOR EACH ROW EXECUTE FUNCTION postback.conversions_validate();

CREATE INDEX conversions_created_at ON postback.conversions USING brin (created_at);

CREATE TABLE postback.clicks (
    click_id   text        PRIMARY KEY
        CONSTRAINT click_click_id_must_be_1_to_512_characters
            CHECK (length(click_id) BETWEEN 1 AND 512),
    partner    text
        CONSTRAINT click_partner_must_be_1_to_100_printable_characters
            CHECK (length(partner) BETWEEN 1 AND 100 AND partner !~ '[[:cntrl:]]'),
    attributes jsonb       NOT NULL DEFAULT '{}'
        CONSTRAINT click_attributes_must_be_a_json_object
            CHECK (jsonb_typeof(attributes) = 'object'),
    clicked_at timestamptz NOT NULL DEFAULT now()
);
-- for the retention DELETE (README), never for look-ups
CREATE INDEX clicks_clicked_at ON postback.clicks USING brin (clicked_at);

-- Deliveries: no credential headers, known methods only --------------------
-- Endpoint headers are now read at send time; copies made by 0.1.0 go.
ALTER TABLE postback.deliveries DROP COLUMN headers;
ALTER TABLE postback.deliveries
    ADD CONSTRAINT delivery_method_must_be_get_post_put_or_patch
        CHECK (method IN ('GET', 'POST', 'PUT', 'PATCH'));

-- Operations: test deliveries have no conversion; manual retries restart the
-- attempt budget and max_age; time windows are indexed --------------------
ALTER TABLE postback.deliveries
    ALTER COLUMN conversion_id DROP NOT NULL,
    ADD COLUMN attempt_offset integer NOT NULL DEFAULT 0,
    ADD COLUMN age_credit interval,
    ADD COLUMN leased_by integer,
    ADD COLUMN success_pattern text;
-- Time windows (health, metrics, replay, retention) over an append-mostly table:
-- BRIN indexes cost almost nothing to maintain.
CREATE INDEX deliveries_created_at ON postback.deliveries USING brin (created_at);
CREATE INDEX deliveries_completed_at ON postback.deliveries USING brin (completed_at);
-- Dead letters are few and reviewed often.
CREATE INDEX deliveries_dead ON postback.deliveries (endpoint_id, completed_at) WHERE state = 'dead';
CREATE INDEX attempts_started_at ON postback.attempts USING brin (started_at);

-- ---------------------------------------------------------------------------
-- endpoint_state: what the worker knows of each endpoint's recent behaviour,
-- kept up to date when it records attempts (health view, alerts).
-- ---------------------------------------------------------------------------
CREATE TABLE postback.endpoint_state (
    endpoint_id          bigint      PRIMARY KEY,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    failing_since        timestamptz,
    last_error           text,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    breaker              text        NOT NULL DEFAULT 'closed'
        CONSTRAINT endpoint_breaker_must_be_closed_open_or_half_open
            CHECK (breaker IN ('closed', 'open', 'half_open')),
    breaker_since        timestamptz,
    breaker_reason       text
);

-- pg_dump keeps user data and its sequences --------------------------------
SELECT pg_catalog.pg_extension_config_dump('postback.conversions', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('postback.deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('postback.deliveries_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('postback.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('postback.attempts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('postback.clicks', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_duplicates', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_duplicates_id_seq', '');

-- Enqueue: one Rust statement trigger, run as the owner ---------------------

DROP TRIGGER conversions_enqueue_inserted ON postback.conversions;
DROP TRIGGER conversions_enqueue_status_changes ON postback.conversions;
DROP FUNCTION postback.enqueue_inserted_conversions();
DROP FUNCTION postback.enqueue_status_changes();
DROP FUNCTION postback.preview(text, bigint);
DROP FUNCTION postback.endpoint_wants(postback.endpoints, postback.conversions);
DROP FUNCTION postback.render_delivery(postback.endpoints, postback.conversions);

ALTER FUNCTION postback.enqueue_conversions() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE TRIGGER conversions_enqueue_inserted
    AFTER INSERT ON postback.conversions REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postback.enqueue_conversions();

CREATE TRIGGER conversions_enqueue_status_changes
    AFTER UPDATE ON postback.conversions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postback.enqueue_conversions();

CREATE FUNCTION postback.preview(endpoint text, conversion_id bigint)
RETURNS TABLE (method text, url text, headers jsonb, body text, error text, routed boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM postback.endpoints e WHERE e.name = preview.endpoint) THEN
        RAISE EXCEPTION 'unknown endpoint "%"', preview.endpoint
            USING ERRCODE = 'no_data_found', HINT = 'SELECT name FROM postback.endpoints lists them.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM postback.conversions c WHERE c.id = preview.conversion_id) THEN
        RAISE EXCEPTION 'unknown conversion id %', preview.conversion_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN QUERY
    SELECT e.method, f.url,
           (SELECT jsonb_object_agg(h.key, CASE WHEN e.headers ? h.key THEN to_jsonb('[redacted]'::text) ELSE h.value END)
              FROM jsonb_each(f.headers) h),
           r[3], r[4], r[5]::boolean
      FROM postback.endpoints e
     CROSS JOIN LATERAL (SELECT postback.render_preview(e.id, preview.conversion_id) AS r) AS rendered
      LEFT JOIN LATERAL postback.finalize_request(
           e.id, e.kind, e.signing_scheme, e.signature_header, e.timestamp_param, e.signature_param,
           r[2], nullif(e.headers, '{}'), r[3], r[1]) f ON r[4] IS NULL
     WHERE e.name = preview.endpoint;
END
$$;

-- Views ----------------------------------------------------------------------

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

-- Operations: functions and views (all new) ---------------------------------

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
-- continues; the delivery gets a fresh attempt budget and max_age.
CREATE FUNCTION postback.resend(ids bigint[]) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    UPDATE postback.deliveries d
       SET state = 'pending', next_attempt_at = now(), completed_at = NULL, last_error = NULL,
           attempt_offset = d.attempts, age_credit = now() - d.created_at
     WHERE d.id = ANY (ids) AND d.state IN ('succeeded', 'dead');
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
BEGIN
    SELECT d.state INTO current FROM postback.deliveries d WHERE d.id = retry.delivery_id FOR UPDATE;
    IF current IS NULL THEN
        RAISE EXCEPTION 'unknown delivery id %', delivery_id USING ERRCODE = 'no_data_found';
    ELSIF current NOT IN ('succeeded', 'dead') THEN
        RAISE EXCEPTION 'delivery % is % already; only succeeded or dead deliveries are retried', delivery_id, current
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM postback.resend(ARRAY[delivery_id]);
    RETURN delivery_id;
END
$$;

CREATE FUNCTION postback.retry_dead(endpoint text, since timestamptz DEFAULT now() - interval '1 day')
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF since IS NULL OR since > now() THEN
        RAISE EXCEPTION 'since must be a time in the past (got %)', since USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN postback.resend(ARRAY(
        SELECT d.id FROM postback.deliveries d
         WHERE d.endpoint_id = postback.endpoint_id(endpoint) AND d.state = 'dead' AND d.completed_at >= since));
END
$$;

-- Re-sends what was sent in a window, with the same rendered requests and
-- idempotency keys, so the partner can deduplicate.
CREATE FUNCTION postback.replay(endpoint text, since timestamptz, until timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF since IS NULL OR until IS NULL OR since >= until THEN
        RAISE EXCEPTION 'replay needs since < until (got % and %)', since, until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN postback.resend(ARRAY(
        SELECT d.id FROM postback.deliveries d
         WHERE d.endpoint_id = postback.endpoint_id(endpoint) AND d.state = 'succeeded'
           AND d.created_at >= since AND d.created_at < until));
END
$$;

-- Enqueues a test request with clearly marked sample values (click id
-- TEST-CLICK, amount 0.00, …; `sample` overrides any of them), delivered by
-- the worker like any other. Test deliveries have no conversion.
CREATE FUNCTION postback.send_test(endpoint text, sample jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    e postback.endpoints;
    r text[];
    made bigint;
BEGIN
    IF sample IS NULL OR jsonb_typeof(sample) <> 'object' THEN
        RAISE EXCEPTION 'sample must be a JSON object of values to override (got %)', coalesce(jsonb_typeof(sample), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO e FROM postback.endpoints WHERE id = postback.endpoint_id(endpoint);
    r := postback.render_test(e.id, sample);
    INSERT INTO postback.deliveries (endpoint_id, conversion_id, event, status, idempotency_key, method, url, body,
                                     state, completed_at, last_error, success_pattern)
    VALUES (e.id, NULL, r[5], r[6], r[1], e.method, coalesce(r[2], e.url_template), r[3],
            CASE WHEN r[4] IS NULL THEN 'pending' ELSE 'dead' END, CASE WHEN r[4] IS NOT NULL THEN now() END, r[4],
            r[7])
    RETURNING id INTO made;
    PERFORM postback.wake_worker();
    RETURN made;
END
$$;

-- Pausing keeps deliveries waiting without spending attempts or max_age.
CREATE FUNCTION postback.pause(endpoint text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE postback.endpoints SET paused_at = coalesce(paused_at, now()) WHERE id = postback.endpoint_id(endpoint);
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
    -- the time spent paused does not count against max_age
    UPDATE postback.deliveries d
       SET age_credit = coalesce(d.age_credit, interval '0') + (now() - greatest(was, d.created_at))
     WHERE d.endpoint_id = eid AND d.state = 'pending';
    UPDATE postback.endpoints SET paused_at = NULL WHERE id = eid;
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
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a positive interval (got %)', older_than USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch IS NULL OR batch < 1 OR batch > 1000000 THEN
        RAISE EXCEPTION 'batch must be between 1 and 1000000 (got %)', batch USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        DELETE FROM postback.deliveries d
         WHERE d.id IN (SELECT x.id FROM postback.deliveries x
                         WHERE x.completed_at < now() - older_than
                           AND (x.state = 'succeeded' OR (include_dead AND x.state = 'dead'))
                         LIMIT batch FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        rounds := rounds + 1;
        EXIT WHEN n < batch OR rounds >= coalesce(max_batches, rounds + 1);
    END LOOP;
    RETURN total;
END
$$;

-- ---------------------------------------------------------------------------
-- Views
-- ---------------------------------------------------------------------------

-- Per endpoint, the last hour and the last 24 hours, and now.
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
    SELECT d.endpoint_id,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms)
               FILTER (WHERE a.started_at > now() - interval '1 hour')                                   AS p50_ms_1h,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)
               FILTER (WHERE a.started_at > now() - interval '1 hour')                                   AS p95_ms_1h,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms)                                    AS p50_ms_24h,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms)                                   AS p95_ms_24h
      FROM postback.attempts a JOIN postback.deliveries d ON d.id = a.delivery_id
     WHERE a.started_at > now() - interval '24 hours' AND a.status_code IS NOT NULL
     GROUP BY d.endpoint_id),
backlog AS (
    SELECT d.endpoint_id, count(*) AS pending, min(d.created_at) AS oldest_pending_at
      FROM postback.deliveries d
     WHERE d.state IN ('pending', 'in_flight')
     GROUP BY d.endpoint_id)
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
       s.last_error, coalesce(s.breaker, 'closed') AS breaker, s.breaker_since, s.breaker_reason,
       coalesce(b.pending, 0) AS pending, now() - b.oldest_pending_at AS oldest_pending_age
  FROM postback.endpoints e
  LEFT JOIN recent r ON r.endpoint_id = e.id
  LEFT JOIN latency l ON l.endpoint_id = e.id
  LEFT JOIN backlog b ON b.endpoint_id = e.id
  LEFT JOIN postback.endpoint_state s ON s.endpoint_id = e.id;

-- The standard postback metrics, per window, per event and per endpoint
-- (rows with event or endpoint NULL are the totals over them).
CREATE VIEW postback.metrics AS
WITH windows (name, since) AS (
    VALUES ('24h', now() - interval '24 hours'), ('7d', now() - interval '7 days'), ('all', '-infinity'::timestamptz)),
delivered AS (
    SELECT w.name AS window_name, d.event, e.name AS endpoint,
           count(*) FILTER (WHERE d.state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE d.state IN ('succeeded', 'dead')) AS finished,
           avg(extract(epoch FROM d.completed_at - d.created_at) * 1000.0) FILTER (WHERE d.state = 'succeeded') AS avg_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM d.completed_at - d.created_at) * 1000.0)
               FILTER (WHERE d.state = 'succeeded') AS p95_ms
      FROM windows w
      JOIN postback.deliveries d ON d.created_at >= w.since
      JOIN postback.endpoints e ON e.id = d.endpoint_id
     WHERE d.conversion_id IS NOT NULL
     GROUP BY GROUPING SETS ((w.name), (w.name, d.event), (w.name, e.name))),
converted AS (
    SELECT w.name AS window_name,
           count(c.id) AS conversions,
           count(c.id) FILTER (WHERE c.status = 'approved') AS approved,
           count(c.id) FILTER (WHERE c.status IN ('reversed', 'refunded', 'chargeback')) AS reversed,
           count(k.click_id) AS matched,
           (SELECT coalesce(sum(x.duplicates), 0) FROM postback.conversion_duplicates x WHERE x.seen_at >= w.since)
               AS duplicates
      FROM windows w
      LEFT JOIN postback.conversions c ON c.created_at >= w.since
      LEFT JOIN postback.clicks k ON k.click_id = c.click_id
     GROUP BY w.name, w.since)
SELECT d.window_name AS period, d.event, d.endpoint,
       d.finished AS deliveries_finished, d.succeeded AS deliveries_succeeded,
       round(d.succeeded::numeric / nullif(d.finished, 0), 4) AS success_rate,
       round(d.avg_ms::numeric, 1) AS avg_commit_to_success_ms,
       round(d.p95_ms::numeric, 1) AS p95_commit_to_success_ms,
       c.conversions,
       round(c.duplicates::numeric / nullif(c.conversions + c.duplicates, 0), 4) AS dedup_rate,
       round(c.reversed::numeric / nullif(c.approved + c.reversed, 0), 4) AS reversal_rate,
       round(c.matched::numeric / nullif(c.conversions, 0), 4) AS match_rate
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


-- Privileges ----------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION postback.render_request(bigint, text, text, text, jsonb, jsonb, boolean, bigint, text, text, text, text, text, text, jsonb, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.finalize_request(bigint, text, text, text, text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.take_proposed_conversions() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.wake_worker() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.worker_stats() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.worker_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.preview(text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.render_preview(bigint, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.enqueue_conversions() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.render_test(bigint, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.resend(bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.retry(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.retry_dead(text, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.replay(text, timestamptz, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.send_test(text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.pause(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.resume(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.purge(interval, integer, boolean, integer) FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA postback FROM PUBLIC;

-- Read access for analysts: everything but credentials. endpoints.headers
-- (API keys, Authorization) and endpoint_secrets stay with the owner.
CREATE FUNCTION postback.grant_analyst(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    readable text;
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO readable
      FROM pg_attribute a
     WHERE a.attrelid = 'postback.endpoints'::regclass AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname <> 'headers';
    EXECUTE format('GRANT USAGE ON SCHEMA postback TO %s', role);
    EXECUTE format('GRANT SELECT ON postback.conversions, postback.deliveries, postback.attempts, '
                   'postback.conversion_duplicates, postback.clicks, postback.endpoint_state, '
                   'postback.delivery_summary, postback.match_rate, postback.endpoint_health, '
                   'postback.metrics, postback.dead_letters TO %s', role);
    EXECUTE format('GRANT SELECT (%s) ON postback.endpoints TO %s', readable, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.worker_status(), postback.worker_stats() TO %s', role);
END
$$;

-- Operators: what analysts read, plus writing conversions (insert, change a
-- status) and clicks (the landing page), previewing requests, and the daily
-- operations: retry, replay, send_test, pause, resume. Not purge, not endpoints. They never write deliveries or endpoints.
CREATE FUNCTION postback.grant_operator(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM postback.grant_analyst(role);
    EXECUTE format('GRANT INSERT, UPDATE ON postback.conversions, postback.clicks TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.preview(text, bigint), postback.retry(bigint), '
                   'postback.retry_dead(text, timestamptz), postback.replay(text, timestamptz, timestamptz), '
                   'postback.send_test(text, jsonb), postback.pause(text), postback.resume(text) TO %s', role);
END
$$;

-- Takes back everything grant_analyst and grant_operator gave.
CREATE FUNCTION postback.revoke_access(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA postback FROM %s', role);
    EXECUTE format('REVOKE SELECT (%s) ON postback.endpoints FROM %s',
                   (SELECT string_agg(quote_ident(a.attname), ', ')
                      FROM pg_attribute a
                     WHERE a.attrelid = 'postback.endpoints'::regclass AND a.attnum > 0 AND NOT a.attisdropped),
                   role);
    EXECUTE format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA postback FROM %s', role);
    EXECUTE format('REVOKE USAGE ON SCHEMA postback FROM %s', role);
END
$$;

REVOKE EXECUTE ON FUNCTION postback.grant_analyst(regrole) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.grant_operator(regrole) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.revoke_access(regrole) FROM PUBLIC;

-- Documentation --------------------------------------------------------------

COMMENT ON COLUMN postback.endpoints.headers IS 'Extra request headers (API keys, Authorization) as a JSON object of name to value: credentials, readable only by the owner and added at send time, never copied into deliveries.';
COMMENT ON COLUMN postback.deliveries.conversion_id IS 'Conversion (postback.conversions.id) it announces; NULL for a test delivery (postback.send_test).';
COMMENT ON COLUMN postback.deliveries.method IS 'HTTP method: GET, POST, PUT or PATCH.';
COMMENT ON FUNCTION postback.endpoints_fill_defaults() IS 'Trigger: validates templates, headers and the success pattern; fills method from kind and max_attempts from the retry schedule.';
COMMENT ON FUNCTION postback.preview(text, bigint) IS 'The method, URL, headers (the endpoint''s own values redacted) and body an endpoint would be sent for a conversion, without sending, and whether its filters route the conversion to it.';
COMMENT ON FUNCTION postback.enqueue_conversions() IS 'Trigger (after INSERT and after UPDATE, per statement, as the owner): routes each inserted conversion, or each changed status, to the active endpoints whose partners, events, statuses and conditions match, renders the requests and writes the deliveries; a changed status waits behind earlier deliveries of the same endpoint and conversion.';
COMMENT ON FUNCTION postback.render_preview(bigint, bigint) IS 'Internal: {idempotency_key, url, body, error, routed} of one endpoint and conversion, rendered as the enqueue trigger would (partner and click included).';
COMMENT ON FUNCTION postback.validate_partners(text[]) IS 'Raises an error if an endpoint''s partners list is empty, holds NULL, or a name that is not 1 to 100 printable characters; true otherwise.';
COMMENT ON FUNCTION postback.validate_conditions(jsonb) IS 'Raises an error if an endpoint''s conditions are not a non-empty JSON object; true otherwise.';
COMMENT ON FUNCTION postback.validate_headers(jsonb) IS 'Raises an error naming the header if endpoint headers are not a JSON object of HTTP token names to strings without control characters, or set Host, Content-Length, Transfer-Encoding, Connection, Upgrade, TE, Trailer, Keep-Alive, Proxy-Connection or Expect; true otherwise.';
COMMENT ON FUNCTION postback.grant_analyst(regrole) IS 'Lets a role read conversions, deliveries, attempts, duplicates, endpoints (all columns but the credential headers) and the views. Owner only.';
COMMENT ON FUNCTION postback.grant_operator(regrole) IS 'What grant_analyst gives, plus inserting conversions, changing their status and postback.preview. Owner only.';
COMMENT ON FUNCTION postback.revoke_access(regrole) IS 'Takes back every privilege grant_analyst or grant_operator gave a role. Owner only.';
COMMENT ON COLUMN postback.endpoints.partners IS 'Partners (networks, affiliates) whose conversions this endpoint receives; NULL = every partner (global receivers such as your CRM).';
COMMENT ON COLUMN postback.endpoints.conditions IS 'JSON object the conversion''s attributes must contain (jsonb @>), e.g. {"offer_id": "12"}; NULL = no condition.';
COMMENT ON COLUMN postback.conversions.partner IS 'Network or affiliate the conversion came from; filled from postback.clicks when NULL and the click is known; cannot change after insert.';
COMMENT ON TABLE postback.clicks IS 'Clicks recorded by the landing page: the partner and the sub-ids it passed. A conversion with a known click_id takes its partner from here, and templates read {click.KEY}. Kept by pg_dump.';
COMMENT ON COLUMN postback.clicks.click_id IS 'The click id the network passed (what conversions carry in click_id).';
COMMENT ON COLUMN postback.clicks.partner IS 'Network or affiliate that sent the click.';
COMMENT ON COLUMN postback.clicks.attributes IS 'Sub-ids and parameters the network passed (sub1…sub5, aff_id, offer_id, …), usable in templates as {click.KEY}.';
COMMENT ON COLUMN postback.clicks.clicked_at IS 'When the click happened ({click.clicked_at}).';
COMMENT ON VIEW postback.match_rate IS 'Conversions attributable to a recorded click ÷ all conversions, per partner and overall (overall = true), last 24 hours and all time.';
COMMENT ON COLUMN postback.match_rate.partner IS 'Partner of the conversions; NULL in a per-partner row = conversions with no known partner.';
COMMENT ON COLUMN postback.match_rate.conversions_24h IS 'Conversions created in the last 24 hours.';
COMMENT ON COLUMN postback.match_rate.matched_24h IS 'Of those, conversions whose click_id is in postback.clicks.';
COMMENT ON COLUMN postback.match_rate.match_rate_24h IS 'matched_24h ÷ conversions_24h.';
COMMENT ON COLUMN postback.match_rate.conversions IS 'All conversions.';
COMMENT ON COLUMN postback.match_rate.matched IS 'Conversions whose click_id is in postback.clicks.';
COMMENT ON COLUMN postback.match_rate.match_rate IS 'matched ÷ conversions.';
COMMENT ON COLUMN postback.match_rate.overall IS 'true for the row over all partners.';
COMMENT ON COLUMN postback.endpoints.paused_at IS 'Set by postback.pause: deliveries wait without spending attempts or max_age; NULL = running.';
COMMENT ON COLUMN postback.deliveries.attempt_offset IS 'Attempts made before the last manual retry or replay; max_attempts and the schedule count from here.';
COMMENT ON COLUMN postback.deliveries.age_credit IS 'Time added to max_age: spent paused, or restarted by a manual retry or replay.';
COMMENT ON TABLE postback.endpoint_state IS 'What the worker knows of each endpoint now: consecutive failures, since when it fails, last success and error. Updated when attempts are recorded.';
COMMENT ON COLUMN postback.endpoint_state.endpoint_id IS 'Endpoint (postback.endpoints.id).';
COMMENT ON COLUMN postback.endpoint_state.consecutive_failures IS 'Failed attempts since the last successful one.';
COMMENT ON COLUMN postback.endpoint_state.last_success_at IS 'Start of the last successful attempt.';
COMMENT ON COLUMN postback.endpoint_state.last_failure_at IS 'Start of the last failed attempt.';
COMMENT ON COLUMN postback.endpoint_state.failing_since IS 'Start of the first failure after the last success; NULL while it succeeds.';
COMMENT ON COLUMN postback.endpoint_state.last_error IS 'Error of the last failed attempt.';
COMMENT ON COLUMN postback.endpoint_state.updated_at IS 'When the worker last recorded an attempt of this endpoint.';
COMMENT ON FUNCTION postback.endpoint_id(text) IS 'The id of the endpoint with this name, or an error naming the unknown endpoint.';
COMMENT ON FUNCTION postback.resend(bigint[]) IS 'Internal: sends finished deliveries again now, with a fresh attempt budget and max_age; returns how many.';
COMMENT ON FUNCTION postback.retry(bigint) IS 'Sends a dead (or succeeded) delivery again now; its attempts are kept and numbering continues. Operators may call it.';
COMMENT ON FUNCTION postback.retry_dead(text, timestamptz) IS 'Sends again every delivery of an endpoint that died since the given time (default: the last day); returns how many.';
COMMENT ON FUNCTION postback.replay(text, timestamptz, timestamptz) IS 'Sends again the succeeded deliveries of an endpoint created in [since, until), same requests and idempotency keys; returns how many.';
COMMENT ON FUNCTION postback.send_test(text, jsonb) IS 'Enqueues a test request with marked sample values (TEST-CLICK-…, amount 0.00), overridable by the jsonb; returns the delivery id. Test deliveries have no conversion.';
COMMENT ON FUNCTION postback.render_test(bigint, jsonb) IS 'Internal: {idempotency_key, url, body, error, event, status} of a test request for an endpoint.';
COMMENT ON FUNCTION postback.pause(text) IS 'Pauses an endpoint: new deliveries are still enqueued, none is sent, no attempt or max_age is spent until resume.';
COMMENT ON FUNCTION postback.resume(text) IS 'Resumes a paused endpoint; its pending deliveries get the paused time added to their max_age.';
COMMENT ON FUNCTION postback.purge(interval, integer, boolean, integer) IS 'Deletes succeeded (and, with include_dead, dead) deliveries and their attempts completed before now() - older_than, batch rows per statement, skipping rows the worker holds; returns how many. Owner only.';
COMMENT ON VIEW postback.endpoint_health IS 'Per endpoint: deliveries, succeeded, dead and success rate over the last hour and 24 hours, attempt latency p50/p95, consecutive failures, backlog, paused/active.';
COMMENT ON COLUMN postback.endpoint_health.endpoint_id IS 'Endpoint id.';
COMMENT ON COLUMN postback.endpoint_health.endpoint IS 'Endpoint name.';
COMMENT ON COLUMN postback.endpoint_health.active IS 'Whether new conversions are enqueued for it.';
COMMENT ON COLUMN postback.endpoint_health.paused IS 'Whether it is paused (postback.pause).';
COMMENT ON COLUMN postback.endpoint_health.paused_at IS 'Since when it is paused.';
COMMENT ON COLUMN postback.endpoint_health.deliveries_1h IS 'Deliveries created in the last hour (test deliveries excluded).';
COMMENT ON COLUMN postback.endpoint_health.succeeded_1h IS 'Of those, succeeded.';
COMMENT ON COLUMN postback.endpoint_health.dead_1h IS 'Of those, dead.';
COMMENT ON COLUMN postback.endpoint_health.success_rate_1h IS 'succeeded_1h ÷ (succeeded_1h + dead_1h).';
COMMENT ON COLUMN postback.endpoint_health.deliveries_24h IS 'Deliveries created in the last 24 hours.';
COMMENT ON COLUMN postback.endpoint_health.succeeded_24h IS 'Of those, succeeded.';
COMMENT ON COLUMN postback.endpoint_health.dead_24h IS 'Of those, dead.';
COMMENT ON COLUMN postback.endpoint_health.success_rate_24h IS 'succeeded_24h ÷ (succeeded_24h + dead_24h).';
COMMENT ON COLUMN postback.endpoint_health.p50_ms_1h IS 'Median attempt duration over the last hour (attempts that got a response), ms.';
COMMENT ON COLUMN postback.endpoint_health.p95_ms_1h IS '95th percentile attempt duration over the last hour, ms.';
COMMENT ON COLUMN postback.endpoint_health.p50_ms_24h IS 'Median attempt duration over the last 24 hours, ms.';
COMMENT ON COLUMN postback.endpoint_health.p95_ms_24h IS '95th percentile attempt duration over the last 24 hours, ms.';
COMMENT ON COLUMN postback.endpoint_health.consecutive_failures IS 'Failed attempts since the last successful one.';
COMMENT ON COLUMN postback.endpoint_health.failing_since IS 'Since when the endpoint fails; NULL while it succeeds.';
COMMENT ON COLUMN postback.endpoint_health.last_success_at IS 'Start of the last successful attempt.';
COMMENT ON COLUMN postback.endpoint_health.last_error IS 'Error of the last failed attempt.';
COMMENT ON COLUMN postback.endpoint_health.pending IS 'Deliveries waiting or in flight.';
COMMENT ON COLUMN postback.endpoint_health.oldest_pending_age IS 'Age of the oldest waiting or in-flight delivery.';
COMMENT ON VIEW postback.metrics IS 'Postback metrics over the last 24 hours, 7 days and all time (period), in total and per event and per endpoint (the other column NULL): success rate, commit-to-success latency, dedup, reversal and match rates.';
COMMENT ON COLUMN postback.metrics.period IS '24h, 7d or all.';
COMMENT ON COLUMN postback.metrics.event IS 'Conversion event of the row; NULL in total and per-endpoint rows.';
COMMENT ON COLUMN postback.metrics.endpoint IS 'Endpoint of the row; NULL in total and per-event rows.';
COMMENT ON COLUMN postback.metrics.deliveries_finished IS 'Deliveries created in the period that succeeded or died.';
COMMENT ON COLUMN postback.metrics.deliveries_succeeded IS 'Of those, succeeded.';
COMMENT ON COLUMN postback.metrics.success_rate IS 'Postback success rate: deliveries_succeeded ÷ deliveries_finished.';
COMMENT ON COLUMN postback.metrics.avg_commit_to_success_ms IS 'Average time from enqueue (the conversion''s commit) to success, ms.';
COMMENT ON COLUMN postback.metrics.p95_commit_to_success_ms IS '95th percentile time from enqueue to success, ms.';
COMMENT ON COLUMN postback.metrics.conversions IS 'Conversions created in the period (all events and endpoints).';
COMMENT ON COLUMN postback.metrics.dedup_rate IS 'Duplicates refused ÷ conversions offered (conversions + duplicates) in the period.';
COMMENT ON COLUMN postback.metrics.reversal_rate IS 'Conversions now reversed, refunded or charged back ÷ those plus the approved ones, in the period.';
COMMENT ON COLUMN postback.metrics.match_rate IS 'Conversions with a recorded click ÷ conversions, in the period.';
COMMENT ON VIEW postback.dead_letters IS 'Dead deliveries for review, with endpoint, conversion, attempts, last status code and error; postback.retry(delivery_id) sends one again.';
COMMENT ON COLUMN postback.dead_letters.delivery_id IS 'Delivery id (for postback.retry).';
COMMENT ON COLUMN postback.dead_letters.endpoint IS 'Endpoint name.';
COMMENT ON COLUMN postback.dead_letters.conversion_id IS 'Conversion id; NULL for a test delivery.';
COMMENT ON COLUMN postback.dead_letters.transaction_id IS 'The conversion''s transaction id.';
COMMENT ON COLUMN postback.dead_letters.partner IS 'The conversion''s partner.';
COMMENT ON COLUMN postback.dead_letters.event IS 'Event announced.';
COMMENT ON COLUMN postback.dead_letters.status IS 'Status announced.';
COMMENT ON COLUMN postback.dead_letters.attempts IS 'Attempts made.';
COMMENT ON COLUMN postback.dead_letters.died_at IS 'When it was given up.';
COMMENT ON COLUMN postback.dead_letters.last_error IS 'Why.';
COMMENT ON COLUMN postback.dead_letters.last_status_code IS 'HTTP status of the last attempt, if a response came.';
COMMENT ON COLUMN postback.dead_letters.created_at IS 'When it was enqueued.';
COMMENT ON COLUMN postback.endpoints.max_in_flight IS 'Most requests the worker has in flight to this endpoint at once (1 to 256, default 8): a hanging endpoint holds at most that many sending slots.';
COMMENT ON COLUMN postback.endpoints.rate_limit IS 'Most requests per second the worker sends to this endpoint (paced, not refused); NULL = no limit.';
COMMENT ON COLUMN postback.deliveries.leased_by IS 'Process id of the worker holding the lease while in_flight.';
COMMENT ON COLUMN postback.endpoint_state.breaker IS 'Circuit breaker: closed (sending), open (failing: deliveries wait, no attempt spent) or half_open (one probe in flight).';
COMMENT ON COLUMN postback.endpoint_state.breaker_since IS 'When the breaker last changed state.';
COMMENT ON COLUMN postback.endpoint_state.breaker_reason IS 'Why it changed (failures counted and the last error, or the probe''s result).';
COMMENT ON COLUMN postback.endpoint_health.breaker IS 'Circuit breaker state: closed, open or half_open.';
COMMENT ON COLUMN postback.endpoint_health.breaker_since IS 'When the breaker last changed state.';
COMMENT ON COLUMN postback.endpoint_health.breaker_reason IS 'Why it changed.';
COMMENT ON COLUMN postback.endpoints.success_statuses IS 'Status codes and ranges that count as success, e.g. {200-302}; NULL = 200-299. A 3xx listed here is success, not a redirect.';
COMMENT ON COLUMN postback.endpoints.retry_statuses IS 'Status codes and ranges that are retried, e.g. {409,500-599}; NULL = 408, 425, 429, 500-599. Any other failure is dead at once.';
COMMENT ON COLUMN postback.endpoints.initial_delay IS 'How long after enqueue the first attempt is due (0 to 1 day); lifecycle ordering still holds.';
COMMENT ON COLUMN postback.deliveries.success_pattern IS 'The endpoint''s success_body_pattern with this delivery''s values filled in (regex-escaped), when the pattern uses {variables}.';
COMMENT ON FUNCTION postback.validate_statuses(text[], text) IS 'Raises an error naming the column if a success_statuses or retry_statuses list holds anything but status codes (100-599) and ranges such as 200-302; true otherwise.';
