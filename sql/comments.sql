-- Documentation of every object, readable with \d+ and \df+ in psql.

COMMENT ON SCHEMA postback IS 'pg_postback: conversion postbacks and signed webhooks delivered by a background worker.';

COMMENT ON TABLE postback.endpoints IS 'Where conversions are announced: one row per affiliate network postback URL or webhook receiver. Kept by pg_dump.';
COMMENT ON COLUMN postback.endpoints.id IS 'Endpoint id.';
COMMENT ON COLUMN postback.endpoints.name IS 'Unique name operators use to refer to the endpoint.';
COMMENT ON COLUMN postback.endpoints.kind IS 'postback = GET to a URL template; webhook = signed JSON POST.';
COMMENT ON COLUMN postback.endpoints.url_template IS 'URL with {macro} placeholders filled from the conversion at enqueue time.';
COMMENT ON COLUMN postback.endpoints.method IS 'HTTP method; defaults to GET for postbacks and POST for webhooks.';
COMMENT ON COLUMN postback.endpoints.headers IS 'Extra request headers (API keys, Authorization) as a JSON object of name to value: credentials, readable only by the owner and added at send time, never copied into deliveries.';
COMMENT ON COLUMN postback.endpoints.events IS 'Conversion events this endpoint receives; NULL means all events.';
COMMENT ON COLUMN postback.endpoints.statuses IS 'Conversion statuses this endpoint receives; NULL means all statuses.';
COMMENT ON COLUMN postback.endpoints.active IS 'Inactive endpoints get no new deliveries and their pending ones wait.';
COMMENT ON COLUMN postback.endpoints.retry_schedule IS 'Delay before each retry (±20% jitter); the last step repeats while attempts remain.';
COMMENT ON COLUMN postback.endpoints.max_attempts IS 'Attempts before a delivery is dead; defaults to the schedule length + 1.';
COMMENT ON COLUMN postback.endpoints.max_age IS 'A delivery older than this is dead instead of retried.';
COMMENT ON COLUMN postback.endpoints.timeout IS 'Connect and total timeout of one HTTP attempt.';
COMMENT ON COLUMN postback.endpoints.signing_scheme IS 'none, hmac-sha256-hex, hmac-sha256-base64, github, stripe or standard-webhooks.';
COMMENT ON COLUMN postback.endpoints.status_map IS 'Maps conversion statuses to the network''s codes before {status} is filled, e.g. {"approved":"1"}.';
COMMENT ON COLUMN postback.endpoints.success_body_pattern IS 'Regular expression a 2xx response body must match to count as success; NULL = the status code decides.';
COMMENT ON COLUMN postback.endpoints.created_at IS 'When the endpoint was created.';
COMMENT ON COLUMN postback.endpoints.updated_at IS 'When the endpoint was last changed.';

COMMENT ON TABLE postback.endpoint_secrets IS 'Signing secrets per endpoint; several unexpired secrets are all used while a key rotates. Readable only by the extension owner and those it grants. Kept by pg_dump.';
COMMENT ON COLUMN postback.endpoint_secrets.id IS 'Secret id.';
COMMENT ON COLUMN postback.endpoint_secrets.endpoint_id IS 'Endpoint the secret signs for.';
COMMENT ON COLUMN postback.endpoint_secrets.secret IS 'The secret (for standard-webhooks, whsec_ followed by base64).';
COMMENT ON COLUMN postback.endpoint_secrets.created_at IS 'When the secret was added.';
COMMENT ON COLUMN postback.endpoint_secrets.expires_at IS 'After this time the secret is no longer used; NULL = never expires.';

COMMENT ON TABLE postback.conversions IS 'Conversions inserted by operators; each insert or status change enqueues deliveries in the same transaction.';
COMMENT ON COLUMN postback.conversions.id IS 'Conversion id.';
COMMENT ON COLUMN postback.conversions.click_id IS 'The network''s click id the conversion is attributed to.';
COMMENT ON COLUMN postback.conversions.transaction_id IS 'The operator''s unique id for this conversion (deduplication key).';
COMMENT ON COLUMN postback.conversions.event IS 'Event type: lead, sale, ftd, deposit, renewal, …';
COMMENT ON COLUMN postback.conversions.status IS 'pending, approved, rejected, reversed, refunded or chargeback; changing it announces the new status.';
COMMENT ON COLUMN postback.conversions.amount IS 'Payout or revenue amount.';
COMMENT ON COLUMN postback.conversions.currency IS 'ISO 4217 currency code, upper case.';
COMMENT ON COLUMN postback.conversions.attributes IS 'Sub-ids and any other values, usable in templates as {attributes.KEY}.';
COMMENT ON COLUMN postback.conversions.occurred_at IS 'When the conversion happened.';
COMMENT ON COLUMN postback.conversions.created_at IS 'When the row was inserted.';

