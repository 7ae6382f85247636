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

-- Trust: every SQL and PL/pgSQL function pins its search_path --------------

ALTER FUNCTION postback.refuse_delete_with_deliveries() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION postback.delete_attempts_of_deleted_deliveries() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION postback.worker_status() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Endpoints: partners and conditions; headers checked when given ------------

ALTER TABLE postback.endpoints
    ADD COLUMN partners text[],
    ADD COLUMN conditions jsonb
        CONSTRAINT endpoint_conditions_must_be_a_json_object
            CHECK (jsonb_typeof(conditions) = 'object');

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
                   'postback.conversion_duplicates, postback.clicks, postback.delivery_summary, '
                   'postback.match_rate TO %s', role);
    EXECUTE format('GRANT SELECT (%s) ON postback.endpoints TO %s', readable, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.worker_status(), postback.worker_stats() TO %s', role);
END
$$;

-- Operators: what analysts read, plus writing conversions (insert, change a
-- status) and clicks (the landing page), and previewing requests. They never write deliveries or endpoints.
CREATE FUNCTION postback.grant_operator(role regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM postback.grant_analyst(role);
    EXECUTE format('GRANT INSERT, UPDATE ON postback.conversions, postback.clicks TO %s', role);
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
