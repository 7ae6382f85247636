-- pg_postback 0.2.0 → 0.3.0. Applied by ALTER EXTENSION pg_postback UPDATE.
-- Everything that changed since 0.2.0, in one step; tests/e2e/test_upgrade.py
-- checks that 0.2.0 → 0.3.0 and 0.1.0 → 0.2.0 → 0.3.0 give the same objects as
-- a fresh 0.3.0 install, and that data and pending deliveries survive.

-- Writers wait for the update instead of deadlocking with it ----------------
-- An application's insert locks conversions, then (its trigger) clicks,
-- endpoints and deliveries; the worker deliveries, then attempts and
-- endpoint_state. The update changes most of these tables, so it takes every
-- lock it needs first, in that order, each try giving up after 200 ms (before
-- a writer's deadlock check could cancel either side) and trying again: an
-- insert during the update waits for it to commit (measured by bench/upgrade.py:
-- about 2 s beside 1M deliveries), it never fails. Without this, one insert
-- beside the update failed with "deadlock detected".
DO $$
DECLARE
    previous text := current_setting('lock_timeout');
BEGIN
    FOR attempt IN 1..600 LOOP
        BEGIN
            PERFORM pg_catalog.set_config('lock_timeout', '200ms', true);
            LOCK TABLE postback.conversions, postback.clicks, postback.endpoints, postback.endpoint_secrets,
                       postback.deliveries, postback.attempts, postback.endpoint_state,
                       postback.conversion_duplicates IN ACCESS EXCLUSIVE MODE;
            PERFORM pg_catalog.set_config('lock_timeout', previous, true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_catalog.pg_sleep(0.05);
        END;
    END LOOP;
    RAISE EXCEPTION 'pg_postback update: could not lock its tables in 3 minutes'
        USING ERRCODE = 'lock_not_available',
              HINT = 'A long transaction holds one of them (see pg_locks); run ALTER EXTENSION pg_postback UPDATE again once it ends.';
END
$$;

-- New functions of the 0.3.0 library ---------------------------------------

CREATE FUNCTION postback."sign_request"(
	"endpoint_id" bigint, "kind" TEXT, "signing_scheme" TEXT, "signature_header" TEXT,
	"timestamp_param" TEXT, "signature_param" TEXT, "url" TEXT, "url_hashes" jsonb,
	"headers" jsonb, "body" TEXT, "idempotency_key" TEXT
) RETURNS TABLE ("url" TEXT, "headers" jsonb)
VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'sign_request_wrapper';
CREATE FUNCTION postback."check_json_nesting"("value" TEXT, "column" TEXT) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'check_json_nesting_wrapper';

-- 0.2.0's finalize_request expanded hash markers found in the URL text (a
-- value could forge one and have the worker sign it): gone.
DROP FUNCTION postback.finalize_request(bigint, text, text, text, text, text, text, jsonb, text, text);

-- preview and send_test read named columns instead of positional text[]
DROP FUNCTION postback.render_preview(bigint, bigint);
DROP FUNCTION postback.render_test(bigint, jsonb);
CREATE FUNCTION postback."preview_request"("endpoint_id" bigint, "conversion_id" bigint)
RETURNS TABLE ("idempotency_key" TEXT, "url" TEXT, "url_hashes" jsonb, "body" TEXT, "error" TEXT, "routed" bool)
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'preview_request_wrapper';
CREATE FUNCTION postback."test_request"("endpoint_id" bigint, "sample" jsonb)
RETURNS TABLE ("idempotency_key" TEXT, "url" TEXT, "url_hashes" jsonb, "body" TEXT, "error" TEXT,
               "event" TEXT, "status" TEXT, "success_pattern" TEXT)
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'test_request_wrapper';
CREATE FUNCTION postback."rerender"("ids" bigint[]) RETURNS bigint
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'rerender_wrapper';
CREATE FUNCTION postback."validate_secret"("scheme" TEXT, "secret" TEXT) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_secret_wrapper';
CREATE FUNCTION postback."needs_secret"("signing_scheme" TEXT, "url_template" TEXT) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'needs_secret_wrapper';
CREATE FUNCTION postback."validate_status_map"("status_map" jsonb) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_status_map_wrapper';
CREATE FUNCTION postback."validate_events"("events" TEXT[]) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_events_wrapper';
CREATE FUNCTION postback."validate_endpoint_choices"("kind" TEXT, "method" TEXT, "signing_scheme" TEXT, "statuses" TEXT[] DEFAULT NULL)
RETURNS bool IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_endpoint_choices_wrapper';
CREATE FUNCTION postback."validate_endpoint_settings"(
	"name" TEXT, "kind" TEXT, "signing_scheme" TEXT, "retry_schedule_secs" double precision[], "max_attempts" INT,
	"max_age_secs" double precision, "timeout_secs" double precision, "max_in_flight" INT,
	"rate_limit" double precision, "initial_delay_secs" double precision, "signature_header" TEXT,
	"timestamp_param" TEXT, "signature_param" TEXT, "has_body_template" bool
) RETURNS bool IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'validate_endpoint_settings_wrapper';
CREATE FUNCTION postback."explain_routing"("conversion_id" bigint)
RETURNS TABLE ("endpoint_id" bigint, "filtered_out_by" TEXT)
STRICT STABLE LANGUAGE c AS 'MODULE_PATHNAME', 'explain_routing_wrapper';
CREATE FUNCTION postback."curl_command"("method" TEXT, "url" TEXT, "headers" jsonb, "body" TEXT, "timeout_ms" bigint)
RETURNS TEXT IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'curl_command_wrapper';
CREATE FUNCTION postback."latency_histogram"("values" double precision[]) RETURNS bigint[]
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'latency_histogram_wrapper';
CREATE FUNCTION postback."histogram_add"("a" bigint[], "b" bigint[]) RETURNS bigint[]
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'histogram_add_wrapper';
CREATE FUNCTION postback."histogram_quantile"("counts" bigint[], "q" double precision) RETURNS double precision
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'histogram_quantile_wrapper';

-- Deliveries: {hash:…} positions out of band; never-rendered rows stay dead --

ALTER TABLE postback.deliveries
    ADD COLUMN url_hashes jsonb,
    ADD COLUMN rendered boolean NOT NULL DEFAULT true,
    ADD COLUMN rendered_at timestamptz NOT NULL DEFAULT now();

-- An edit of what an endpoint's requests are made of renders its queued
-- deliveries again (endpoints_rerender_queue, below), finished ones when
-- resent: revised_at says when (the update's time for existing endpoints,
-- the same as their deliveries' rendered_at, so nothing counts as edited).
ALTER TABLE postback.endpoints ADD COLUMN revised_at timestamptz NOT NULL DEFAULT now();

-- A delivery that died at enqueue was never claimed (attempts = 0): its url
-- holds the unrendered template, which a retry must never send.
UPDATE postback.deliveries SET rendered = false WHERE state = 'dead' AND attempts = 0;

ALTER TABLE postback.deliveries
    ADD CONSTRAINT delivery_never_rendered_stays_dead CHECK (rendered OR state = 'dead');

-- Unsent 0.2.0 deliveries carry their digests as in-band markers
-- (~pgpb-hash~ALG~base64url(json)~). They become out-of-band positions only
-- when the URL holds exactly as many markers as the endpoint's template has
-- {hash:…} macros (then no value added one); any other such delivery is held
-- dead with the reason, and is never sent with a digest a value asked for.
DO $$
DECLARE
    d record;
    rest text;
    rebuilt text;
    slots jsonb;
    algorithm text;
    payload text;
    i integer;
    held integer := 0;
    moved integer := 0;
BEGIN
    FOR d IN
        SELECT x.id, x.url,
               pg_catalog.regexp_count(e.url_template, '\{\s*hash:') AS wanted,
               pg_catalog.regexp_count(x.url, '~pgpb-hash~') AS found
          FROM postback.deliveries x JOIN postback.endpoints e ON e.id = x.endpoint_id
         WHERE x.state IN ('pending', 'in_flight') AND pg_catalog.strpos(x.url, '~pgpb-hash~') > 0
           FOR UPDATE OF x
    LOOP
        BEGIN
            IF d.wanted <> d.found THEN
                RAISE EXCEPTION 'the URL holds % hash markers but the template has % {hash:…}', d.found, d.wanted;
            END IF;
            rest := d.url;
            rebuilt := '';
            slots := '[]';
            LOOP
                i := pg_catalog.strpos(rest, '~pgpb-hash~');
                EXIT WHEN i = 0;
                rebuilt := rebuilt || pg_catalog.substr(rest, 1, i - 1);
                rest := pg_catalog.substr(rest, i + 11);
                algorithm := pg_catalog.split_part(rest, '~', 1);
                payload := pg_catalog.split_part(rest, '~', 2);
                IF algorithm NOT IN ('md5', 'sha1', 'sha256') OR payload = '' THEN
                    RAISE EXCEPTION 'a hash marker is malformed';
                END IF;
                rest := pg_catalog.substr(rest, pg_catalog.length(algorithm) + pg_catalog.length(payload) + 3);
                payload := pg_catalog.translate(payload, '-_', '+/');
                payload := payload || pg_catalog.repeat('=', (4 - pg_catalog.length(payload) % 4) % 4);
                slots := slots || pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
                    'at', pg_catalog.octet_length(rebuilt), 'alg', algorithm,
                    'parts', pg_catalog.convert_from(pg_catalog.decode(payload, 'base64'), 'UTF8')::jsonb));
            END LOOP;
            UPDATE postback.deliveries SET url = rebuilt || rest, url_hashes = slots WHERE id = d.id;
            moved := moved + 1;
        EXCEPTION WHEN OTHERS THEN
            UPDATE postback.deliveries
               SET state = 'dead', completed_at = pg_catalog.now(), lease_expires_at = NULL, leased_by = NULL,
                   rendered = false,
                   last_error = 'held by the 0.3.0 update: its URL carries 0.2.0 hash markers that cannot be told '
                                'from ones a value inserted (' || SQLERRM || '); not sent'
             WHERE id = d.id;
            held := held + 1;
        END;
    END LOOP;
    IF moved + held > 0 THEN
        RAISE WARNING 'pg_postback 0.3.0: % unsent deliveries with {hash:…} digests moved to url_hashes, % held dead (see last_error)', moved, held;
    END IF;
END
$$;

-- Lifecycle predecessors by index probe (was a key-range max(id) that the
-- planner turned into a backward scan of the whole primary key). CREATE INDEX
-- here holds a SHARE lock on deliveries while it builds (writes wait; reads go
-- on): about a second per million rows. On a large table, build it first
-- without that lock, and this statement then finds it:
--   CREATE INDEX CONCURRENTLY deliveries_conversion ON postback.deliveries
--       (conversion_id, endpoint_id, id) WHERE conversion_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_conversion ON postback.deliveries (conversion_id, endpoint_id, id)
    WHERE conversion_id IS NOT NULL;

-- A slow endpoint's due deliveries are claimed on their own through this index
-- (its backlog never fills the window the others are claimed from). Like
-- deliveries_conversion above: on a large backlog, build it first with
--   CREATE INDEX CONCURRENTLY deliveries_endpoint_due ON postback.deliveries
--       (endpoint_id, next_attempt_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_endpoint_due ON postback.deliveries (endpoint_id, next_attempt_at)
    WHERE state = 'pending';

-- The newest dead letters, read newest first (dead_letters ORDER BY died_at
-- DESC LIMIT 20 read every dead delivery: 372 ms beside 10M finished ones).
-- Dead deliveries are few, so this builds fast; on a large table it can be
-- built first with
--   CREATE INDEX CONCURRENTLY deliveries_died_at ON postback.deliveries (completed_at) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS deliveries_died_at ON postback.deliveries (completed_at) WHERE state = 'dead';

-- Attributes nest at most 32 levels (a deeper click or conversion is refused
-- when written, naming the column, instead of failing a later import whole).
ALTER TABLE postback.conversions ADD CONSTRAINT attributes_nest_at_most_32_levels
    CHECK (postback.check_json_nesting(attributes::text, 'conversions.attributes'));
ALTER TABLE postback.clicks ADD CONSTRAINT click_attributes_nest_at_most_32_levels
    CHECK (postback.check_json_nesting(attributes::text, 'clicks.attributes'));

-- The live secrets of an endpoint, newest first: what signs its requests and
-- fills its {hash:…} digests. The worker and sign_request both read them here.
CREATE FUNCTION postback.live_secrets(endpoint_id bigint) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(k.secret ORDER BY k.created_at DESC, k.id DESC), '{}')
      FROM postback.endpoint_secrets k
     WHERE k.endpoint_id = live_secrets.endpoint_id AND (k.expires_at IS NULL OR k.expires_at > now())
$$;

-- Functions whose bodies changed -------------------------------------------

CREATE OR REPLACE FUNCTION postback.preview(endpoint text, conversion_id bigint)
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
           r.body, r.error, r.routed
      FROM postback.endpoints e
     CROSS JOIN LATERAL postback.preview_request(e.id, preview.conversion_id) AS r
      LEFT JOIN LATERAL postback.sign_request(
           e.id, e.kind, e.signing_scheme, e.signature_header, e.timestamp_param, e.signature_param,
           r.url, r.url_hashes, nullif(e.headers, '{}'), r.body, r.idempotency_key) f ON true
     WHERE e.name = preview.endpoint;
END
$$;

CREATE OR REPLACE FUNCTION postback.resend(ids bigint[]) RETURNS integer
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