COMMENT ON TABLE postback.deliveries IS 'One request to one endpoint announcing one conversion status, rendered once at enqueue and retried unchanged.';
COMMENT ON COLUMN postback.deliveries.id IS 'Delivery id.';
COMMENT ON COLUMN postback.deliveries.endpoint_id IS 'Endpoint (postback.endpoints.id) the request goes to.';
COMMENT ON COLUMN postback.deliveries.conversion_id IS 'Conversion (postback.conversions.id) it announces.';
COMMENT ON COLUMN postback.deliveries.event IS 'The conversion''s event.';
COMMENT ON COLUMN postback.deliveries.status IS 'The conversion status this delivery announces.';
COMMENT ON COLUMN postback.deliveries.idempotency_key IS 'Deterministic key of (conversion, endpoint, event, status); sent as Idempotency-Key; a repeated enqueue is a no-op.';
COMMENT ON COLUMN postback.deliveries.predecessor_id IS 'Earlier delivery of the same endpoint and conversion that must finish first (ordering of lifecycle postbacks).';
COMMENT ON COLUMN postback.deliveries.method IS 'HTTP method: GET, POST, PUT or PATCH.';
COMMENT ON COLUMN postback.deliveries.url IS 'Rendered request URL.';
COMMENT ON COLUMN postback.deliveries.body IS 'Rendered request body; NULL for GET postbacks.';
COMMENT ON COLUMN postback.deliveries.state IS 'pending (waiting for next_attempt_at), in_flight (leased by the worker), succeeded, or dead (gave up).';
COMMENT ON COLUMN postback.deliveries.attempts IS 'Attempts made so far.';
COMMENT ON COLUMN postback.deliveries.next_attempt_at IS 'Earliest time of the next attempt while pending.';
COMMENT ON COLUMN postback.deliveries.lease_expires_at IS 'While in_flight: when the worker''s claim lapses and the delivery is retried (crash recovery).';
COMMENT ON COLUMN postback.deliveries.created_at IS 'When the delivery was enqueued.';
COMMENT ON COLUMN postback.deliveries.completed_at IS 'When it succeeded or died.';
COMMENT ON COLUMN postback.deliveries.last_error IS 'Why the last attempt failed, or why the delivery is dead.';

COMMENT ON TABLE postback.attempts IS 'Every HTTP attempt of every delivery, recorded in the same transaction as the delivery''s new state.';
COMMENT ON COLUMN postback.attempts.id IS 'Attempt id.';
COMMENT ON COLUMN postback.attempts.delivery_id IS 'Delivery (postback.deliveries.id) attempted.';
COMMENT ON COLUMN postback.attempts.attempt_no IS '1 for the first attempt, 2 for the first retry, …';
COMMENT ON COLUMN postback.attempts.started_at IS 'When the request started.';
COMMENT ON COLUMN postback.attempts.duration_ms IS 'Time from start to the end of the response (or the failure), in milliseconds.';
COMMENT ON COLUMN postback.attempts.status_code IS 'HTTP status code; NULL when no response arrived.';
COMMENT ON COLUMN postback.attempts.response_body IS 'Response body, truncated to postback.max_response_bytes.';
COMMENT ON COLUMN postback.attempts.error IS 'Transport or policy error, or why the response did not count as success.';
COMMENT ON COLUMN postback.attempts.outcome IS 'succeeded, retry (another attempt is scheduled) or dead (no more attempts).';

COMMENT ON FUNCTION postback.endpoints_fill_defaults() IS 'Trigger: validates templates, headers and the success pattern; fills method from kind and max_attempts from the retry schedule.';
COMMENT ON FUNCTION postback.refuse_delete_with_deliveries() IS 'Trigger: refuses deleting endpoints or conversions that deliveries still refer to.';
COMMENT ON FUNCTION postback.delete_attempts_of_deleted_deliveries() IS 'Trigger: removes the attempts of deleted deliveries.';
COMMENT ON FUNCTION postback.worker_status() IS 'Whether the delivery worker runs, its pid, database, counters and last error, and a hint when it does not run.';

COMMENT ON VIEW postback.delivery_summary IS 'Deliveries per endpoint and state, with the age of the oldest unfinished one.';
COMMENT ON COLUMN postback.delivery_summary.endpoint_id IS 'Endpoint id.';
COMMENT ON COLUMN postback.delivery_summary.endpoint IS 'Endpoint name.';
COMMENT ON COLUMN postback.delivery_summary.active IS 'Whether the endpoint is active.';
COMMENT ON COLUMN postback.delivery_summary.pending IS 'Deliveries waiting to be sent or retried.';
COMMENT ON COLUMN postback.delivery_summary.in_flight IS 'Deliveries being sent now.';
COMMENT ON COLUMN postback.delivery_summary.succeeded IS 'Deliveries that succeeded.';
COMMENT ON COLUMN postback.delivery_summary.dead IS 'Deliveries given up on.';
COMMENT ON COLUMN postback.delivery_summary.oldest_unfinished_at IS 'Creation time of the oldest pending or in-flight delivery.';

