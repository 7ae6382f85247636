-- pg_postback 0.1.0 → 0.2.0. Applied by ALTER EXTENSION pg_postback UPDATE.
-- Everything that changed since 0.1.0, in one step; tests/e2e/test_upgrade.py
-- checks that the result has the same objects as a fresh 0.2.0 install.

-- Trust: every SQL and PL/pgSQL function pins its search_path --------------

ALTER FUNCTION postback.refuse_delete_with_deliveries() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION postback.delete_attempts_of_deleted_deliveries() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION postback.worker_status() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Endpoint headers are checked when given ----------------------------------

CREATE FUNCTION postback."validate_headers"(
	"headers" jsonb /* JsonB */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'validate_headers_wrapper';

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

-- Deliveries: no credential headers, known methods only --------------------
-- Endpoint headers are now read at send time; copies made by 0.1.0 go.
ALTER TABLE postback.deliveries DROP COLUMN headers;
ALTER TABLE postback.deliveries
    ADD CONSTRAINT delivery_method_must_be_get_post_put_or_patch
        CHECK (method IN ('GET', 'POST', 'PUT', 'PATCH'));

-- pg_dump keeps user data and its sequences --------------------------------
SELECT pg_catalog.pg_extension_config_dump('postback.conversions', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('postback.deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('postback.deliveries_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('postback.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('postback.attempts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_duplicates', '');
SELECT pg_catalog.pg_extension_config_dump('postback.conversion_duplicates_id_seq', '');

-- Enqueue runs as the owner with a pinned search_path ----------------------

CREATE OR REPLACE FUNCTION postback.enqueue_inserted_conversions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    proposed bigint := postback.take_proposed_conversions();
    inserted bigint;
BEGIN
    -- New conversions have new ids, so their idempotency keys cannot exist yet:
    -- a plain INSERT (the unique index still guards it) is cheaper than ON CONFLICT.
    INSERT INTO postback.deliveries
           (endpoint_id, conversion_id, event, status, idempotency_key, method, url, body,
            state, completed_at, last_error)
    SELECT endpoint_id, conversion_id, event, status, r[1], method, coalesce(r[2], url_template), r[3],
           CASE WHEN r[4] IS NULL THEN 'pending' ELSE 'dead' END,
           CASE WHEN r[4] IS NOT NULL THEN now() END,
           r[4]
      FROM (SELECT e.id AS endpoint_id, c.id AS conversion_id, c.event, c.status, e.method, e.url_template,
                   postback.render_request(
                       e.id, e.name, e.kind, e.url_template, e.body_template, e.status_map, e.drop_empty_params,
                       c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                       c.attributes, c.occurred_at) AS r
              FROM new_rows c
              JOIN postback.endpoints e
                ON e.active AND (e.events IS NULL OR c.event = ANY (e.events))
                            AND (e.statuses IS NULL OR c.status = ANY (e.statuses))
            OFFSET 0) AS rendered;  -- OFFSET 0: render once per row, not once per r[i]
    IF FOUND THEN
        PERFORM postback.wake_worker();
    END IF;
    IF proposed > 0 THEN
        SELECT count(*) INTO inserted FROM new_rows;
        IF proposed > inserted THEN
            INSERT INTO postback.conversion_duplicates (duplicates) VALUES ((proposed - inserted)::integer);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION postback.enqueue_status_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- A status can come back (approved → pending → approved): its key exists
    -- then and the repeated announcement is a no-op.
    INSERT INTO postback.deliveries
           (endpoint_id, conversion_id, event, status, idempotency_key, predecessor_id, method, url,
            body, state, completed_at, last_error)
    SELECT rendered.endpoint_id, rendered.conversion_id, rendered.event, rendered.status, r[1],
           (SELECT max(p.id) FROM postback.deliveries p
             WHERE p.idempotency_key >= (rendered.conversion_id::text || '.' || rendered.endpoint_id::text || '.') COLLATE "C"
               AND p.idempotency_key <  (rendered.conversion_id::text || '.' || rendered.endpoint_id::text || '/') COLLATE "C"),
           rendered.method, coalesce(r[2], rendered.url_template), r[3],
           CASE WHEN r[4] IS NULL THEN 'pending' ELSE 'dead' END,
           CASE WHEN r[4] IS NOT NULL THEN now() END,
           r[4]
      FROM (SELECT e.id AS endpoint_id, c.id AS conversion_id, c.event, c.status, e.method, e.url_template,
                   postback.render_request(
                       e.id, e.name, e.kind, e.url_template, e.body_template, e.status_map, e.drop_empty_params,
                       c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                       c.attributes, c.occurred_at) AS r
              FROM new_rows c
              JOIN old_rows o ON o.id = c.id AND o.status IS DISTINCT FROM c.status
              JOIN postback.endpoints e
                ON e.active AND (e.events IS NULL OR c.event = ANY (e.events))
                            AND (e.statuses IS NULL OR c.status = ANY (e.statuses))
            OFFSET 0) AS rendered
        ON CONFLICT (idempotency_key) DO NOTHING;
    IF FOUND THEN
        PERFORM postback.wake_worker();
    END IF;
    RETURN NULL;
END
$$;

DROP FUNCTION postback.preview(text, bigint);

CREATE FUNCTION postback.preview(endpoint text, conversion_id bigint)
RETURNS TABLE (method text, url text, headers jsonb, body text, error text)
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
           r[3], r[4]
      FROM postback.endpoints e
      JOIN postback.conversions c ON c.id = preview.conversion_id
     CROSS JOIN LATERAL (SELECT postback.render_request(
                       e.id, e.name, e.kind, e.url_template, e.body_template, e.status_map, e.drop_empty_params,
                       c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                       c.attributes, c.occurred_at) AS r) AS rendered
      LEFT JOIN LATERAL postback.finalize_request(
           e.id, e.kind, e.signing_scheme, e.signature_header, e.timestamp_param, e.signature_param,
           r[2], nullif(e.headers, '{}'), r[3], r[1]) f ON r[4] IS NULL
     WHERE e.name = preview.endpoint;
END
$$;

DROP FUNCTION postback.endpoint_wants(postback.endpoints, postback.conversions);
DROP FUNCTION postback.render_delivery(postback.endpoints, postback.conversions);

-- Privileges ----------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION postback.render_request(bigint, text, text, text, jsonb, jsonb, boolean, bigint, text, text, text, text, text, text, jsonb, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.finalize_request(bigint, text, text, text, text, text, text, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.take_proposed_conversions() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.wake_worker() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.worker_stats() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.worker_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.preview(text, bigint) FROM PUBLIC;
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
                   'postback.conversion_duplicates, postback.delivery_summary TO %s', role);
    EXECUTE format('GRANT SELECT (%s) ON postback.endpoints TO %s', readable, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.worker_status(), postback.worker_stats() TO %s', role);
END
$$;

-- Operators: what analysts read, plus writing conversions (insert, change a
-- status) and previewing requests. They never write deliveries or endpoints.
CREATE FUNCTION postback.grant_operator(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM postback.grant_analyst(role);
    EXECUTE format('GRANT INSERT, UPDATE ON postback.conversions TO %s', role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.preview(text, bigint) TO %s', role);
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
COMMENT ON COLUMN postback.deliveries.method IS 'HTTP method: GET, POST, PUT or PATCH.';
COMMENT ON FUNCTION postback.endpoints_fill_defaults() IS 'Trigger: validates templates, headers and the success pattern; fills method from kind and max_attempts from the retry schedule.';
COMMENT ON FUNCTION postback.preview(text, bigint) IS 'The method, URL, headers (the endpoint''s own values redacted) and body an endpoint would be sent for a conversion, without sending.';
COMMENT ON FUNCTION postback.validate_headers(jsonb) IS 'Raises an error naming the header if endpoint headers are not a JSON object of HTTP token names to strings without control characters, or set Host, Content-Length, Transfer-Encoding, Connection, Upgrade, TE, Trailer, Keep-Alive, Proxy-Connection or Expect; true otherwise.';
COMMENT ON FUNCTION postback.grant_analyst(regrole) IS 'Lets a role read conversions, deliveries, attempts, duplicates, endpoints (all columns but the credential headers) and the views. Owner only.';
COMMENT ON FUNCTION postback.grant_operator(regrole) IS 'What grant_analyst gives, plus inserting conversions, changing their status and postback.preview. Owner only.';
COMMENT ON FUNCTION postback.revoke_access(regrole) IS 'Takes back every privilege grant_analyst or grant_operator gave a role. Owner only.';
