-- pg_postback 0.2.0 → 0.3.0. Applied by ALTER EXTENSION pg_postback UPDATE.
-- Everything that changed since 0.2.0, in one step; tests/e2e/test_upgrade.py
-- checks that 0.2.0 → 0.3.0 and 0.1.0 → 0.2.0 → 0.3.0 give the same objects as
-- a fresh 0.3.0 install, and that data and pending deliveries survive.

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

-- Privileges ---------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION postback.sign_request(bigint, text, text, text, text, text, text, jsonb, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.live_secrets(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender(bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender_queue() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.preview_request(bigint, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.test_request(bigint, jsonb) FROM PUBLIC;

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
