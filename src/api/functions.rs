//! Validators of endpoint settings, template rendering, sign and verify.

use pgrx::datetime::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

use super::{invalid, now_unix_micros, object_of};
use crate::rules::outgoing;
use crate::rules::signing::{self, Scheme};
use crate::rules::template::{self, RenderOptions, Template};

/// Fills a template from `vars`; each value is percent-encoded for where it stands.
#[pg_extern(immutable, parallel_safe)]
fn render(template: &str, vars: JsonB) -> String {
    let parsed = Template::parse(template).unwrap_or_else(|e| invalid(format!("invalid template: {e}")));
    template::render_url(&parsed, &object_of(vars, "vars"), RenderOptions::default())
        .unwrap_or_else(|e| invalid(format!("rendering: {e}")))
}

/// Checks an endpoint URL template; raises an error naming the problem and its position.
#[pg_extern(immutable, parallel_safe)]
fn validate_template(template: &str) -> bool {
    crate::rules::url_policy::validate_url_template(template)
        .unwrap_or_else(|e| invalid(format!("invalid url_template: {e}")));
    true
}

/// Checks a webhook JSON body template; raises an error naming the problem.
#[pg_extern(immutable, parallel_safe)]
fn validate_body_template(body: JsonB) -> bool {
    template::validate_body_template(&body.0).unwrap_or_else(|e| invalid(format!("invalid body_template: {e}")));
    true
}

/// Checks that a JSON value (as text) nests arrays and objects at most
/// `conversion_rules::MAX_JSON_NESTING` deep; raises an error naming `column`.
/// Used by CHECK constraints, so that a value every reader cannot handle is
/// refused when its row is written, never when a later import reads it.
#[pg_extern(immutable, parallel_safe)]
fn check_json_nesting(value: &str, column: &str) -> bool {
    if let Err(e) = crate::rules::conversion_rules::check_nesting(value, column) {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
            e,
            "Store deeply nested data elsewhere; attributes are read by routing and templates."
        );
    }
    true
}

/// Checks an endpoint's headers: a JSON object of strings, each name an HTTP
/// token that does not frame the request, each value free of control characters.
#[pg_extern(immutable, parallel_safe)]
fn validate_headers(headers: JsonB) -> bool {
    let Value::Object(map) = headers.0 else {
        invalid("invalid headers: must be a JSON object of header name to string value")
    };
    for (name, value) in &map {
        let Value::String(value) = value else {
            invalid(format!("invalid headers: the value of \"{}\" must be a string", name.escape_default()))
        };
        outgoing::check_header(name, value).unwrap_or_else(|e| invalid(format!("invalid headers: {e}")));
    }
    true
}

/// Checks a success_body_pattern (the worker's regular expression syntax).
#[pg_extern(immutable, parallel_safe)]
fn validate_success_pattern(pattern: &str) -> bool {
    // {variables} are filled per delivery (regex-escaped): check with sample values
    regex::Regex::new(&crate::rules::template::pattern::render_pattern(pattern, &template::sample_vars()))
        .unwrap_or_else(|e| invalid(format!("invalid regular expression in success_body_pattern: {e}")));
    true
}

/// Checks success_statuses / retry_statuses: status codes (100-599) and
/// ranges such as 200-302.
#[pg_extern(immutable, parallel_safe)]
fn validate_statuses(statuses: Vec<Option<String>>, column: &str) -> bool {
    let items: Vec<String> = statuses
        .into_iter()
        .map(|s| s.unwrap_or_else(|| invalid(format!("invalid {column}: the list holds NULL"))))
        .collect();
    crate::rules::retry::parse_statuses(&items, column).unwrap_or_else(|e| invalid(format!("invalid {e}")));
    true
}

/// Checks an endpoint's `partners`: NULL, or a non-empty list of partner names.
#[pg_extern(immutable, parallel_safe)]
fn validate_partners(partners: Vec<Option<String>>) -> bool {
    if partners.is_empty() {
        invalid("invalid partners: the list is empty (use NULL for every partner)");
    }
    for p in &partners {
        let Some(p) = p else { invalid("invalid partners: the list holds NULL") };
        crate::rules::routing::check_partner(p)
            .unwrap_or_else(|e| invalid(format!("invalid partners: \"{}\" {e}", p.escape_default())));
    }
    true
}

/// Checks an endpoint's `conditions` (a JSON object the attributes must contain).
#[pg_extern(immutable, parallel_safe)]
fn validate_conditions(conditions: JsonB) -> bool {
    crate::rules::routing::check_conditions(&conditions.0)
        .unwrap_or_else(|e| invalid(format!("invalid conditions: {e}")));
    true
}

fn scheme(name: &str) -> Scheme {
    Scheme::parse(name).unwrap_or_else(|e| invalid(e.0))
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
    signing::sign(payload, secret, self::scheme(scheme), msg_id, ts).unwrap_or_else(|e| invalid(e.0))
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
    signing::verify(payload, secret, self::scheme(scheme), signature, msg_id, ts, tolerance_secs, now)
        .unwrap_or_else(|e| invalid(e.0))
}
