//! Validators of endpoint settings (each calls its rule in
//! `rules::validate`), template rendering, sign and verify.

use pgrx::datetime::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;

use super::{invalid, now_unix_micros, object_of, raise, OrRaise};
use crate::rules::refusal::{Kind, Refusal};
use crate::rules::signing;
use crate::rules::template::{self, RenderOptions, Template};
use crate::rules::validate;

/// Fills a template from `vars`; each value is percent-encoded for where it stands.
#[pg_extern(immutable, parallel_safe)]
fn render(template: &str, vars: JsonB) -> String {
    let parsed = Template::parse(template).unwrap_or_else(|e| invalid("template", format!("invalid template: {e}")));
    template::render_url_hashed(&parsed, &object_of(vars, "vars"), RenderOptions::default())
        .and_then(|(url, slots)| crate::rules::url_hash::expand_without_secret(&url, &slots))
        .unwrap_or_else(|e| invalid("vars", format!("rendering: {e}")))
}

/// Checks an endpoint URL template; raises an error naming the problem and its position.
#[pg_extern(immutable, parallel_safe)]
fn validate_template(template: &str) -> bool {
    validate::url_template(template).or_raise();
    true
}

/// Checks a webhook JSON body template; raises an error naming the problem.
#[pg_extern(immutable, parallel_safe)]
fn validate_body_template(body: JsonB) -> bool {
    validate::body_template(&body.0).or_raise();
    true
}

/// Checks that a JSON value (as text) nests arrays and objects at most
/// `conversion_rules::MAX_JSON_NESTING` deep; raises a check_violation naming
/// `column`. Used by CHECK constraints, so that a value every reader cannot
/// handle is refused when its row is written, never when a later import reads it.
#[pg_extern(immutable, parallel_safe)]
fn check_json_nesting(value: &str, column: &str) -> bool {
    validate::nesting(value, column).or_raise();
    true
}

/// Checks an endpoint's headers: a JSON object of strings, each name an HTTP
/// token that does not frame the request, each value free of control characters.
#[pg_extern(immutable, parallel_safe)]
fn validate_headers(headers: JsonB) -> bool {
    validate::headers(&headers.0).or_raise();
    true
}

/// Checks a success_body_pattern (the worker's regular expression syntax).
#[pg_extern(immutable, parallel_safe)]
fn validate_success_pattern(pattern: &str) -> bool {
    validate::success_pattern(pattern).or_raise();
    true
}

/// Checks success_statuses / retry_statuses: status codes (100-599) and
/// ranges such as 200-302.
#[pg_extern(immutable, parallel_safe)]
fn validate_statuses(statuses: Vec<Option<String>>, column: &str) -> bool {
    validate::statuses(&statuses, column).or_raise();
    true
}

/// Checks an endpoint's `partners`: NULL, or a non-empty list of partner names.
#[pg_extern(immutable, parallel_safe)]
fn validate_partners(partners: Vec<Option<String>>) -> bool {
    validate::partners(&partners).or_raise();
    true
}

/// Checks an endpoint's `conditions` (a JSON object the attributes must contain).
#[pg_extern(immutable, parallel_safe)]
fn validate_conditions(conditions: JsonB) -> bool {
    validate::conditions(&conditions.0).or_raise();
    true
}

/// Checks an endpoint's status_map: known statuses to strings or numbers.
#[pg_extern(immutable, parallel_safe)]
fn validate_status_map(status_map: JsonB) -> bool {
    validate::status_map(&status_map.0).or_raise();
    true
}

/// Checks an endpoint's events: a non-empty list of names a conversion's event can have.
#[pg_extern(immutable, parallel_safe)]
fn validate_events(events: Vec<Option<String>>) -> bool {
    validate::events(&events).or_raise();
    true
}

/// Checks an endpoint's kind, method, signing_scheme and statuses against
/// their valid values, naming the column and the values.
#[pg_extern(immutable, parallel_safe)]
fn validate_endpoint_choices(
    kind: &str,
    method: &str,
    signing_scheme: &str,
    statuses: default!(Option<Vec<Option<String>>>, "NULL"),
) -> bool {
    validate::endpoint_choices(kind, method, signing_scheme, statuses.as_deref()).or_raise();
    true
}