COMMENT ON COLUMN postback.endpoints.body_template IS 'Webhook body as JSON whose strings may hold {macros}; a string that is exactly one macro keeps the value''s JSON type. NULL = the standard envelope.';
COMMENT ON COLUMN postback.endpoints.drop_empty_params IS 'Drop a query parameter whose macros all render empty (for networks that reject amount=).';
COMMENT ON COLUMN postback.endpoints.signature_header IS 'Header carrying a webhook signature; NULL = the scheme''s usual one (webhook-signature, Stripe-Signature, X-Hub-Signature-256, X-Signature).';
COMMENT ON COLUMN postback.endpoints.timestamp_param IS 'Query parameter holding the unix timestamp of a signed postback URL.';
COMMENT ON COLUMN postback.endpoints.signature_param IS 'Query parameter holding the signature of a signed postback URL (HMAC-SHA256 over the URL before it).';

COMMENT ON TABLE postback.conversion_duplicates IS 'Conversions skipped as duplicates by INSERT … ON CONFLICT (transaction_id) DO NOTHING: one row per statement that skipped any.';
COMMENT ON COLUMN postback.conversion_duplicates.id IS 'Row id.';
COMMENT ON COLUMN postback.conversion_duplicates.seen_at IS 'When the statement ran.';
COMMENT ON COLUMN postback.conversion_duplicates.duplicates IS 'How many proposed rows were skipped as duplicates.';

COMMENT ON FUNCTION postback.render(text, jsonb) IS 'Fills {macros} of a template from a JSON object, percent-encoding each value for where it stands ({x|raw} unencoded, {x|default:v} fallback).';
COMMENT ON FUNCTION postback.validate_template(text) IS 'Raises an error naming the problem and its position if the text is not a valid endpoint URL template; true otherwise.';
COMMENT ON FUNCTION postback.validate_body_template(jsonb) IS 'Raises an error if a webhook body template uses unknown variables or bad syntax; true otherwise.';
COMMENT ON FUNCTION postback.sign(text, text, text, text, bigint) IS 'Signature of a payload in the exact header format of a scheme (hmac-sha256-hex, hmac-sha256-base64, github, stripe, standard-webhooks).';
COMMENT ON FUNCTION postback.verify(text, text, text, text, text, bigint, interval) IS 'Constant-time check of a signature header; accepts any of several signatures; refuses timestamps outside the tolerance.';
COMMENT ON FUNCTION postback.render_request(bigint, text, text, text, jsonb, jsonb, boolean, bigint, text, text, text, text, text, text, jsonb, timestamptz) IS 'Internal: renders the request of one conversion for one endpoint; problems come back in error instead of raising.';
COMMENT ON FUNCTION postback.finalize_request(bigint, text, text, text, text, text, text, jsonb, text, text) IS 'Internal: the URL and full headers (signatures included) a request would be sent with now.';
COMMENT ON FUNCTION postback.preview(text, bigint) IS 'The method, URL, headers (the endpoint''s own values redacted) and body an endpoint would be sent for a conversion, without sending, and whether its filters route the conversion to it.';
COMMENT ON FUNCTION postback.conversions_validate() IS 'Trigger: per row, refuses a bad conversion with a message naming the column and transaction_id and counts proposed rows; per statement, resets that count.';
COMMENT ON FUNCTION postback.take_proposed_conversions() IS 'Internal: rows proposed to the current INSERT on conversions (to count duplicates skipped by ON CONFLICT).';
COMMENT ON FUNCTION postback.enqueue_conversions() IS 'Trigger (after INSERT and after UPDATE, per statement, as the owner): routes each inserted conversion, or each changed status, to the active endpoints whose partners, events, statuses and conditions match, renders the requests and writes the deliveries; a changed status waits behind earlier deliveries of the same endpoint and conversion.';
COMMENT ON FUNCTION postback.render_preview(bigint, bigint) IS 'Internal: {idempotency_key, url, body, error, routed} of one endpoint and conversion, rendered as the enqueue trigger would (partner and click included).';
COMMENT ON FUNCTION postback.validate_partners(text[]) IS 'Raises an error if an endpoint''s partners list is empty, holds NULL, or a name that is not 1 to 100 printable characters; true otherwise.';
COMMENT ON FUNCTION postback.validate_conditions(jsonb) IS 'Raises an error if an endpoint''s conditions are not a non-empty JSON object; true otherwise.';
COMMENT ON FUNCTION postback.wake_worker() IS 'Wakes the delivery worker when the current transaction commits.';
COMMENT ON FUNCTION postback.worker_stats() IS 'The worker''s figures from shared memory: pid, start, last wake, requests sent, in flight, last error.';
COMMENT ON FUNCTION postback.validate_success_pattern(text) IS 'Raises an error if a success_body_pattern is not a valid regular expression (Rust regex syntax, as the worker uses); true otherwise.';
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
