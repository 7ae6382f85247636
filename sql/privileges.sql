-- Who may do what. The extension's owner (the superuser who ran CREATE
-- EXTENSION) owns every table; nobody else writes deliveries, attempts,
-- endpoints or secrets. Applications and people get one of two roles' worth of
-- grants, through the functions below (so that later versions can extend them).

-- Internal functions: only the owner (and the SECURITY DEFINER triggers and
-- functions, which run as the owner) may call them. sign_request signs
-- with an endpoint's live secrets, so it is a signing oracle for anyone else.
REVOKE EXECUTE ON FUNCTION postback.render_request(bigint, text, text, text, jsonb, jsonb, boolean, bigint, text, text, text, text, text, text, jsonb, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.sign_request(bigint, text, text, text, text, text, text, jsonb, jsonb, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.live_secrets(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.take_proposed_conversions() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.wake_worker() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.worker_stats() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.worker_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.preview(text, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.preview_request(bigint, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.enqueue_conversions() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.test_request(bigint, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.resend(bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender(bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender_queue() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.rerender_queued_here(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.distribute(integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.citus_prepare_node() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.citus_views() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.cluster_worker_status() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.retry(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.retry_dead(text, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.replay(text, timestamptz, timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.send_test(text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.pause(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.resume(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.purge(interval, integer, boolean, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.explain(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.purge_tests(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.roll_up(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.roll_up_conversions(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.roll_up_attempts() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.refuse_on_citus_worker() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.count_conversion_changes() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.held_by(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.cluster_endpoint_state() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.curl(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.explain(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.explain_routing(bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch(regclass, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.unwatch(regclass) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_check(regclass, text, jsonb, regtype) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_expression(regclass, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_fields() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION postback.watch_drop_triggers(regclass) FROM PUBLIC;
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
                   'postback.metrics, postback.dead_letters, postback.delivery_rollup, postback.conversion_rollup, '
                   'postback.attempt_rollup, postback.rollup_state, postback.watches TO %s', role);
    EXECUTE format('GRANT SELECT (%s) ON postback.endpoints TO %s', readable, role);
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.worker_status(), postback.worker_stats(), '
                   'postback.cluster_worker_status(), '
                   'postback.explain(bigint), postback.explain(text), postback.held_by(bigint), '
                   'postback.cluster_endpoint_state() TO %s', role);
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
                   'postback.send_test(text, jsonb), postback.pause(text), postback.resume(text), '
                   'postback.curl(bigint), postback.purge_tests(interval) TO %s', role);
    -- watch: only of tables the role owns (watch checks), with the helpers it calls as the role
    EXECUTE format('GRANT EXECUTE ON FUNCTION postback.watch(regclass, jsonb), postback.unwatch(regclass), '
                   'postback.watch_check(regclass, text, jsonb, regtype), postback.watch_expression(regclass, text), '
                   'postback.watch_fields(), postback.watch_drop_triggers(regclass) TO %s', role);
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