/// Checks an endpoint's bounded settings (intervals in seconds), naming the
/// column, its bounds and the value, before a CHECK constraint would answer
/// with the whole row.
#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn validate_endpoint_settings(
    name: Option<&str>,
    kind: Option<&str>,
    signing_scheme: Option<&str>,
    retry_schedule_secs: Option<Vec<Option<f64>>>,
    max_attempts: Option<i32>,
    max_age_secs: Option<f64>,
    timeout_secs: Option<f64>,
    max_in_flight: Option<i32>,
    rate_limit: Option<f64>,
    initial_delay_secs: Option<f64>,
    signature_header: Option<&str>,
    timestamp_param: Option<&str>,
    signature_param: Option<&str>,
    has_body_template: Option<bool>,
) -> bool {
    validate::endpoint_settings(&validate::EndpointSettings {
        name,
        kind,
        signing_scheme,
        retry_schedule_secs: retry_schedule_secs.as_deref(),
        max_attempts,
        max_age_secs,
        timeout_secs,
        max_in_flight,
        rate_limit,
        initial_delay_secs,
        signature_header,
        timestamp_param,
        signature_param,
        has_body_template: has_body_template.unwrap_or(false),
    })
    .or_raise();
    true
}

/// Checks a secret for an endpoint signing with `scheme` (the message never quotes it).
#[pg_extern(immutable, parallel_safe)]
fn validate_secret(scheme: &str, secret: &str) -> bool {
    validate::secret(scheme, secret).or_raise();
    true
}

/// Whether an endpoint with this signing scheme and URL template needs a live
/// secret to send (it signs, or its template has a `{hash:…}`); its deliveries
/// wait while it has none. The worker applies the same rule.
#[pg_extern(immutable, parallel_safe)]
fn needs_secret(signing_scheme: &str, url_template: &str) -> bool {
    crate::rules::outgoing::needs_secret(signing_scheme, url_template)
}

/// A curl command line for a request (method, URL, headers as a JSON object
/// of strings, body, timeout in ms), every argument quoted for the shell.
#[pg_extern(immutable, parallel_safe)]
fn curl_command(method: &str, url: &str, headers: JsonB, body: Option<&str>, timeout_ms: i64) -> String {
    let headers: Vec<(String, String)> = match headers.0 {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(v) => (k, v),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => invalid("headers", "headers must be a JSON object"),
    };
    crate::rules::outgoing::curl_command(method, url, &headers, body, timeout_ms)
}

/// A latency histogram (`rules::histogram`: four buckets per doubling) of values in ms.
#[pg_extern(immutable, parallel_safe)]
fn latency_histogram(values: Vec<Option<f64>>) -> Vec<i64> {
    crate::rules::histogram::of(&values.into_iter().flatten().collect::<Vec<_>>())
}

/// The sum of two latency histograms.
#[pg_extern(immutable, parallel_safe)]
fn histogram_add(a: Vec<Option<i64>>, b: Vec<Option<i64>>) -> Vec<i64> {
    let plain = |v: Vec<Option<i64>>| v.into_iter().map(Option::unwrap_or_default).collect::<Vec<_>>();
    crate::rules::histogram::add(&plain(a), &plain(b))
}

/// The `q` quantile of a latency histogram in ms (within 9%); NULL when empty.
#[pg_extern(immutable, parallel_safe)]
fn histogram_quantile(counts: Vec<Option<i64>>, q: f64) -> Option<f64> {
    crate::rules::histogram::quantile(&counts.into_iter().map(Option::unwrap_or_default).collect::<Vec<_>>(), q)
}

fn sign_error(e: signing::SignError) -> ! {
    raise(Refusal::new(Kind::InvalidValue, e.argument, e.message).argument())
}

/// Signs `payload` and returns the signature in the exact header format of `scheme`.
#[pg_extern(stable, parallel_safe)]
fn sign(
    payload: &str,
    secret: &str,
    scheme: &str,
    msg_id: default!(Option<&str>, "NULL"),
    ts: default!(Option<i64>, "NULL"),
) -> String {
    let ts = ts.unwrap_or_else(|| now_unix_micros().div_euclid(1_000_000));
    signing::sign(payload, secret, validate::scheme(scheme).or_raise(), msg_id, ts).unwrap_or_else(|e| sign_error(e))
}

/// Verifies a signature header in constant time, accepting any of several
/// space-separated signatures and refusing stale timestamps.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn verify(
    payload: &str,
    secret: &str,
    scheme: &str,
    signature: &str,
    msg_id: default!(Option<&str>, "NULL"),
    ts: default!(Option<i64>, "NULL"),
    tolerance: default!(Interval, "'5 minutes'"),
) -> bool {
    let tolerance_secs = (tolerance.as_micros() / 1_000_000) as i64;
    let now = now_unix_micros().div_euclid(1_000_000);
    signing::verify(payload, secret, validate::scheme(scheme).or_raise(), signature, msg_id, ts, tolerance_secs, now)
        .unwrap_or_else(|e| sign_error(e))
}