CREATE OR REPLACE FUNCTION postback.retry(delivery_id bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current text;
    is_test boolean;
    why text;
BEGIN
    SELECT d.state, d.conversion_id IS NULL INTO current, is_test
      FROM postback.deliveries d WHERE d.id = retry.delivery_id FOR UPDATE;
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

CREATE OR REPLACE FUNCTION postback.send_test(endpoint text, sample jsonb DEFAULT '{}') RETURNS bigint
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

CREATE OR REPLACE FUNCTION postback.replay(endpoint text, since timestamptz, until timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF since IS NULL OR until IS NULL OR since >= until THEN
        RAISE EXCEPTION 'replay needs since < until (got % and %)', since, until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- test deliveries (no conversion) are never replayed to the partner
    RETURN postback.resend(ARRAY(
        SELECT d.id FROM postback.deliveries d
         WHERE d.endpoint_id = postback.endpoint_id(endpoint) AND d.state = 'succeeded'
           AND d.conversion_id IS NOT NULL AND d.created_at >= since AND d.created_at < until));
END
$$;

CREATE OR REPLACE FUNCTION postback.endpoints_fill_defaults() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    seen text[];
    unseen text[];
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
    IF NEW.status_map IS NOT NULL AND (TG_OP = 'INSERT' OR NEW.status_map IS DISTINCT FROM OLD.status_map) THEN
        PERFORM postback.validate_status_map(NEW.status_map);
    END IF;
    IF NEW.events IS NOT NULL AND (TG_OP = 'INSERT' OR NEW.events IS DISTINCT FROM OLD.events) THEN
        PERFORM postback.validate_events(NEW.events);
        -- events are free text: say when one has not been seen lately (a typo never fires)
        SELECT pg_catalog.array_agg(DISTINCT r.event ORDER BY r.event) INTO seen
          FROM (SELECT c.event FROM postback.conversions c ORDER BY c.id DESC LIMIT 10000) r;
        unseen := ARRAY(SELECT u FROM pg_catalog.unnest(NEW.events) u WHERE u <> ALL (seen));
        IF seen IS NOT NULL AND pg_catalog.cardinality(unseen) > 0 THEN
            RAISE NOTICE 'endpoint "%": no recent conversion has event %; the events seen lately are %',
                         NEW.name, unseen, seen
                USING HINT = 'An endpoint fires only for conversions whose event it lists, spelled exactly.';
        END IF;
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
    IF NEW.kind IS NOT NULL AND NEW.method IS NOT NULL AND NEW.signing_scheme IS NOT NULL THEN
        PERFORM postback.validate_endpoint_choices(NEW.kind, NEW.method, NEW.signing_scheme, NEW.statuses);
    END IF;
    PERFORM postback.validate_endpoint_settings(
        NEW.name, NEW.kind, NEW.signing_scheme,
        ARRAY(SELECT extract(epoch FROM s.step)::float8
                FROM pg_catalog.unnest(NEW.retry_schedule) WITH ORDINALITY AS s (step, n) ORDER BY s.n),
        NEW.max_attempts, extract(epoch FROM NEW.max_age)::float8, extract(epoch FROM NEW.timeout)::float8,
        NEW.max_in_flight, NEW.rate_limit::float8, extract(epoch FROM NEW.initial_delay)::float8,
        NEW.signature_header, NEW.timestamp_param, NEW.signature_param, NEW.body_template IS NOT NULL);
    IF TG_OP = 'UPDATE' AND NEW.signing_scheme IS DISTINCT FROM OLD.signing_scheme THEN
        -- the live secrets must sign with the new scheme (expire those that do not)
        PERFORM postback.validate_secret(NEW.signing_scheme, k.secret)
           FROM postback.endpoint_secrets k
          WHERE k.endpoint_id = NEW.id AND (k.expires_at IS NULL OR k.expires_at > now());
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
        -- what the deliveries' requests were rendered from: queued ones are
        -- rendered again (endpoints_rerender_queue), finished ones when resent
        IF (NEW.kind, NEW.method, NEW.url_template, NEW.body_template, NEW.status_map,
            NEW.drop_empty_params, NEW.success_body_pattern)
           IS DISTINCT FROM
           (OLD.kind, OLD.method, OLD.url_template, OLD.body_template, OLD.status_map,
            OLD.drop_empty_params, OLD.success_body_pattern) THEN
            NEW.revised_at := now();
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION postback.rerender_queue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
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

CREATE OR REPLACE FUNCTION postback.endpoint_secrets_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM postback.validate_secret(e.signing_scheme, NEW.secret)
       FROM postback.endpoints e WHERE e.id = NEW.endpoint_id;
    RETURN NEW;
END
$$;

CREATE TRIGGER endpoint_secrets_check
    BEFORE INSERT OR UPDATE OF secret, endpoint_id ON postback.endpoint_secrets
    FOR EACH ROW EXECUTE FUNCTION postback.endpoint_secrets_check();

-- A numeric amount of Infinity passed "amount_must_be_a_finite_number" and was
-- sent as payout=Infinity. Rows that hold one already are left as they are
-- (a WARNING counts them); the constraint then checks new rows only.
ALTER TABLE postback.conversions DROP CONSTRAINT amount_must_be_a_finite_number;
ALTER TABLE postback.conversions ADD CONSTRAINT amount_must_be_a_finite_number
    CHECK (amount IS NULL OR amount NOT IN ('NaN'::numeric, 'Infinity'::numeric, '-Infinity'::numeric)) NOT VALID;
DO $$
DECLARE
    infinite bigint;
BEGIN
    SELECT count(*) INTO infinite FROM postback.conversions
     WHERE amount IN ('Infinity'::numeric, '-Infinity'::numeric);
    IF infinite = 0 THEN
        ALTER TABLE postback.conversions VALIDATE CONSTRAINT amount_must_be_a_finite_number;
    ELSE
        RAISE WARNING 'pg_postback: % conversions have an infinite amount; amount_must_be_a_finite_number checks new rows only until they are corrected', infinite;
    END IF;
END
$$;

-- Since when the worker finds an endpoint slow (endpoint_health.slow_since)
ALTER TABLE postback.endpoint_state ADD COLUMN slow_since timestamptz;

-- endpoint_health: held_by (why deliveries wait), last_error only while failing,
-- in_flight and slow_since (how much of the sending capacity it holds)
CREATE OR REPLACE FUNCTION postback.held_by(endpoint_id bigint) RETURNS text
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

-- Attempt durations of the last day per endpoint (p50/p95 over the last hour and
-- the last day), for endpoint_health: each attempt finds its delivery's endpoint
-- by one primary-key probe, so the cost follows the day's attempts, not the
-- history (a hash of every delivery read the whole table: 285 ms of 485 beside
-- 1M finished deliveries). A function so that it runs without JIT: the planner
-- prices those probes above jit_optimize_above_cost and compiled the query for
-- 600 ms to run it in 150.
CREATE FUNCTION postback.attempt_latency()
RETURNS TABLE (endpoint_id bigint, p50_ms_1h double precision, p95_ms_1h double precision,
               p50_ms_24h double precision, p95_ms_24h double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    WITH bounds AS (
        SELECT date_trunc('hour', now() - interval '24 hours', 'UTC') AS day_since,
               greatest(date_trunc('hour', now() - interval '24 hours', 'UTC'),
                        coalesce((SELECT s.attempts_until FROM postback.rollup_state s), '-infinity')) AS rolled),
    recent AS (
        SELECT d.endpoint_id, a.started_at, a.duration_ms
          FROM bounds b, postback.attempts a
          CROSS JOIN LATERAL (SELECT x.endpoint_id FROM postback.deliveries x WHERE x.id = a.delivery_id LIMIT 1) d
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
      FROM hour h FULL JOIN day d ON d.endpoint_id = h.endpoint_id
$$;

CREATE OR REPLACE VIEW postback.endpoint_health AS
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
       postback.held_by(e.id) AS held_by,
       coalesce(b.in_flight, 0) AS in_flight, s.slow_since
  FROM postback.endpoints e
  LEFT JOIN recent r ON r.endpoint_id = e.id
  LEFT JOIN latency l ON l.endpoint_id = e.id
  LEFT JOIN backlog b ON b.endpoint_id = e.id
  LEFT JOIN postback.endpoint_state s ON s.endpoint_id = e.id;

CREATE OR REPLACE FUNCTION postback.explain(conversion_id bigint)
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
      LEFT JOIN LATERAL (
           SELECT array_agg(x.id ORDER BY x.id) AS ids, array_agg(x.status ORDER BY x.id) AS announced,
                  array_agg(x.state ORDER BY x.id) AS states, sum(x.attempts)::integer AS attempts,
                  min(x.next_attempt_at) FILTER (WHERE x.state = 'pending') AS next_at,
                  (array_agg(x.last_error ORDER BY x.id DESC))[1] AS last_error
             FROM postback.deliveries x
            WHERE x.conversion_id = c.id AND x.endpoint_id = e.id
           HAVING count(*) > 0) d ON true
     ORDER BY d.ids IS NULL, e.name;
END
$$;

CREATE OR REPLACE FUNCTION postback.explain(transaction_id text)
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

CREATE OR REPLACE FUNCTION postback.grant_analyst(role regrole) RETURNS void
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
                   'postback.metrics, postback.dead_letters, postback.delivery_rollup, postback.conversion_rollup, '
                   'postback.attempt_rollup, postback.rollup_state, postback.watches TO %s', role);
    EXECUTE format('GRANT SELECT (%s) ON postback.endpoints TO %s', readable, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.worker_status(), postback.worker_stats(), '
                   'postback.explain(bigint), postback.explain(text), postback.held_by(bigint) TO %s', role);
END
$$;

CREATE OR REPLACE FUNCTION postback.curl(delivery_id bigint) RETURNS text
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

CREATE OR REPLACE FUNCTION postback.grant_operator(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM postback.grant_analyst(role);
    EXECUTE format('GRANT INSERT, UPDATE ON postback.conversions, postback.clicks TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.preview(text, bigint), postback.retry(bigint), '
                   'postback.retry_dead(text, timestamptz), postback.replay(text, timestamptz, timestamptz), '
                   'postback.send_test(text, jsonb), postback.pause(text), postback.resume(text), '
                   'postback.curl(bigint), postback.purge_tests(interval) TO %s', role);
    -- watch: only of tables the role owns (watch checks), with the helpers it calls as the role
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.watch(regclass, jsonb), postback.unwatch(regclass), '
                   'postback.watch_check(regclass, text, jsonb, regtype), postback.watch_expression(regclass, text), '
                   'postback.watch_fields(), postback.watch_drop_triggers(regclass) TO %s', role);
END
$$;

-- worker_stats and worker_status say how much of the sending capacity slow
-- endpoints hold, and list every worker of every database (new columns at
-- the end; worker_status returns a row per worker). Their grants come back below with
-- grant_operator/grant_analyst for the roles that have them.
DROP FUNCTION postback.worker_status();
DROP FUNCTION postback.worker_stats();
CREATE FUNCTION postback."worker_stats"() RETURNS TABLE (
	"pid" INT, "started_at" timestamp with time zone, "last_wake" timestamp with time zone,
	"sent" bigint, "succeeded" bigint, "failed" bigint, "in_flight" INT, "last_error" TEXT,
	"last_error_at" timestamp with time zone, "concurrency" INT, "slow_endpoints" INT, "in_flight_slow" INT,
	"database" TEXT, "worker" INT, "workers" INT, "state" TEXT, "role" TEXT
)
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'worker_stats_wrapper';
REVOKE EXECUTE ON FUNCTION postback.worker_stats() FROM PUBLIC;
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
REVOKE EXECUTE ON FUNCTION postback.worker_status() FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- delivery_rollup: finished deliveries counted by the hour (UTC), kept after
-- the deliveries themselves are purged; postback.metrics reads it
-- ---------------------------------------------------------------------------
CREATE TABLE postback.delivery_rollup (
    span           text             NOT NULL
        CONSTRAINT rollup_span_must_be_hour_or_day CHECK (span IN ('hour', 'day')),
    hour           timestamptz      NOT NULL,
    endpoint_id    bigint           NOT NULL,
    event          text             NOT NULL,
    partner        text             NOT NULL,
    succeeded      bigint           NOT NULL,
    dead           bigint           NOT NULL,
    timed          bigint           NOT NULL,
    latency_ms_sum double precision NOT NULL,
    latency_hist   bigint[]         NOT NULL,
    attempts       bigint           NOT NULL DEFAULT 0,
    PRIMARY KEY (span, hour, endpoint_id, event, partner)
);
REVOKE ALL ON postback.delivery_rollup FROM PUBLIC;

-- How far delivery_rollup goes: deliveries finished before rolled_until are in
-- it. One row, written by the first postback.roll_up (none yet: nothing rolled);
-- not created here, so that a dump's row restores without a conflict.
CREATE TABLE postback.rollup_state (
    singleton    boolean     PRIMARY KEY DEFAULT true CONSTRAINT rollup_state_has_one_row CHECK (singleton),
    rolled_until timestamptz NOT NULL,
    conversions_until timestamptz,
    attempts_until timestamptz
);
REVOKE ALL ON postback.rollup_state FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- conversion_rollup: conversions counted by the hour (UTC) they were created,
-- partner, status and whether their click was recorded; postback.metrics and
-- postback.match_rate add the hours not rolled up yet, so neither reads the
-- whole history. Rolled an hour behind (rollup_state.conversions_until).
-- ---------------------------------------------------------------------------
CREATE TABLE postback.conversion_rollup (
    span        text        NOT NULL
        CONSTRAINT conversion_rollup_span_must_be_hour_or_day CHECK (span IN ('hour', 'day')),
    hour        timestamptz NOT NULL,
    partner     text        NOT NULL,
    status      text        NOT NULL,
    matched     boolean     NOT NULL,
    conversions bigint      NOT NULL,
    PRIMARY KEY (span, hour, partner, status, matched)
);
REVOKE ALL ON postback.conversion_rollup FROM PUBLIC;

-- Changes to conversions already counted in conversion_rollup (a status
-- changed, a row deleted, a row inserted with an earlier created_at),
-- appended by a statement trigger so that concurrent writers never wait on
-- each other; postback.roll_up merges them.
CREATE TABLE postback.conversion_rollup_changes (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    hour        timestamptz NOT NULL,
    partner     text        NOT NULL,
    status      text        NOT NULL,
    matched     boolean     NOT NULL,
    conversions bigint      NOT NULL
);
REVOKE ALL ON postback.conversion_rollup_changes FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- attempt_rollup: attempt durations (attempts that got a response) per hour
-- they started (UTC) and endpoint, as latency histograms, kept two days:
-- endpoint_health's 24-hour percentiles read it instead of a day of attempts.
-- ---------------------------------------------------------------------------
CREATE TABLE postback.attempt_rollup (
    hour          timestamptz NOT NULL,
    endpoint_id   bigint      NOT NULL,
    attempts      bigint      NOT NULL,
    duration_hist bigint[]    NOT NULL,
    PRIMARY KEY (hour, endpoint_id)
);
REVOKE ALL ON postback.attempt_rollup FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('postback.delivery_rollup', '');
SELECT pg_catalog.pg_extension_config_dump('postback.rollup_state', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_rollup', '');
SELECT pg_catalog.pg_extension_config_dump('postback.attempt_rollup', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_rollup_changes', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_rollup_changes_id_seq', '');

CREATE FUNCTION postback.finished_between(since timestamptz, until timestamptz)
RETURNS TABLE (hour timestamptz, endpoint_id bigint, event text, partner text, succeeded bigint, dead bigint,
               timed bigint, latency_ms_sum double precision, latency_hist bigint[], attempts bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
      JOIN postback.conversions c ON c.id = d.conversion_id
     WHERE d.completed_at >= finished_between.since AND d.completed_at < finished_between.until
       AND d.state IN ('succeeded', 'dead')
     GROUP BY 1, 2, 3, 4
$$;

CREATE AGGREGATE postback.histogram_sum(bigint[]) (SFUNC = postback.histogram_add, STYPE = bigint[]);

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

-- metrics: from delivery_rollup, per partner, dead counts, conversion figures on total rows only
CREATE OR REPLACE VIEW postback.metrics AS
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

CREATE OR REPLACE FUNCTION postback.refuse_delete_with_deliveries() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    referenced text;
BEGIN
    IF TG_TABLE_NAME = 'endpoints' THEN
        SELECT format('endpoint %L', o.name) INTO referenced FROM old_rows o
         WHERE EXISTS (SELECT 1 FROM postback.deliveries d WHERE d.endpoint_id = o.id) LIMIT 1;
    ELSE
        SELECT format('conversion %L', o.transaction_id) INTO referenced FROM old_rows o
         WHERE EXISTS (SELECT 1 FROM postback.deliveries d WHERE d.conversion_id = o.id) LIMIT 1;
    END IF;
    IF referenced IS NOT NULL THEN
        RAISE EXCEPTION 'cannot delete %: it still has deliveries', referenced
            USING ERRCODE = 'foreign_key_violation',
                  HINT = CASE TG_TABLE_NAME
                      WHEN 'endpoints' THEN 'Set active = false to stop an endpoint, or delete its deliveries first.'
                      ELSE 'Delete the conversion''s deliveries first (postback.deliveries), or keep the conversion.' END;
    END IF;
    RETURN NULL;
END
$$;

-- A repeated transaction_id is refused by the unique constraint; its name now
-- says what to write to skip repeats (a hint a trigger could only give at the
-- cost of a second look-up per row).
ALTER TABLE postback.conversions
    RENAME CONSTRAINT transaction_id_is_unique TO transaction_id_is_unique_use_on_conflict_do_nothing_to_skip;
DO $$
BEGIN
    RAISE WARNING 'pg_postback 0.3.0: constraint transaction_id_is_unique on postback.conversions is now transaction_id_is_unique_use_on_conflict_do_nothing_to_skip; ON CONFLICT (transaction_id) is unaffected, ON CONFLICT ON CONSTRAINT must use the new name';
END
$$;

-- Privileges ---------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION postback.sign_request(bigint, text, text, text, text, text, text, jsonb, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.live_secrets(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender(bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender_queue() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.explain(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.purge_tests(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.roll_up(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.roll_up_conversions(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.roll_up_attempts() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.count_conversion_changes() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.held_by(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.curl(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.explain(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.explain_routing(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.preview_request(bigint, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.test_request(bigint, jsonb) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- watch: postbacks from a table the application already has (orders, sales).
-- postback.watch(source, mapping) puts triggers on the table: its INSERTs
-- become conversions (and their deliveries) in the same transaction, UPDATEs
-- of mapped fields become lifecycle postbacks, a DELETE becomes a status when
-- the mapping says which. The mapping's expressions run with the rights of
-- the table's owner (a SECURITY DEFINER function owned by that owner, created
-- in the table's schema): nothing in them runs as anyone else, and the people
-- who insert into the table need no grant on postback.
-- ---------------------------------------------------------------------------

-- The conversion fields a mapping may name, with the type each is written as.
CREATE FUNCTION postback.watch_fields(OUT field text, OUT type regtype, OUT required boolean)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    VALUES ('click_id', 'text'::regtype, true), ('transaction_id', 'text', true), ('event', 'text', false),
           ('status', 'text', false), ('amount', 'numeric', false), ('currency', 'text', false),
           ('occurred_at', 'timestamptz', false), ('partner', 'text', false), ('attributes', 'jsonb', false)
$$;

-- The SQL a mapping value stands for over the row alias r: a column of the
-- source (r."column") or, otherwise, an SQL expression over its columns.
CREATE FUNCTION postback.watch_expression(source regclass, value text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = source AND a.attname = value AND a.attnum > 0 AND NOT a.attisdropped)
                THEN 'r.' || pg_catalog.quote_ident(value)
                ELSE '(' || value || ')' END
$$;

-- Checks one mapping value against the source: it must be a column or an SQL
-- expression over the row whose type can be written into the field (any type
-- into a text field, as an INSERT would). Raises naming the field; returns the
-- SQL for it. Runs as the caller (the table's owner): the expression is only
-- planned (a cursor, which takes a single statement, then a temporary view
-- for its type), never run.
CREATE FUNCTION postback.watch_check(source regclass, field text, value jsonb, target regtype) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expression text;
    got regtype;
    base regtype;
    state text;
    message text;
    probe refcursor;
BEGIN
    IF pg_catalog.jsonb_typeof(value) IS DISTINCT FROM 'string' OR btrim(value #>> '{}') = '' THEN
        RAISE EXCEPTION 'mapping field "%" must be a column name or an SQL expression over the row, as a JSON string', field
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = pg_catalog.format('It is %s.', coalesce(value::text, 'missing')),
                  HINT = pg_catalog.format('For example {"%s": "%s"} names a column of %s.', field, field, source);
    END IF;
    expression := postback.watch_expression(source, value #>> '{}');
    BEGIN
        -- a cursor takes one statement only, and is planned without running it
        -- ("1) FROM t; DELETE …" is refused here, before anything runs)
        OPEN probe FOR EXECUTE pg_catalog.format('SELECT %s AS v FROM %s AS r WHERE false', expression, source);
        CLOSE probe;
        EXECUTE pg_catalog.format('CREATE TEMPORARY VIEW postback_watch_check AS SELECT %s AS v FROM %s AS r',
                                  expression, source);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
        RAISE EXCEPTION 'mapping field "%" (%): %', field, value #>> '{}', message
            USING ERRCODE = state,
                  HINT = pg_catalog.format('Name a column of %s or write an SQL expression over its columns; columns: %s.',
                                           source, (SELECT string_agg(a.attname, ', ' ORDER BY a.attnum)
                                                      FROM pg_catalog.pg_attribute a
                                                     WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped));
    END;
    SELECT a.atttypid INTO got FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = 'pg_temp.postback_watch_check'::regclass AND a.attname = 'v';
    DROP VIEW pg_temp.postback_watch_check;
    base := coalesce((SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = got AND t.typtype = 'd'), got);
    IF base <> target AND target <> 'text'::regtype
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_cast c
                        WHERE c.castsource = base AND c.casttarget = target AND c.castcontext IN ('a', 'i')) THEN
        RAISE EXCEPTION 'mapping field "%" (%) is of type %, which cannot be written as %', field, value #>> '{}', got, target
            USING ERRCODE = 'datatype_mismatch',
                  HINT = CASE WHEN field = 'when' THEN 'The "when" expression must be boolean: rows for which it is true become conversions.'
                              ELSE pg_catalog.format('Convert it in the expression, for example "(%s)::%s".', value #>> '{}', target) END;
    END IF;
    RETURN expression;
END
$$;

-- Drops a watch's triggers from the table and its partitions (those a
-- partitioned table's row trigger put on its partitions go with it).
CREATE FUNCTION postback.watch_drop_triggers(source regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT g.tgname, g.tgrelid::regclass AS rel
               FROM (SELECT source AS relid UNION ALL
                     SELECT p.relid FROM pg_catalog.pg_partition_tree(source) p WHERE p.relid <> source) m
               JOIN pg_catalog.pg_trigger g ON g.tgrelid = m.relid
              WHERE g.tgname IN ('postback_watch_insert', 'postback_watch_update', 'postback_watch_delete')
                AND g.tgparentid = 0 LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$$;

CREATE FUNCTION postback.watch(source regclass, mapping jsonb) RETURNS regprocedure
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    owner_name name;
    f record;
    columns text[] := '{}';
    exprs text[] := '{}';
    changed text[] := '{}';
    direct text[] := '{}';
    excluded text[] := '{}';
    x text;
    where_sql text := 'true';
    on_delete text;
    attributes_sql text;
    function_name text;
    qualified text;
    existing regprocedure;
    body text;
    cols text;
    c_cols text;
    n_cols text;
    tx text;
    keys text[];
    key_names text;
    update_sql text;
    delete_sql text;
    member regclass;
    probe refcursor;
    state text;
    message text;
BEGIN
    IF source IS NULL OR mapping IS NULL THEN
        RAISE EXCEPTION 'source and mapping must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relname, c.relnamespace, n.nspname, c.relkind, c.relowner INTO rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = source;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', source
            USING ERRCODE = 'wrong_object_type', HINT = 'Only a table (plain or partitioned) can be watched.';
    END IF;
    IF rel.nspname IN ('postback', 'pg_catalog', 'information_schema') OR rel.nspname LIKE 'pg\_%' THEN
        RAISE EXCEPTION 'a table in schema % cannot be watched', rel.nspname
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Watch the application''s own table; rows written into postback.conversions are delivered already.';
    END IF;
    owner_name := pg_catalog.pg_get_userbyid(rel.relowner);
    IF NOT pg_catalog.pg_has_role(current_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to watch it', source
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = pg_catalog.format('%s is owned by %s.', source, owner_name),
                  HINT = 'The mapping''s expressions run with the rights of the table''s owner, so only that owner (or a superuser) may write them.';
    END IF;
    IF pg_catalog.jsonb_typeof(mapping) <> 'object' THEN
        RAISE EXCEPTION 'mapping must be a JSON object, not %', pg_catalog.jsonb_typeof(mapping)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example {"click_id": "click_id", "transaction_id": "order_id::text", "amount": "total"}.';
    END IF;
    SELECT k INTO x FROM pg_catalog.jsonb_object_keys(mapping) k
     WHERE k NOT IN (SELECT w.field FROM postback.watch_fields() w) AND k NOT IN ('when', 'exclude', 'on_delete')
     LIMIT 1;
    IF x IS NOT NULL THEN
        RAISE EXCEPTION 'unknown mapping key "%"', x
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Valid keys: ' || (SELECT string_agg(w.field, ', ') FROM postback.watch_fields() w)
                           || ', when, exclude, on_delete.';
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO columns FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = source AND a.attnum > 0 AND NOT a.attisdropped;

    FOR f IN SELECT * FROM postback.watch_fields() LOOP
        IF NOT mapping ? f.field THEN
            IF f.required THEN
                RAISE EXCEPTION 'the mapping has no "%"', f.field
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = CASE f.field
                              WHEN 'transaction_id' THEN 'Name the column (or an SQL expression) that identifies the conversion, such as the order id: it is unique in postback.conversions and an UPDATE of the row finds its conversion by it.'
                              ELSE 'Name the column (or an SQL expression) holding the click id the network passed.' END;
            END IF;
            CONTINUE;
        END IF;
        x := postback.watch_check(source, f.field, mapping -> f.field, f.type);
        IF (mapping ->> f.field) = ANY (columns) THEN
            direct := direct || (mapping ->> f.field);
        END IF;
        changed := changed || f.field;
        exprs := exprs || pg_catalog.format('(%s)::%s', x, f.type);
    END LOOP;

    IF mapping ? 'exclude' THEN
        IF pg_catalog.jsonb_typeof(mapping -> 'exclude') <> 'array'
           OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(mapping -> 'exclude') e WHERE pg_catalog.jsonb_typeof(e) <> 'string') THEN
            RAISE EXCEPTION 'mapping "exclude" must be a JSON array of column names'
                USING ERRCODE = 'invalid_parameter_value', HINT = 'For example {"exclude": ["card_number", "email"]}.';
        END IF;
        SELECT e INTO x FROM pg_catalog.jsonb_array_elements_text(mapping -> 'exclude') e WHERE e <> ALL (columns) LIMIT 1;
        IF x IS NOT NULL THEN
            RAISE EXCEPTION 'mapping "exclude" names "%", which is not a column of %', x, source
                USING ERRCODE = 'undefined_column', HINT = 'Columns: ' || array_to_string(columns, ', ') || '.';
        END IF;
        excluded := ARRAY(SELECT pg_catalog.jsonb_array_elements_text(mapping -> 'exclude'));
    END IF;
    IF mapping ? 'when' THEN
        where_sql := postback.watch_check(source, 'when', mapping -> 'when', 'boolean');
    END IF;
    IF mapping ? 'on_delete' THEN
        on_delete := mapping ->> 'on_delete';
        IF pg_catalog.jsonb_typeof(mapping -> 'on_delete') <> 'string'
           OR on_delete NOT IN ('pending', 'approved', 'rejected', 'reversed', 'refunded', 'chargeback') THEN
            RAISE EXCEPTION 'mapping "on_delete" must be the status a deleted row announces, not %', mapping -> 'on_delete'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = 'Valid values: pending, approved, rejected, reversed, refunded, chargeback.',
                      HINT = 'Leave it out and a DELETE announces nothing.';
        END IF;
    END IF;
    IF NOT mapping ? 'attributes' THEN
        -- every column not mapped by name nor excluded, by name
        attributes_sql := 'pg_catalog.to_jsonb(r.*)';
        IF cardinality(direct || excluded) > 0 THEN
            attributes_sql := attributes_sql || pg_catalog.format(' - %L::text[]', direct || excluded);
        END IF;
        changed := changed || 'attributes'::text;
        exprs := exprs || attributes_sql;
    END IF;

    IF NOT pg_catalog.has_schema_privilege(current_user, rel.relnamespace, 'CREATE') THEN
        RAISE EXCEPTION 'watch creates the trigger function of % in schema %, where % may not create', source, rel.nspname, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = pg_catalog.format('GRANT CREATE ON SCHEMA %I TO %I; or let a superuser watch the table.', rel.nspname, current_user);
    END IF;
    -- the owner writes the conversions: it needs what an operator has
    IF NOT pg_catalog.has_schema_privilege(rel.relowner, 'postback', 'USAGE')
       OR NOT pg_catalog.has_table_privilege(rel.relowner, 'postback.conversions', 'INSERT, UPDATE') THEN
        RAISE EXCEPTION 'the owner of %, %, cannot write postback.conversions', source, owner_name
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'The watch''s trigger writes the conversions with the rights of the table''s owner.',
                  HINT = pg_catalog.format('A superuser runs SELECT postback.grant_operator(%L); then watch again.', owner_name);
    END IF;

    -- the fields together: one statement (an aggregate in one field and a
    -- column in another is refused here, not on the table's next insert)
    BEGIN
        OPEN probe FOR EXECUTE pg_catalog.format('SELECT %s FROM %s AS r WHERE (%s) AND false',
                                                 array_to_string(exprs, ', '), source, where_sql);
        CLOSE probe;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
        RAISE EXCEPTION 'the mapping''s fields do not make one row per row of %: %', source, message
            USING ERRCODE = state,
                  HINT = 'Each field is a value of one row: no aggregates (sum, count), window or set-returning functions.';
    END;

    -- <table>_postback_watch, the table's name cut to fit 63 bytes
    function_name := rel.relname;
    WHILE octet_length(function_name) > 48 LOOP
        function_name := left(function_name, -1);
    END LOOP;
    function_name := function_name || '_postback_watch';
    qualified := pg_catalog.format('%I.%I', rel.nspname, function_name);
    existing := pg_catalog.to_regprocedure(qualified || '()');
    IF existing IS NOT NULL AND existing IS DISTINCT FROM (
           SELECT t.tgfoid FROM pg_catalog.pg_trigger t WHERE t.tgrelid = source AND t.tgname = 'postback_watch_insert') THEN
        RAISE EXCEPTION 'function %() exists and is not this table''s watch', qualified
            USING ERRCODE = 'duplicate_function', HINT = 'Rename or drop it; watch creates its trigger function under that name.';
    END IF;

    cols := (SELECT string_agg(pg_catalog.quote_ident(c), ', ') FROM unnest(changed) c);
    c_cols := (SELECT string_agg('c.' || pg_catalog.quote_ident(c), ', ') FROM unnest(changed) c);
    n_cols := (SELECT string_agg('n.' || pg_catalog.quote_ident(c), ', ') FROM unnest(changed) c);
    tx := postback.watch_expression(source, mapping ->> 'transaction_id');
    SELECT array_agg(pg_catalog.quote_ident(a.attname) ORDER BY k.n) INTO keys
      FROM pg_catalog.pg_index i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, n)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = source AND i.indisprimary;
    IF keys IS NOT NULL THEN
        -- one statement for all the rows an UPDATE changed, old and new paired by
        -- the primary key: the conversions' triggers run once, as for an UPDATE
        -- of postback.conversions
        key_names := (SELECT string_agg('postback_key_' || n, ', ') FROM generate_series(1, cardinality(keys)) n);
        update_sql := pg_catalog.format($u$
    ELSIF TG_OP = 'UPDATE' THEN
        UPDATE postback.conversions AS c SET (%1$s) = (%2$s)
          FROM (SELECT %3$s, (%4$s)::text FROM postback_old_rows AS r) AS o (%5$s, postback_old_transaction_id)
          JOIN (SELECT %3$s, %6$s FROM postback_new_rows AS r) AS n (%5$s, %1$s) USING (%5$s)
         WHERE c.transaction_id = o.postback_old_transaction_id AND (%7$s) IS DISTINCT FROM (%2$s);
        -- rows that were no conversion yet (written before the watch, or left out by "when")
        INSERT INTO postback.conversions (%1$s)
        SELECT %6$s FROM postback_new_rows AS r
         WHERE %8$s AND NOT EXISTS (SELECT 1 FROM postback.conversions AS c WHERE c.transaction_id = (%4$s)::text)
            ON CONFLICT (transaction_id) DO NOTHING;
$u$, cols, n_cols, (SELECT string_agg('r.' || k, ', ') FROM unnest(keys) k), tx, key_names,
            array_to_string(exprs, ', '), c_cols, where_sql);
    ELSE
        -- no primary key to pair old and new rows by: row by row
        update_sql := pg_catalog.format($u$
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT (%4$s)::text INTO postback_old_transaction_id FROM (SELECT OLD.*) AS r;
        UPDATE postback.conversions AS c SET (%1$s) = (%2$s)
          FROM (SELECT %6$s FROM (SELECT NEW.*) AS r) AS n (%1$s)
         WHERE c.transaction_id = postback_old_transaction_id AND (%7$s) IS DISTINCT FROM (%2$s);
        IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM postback.conversions AS c
                                      WHERE c.transaction_id = postback_old_transaction_id) THEN
            -- a row that was no conversion yet (written before the watch, or left out by "when")
            INSERT INTO postback.conversions (%1$s)
            SELECT %6$s FROM (SELECT NEW.*) AS r WHERE %8$s
                ON CONFLICT (transaction_id) DO NOTHING;
        END IF;
$u$, cols, n_cols, NULL, tx, NULL, array_to_string(exprs, ', '), c_cols, where_sql);
    END IF;
    IF on_delete IS NOT NULL THEN
        delete_sql := pg_catalog.format($d$
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE postback.conversions AS c SET status = %1$L
         WHERE c.transaction_id = ANY (ARRAY(SELECT (%2$s)::text FROM postback_old_rows AS r)) AND c.status <> %1$L;
$d$, on_delete, tx);
    END IF;

    body := pg_catalog.format($b$#variable_conflict use_column
-- written by postback.watch: the mapping is this function's trigger
-- argument (postback.watches shows it); postback.unwatch removes it.
DECLARE
    postback_old_transaction_id text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO postback.conversions (%1$s)
        SELECT %2$s FROM postback_new_rows AS r WHERE %3$s
            ON CONFLICT (transaction_id) DO NOTHING;%4$s%5$s
    END IF;
    RETURN NULL;
END
$b$, cols, array_to_string(exprs, ', '), where_sql, update_sql, coalesce(delete_sql, ''));

    -- watching again replaces the mapping
    PERFORM postback.watch_drop_triggers(source);
    EXECUTE pg_catalog.format(
        'CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER '
        'SET search_path = pg_catalog, %I, pg_temp AS %L', qualified, rel.nspname, body);
    EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s() FROM PUBLIC', qualified);
    IF current_user <> owner_name THEN
        EXECUTE pg_catalog.format('ALTER FUNCTION %s() OWNER TO %I', qualified, owner_name);
    END IF;
    EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s() IS %L', qualified,
        pg_catalog.format('pg_postback watch of %s: turns its rows into conversions with the rights of its owner '
                          '(postback.watches shows the mapping; postback.unwatch(%L) removes it).', source, source));
    EXECUTE pg_catalog.format('ALTER FUNCTION %s() DEPENDS ON EXTENSION pg_postback', qualified);
    -- on the table and on each of its partitions (a statement trigger fires on
    -- the table a statement names: an INSERT straight into a partition fires
    -- the partition's, one through the table only the table's); only the
    -- table's carries the mapping
    FOR member IN SELECT source UNION ALL
                  SELECT p.relid FROM pg_catalog.pg_partition_tree(source) p WHERE p.relid <> source LOOP
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER postback_watch_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS postback_new_rows '
            'FOR EACH STATEMENT EXECUTE FUNCTION %s(%s)', member, qualified,
            CASE WHEN member = source THEN pg_catalog.quote_literal(mapping::text) ELSE '' END);
        IF keys IS NOT NULL THEN
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER postback_watch_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS postback_old_rows '
                'NEW TABLE AS postback_new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()', member, qualified);
        ELSIF member = source THEN
            -- a row trigger on a partitioned table is on its partitions too
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER postback_watch_update AFTER UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
                source, qualified);
        END IF;
        IF on_delete IS NOT NULL THEN
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER postback_watch_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS postback_old_rows '
                'FOR EACH STATEMENT EXECUTE FUNCTION %s()', member, qualified);
        END IF;
    END LOOP;
    RETURN pg_catalog.to_regprocedure(qualified || '()');
END
$$;

CREATE FUNCTION postback.unwatch(source regclass) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fn regprocedure;
BEGIN
    IF source IS NULL THEN
        RAISE EXCEPTION 'source must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF NOT pg_catalog.pg_has_role(current_user, (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = source), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of table % to unwatch it', source USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT t.tgfoid INTO fn FROM pg_catalog.pg_trigger t WHERE t.tgrelid = source AND t.tgname = 'postback_watch_insert';
    IF fn IS NULL THEN
        RAISE NOTICE '% is not watched', source;
        RETURN false;
    END IF;
    PERFORM postback.watch_drop_triggers(source);
    EXECUTE pg_catalog.format('DROP FUNCTION %s', fn);
    RETURN true;
END
$$;

-- Watched tables: the mapping is the insert trigger's argument, so that
-- pg_dump/pg_restore keep a watch with its table.
CREATE VIEW postback.watches AS
SELECT t.tgrelid::regclass AS source,
       pg_catalog.convert_from(substr(t.tgargs, 1, octet_length(t.tgargs) - 1),
                               pg_catalog.getdatabaseencoding())::jsonb AS mapping,
       pg_catalog.pg_get_userbyid(c.relowner) AS owner,
       t.tgfoid::regprocedure AS function,
       EXISTS (SELECT 1 FROM pg_catalog.pg_trigger d WHERE d.tgrelid = t.tgrelid AND d.tgname = 'postback_watch_delete') AS on_delete,
       t.tgenabled <> 'D' AS enabled,
       (SELECT count(*)::integer FROM pg_catalog.pg_partition_tree(t.tgrelid) p
         WHERE p.relid <> t.tgrelid
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                            WHERE g.tgrelid = p.relid AND g.tgname = 'postback_watch_insert')) AS partitions_unwatched
  FROM pg_catalog.pg_trigger t
  JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
 WHERE t.tgname = 'postback_watch_insert' AND t.tgnargs = 1;

REVOKE EXECUTE ON FUNCTION postback.watch(regclass, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.unwatch(regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_check(regclass, text, jsonb, regtype) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_expression(regclass, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_fields() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_drop_triggers(regclass) FROM PUBLIC;
REVOKE ALL ON postback.watches FROM PUBLIC;

-- Grants an earlier model needed and 0.3.0's does not give. 0.1.0's enqueue
-- ran as the caller, so an application role was granted INSERT on deliveries
-- and SELECT on endpoints: kept, it could insert a delivery the worker signs
-- and sends with the endpoint's credentials, and read endpoints.headers.
-- Every role but the owner loses writes on deliveries, attempts, endpoints,
-- endpoint_secrets and endpoint_state (and their sequences), and reads of
-- endpoint_secrets and endpoints.headers; roles that wrote conversions get
-- postback.grant_operator, roles that read the tables postback.grant_analyst.
-- A NOTICE names each role and what it lost.
DO $$
DECLARE
    g record;
    p record;
    who text;
    lost text[];
    protected CONSTANT text[] := ARRAY['deliveries', 'attempts', 'endpoints', 'endpoint_secrets', 'endpoint_state'];
    writer boolean;
    reader boolean;
BEGIN
    FOR g IN
        SELECT DISTINCT a.grantee
          FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
         WHERE c.relnamespace = 'postback'::pg_catalog.regnamespace AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
        UNION
        SELECT DISTINCT a.grantee
          FROM pg_catalog.pg_attribute t JOIN pg_catalog.pg_class c ON c.oid = t.attrelid,
               pg_catalog.aclexplode(t.attacl) a
         WHERE c.relnamespace = 'postback'::pg_catalog.regnamespace AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
    LOOP
        who := CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END;
        lost := '{}';
        SELECT pg_catalog.bool_or(c.relname = 'conversions' AND a.privilege_type IN ('INSERT', 'UPDATE')),
               pg_catalog.bool_or(c.relname IN ('conversions', 'deliveries', 'attempts', 'endpoints') AND a.privilege_type = 'SELECT')
          INTO writer, reader
          FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
         WHERE c.relnamespace = 'postback'::pg_catalog.regnamespace AND a.grantee = g.grantee;
        writer := coalesce(writer, false) OR EXISTS (
            SELECT 1 FROM pg_catalog.pg_attribute t, pg_catalog.aclexplode(t.attacl) a
             WHERE t.attrelid = 'postback.conversions'::pg_catalog.regclass AND a.grantee = g.grantee
               AND a.privilege_type IN ('INSERT', 'UPDATE'));
        -- tables and views: writes on the protected tables, reads of secrets and all of endpoints
        FOR p IN
            SELECT c.relname, c.relkind, a.privilege_type
              FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
             WHERE c.relnamespace = 'postback'::pg_catalog.regnamespace AND a.grantee = g.grantee
               AND c.relkind IN ('r', 'p', 'v')
               AND ((c.relname = ANY (protected) AND a.privilege_type <> 'SELECT')
                    OR (c.relname IN ('endpoints', 'endpoint_secrets') AND a.privilege_type = 'SELECT'))
        LOOP
            EXECUTE pg_catalog.format('REVOKE %s ON postback.%I FROM %s', p.privilege_type, p.relname, who);
            lost := lost || pg_catalog.format('%s on postback.%s', p.privilege_type, p.relname);
        END LOOP;
        -- sequences of the protected tables
        FOR p IN
            SELECT s.relname, a.privilege_type
              FROM pg_catalog.pg_class s
              JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = s.oid
                                          AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
              JOIN pg_catalog.pg_class t ON t.oid = d.refobjid,
                   pg_catalog.aclexplode(s.relacl) a
             WHERE s.relkind = 'S' AND s.relnamespace = 'postback'::pg_catalog.regnamespace
               AND t.relname = ANY (protected) AND a.grantee = g.grantee AND a.privilege_type <> 'SELECT'
        LOOP
            EXECUTE pg_catalog.format('REVOKE %s ON SEQUENCE postback.%I FROM %s', p.privilege_type, p.relname, who);
            lost := lost || pg_catalog.format('%s on sequence postback.%s', p.privilege_type, p.relname);
        END LOOP;
        -- columns: writes on the protected tables, reads of headers and secrets
        FOR p IN
            SELECT c.relname, t.attname, a.privilege_type
              FROM pg_catalog.pg_attribute t JOIN pg_catalog.pg_class c ON c.oid = t.attrelid,
                   pg_catalog.aclexplode(t.attacl) a
             WHERE c.relnamespace = 'postback'::pg_catalog.regnamespace AND a.grantee = g.grantee
               AND ((c.relname = ANY (protected) AND a.privilege_type <> 'SELECT')
                    OR (c.relname = 'endpoints' AND t.attname = 'headers')
                    OR c.relname = 'endpoint_secrets')
        LOOP
            EXECUTE pg_catalog.format('REVOKE %s (%I) ON postback.%I FROM %s', p.privilege_type, p.attname, p.relname, who);
            lost := lost || pg_catalog.format('%s (%s) on postback.%s', p.privilege_type, p.attname, p.relname);
        END LOOP;
        IF g.grantee <> 0 AND writer THEN
            PERFORM postback.grant_operator(g.grantee::pg_catalog.regrole);
        ELSIF g.grantee <> 0 AND reader THEN
            PERFORM postback.grant_analyst(g.grantee::pg_catalog.regrole);
        END IF;
        IF pg_catalog.cardinality(lost) > 0 THEN
            RAISE WARNING 'pg_postback 0.3.0: role % lost %; %', who, pg_catalog.array_to_string(lost, ', '),
                CASE WHEN g.grantee <> 0 AND writer THEN 'it writes conversions, so it now has postback.grant_operator'
                     WHEN g.grantee <> 0 AND reader THEN 'it reads the tables, so it now has postback.grant_analyst'
                     ELSE 'nothing was granted in its place' END;
        END IF;
    END LOOP;
END
$$;

-- Comments -----------------------------------------------------------------

COMMENT ON FUNCTION postback.sign_request(bigint, text, text, text, text, text, text, jsonb, jsonb, text, text) IS 'Internal: the URL and full headers (signatures and {hash:…} digests at the positions url_hashes names) a request would be sent with now; no row for a NULL url.';
COMMENT ON FUNCTION postback.check_json_nesting(text, text) IS 'Internal: raises an error naming the column when a JSON value (as text) nests arrays and objects deeper than 32 levels; true otherwise. Used by the attributes CHECK constraints of conversions and clicks.';
COMMENT ON COLUMN postback.deliveries.url_hashes IS 'Where the URL template''s {hash:…} digests go: [{"at": byte offset in url, "alg", "parts": values and literals, null for the secret}]. The worker computes each digest with the endpoint''s secret when it sends; nothing in the url text is ever expanded.';
COMMENT ON COLUMN postback.deliveries.rendered IS 'False when the request could not be rendered (last_error says why): such a delivery stays dead; a retry renders it again from its conversion first.';
COMMENT ON FUNCTION postback.live_secrets(bigint) IS 'Internal: the unexpired secrets of an endpoint, newest first (what signs its requests and fills its {hash:…} digests); owner only.';
COMMENT ON FUNCTION postback.preview_request(bigint, bigint) IS 'Internal: the request one endpoint would get for one conversion (idempotency_key, url, url_hashes, body), rendered as the enqueue trigger would, the render error if any, and whether the endpoint''s filters route the conversion to it.';
COMMENT ON FUNCTION postback.test_request(bigint, jsonb) IS 'Internal: the request a test delivery of an endpoint sends (sample values, overridable), with its event, status, filled success pattern and the render error if any.';
COMMENT ON TABLE postback.deliveries IS 'One request to one endpoint announcing one conversion status, rendered at enqueue and retried unchanged; rendered again from its conversion when its endpoint''s request settings are edited (queued ones at once, finished ones when resent).';
COMMENT ON FUNCTION postback.resend(bigint[]) IS 'Internal: sends finished deliveries again now, with a fresh attempt budget and max_age, rendered again from their conversions when they never rendered or their endpoint was edited since; returns how many.';
COMMENT ON FUNCTION postback.retry(bigint) IS 'Sends a dead (or succeeded) delivery again now (rendered again from its conversion if its endpoint was edited since or it never rendered); its attempts are kept and numbering continues. Operators may call it.';
COMMENT ON FUNCTION postback.replay(text, timestamptz, timestamptz) IS 'Sends again the succeeded deliveries of an endpoint created in [since, until), same idempotency keys and, unless the endpoint was edited since, same requests; test deliveries are left out; returns how many.';
COMMENT ON COLUMN postback.endpoints.revised_at IS 'When kind, method, url_template, body_template, status_map, drop_empty_params or success_body_pattern last changed: deliveries rendered before it are rendered again (queued ones at once, finished ones when resent).';
COMMENT ON COLUMN postback.deliveries.rendered_at IS 'When the request was rendered (at enqueue, or again after an edit of its endpoint).';
COMMENT ON FUNCTION postback.rerender(bigint[]) IS 'Internal: renders deliveries again from their conversions with their endpoints as they are now, keeping id, idempotency key, event, status and attempts; one that no longer renders is dead with the reason. Returns how many have a request to send.';
COMMENT ON FUNCTION postback.rerender_queue() IS 'Trigger: after an endpoint''s request settings change, renders its queued deliveries again (a queued test delivery is dead with a reason instead).';
COMMENT ON TRIGGER endpoints_rerender_queue ON postback.endpoints IS 'Renders an endpoint''s queued deliveries again when revised_at changes.';
COMMENT ON COLUMN postback.endpoint_health.last_error IS 'Error of the last failed attempt while the endpoint is failing (NULL once an attempt succeeds).';
COMMENT ON COLUMN postback.endpoint_health.held_by IS 'Why its deliveries are not being sent now, if anything holds them: inactive, paused, no live secret (an endpoint that signs or has a {hash:…} waits for one), or an open circuit breaker; NULL otherwise.';
COMMENT ON FUNCTION postback.validate_secret(text, text) IS 'Raises an error if a secret cannot sign with the scheme (standard-webhooks wants "whsec_" and base64; none of the others accepts an empty one), naming the format, never the secret; true otherwise.';
COMMENT ON FUNCTION postback.needs_secret(text, text) IS 'Whether an endpoint with this signing scheme and URL template needs a live secret to send (it signs, or its template has a {hash:…}); its deliveries wait while it has none. The worker applies the same rule.';
COMMENT ON FUNCTION postback.endpoint_secrets_check() IS 'Trigger: refuses a secret that cannot sign with its endpoint''s scheme when it is inserted or changed.';
COMMENT ON FUNCTION postback.validate_status_map(jsonb) IS 'Raises an error naming the key if an endpoint''s status_map maps anything but a conversion status, or to anything but a string or a number; true otherwise.';
COMMENT ON FUNCTION postback.validate_events(text[]) IS 'Raises an error if an endpoint''s events list is empty, holds NULL, or a name no conversion event can have; true otherwise.';
COMMENT ON FUNCTION postback.attempt_latency() IS 'Attempt durations of the last day per endpoint: p50 and p95 over the last hour and the last day (what endpoint_health shows); each attempt''s endpoint found by a primary-key probe, run without JIT.';
COMMENT ON FUNCTION postback.held_by(bigint) IS 'Why an endpoint''s deliveries are not being sent now (inactive, paused, no live secret, open circuit breaker), or NULL; read by endpoint_health and explain.';
COMMENT ON FUNCTION postback.explain(bigint) IS 'Why each endpoint did or did not receive a conversion: fired or not, the reason (inactive, the filter that left it out naming what it wants and what the conversion has, created after it), the deliveries with their announced statuses, states, attempts, next attempt and last error, and what holds the endpoint now. Operators and analysts may call it.';
COMMENT ON FUNCTION postback.explain(text) IS 'postback.explain for the conversion with this transaction_id.';
COMMENT ON FUNCTION postback.explain_routing(bigint) IS 'Internal: for every endpoint, the first of its filters that leaves the conversion out (what it wants, what the conversion has), or NULL when all match.';
COMMENT ON FUNCTION postback.curl_command(text, text, jsonb, text, bigint) IS 'A curl command line for a request (method, URL, headers, body, timeout in ms), every argument single-quoted for the shell.';
COMMENT ON FUNCTION postback.curl(bigint) IS 'A delivery''s request as a curl command line to run by hand: method, URL, headers with a fresh signature, body, the endpoint''s timeout. The endpoint''s own header values are shown to the extension owner only ([redacted] for operators). Owner and operators; never logged.';
COMMENT ON FUNCTION postback.worker_status() IS 'One row per delivery worker the launcher runs, this database''s first (every database listed in postback.database_name, postback.workers each, and one maintenance worker per database: role): running, pid, database, worker (1..workers; NULL for maintenance), counters, last error (also: waiting for ALTER EXTENSION … UPDATE), state (delivering, waiting, restarting and why); concurrency, slow endpoints and the requests they hold. When no worker serves this database, one more row with a hint: not preloaded, postback.database_name naming no database or not this one, or not started yet.';
COMMENT ON COLUMN postback.endpoint_state.slow_since IS 'Since when the worker counts this endpoint slow (a request out for a second or more, or answers lately that slow): slow endpoints together hold at most half of postback.concurrency. NULL while it is not.';
COMMENT ON COLUMN postback.endpoint_health.in_flight IS 'Deliveries on the wire now (claimed by the worker).';
COMMENT ON COLUMN postback.endpoint_health.slow_since IS 'Since when the worker counts it slow (a request out for a second or more, or answers lately that slow); slow endpoints together hold at most half of postback.concurrency, so they never take the capacity other endpoints need. NULL while it is not.';
COMMENT ON FUNCTION postback.worker_stats() IS 'Every worker''s figures from shared memory, one row per worker the launcher runs: pid, start, last wake, requests sent, in flight, last error; concurrency (most requests open at once), slow endpoints and their requests in flight; database, worker (1..workers, NULL for the maintenance worker), workers, state, role (delivery or maintenance).';

COMMENT ON VIEW postback.metrics IS 'Postback metrics over the last 24 hours, 7 days and all time (period; deliveries count in the hour they finished, windows start on the hour), in total and per event, per endpoint and per partner (breakdown): success rate, dead deliveries, commit-to-success latency (from delivery_rollup, so they survive the purge); dedup, reversal and match rates on the total rows.';
COMMENT ON COLUMN postback.metrics.event IS 'Conversion event of a per-event row; NULL in the others.';
COMMENT ON COLUMN postback.metrics.endpoint IS 'Endpoint of a per-endpoint row; NULL in the others.';
COMMENT ON COLUMN postback.metrics.avg_commit_to_success_ms IS 'Average time from enqueue (the conversion''s commit) to success, ms; deliveries resent by hand (retry, replay) are left out.';
COMMENT ON COLUMN postback.metrics.p95_commit_to_success_ms IS '95th percentile time from enqueue to success, ms, from a histogram (within 9%); deliveries resent by hand are left out.';
COMMENT ON COLUMN postback.metrics.conversions IS 'Conversions created in the period (total rows only: a conversion is not per endpoint).';
COMMENT ON COLUMN postback.metrics.dedup_rate IS 'Duplicates refused ÷ conversions offered (conversions + duplicates) in the period; total rows only.';
COMMENT ON COLUMN postback.metrics.reversal_rate IS 'Conversions now reversed, refunded or charged back ÷ those plus the approved ones, in the period; total rows only.';
COMMENT ON COLUMN postback.metrics.match_rate IS 'Conversions with a recorded click ÷ conversions, in the period; total rows only.';
COMMENT ON COLUMN postback.metrics.partner IS 'Partner of a per-partner row (NULL there: conversions without a partner); NULL in the others.';
COMMENT ON COLUMN postback.metrics.breakdown IS 'total, event, endpoint or partner: which rows these are.';
COMMENT ON COLUMN postback.metrics.deliveries_dead IS 'Deliveries that died in the period.';
COMMENT ON FUNCTION postback.validate_endpoint_choices(text, text, text, text[]) IS 'Raises an error naming the column and the valid values if an endpoint''s kind, method, signing_scheme or statuses holds anything else; true otherwise.';
COMMENT ON COLUMN postback.metrics.deliveries_finished IS 'Deliveries that finished (succeeded or died) in the period.';
COMMENT ON TABLE postback.delivery_rollup IS 'Finished deliveries of conversions counted per hour of completion (UTC; rows older than 8 days merged per day), endpoint, event and partner; kept after the deliveries are purged. Written by postback.roll_up, read by postback.metrics.';
COMMENT ON COLUMN postback.delivery_rollup.span IS 'hour, or day once the hour is older than 8 days.';
COMMENT ON COLUMN postback.delivery_rollup.hour IS 'Start (UTC) of the hour or day the deliveries finished in.';
COMMENT ON COLUMN postback.delivery_rollup.endpoint_id IS 'Endpoint id.';
COMMENT ON COLUMN postback.delivery_rollup.event IS 'Conversion event.';
COMMENT ON COLUMN postback.delivery_rollup.partner IS 'Conversion partner; empty for none.';
COMMENT ON COLUMN postback.delivery_rollup.succeeded IS 'Deliveries that succeeded.';
COMMENT ON COLUMN postback.delivery_rollup.dead IS 'Deliveries that died.';
COMMENT ON COLUMN postback.delivery_rollup.timed IS 'Successes whose commit-to-success latency counts (not resent by hand).';
COMMENT ON COLUMN postback.delivery_rollup.latency_ms_sum IS 'Sum of their commit-to-success latencies, ms.';
COMMENT ON COLUMN postback.delivery_rollup.latency_hist IS 'Histogram of those latencies: 108 counts, four buckets per doubling from 1 ms (postback.histogram_quantile reads it).';
COMMENT ON TABLE postback.rollup_state IS 'How far postback.delivery_rollup goes (one row, once postback.roll_up has run).';
COMMENT ON COLUMN postback.rollup_state.singleton IS 'Always true: the table has one row.';
COMMENT ON COLUMN postback.rollup_state.rolled_until IS 'Deliveries that finished before this are counted in delivery_rollup.';
COMMENT ON FUNCTION postback.finished_between(timestamptz, timestamptz) IS 'Finished deliveries of conversions in [since, until), counted per hour (UTC), endpoint, event and partner, with their commit-to-success latency histogram: what roll_up stores and metrics adds for the minutes not rolled up yet.';
COMMENT ON FUNCTION postback.roll_up(interval) IS 'Internal (the worker calls it every minute): moves up to max_span of finished deliveries into delivery_rollup, merges hours older than 8 days into days; true when more is left.';
COMMENT ON AGGREGATE postback.histogram_sum(bigint[]) IS 'Adds latency histograms bucket by bucket.';
COMMENT ON FUNCTION postback.latency_histogram(double precision[]) IS 'A latency histogram (108 buckets, four per doubling from 1 ms) of values in ms.';
COMMENT ON FUNCTION postback.histogram_add(bigint[], bigint[]) IS 'The sum of two latency histograms.';
COMMENT ON FUNCTION postback.histogram_quantile(bigint[], double precision) IS 'The q quantile (0 to 1) of a latency histogram in ms, within 9% of the exact value; NULL when empty.';
COMMENT ON FUNCTION postback.purge_tests(interval) IS 'Deletes finished test deliveries (send_test, no conversion) created before now() - older_than (default: all), with their attempts; returns how many. Operators may call it.';
COMMENT ON FUNCTION postback.validate_endpoint_settings(text, text, text, double precision[], integer, double precision, double precision, integer, double precision, double precision, text, text, text, boolean) IS 'Raises an error naming the column, its bounds and the value if an endpoint''s bounded settings (name, retry_schedule, max_attempts, max_age, timeout, max_in_flight, rate_limit, initial_delay, signature_header, timestamp_param, signature_param, a postback''s signing scheme or body) are out of bounds, before a CHECK constraint would answer with the whole row; true otherwise.';

-- Retention costs what it removes: purge and the attempts trigger go by index
CREATE OR REPLACE FUNCTION postback.purge(older_than interval, batch integer DEFAULT 10000,
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
        -- by primary key (= ANY of an array): an IN (subquery) became a hash
        -- join over every delivery, so a batch cost the table, not the batch
        DELETE FROM postback.deliveries d
         WHERE d.id = ANY (ARRAY(SELECT x.id FROM postback.deliveries x
                                  WHERE x.completed_at < now() - older_than
                                    AND (x.state = 'succeeded' OR (include_dead AND x.state = 'dead'))
                                  LIMIT batch FOR UPDATE SKIP LOCKED));
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
        rounds := rounds + 1;
        EXIT WHEN n < batch OR rounds >= coalesce(max_batches, rounds + 1);
    END LOOP;
    RETURN total;
END
$$;

CREATE OR REPLACE FUNCTION postback.delete_attempts_of_deleted_deliveries() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- through attempts' (delivery_id, attempt_no) index: a join with the
    -- transition table hashed every attempt (3M read to delete 60k)
    DELETE FROM postback.attempts a WHERE a.delivery_id = ANY (ARRAY(SELECT o.id FROM old_rows o));
    RETURN NULL;
END
$$;

-- metrics and match_rate read conversion_rollup (history no longer read whole)
-- How many conversions could be attributed to a recorded click: per partner
-- (NULL = conversions with no known partner) and overall, last 24 h (from the
-- hour) and all time. From conversion_rollup plus the hours not rolled up yet:
-- a click recorded after its conversion was rolled up is not counted.
CREATE OR REPLACE VIEW postback.match_rate AS
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

COMMENT ON VIEW postback.match_rate IS 'Conversions attributable to a recorded click ÷ all conversions, per partner and overall (overall = true), last 24 hours (from the hour, UTC) and all time; from conversion_rollup plus the hours not rolled up yet (a click recorded after its conversion was rolled up does not count).';
COMMENT ON COLUMN postback.match_rate.conversions_24h IS 'Conversions created in the last 24 hours (from the start of that hour, UTC).';
COMMENT ON VIEW postback.metrics IS 'Postback metrics over the last 24 hours, 7 days and all time (period; deliveries count in the hour they finished, windows start on the hour), in total and per event, per endpoint and per partner (breakdown): success rate, dead deliveries, commit-to-success latency (from delivery_rollup, so they survive the purge); dedup, reversal and match rates on the total rows (conversions from conversion_rollup, by the hour they were created).';
COMMENT ON COLUMN postback.rollup_state.conversions_until IS 'Conversions created before this are counted in conversion_rollup (an hour behind; NULL until the first roll-up).';
COMMENT ON TABLE postback.conversion_rollup IS 'Conversions counted per hour of creation (UTC; rows older than 8 days merged per day), partner, status and whether their click was recorded; kept when conversions are deleted. Written by postback.roll_up, read by postback.metrics and postback.match_rate.';
COMMENT ON COLUMN postback.conversion_rollup.span IS 'hour, or day once the hour is older than 8 days.';
COMMENT ON COLUMN postback.conversion_rollup.hour IS 'Start (UTC) of the hour or day the conversions were created in.';
COMMENT ON COLUMN postback.conversion_rollup.partner IS 'Conversion partner; empty for none.';
COMMENT ON COLUMN postback.conversion_rollup.status IS 'Conversion status (changes after the roll-up are counted through conversion_rollup_changes).';
COMMENT ON COLUMN postback.conversion_rollup.matched IS 'Whether the conversion''s click_id was in postback.clicks when it was counted.';
COMMENT ON COLUMN postback.conversion_rollup.conversions IS 'How many conversions.';
COMMENT ON TABLE postback.conversion_rollup_changes IS 'Changes to conversions already counted in conversion_rollup (status changed, deleted, inserted with an earlier created_at), appended by statement triggers on postback.conversions and merged by postback.roll_up.';
COMMENT ON COLUMN postback.conversion_rollup_changes.id IS 'Row id.';
COMMENT ON COLUMN postback.conversion_rollup_changes.hour IS 'Hour (UTC) the conversions were created in.';
COMMENT ON COLUMN postback.conversion_rollup_changes.partner IS 'Conversion partner; empty for none.';
COMMENT ON COLUMN postback.conversion_rollup_changes.status IS 'Conversion status.';
COMMENT ON COLUMN postback.conversion_rollup_changes.matched IS 'Whether the conversion''s click_id is in postback.clicks.';
COMMENT ON COLUMN postback.conversion_rollup_changes.conversions IS 'Conversions counted in (positive) or out (negative).';
COMMENT ON FUNCTION postback.roll_up_conversions(interval) IS 'Internal (postback.roll_up calls it): counts up to max_span of conversions created over an hour ago into conversion_rollup, merges conversion_rollup_changes, and hours older than 8 days into days.';
COMMENT ON FUNCTION postback.count_conversion_changes() IS 'Trigger: counts the rows of an UPDATE or DELETE on postback.conversions that conversion_rollup already covers (created before rollup_state.conversions_until) out as they were and in as they are (inserted ones: the enqueue trigger).';
COMMENT ON TRIGGER conversions_count_updated ON postback.conversions IS 'Keeps conversion_rollup true when rows it counts change status, click or created_at.';
COMMENT ON TRIGGER conversions_count_deleted ON postback.conversions IS 'Keeps conversion_rollup true when rows it counts are deleted.';
COMMENT ON FUNCTION postback.roll_up(interval) IS 'Internal (the worker calls it every minute): moves up to max_span of finished deliveries into delivery_rollup and of conversions into conversion_rollup, merges hours older than 8 days into days; true when more is left.';

-- endpoint_health's 24-hour attempt percentiles from attempt_rollup
COMMENT ON COLUMN postback.endpoint_health.p50_ms_24h IS 'Median attempt duration over the last 24 hours (from the start of that hour, UTC), ms, from latency histograms (within 9%).';
COMMENT ON COLUMN postback.endpoint_health.p95_ms_24h IS '95th percentile attempt duration over the last 24 hours (from the start of that hour, UTC), ms, from latency histograms (within 9%).';
COMMENT ON FUNCTION postback.attempt_latency() IS 'Attempt durations per endpoint (attempts that got a response), what endpoint_health shows: p50 and p95 over the last hour from the attempts, over the last 24 hours (from the hour) from attempt_rollup plus the minutes not rolled up yet (within 9%).';
COMMENT ON COLUMN postback.rollup_state.attempts_until IS 'Attempts that started before this are counted in attempt_rollup (six minutes behind; NULL until the first roll-up).';
COMMENT ON TABLE postback.attempt_rollup IS 'Durations of attempts that got a response, per hour they started (UTC) and endpoint, as latency histograms; kept two days. Written by postback.roll_up, read by endpoint_health (24-hour percentiles).';
COMMENT ON COLUMN postback.attempt_rollup.hour IS 'Start (UTC) of the hour the attempts started in.';
COMMENT ON COLUMN postback.attempt_rollup.endpoint_id IS 'Endpoint id.';
COMMENT ON COLUMN postback.attempt_rollup.attempts IS 'How many attempts.';
COMMENT ON COLUMN postback.attempt_rollup.duration_hist IS 'Histogram of their durations: 108 counts, four buckets per doubling from 1 ms (postback.histogram_quantile reads it).';
COMMENT ON FUNCTION postback.roll_up_attempts() IS 'Internal (postback.roll_up calls it): counts the durations of attempts that started more than six minutes ago (a day back at most) into attempt_rollup; drops its hours older than two days.';
COMMENT ON FUNCTION postback.roll_up(interval) IS 'Internal (the worker calls it every minute): moves up to max_span of finished deliveries into delivery_rollup and of conversions into conversion_rollup, attempt durations into attempt_rollup, merges hours older than 8 days into days; true when more is left.';

-- Citus coordinator-only mode: writes on a worker node's copy are refused
CREATE FUNCTION postback.refuse_on_citus_worker() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    coordinator text;
    this_node text;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT coalesce((SELECT pg_catalog.format(''%s:%s'', n.nodename, n.nodeport) FROM pg_catalog.pg_dist_node n
                               WHERE n.groupid = 0 LIMIT 1), ''the coordinator''),
                    (SELECT pg_catalog.format(''%s:%s'', n.nodename, n.nodeport) FROM pg_catalog.pg_dist_node n
                      WHERE n.groupid = g.groupid LIMIT 1)
               FROM pg_catalog.pg_dist_local_group g
              WHERE g.groupid <> 0
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = $1)
                -- nor a shard of one (conversions_102008: its trigger runs there)
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_shard s
                                 WHERE s.shardid::text = pg_catalog.substring($2, ''_([0-9]+)$''))'
       INTO coordinator, this_node USING TG_RELID, TG_TABLE_NAME;
    IF coordinator IS NOT NULL THEN
        RAISE EXCEPTION 'pg_postback on Citus runs on the coordinator (%): postback.% cannot be written on a worker node (%)',
                        coordinator, TG_TABLE_NAME, coalesce(this_node, 'this one')
            USING ERRCODE = 'read_only_sql_transaction',
                  DETAIL = 'In coordinator-only mode pg_postback''s tables live on the coordinator and its worker '
                           'delivers from them; a worker node''s copy stays empty and is never delivered from.',
                  HINT = pg_catalog.format('Connect to the coordinator (%s) to write postback.%s.', coordinator,
                                           TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER conversions_refuse_on_citus_worker
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON postback.conversions
    FOR EACH STATEMENT EXECUTE FUNCTION postback.refuse_on_citus_worker();
CREATE TRIGGER clicks_refuse_on_citus_worker
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON postback.clicks
    FOR EACH STATEMENT EXECUTE FUNCTION postback.refuse_on_citus_worker();
CREATE TRIGGER endpoints_refuse_on_citus_worker
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON postback.endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION postback.refuse_on_citus_worker();
CREATE TRIGGER endpoint_secrets_refuse_on_citus_worker
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON postback.endpoint_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION postback.refuse_on_citus_worker();
CREATE TRIGGER deliveries_refuse_on_citus_worker
    BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON postback.deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION postback.refuse_on_citus_worker();
REVOKE EXECUTE ON FUNCTION postback.refuse_on_citus_worker() FROM PUBLIC;
COMMENT ON FUNCTION postback.refuse_on_citus_worker() IS 'Trigger: on a Citus worker node, refuses writes to pg_postback''s tables (coordinator-only mode: they live on the coordinator), naming the coordinator; nothing without Citus or for a table Citus distributes (or a shard of one).';
COMMENT ON TRIGGER conversions_refuse_on_citus_worker ON postback.conversions IS 'Refuses writes on a Citus worker node (coordinator-only mode).';
COMMENT ON TRIGGER clicks_refuse_on_citus_worker ON postback.clicks IS 'Refuses writes on a Citus worker node (coordinator-only mode).';
COMMENT ON TRIGGER endpoints_refuse_on_citus_worker ON postback.endpoints IS 'Refuses writes on a Citus worker node (coordinator-only mode).';
COMMENT ON TRIGGER endpoint_secrets_refuse_on_citus_worker ON postback.endpoint_secrets IS 'Refuses writes on a Citus worker node (coordinator-only mode).';
COMMENT ON TRIGGER deliveries_refuse_on_citus_worker ON postback.deliveries IS 'Refuses writes on a Citus worker node (coordinator-only mode).';
COMMENT ON COLUMN postback.delivery_rollup.attempts IS 'Attempts those deliveries took (since their last resend by hand).';
COMMENT ON FUNCTION postback.watch(regclass, jsonb) IS 'Makes a table the application already has a source of conversions: its INSERTs become conversions (and deliveries) in the same transaction, UPDATEs of mapped fields lifecycle postbacks, a DELETE the status mapping.on_delete names. The mapping names, per conversion field, a column or an SQL expression over the row (click_id and transaction_id required; when, exclude, on_delete optional); columns not mapped by name go to attributes unless excluded. Only the table''s owner may watch it; the expressions run with the owner''s rights. Watching again replaces the mapping. Returns the trigger function it created.';
COMMENT ON FUNCTION postback.unwatch(regclass) IS 'Removes a table''s watch (its triggers and trigger function); false, with a notice, when the table was not watched. Conversions already written stay.';
COMMENT ON FUNCTION postback.watch_check(regclass, text, jsonb, regtype) IS 'Internal to watch: checks one mapping value (a column or an expression over the row, planned in a temporary view, never run) can be written as the field''s type; raises naming the field.';
COMMENT ON FUNCTION postback.watch_expression(regclass, text) IS 'Internal to watch: the SQL a mapping value stands for over the row alias r (a column of the source, or the expression in parentheses).';
COMMENT ON FUNCTION postback.watch_fields() IS 'Internal to watch: the conversion fields a mapping may name, the type each is written as, and whether it is required.';
COMMENT ON VIEW postback.watches IS 'Tables watched by postback.watch: the mapping (kept as the insert trigger''s argument, so pg_dump keeps it with the table), the table''s owner, the trigger function, whether a DELETE announces a status, whether the triggers are enabled.';
COMMENT ON COLUMN postback.watches.source IS 'The watched table.';
COMMENT ON COLUMN postback.watches.mapping IS 'The mapping given to postback.watch.';
COMMENT ON COLUMN postback.watches.owner IS 'The table''s owner, whose rights the mapping''s expressions run with.';
COMMENT ON COLUMN postback.watches.function IS 'The trigger function watch created in the table''s schema (SECURITY DEFINER, owned by the table''s owner).';
COMMENT ON COLUMN postback.watches.on_delete IS 'Whether a DELETE of a row announces a status (mapping.on_delete).';
COMMENT ON COLUMN postback.watches.enabled IS 'False when the insert trigger is disabled (ALTER TABLE … DISABLE TRIGGER).';
COMMENT ON COLUMN postback.watches.partitions_unwatched IS 'Partitions created or attached after the watch: rows written straight into them are not seen until postback.watch runs again (rows written through the table are).';
COMMENT ON FUNCTION postback.watch_drop_triggers(regclass) IS 'Internal to watch and unwatch: drops a watch''s triggers from the table and its partitions.';
COMMENT ON FUNCTION postback.grant_operator(regrole) IS 'What grant_analyst gives, plus inserting conversions, changing their status, postback.preview, the daily operations and watching tables the role owns (postback.watch). Owner only.';

-- The conversion's click_id on deliveries and attempts (NULL on one node; the
-- distribution column on Citus): metadata only, no rewrite.
ALTER TABLE postback.deliveries ADD COLUMN click_id text;
ALTER TABLE postback.attempts ADD COLUMN click_id text;
COMMENT ON COLUMN postback.deliveries.click_id IS 'On Citus (distributed mode): the conversion''s click_id, by which deliveries are distributed beside their conversion. NULL on one node.';
COMMENT ON COLUMN postback.attempts.click_id IS 'On Citus (distributed mode): the delivery''s click_id, by which attempts are distributed beside it. NULL on one node.';

-- ---------------------------------------------------------------------------
-- Citus, distributed mode (postback.distribute()) and the functions it made
-- (the same text as in sql/; test_upgrade.py proves the result equal)
-- ---------------------------------------------------------------------------
-- ---------------------------------------------------------------------------
-- Citus, distributed mode: postback.distribute() on the coordinator turns an
-- installed pg_postback into clicks, conversions, deliveries and attempts
-- co-located by click_id, endpoints and endpoint_secrets as reference tables,
-- and every other table (endpoint_state, roll-ups, duplicates) each node's
-- own. Each node's worker then delivers the deliveries of its own shards.
-- ---------------------------------------------------------------------------

-- True when pg_postback's tables are distributed by Citus (on any node).
CREATE FUNCTION postback.is_distributed() RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found boolean;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                             WHERE p.logicalrelid = ''postback.deliveries''::pg_catalog.regclass)' INTO found;
    RETURN found;
END
$$;

-- For a trigger's relation: `logical` (a pg_postback table) as a statement
-- there may name it. On a Citus shard (conversions_102008) that is the shard
-- of `logical` with the same hash range (deliveries_102040): a statement on a
-- shard must never name a distributed table. Elsewhere `postback.<logical>`.
CREATE FUNCTION postback.shard_beside(rel regclass, logical text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    shard text := pg_catalog.substring(rel::text, '_([0-9]+)$');
    beside text;
BEGIN
    IF shard IS NULL OR pg_catalog.to_regclass('pg_catalog.pg_dist_shard') IS NULL THEN
        RETURN pg_catalog.format('postback.%I', logical);
    END IF;
    EXECUTE 'SELECT pg_catalog.format(''postback.%I'', $2 || ''_'' || t.shardid)
               FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_shard t
                 ON t.logicalrelid = pg_catalog.format(''postback.%I'', $2)::pg_catalog.regclass
                AND t.shardminvalue IS NOT DISTINCT FROM s.shardminvalue
              WHERE s.shardid = $1::bigint'
       INTO beside USING shard, logical;
    RETURN coalesce(beside, pg_catalog.format('postback.%I', logical));
END
$$;

-- This node's shards of a distributed pg_postback table (none when it is not).
CREATE FUNCTION postback.local_shards(logical text) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT postback.is_distributed() THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT pg_catalog.format(''postback.%I'', $1 || ''_'' || s.shardid)
           FROM pg_catalog.pg_dist_shard s JOIN pg_catalog.pg_dist_placement p USING (shardid)
          WHERE s.logicalrelid = pg_catalog.format(''postback.%I'', $1)::pg_catalog.regclass
            AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
          ORDER BY s.shardid' USING logical;
END
$$;

-- One node's part of distribute(): keys that include the distribution column
-- (click_id), the deliveries' and attempts' click_id required, the foreign key
-- Citus cannot convert dropped. Run on every node (the same schema
-- everywhere); idempotent; one transaction per node.
CREATE FUNCTION postback.citus_prepare_node() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                WHERE c.conrelid = 'postback.conversions'::pg_catalog.regclass
                  AND c.conname = 'transaction_id_is_unique_per_click') THEN
        RETURN 'prepared already';
    END IF;
    ALTER TABLE postback.conversions DROP CONSTRAINT conversions_pkey;
    ALTER TABLE postback.conversions ADD PRIMARY KEY (click_id, id);
    ALTER TABLE postback.conversions DROP CONSTRAINT transaction_id_is_unique_use_on_conflict_do_nothing_to_skip;
    ALTER TABLE postback.conversions
        ADD CONSTRAINT transaction_id_is_unique_per_click UNIQUE (click_id, transaction_id);
    ALTER TABLE postback.deliveries ALTER COLUMN click_id SET DEFAULT '';
    ALTER TABLE postback.deliveries ALTER COLUMN click_id SET NOT NULL;
    ALTER TABLE postback.deliveries DROP CONSTRAINT deliveries_pkey;
    ALTER TABLE postback.deliveries ADD PRIMARY KEY (click_id, id);
    -- the worker, retry and the predecessor check find a delivery by id alone
    CREATE INDEX deliveries_id ON postback.deliveries (id);
    ALTER TABLE postback.deliveries DROP CONSTRAINT delivery_idempotency_key_is_unique;
    ALTER TABLE postback.deliveries
        ADD CONSTRAINT delivery_idempotency_key_is_unique UNIQUE (click_id, idempotency_key);
    ALTER TABLE postback.attempts ALTER COLUMN click_id SET DEFAULT '';
    ALTER TABLE postback.attempts ALTER COLUMN click_id SET NOT NULL;
    ALTER TABLE postback.attempts DROP CONSTRAINT attempts_pkey;
    ALTER TABLE postback.attempts ADD PRIMARY KEY (click_id, id);
    ALTER TABLE postback.attempts DROP CONSTRAINT attempt_no_is_unique_per_delivery;
    ALTER TABLE postback.attempts
        ADD CONSTRAINT attempt_no_is_unique_per_delivery UNIQUE (click_id, delivery_id, attempt_no);
    -- Citus converts tables linked by a foreign key through a path that fails
    -- on extension-owned objects: distribute() adds it back afterwards
    ALTER TABLE postback.endpoint_secrets DROP CONSTRAINT endpoint_secrets_endpoint_id_fkey;
    PERFORM postback.citus_views();
    RETURN 'prepared';
END
$$;

-- The views whose joins Citus can run only on the distribution column: the
-- same columns, the conversion and the attempts found beside the delivery (by
-- click_id). Part of citus_prepare_node.
CREATE FUNCTION postback.citus_views() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    propagating text := pg_catalog.current_setting('citus.enable_ddl_propagation', true);
BEGIN
    -- each node's own view (Citus would refuse view DDL on a worker node)
    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
    CREATE OR REPLACE VIEW postback.dead_letters AS
    SELECT d.id AS delivery_id, e.name AS endpoint, d.conversion_id, c.transaction_id, c.partner, d.event, d.status,
           d.attempts, d.completed_at AS died_at, d.last_error,
           (SELECT a.status_code FROM postback.attempts a
             WHERE a.click_id = d.click_id AND a.delivery_id = d.id ORDER BY a.attempt_no DESC LIMIT 1)
               AS last_status_code,
           d.created_at
      FROM postback.deliveries d
      JOIN postback.endpoints e ON e.id = d.endpoint_id
      LEFT JOIN postback.conversions c ON c.click_id = d.click_id AND c.id = d.conversion_id
     WHERE d.state = 'dead';
    IF propagating IS NOT NULL THEN
        PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', propagating, true);
    END IF;
END
$$;

-- Every node's pg_postback workers, seen from the coordinator: each node's
-- postback.worker_status(), with the node. A node that cannot be reached is
-- one row saying so. Without Citus: this node's rows.
CREATE FUNCTION postback.cluster_worker_status()
RETURNS TABLE (node text, role text, worker integer, running boolean, pid integer, state text,
               sent bigint, succeeded bigint, failed bigint, in_flight integer, last_error text,
               last_error_at timestamptz, hint text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_node') IS NULL THEN
        RETURN QUERY SELECT 'this node'::text, w.role, w.worker, w.running, w.pid, w.state, w.sent, w.succeeded,
                            w.failed, w.in_flight, w.last_error, w.last_error_at, w.hint
                       FROM postback.worker_status() w;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        $q$SELECT n.nodename || ':' || n.nodeport, w.role, w.worker, w.running, w.pid,
                  CASE WHEN r.success THEN w.state ELSE 'unreachable: ' || r.result END,
                  w.sent, w.succeeded, w.failed, w.in_flight, w.last_error, w.last_error_at, w.hint
             FROM run_command_on_all_nodes(
                      'SELECT coalesce(pg_catalog.json_agg(w), ''[]'') FROM postback.worker_status() w') r
             JOIN pg_catalog.pg_dist_node n ON n.nodeid = r.nodeid
             LEFT JOIN LATERAL pg_catalog.json_to_recordset(CASE WHEN r.success THEN r.result::json END)
                  AS w(role text, worker integer, running boolean, pid integer, state text, sent bigint,
                       succeeded bigint, failed bigint, in_flight integer, last_error text,
                       last_error_at timestamptz, hint text) ON true
            ORDER BY n.groupid, w.role, w.worker$q$;
END
$$;

-- The one call of distributed mode, on the coordinator. Refuses (changing
-- nothing) without Citus, off the coordinator, or when a worker node lacks
-- pg_postback, runs another version, or does not preload it (its shards'
-- deliveries would never be sent). Distributed already: says so, changes
-- nothing.
CREATE FUNCTION postback.distribute(shard_count integer DEFAULT 32) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    version text := (SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_postback');
    bad text;
    nodes integer;
BEGIN
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RAISE EXCEPTION 'postback.distribute() needs Citus: it is not installed in this database'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Without Citus pg_postback''s tables stay local; there is nothing to distribute.';
    END IF;
    IF shard_count IS NULL OR shard_count < 1 OR shard_count > 64000 THEN
        RAISE EXCEPTION 'shard_count must be between 1 and 64000 (got %)', shard_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE 'SELECT pg_catalog.format(''this is a worker node (group %s); the coordinator is %s'', g.groupid,
                    coalesce((SELECT n.nodename || '':'' || n.nodeport FROM pg_catalog.pg_dist_node n
                               WHERE n.groupid = 0 LIMIT 1), ''not in pg_dist_node''))
               FROM pg_catalog.pg_dist_local_group g WHERE g.groupid <> 0' INTO bad;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'postback.distribute() runs on the coordinator: %', bad
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF postback.is_distributed() THEN
        RETURN 'distributed already';
    END IF;
    -- every worker node: pg_postback installed at this version and preloaded
    EXECUTE 'SELECT pg_catalog.string_agg(pg_catalog.format(''%s:%s (%s)'', w.nodename, w.nodeport,
                    CASE WHEN NOT w.success THEN w.result
                         WHEN w.result = '''' THEN ''pg_postback is not installed''
                         WHEN pg_catalog.split_part(w.result, '' '', 1) <> $1
                         THEN ''pg_postback '' || pg_catalog.split_part(w.result, '' '', 1) || '', not '' || $1
                         ELSE ''pg_postback is not in shared_preload_libraries: nothing would send its shards'''' deliveries''
                    END), ''; '')
               FROM run_command_on_workers(
                        $q$SELECT coalesce((SELECT e.extversion FROM pg_catalog.pg_extension e
                                             WHERE e.extname = ''pg_postback''), '''')
                                  || '' '' || pg_catalog.current_setting(''shared_preload_libraries'')$q$) w
              WHERE NOT w.success OR pg_catalog.split_part(w.result, '' '', 1) <> $1
                 OR w.result !~ ''pg_postback''' INTO bad USING version;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'postback.distribute() found worker nodes not ready: %', bad
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Every node needs shared_preload_libraries = ''citus,pg_postback'' and pg_postback '
                         || version || ' (CREATE EXTENSION on the coordinator installs it on every node).';
    END IF;
    -- every table it changes, at once and first: a worker claiming or recording meanwhile
    -- waits for the commit instead of holding a table this transaction reaches for later
    -- (a deadlock that undid the whole call)
    LOCK TABLE postback.deliveries, postback.attempts, postback.conversions, postback.clicks,
               postback.endpoints, postback.endpoint_secrets IN ACCESS EXCLUSIVE MODE;
    -- (only the coordinator holds rows) deliveries and attempts written before: their conversion's click (a test
    -- delivery, which has none, gets '')
    UPDATE postback.deliveries d SET click_id = c.click_id
      FROM postback.conversions c WHERE c.id = d.conversion_id AND d.click_id IS NULL;
    UPDATE postback.deliveries d SET click_id = '' WHERE d.click_id IS NULL;
    UPDATE postback.attempts a SET click_id = d.click_id
      FROM postback.deliveries d WHERE d.id = a.delivery_id AND a.click_id IS NULL;
    UPDATE postback.attempts a SET click_id = '' WHERE a.click_id IS NULL;
    PERFORM postback.citus_prepare_node();
    EXECUTE 'SELECT pg_catalog.string_agg(pg_catalog.format(''%s:%s: %s'', w.nodename, w.nodeport, w.result), ''; '')
               FROM run_command_on_workers(''SELECT postback.citus_prepare_node()'') w
              WHERE NOT w.success' INTO bad;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'postback.distribute() could not prepare worker nodes: %', bad
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Nothing is distributed; the coordinator is unchanged. A worker node''s empty tables '
                           'may have their new keys already (harmless).',
                  HINT = 'Fix the worker node and call postback.distribute() again.';
    END IF;
    -- Citus recreates a reference table's identity sequence: the endpoints'
    -- and secrets' sequences leave the extension first
    ALTER EXTENSION pg_postback DROP SEQUENCE postback.endpoints_id_seq;
    ALTER EXTENSION pg_postback DROP SEQUENCE postback.endpoint_secrets_id_seq;
    -- pg_postback's triggers run on the shards, by design (each reads and
    -- writes only its own shard and the ones beside it)
    SET LOCAL citus.enable_unsafe_triggers = on;
    EXECUTE 'SELECT create_reference_table(''postback.endpoints'')';
    EXECUTE 'SELECT create_reference_table(''postback.endpoint_secrets'')';
    ALTER TABLE postback.endpoint_secrets ADD CONSTRAINT endpoint_secrets_endpoint_id_fkey
        FOREIGN KEY (endpoint_id) REFERENCES postback.endpoints (id) ON DELETE CASCADE;
    -- the rows there are copied into the shards: as in a restore, conversions
    -- that are there already enqueue nothing (their deliveries come along)
    ALTER TABLE postback.conversions DISABLE TRIGGER USER;
    EXECUTE 'SELECT create_distributed_table(''postback.clicks'', ''click_id'', shard_count := $1)' USING shard_count;
    EXECUTE 'SELECT create_distributed_table(''postback.conversions'', ''click_id'', colocate_with := ''postback.clicks'')';
    EXECUTE 'SELECT create_distributed_table(''postback.deliveries'', ''click_id'', colocate_with := ''postback.clicks'')';
    EXECUTE 'SELECT create_distributed_table(''postback.attempts'', ''click_id'', colocate_with := ''postback.clicks'')';
    ALTER TABLE postback.conversions ENABLE TRIGGER USER;
    EXECUTE 'SELECT pg_catalog.count(*) FROM pg_catalog.pg_dist_node n WHERE n.isactive AND n.shouldhaveshards
                AND n.noderole = ''primary''' INTO nodes;
    RETURN pg_catalog.format('distributed: clicks, conversions, deliveries and attempts in %s shards by click_id '
                             'over %s nodes; endpoints and endpoint_secrets on every node', shard_count, nodes);
END
$$;

-- Upgrades of a distributed install: an extension update script changes the
-- coordinator's tables, while each node's shards and the worker nodes' own
-- tables need the same change made by a procedure that knows them. Until a
-- release ships one, ALTER EXTENSION pg_postback UPDATE on a distributed
-- install is refused before anything changes, on any node, with the steps.
CREATE FUNCTION postback.refuse_distributed_update() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.current_query() ~* 'alter\s+extension\s+("?)pg_postback\1\s+update'
       AND postback.is_distributed()
       AND coalesce(pg_catalog.current_setting('postback.allow_distributed_update', true), '') <> 'on' THEN
        RAISE EXCEPTION 'pg_postback''s tables are distributed by Citus: ALTER EXTENSION pg_postback UPDATE would change '
                        'the coordinator''s tables and not the shards on the worker nodes'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'Nothing was changed on any node.',
                  HINT = 'Read the new release''s notes, "Upgrading a distributed install": when they say its upgrade '
                         'handles distributed tables, run SET postback.allow_distributed_update = on; in the same '
                         'session first. Otherwise stay on this version.';
    END IF;
END
$$;

CREATE EVENT TRIGGER postback_refuse_distributed_update ON ddl_command_start
    WHEN TAG IN ('ALTER EXTENSION')
    EXECUTE FUNCTION postback.refuse_distributed_update();

CREATE OR REPLACE FUNCTION postback.refuse_delete_with_deliveries() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    referenced text;
    shard text;
BEGIN
    IF TG_TABLE_NAME = 'endpoints' THEN
        SELECT format('endpoint %L', o.name) INTO referenced FROM old_rows o
         WHERE EXISTS (SELECT 1 FROM postback.deliveries d WHERE d.endpoint_id = o.id) LIMIT 1;
    ELSIF TG_TABLE_NAME = 'conversions' THEN
        SELECT format('conversion %L', o.transaction_id) INTO referenced FROM old_rows o
         WHERE EXISTS (SELECT 1 FROM postback.deliveries d WHERE d.conversion_id = o.id) LIMIT 1;
    ELSIF TG_TABLE_NAME LIKE 'endpoints\_%' THEN
        -- Citus: a placement of the endpoints reference table, on every node;
        -- each looks in its own node's shards of deliveries
        FOR shard IN SELECT postback.local_shards('deliveries') LOOP
            EXECUTE format('SELECT format(''endpoint %%L'', o.name) FROM old_rows o
                             WHERE EXISTS (SELECT 1 FROM %s d WHERE d.endpoint_id = o.id) LIMIT 1', shard)
               INTO referenced;
            EXIT WHEN referenced IS NOT NULL;
        END LOOP;
    ELSE
        -- Citus: a shard of conversions, its deliveries in the shard beside it
        EXECUTE format('SELECT format(''conversion %%L'', o.transaction_id) FROM old_rows o
                         WHERE EXISTS (SELECT 1 FROM %s d WHERE d.conversion_id = o.id) LIMIT 1',
                       postback.shard_beside(TG_RELID, 'deliveries'))
           INTO referenced;
    END IF;
    IF referenced IS NOT NULL THEN
        RAISE EXCEPTION 'cannot delete %: it still has deliveries', referenced
            USING ERRCODE = 'foreign_key_violation',
                  HINT = CASE WHEN TG_TABLE_NAME LIKE 'endpoints%'
                      THEN 'Set active = false to stop an endpoint, or delete its deliveries first.'
                      ELSE 'Delete the conversion''s deliveries first (postback.deliveries), or keep the conversion.' END;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION postback.delete_attempts_of_deleted_deliveries() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'deliveries' THEN
        -- through attempts' (delivery_id, attempt_no) index: a join with the
        -- transition table hashed every attempt (3M read to delete 60k)
        DELETE FROM postback.attempts a WHERE a.delivery_id = ANY (ARRAY(SELECT o.id FROM old_rows o));
    ELSE
        -- Citus: a shard of deliveries, its attempts in the shard beside it
        EXECUTE format('DELETE FROM %s a WHERE a.delivery_id = ANY (ARRAY(SELECT o.id FROM old_rows o))',
                       postback.shard_beside(TG_RELID, 'attempts'));
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION postback.retry(delivery_id bigint) RETURNS bigint
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

CREATE OR REPLACE FUNCTION postback.retry_dead(endpoint text, since timestamptz DEFAULT now() - interval '1 day')
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

CREATE OR REPLACE FUNCTION postback.replay(endpoint text, since timestamptz, until timestamptz DEFAULT now())
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

CREATE OR REPLACE FUNCTION postback.pause(endpoint text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    eid bigint := postback.endpoint_id(endpoint);
BEGIN
    -- (no coalesce: Citus refuses now() inside one on a reference table)
    UPDATE postback.endpoints SET paused_at = now() WHERE id = eid AND paused_at IS NULL;
END
$$;

CREATE OR REPLACE FUNCTION postback.resume(endpoint text) RETURNS void
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

CREATE OR REPLACE FUNCTION postback.purge(older_than interval, batch integer DEFAULT 10000,
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

CREATE OR REPLACE FUNCTION postback.finished_between(since timestamptz, until timestamptz)
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

CREATE OR REPLACE FUNCTION postback.attempt_latency()
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

CREATE OR REPLACE FUNCTION postback.rerender_queue() RETURNS trigger
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

CREATE OR REPLACE FUNCTION postback.explain(conversion_id bigint)
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

CREATE OR REPLACE FUNCTION postback.cluster_endpoint_state() RETURNS SETOF postback.endpoint_state
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

CREATE OR REPLACE FUNCTION postback.grant_analyst(role regrole) RETURNS void
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
                   'postback.metrics, postback.dead_letters, postback.delivery_rollup, postback.conversion_rollup, '
                   'postback.attempt_rollup, postback.rollup_state, postback.watches TO %s', role);
    EXECUTE format('GRANT SELECT (%s) ON postback.endpoints TO %s', readable, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.worker_status(), postback.worker_stats(), '
                   'postback.cluster_worker_status(), '
                   'postback.explain(bigint), postback.explain(text), postback.held_by(bigint), '
                   'postback.cluster_endpoint_state() TO %s', role);
END
$$;

CREATE OR REPLACE VIEW postback.endpoint_health AS
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

CREATE FUNCTION postback."rerender_queued_here"("endpoint_id" bigint) RETURNS bigint
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'rerender_queued_here_wrapper';

REVOKE EXECUTE ON FUNCTION postback.rerender_queued_here(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.distribute(integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.citus_prepare_node() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.citus_views() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.cluster_worker_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.cluster_endpoint_state() FROM PUBLIC;
COMMENT ON FUNCTION postback.rerender_queued_here(bigint) IS 'Internal (rerender_queue on a Citus node): renders again an edited endpoint''s queued postbacks in this node''s shards, with the conversions and clicks beside them; returns how many have a request to send.';
COMMENT ON FUNCTION postback.is_distributed() IS 'True when pg_postback''s tables are distributed by Citus (postback.distribute() has run).';
COMMENT ON FUNCTION postback.shard_beside(regclass, text) IS 'Internal: for a trigger''s relation, the table a statement there may name for a pg_postback table: on a Citus shard the co-located shard, elsewhere postback.<table>.';
COMMENT ON FUNCTION postback.local_shards(text) IS 'Internal: this node''s shards of a distributed pg_postback table (none when the tables are not distributed).';
COMMENT ON FUNCTION postback.citus_prepare_node() IS 'Internal: one node''s part of postback.distribute() (keys that include click_id, click_id required on deliveries and attempts); idempotent.';
COMMENT ON FUNCTION postback.distribute(integer) IS 'Citus, on the coordinator: distributes clicks, conversions, deliveries and attempts by click_id (co-located, shard_count shards) and makes endpoints and endpoint_secrets reference tables; each node''s worker then delivers its own shards. Refuses without Citus, off the coordinator, or when a worker node lacks or does not preload pg_postback.';
COMMENT ON FUNCTION postback.citus_views() IS 'Internal to distribute: redefines the views whose joins Citus runs only on the distribution column (dead_letters: the conversion and attempts found by click_id beside the delivery), with the same columns.';
COMMENT ON FUNCTION postback.cluster_worker_status() IS 'Every node''s pg_postback workers seen from the Citus coordinator (each node''s worker_status(), with the node as host:port; an unreachable node is one row saying so). Without Citus, this node''s. Granted with worker_status.';
COMMENT ON FUNCTION postback.refuse_distributed_update() IS 'Event trigger: refuses ALTER EXTENSION pg_postback UPDATE while the tables are distributed by Citus (the update would miss the shards), unless postback.allow_distributed_update = on says the new release''s upgrade handles them.';
COMMENT ON EVENT TRIGGER postback_refuse_distributed_update IS 'Refuses ALTER EXTENSION pg_postback UPDATE on a distributed install (see postback.refuse_distributed_update).';
COMMENT ON FUNCTION postback.cluster_endpoint_state() IS 'Each endpoint''s failure record and breaker as endpoint_health shows them: postback.endpoint_state on one node; on Citus with the tables distributed, every node''s rows merged per endpoint (worst breaker, most consecutive failures, earliest failing_since, latest success, error of the latest failure). Granted with endpoint_health.';

-- Roles that read endpoint_health (analysts and operators from before the
-- update) may call what it and the cluster view now need (grant_analyst,
-- redefined above, gives it to new ones)
DO $regrant$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT a.grantee
               FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.oid = 'postback.endpoint_health'::pg_catalog.regclass AND a.privilege_type = 'SELECT'
                AND a.grantee <> 0 AND a.grantee <> c.relowner
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION postback.cluster_endpoint_state(), '
                                  'postback.cluster_worker_status() TO %s', r.grantee::pg_catalog.regrole);
    END LOOP;
END
$regrant$;
