//! SQL functions: thin conversions between Postgres types and the pure modules.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datetime::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use crate::rules::outgoing;
use crate::rules::request::{self, Conversion, Endpoint, PG_EPOCH_OFFSET_MICROS};
use crate::rules::signing::{self, Scheme};
use crate::rules::template::{self, RenderOptions, Template};

fn invalid(message: impl Into<String>) -> ! {
    ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message.into());
}

fn object_of(value: JsonB, what: &str) -> Map<String, Value> {
    match value.0 {
        Value::Object(m) => m,
        _ => invalid(format!("{what} must be a JSON object")),
    }
}

pub fn now_unix_micros() -> i64 {
    // the transaction's start: one timestamp for every row of a statement
    let pg: i64 = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    pg + PG_EPOCH_OFFSET_MICROS
}

fn unix_micros(ts: TimestampWithTimeZone) -> i64 {
    let pg: pg_sys::TimestampTz = ts.into();
    pg + PG_EPOCH_OFFSET_MICROS
}

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
    template::validate_url_template(template).unwrap_or_else(|e| invalid(format!("invalid url_template: {e}")));
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
    regex::Regex::new(&template::render_pattern(pattern, &template::sample_vars()))
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

/// A parsed URL template and whether its renderings need no URL check.
pub(crate) type CachedTemplate = Rc<Result<(Template, bool), String>>;

thread_local! {
    /// Parsed URL templates by text: a 100k-row insert parses each endpoint's once.
    static TEMPLATES: RefCell<HashMap<String, CachedTemplate>> = RefCell::new(HashMap::new());
}

pub(crate) fn cached_template(text: &str) -> CachedTemplate {
    TEMPLATES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(t) = cache.get(text) {
            return t.clone();
        }
        // validated again here: a template may have bypassed the endpoint trigger
        let entry = Rc::new(match template::validate_url_template(text) {
            Ok(t) => {
                let trusted = !t.has_raw();
                Ok((t, trusted))
            }
            Err(e) => match Template::parse(text) {
                Ok(t) => Ok((t, false)),
                Err(_) => Err(format!("invalid url_template: {e}")),
            },
        });
        if cache.len() > 1000 {
            cache.clear();
        }
        cache.insert(text.to_string(), entry.clone());
        entry
    })
}

/// 0.1.0's per-delivery renderer, called only by the enqueue trigger of the
/// frozen 0.1.0 install script (a database whose `ALTER EXTENSION … UPDATE` has
/// not run yet); since 0.2.0 the enqueue renders in Rust (`enqueue.rs`).
/// Returns `{idempotency_key, url, body, error}`; data problems come back in
/// `error`, never raised.
#[pg_extern(stable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn render_request(
    endpoint_id: i64,
    endpoint_name: &str,
    kind: &str,
    url_template: &str,
    body_template: Option<JsonB>,
    status_map: Option<JsonB>,
    drop_empty_params: bool,
    conversion_id: i64,
    click_id: &str,
    transaction_id: &str,
    event: &str,
    status: &str,
    amount: Option<&str>,
    currency: Option<&str>,
    attributes: JsonB,
    occurred_at: TimestampWithTimeZone,
) -> Vec<Option<String>> {
    let key = request::idempotency_key(conversion_id, endpoint_id, event, status);
    let cached = cached_template(url_template);
    let rendered = cached.as_ref().as_ref().map_err(Clone::clone).and_then(|(url_template, trusted)| {
        let body_template = body_template.map(|b| b.0);
        let status_map = status_map.and_then(|m| match m.0 {
            Value::Object(map) => Some(map),
            _ => None,
        });
        let endpoint = Endpoint {
            name: endpoint_name,
            kind,
            url_template,
            url_template_trusted: *trusted,
            body_template: body_template.as_ref(),
            status_map: status_map.as_ref(),
            drop_empty_params,
        };
        let conversion = Conversion {
            id: conversion_id,
            click_id,
            transaction_id,
            event,
            status,
            amount,
            currency,
            attributes: match attributes.0 {
                Value::Object(map) => map,
                _ => Map::new(),
            },
            occurred_at_unix_micros: unix_micros(occurred_at),
            partner: None,
            click: None,
        };
        request::render(&conversion, &endpoint, &key, now_unix_micros(), crate::gucs::request_limits())
    });
    match rendered {
        Ok(r) => vec![Some(key), Some(r.url), r.body, None],
        Err(e) => vec![Some(key), None, None, Some(e)],
    }
}

/// Live secrets of an endpoint, newest first.
pub fn live_secrets(endpoint_id: i64) -> Vec<String> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT secret FROM postback.endpoint_secrets
                  WHERE endpoint_id = $1 AND (expires_at IS NULL OR expires_at > now())
                  ORDER BY created_at DESC, id DESC",
                None,
                &[endpoint_id.into()],
            )?
            .map(|row| row.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_else(|e| invalid(format!("reading secrets: {e}")))
}

/// The URL and complete headers a delivery would be sent with now (signature
/// headers and `{hash:…}` digests included, computed at the positions in
/// `url_hashes` only). Used by `postback.preview`. No row when `url` is NULL
/// (the request could not be rendered; the caller shows why).
#[pg_extern(volatile)]
#[allow(clippy::too_many_arguments)]
fn sign_request(
    endpoint_id: i64,
    kind: &str,
    signing_scheme: &str,
    signature_header: Option<&str>,
    timestamp_param: &str,
    signature_param: &str,
    url: Option<&str>,
    url_hashes: Option<JsonB>,
    headers: Option<JsonB>,
    body: Option<&str>,
    idempotency_key: &str,
) -> TableIterator<'static, (name!(url, String), name!(headers, JsonB))> {
    let Some(url) = url else { return TableIterator::new(std::iter::empty()) };
    let hashes = crate::rules::url_hash::from_json(url_hashes.map(|h| h.0.to_string()).as_deref())
        .unwrap_or_else(|e| invalid(e));
    let signing = outgoing::Signing {
        scheme: signing_scheme.to_string(),
        secrets: if signing_scheme == "none" && hashes.is_empty() { Vec::new() } else { live_secrets(endpoint_id) },
        header: signature_header.map(str::to_string),
        ts_param: timestamp_param.to_string(),
        sig_param: signature_param.to_string(),
    };
    let stored = outgoing::header_pairs(headers.map(|h| h.0));
    let now = now_unix_micros().div_euclid(1_000_000);
    let out = outgoing::finalize(kind, url, &hashes, &stored, body, idempotency_key, &signing, now)
        .unwrap_or_else(|e| invalid(e));
    let headers: Map<String, Value> = out.headers.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    TableIterator::once((out.url, JsonB(Value::Object(headers))))
}

/// 0.2.0's `postback.finalize_request`, kept only so that its install script
/// still loads beside this library: it expanded hash markers found in the URL
/// text, which a value could forge. It refuses to run; 0.3.0 has sign_request.
#[pg_extern(volatile, sql = false)]
#[allow(clippy::too_many_arguments)]
fn finalize_request(
    _endpoint_id: i64,
    _kind: &str,
    _signing_scheme: &str,
    _signature_header: Option<&str>,
    _timestamp_param: &str,
    _signature_param: &str,
    _url: &str,
    _headers: Option<JsonB>,
    _body: Option<&str>,
    _idempotency_key: &str,
) -> TableIterator<'static, (name!(url, String), name!(headers, JsonB))> {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        "postback.finalize_request belongs to pg_postback 0.2.0 and no longer runs",
        "Run ALTER EXTENSION pg_postback UPDATE."
    );
}

thread_local! {
    /// Rows proposed to INSERT on postback.conversions by the current statement
    /// (reset by the BEFORE STATEMENT trigger); rows skipped by ON CONFLICT DO
    /// NOTHING are counted here but never reach the transition table.
    static PROPOSED_CONVERSIONS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// BEFORE INSERT OR UPDATE trigger on postback.conversions. Per row: refuses
/// a bad row with a message naming the column and the transaction_id, and
/// counts proposed rows. Per statement: resets that count.
#[pg_trigger]
fn conversions_validate<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::datum::TryFromDatumError> {
    let Some(row) = trigger.new() else {
        PROPOSED_CONVERSIONS.with(|c| c.set(0));
        SEEN_CLICKS.with(|c| c.borrow_mut().clear());
        return Ok(None);
    };
    let click_id: Option<&str> = row.get_by_name("click_id")?;
    let transaction_id: Option<&str> = row.get_by_name("transaction_id")?;
    let event: Option<&str> = row.get_by_name("event")?;
    let status: Option<&str> = row.get_by_name("status")?;
    let currency: Option<&str> = row.get_by_name("currency")?;
    // a 0.1.0 schema (library upgraded, ALTER EXTENSION … UPDATE not yet run) has no partner
    let (has_partner, partner): (bool, Option<&str>) = match row.get_by_name("partner") {
        Ok(p) => (true, p),
        Err(pgrx::datum::TryFromDatumError::NoSuchAttributeName(_)) => (false, None),
        Err(e) => return Err(e),
    };
    let fields = crate::rules::conversion_rules::Fields { click_id, transaction_id, event, status, currency, partner };
    if let Err((_column, message)) = crate::rules::conversion_rules::check(&fields) {
        ereport!(ERROR, PgSqlErrorCode::ERRCODE_CHECK_VIOLATION, message);
    }
    let inserting = matches!(trigger.op(), Ok(pgrx::PgTriggerOperation::Insert));
    if !has_partner {
        if inserting {
            PROPOSED_CONVERSIONS.with(|c| c.set(c.get() + 1));
        }
        return Ok(Some(row.into_owned()));
    }
    if !inserting {
        // a conversion's history stays with one partner
        let old_partner =
            trigger.old().and_then(|o| o.get_by_name::<&str>("partner").ok().flatten().map(str::to_string));
        if old_partner.as_deref() != partner {
            let message =
                crate::rules::conversion_rules::partner_change_message(transaction_id, old_partner.as_deref(), partner);
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_RESTRICT_VIOLATION, message);
        }
        return Ok(Some(row.into_owned()));
    }
    PROPOSED_CONVERSIONS.with(|c| c.set(c.get() + 1));
    let click_id = click_id.unwrap_or("");
    let click = find_click(click_id);
    let from_click = match (&click, partner) {
        (Some(k), None) => k.partner.clone(),
        _ => None,
    };
    SEEN_CLICKS.with(|c| c.borrow_mut().insert(click_id.to_string(), click));
    if let Some(found) = from_click {
        let mut row = row.into_owned();
        row.set_by_name("partner", found)?;
        return Ok(Some(row));
    }
    Ok(Some(row.into_owned()))
}

/// A recorded click as the validation trigger found it.
#[derive(Debug, Clone)]
pub(crate) struct FoundClick {
    pub partner: Option<String>,
    pub attributes: Option<Value>,
    pub clicked_at: Option<TimestampWithTimeZone>,
}

thread_local! {
    /// Clicks looked up for the rows of the current INSERT, by click_id, so
    /// that the enqueue trigger reads each click once per conversion without a
    /// second look-up (reset by the BEFORE STATEMENT trigger).
    static SEEN_CLICKS: RefCell<HashMap<String, Option<FoundClick>>> = RefCell::new(HashMap::new());
}

/// The click the validation trigger found for `click_id` in this statement:
/// `Some(None)` when it looked and there was none, `None` when it did not look.
pub(crate) fn seen_click(click_id: &str) -> Option<Option<FoundClick>> {
    SEEN_CLICKS.with(|c| c.borrow().get(click_id).cloned())
}

thread_local! {
    /// The click look-up, planned once per backend.
    static CLICK_LOOKUP: std::cell::OnceCell<pgrx::spi::OwnedPreparedStatement> = const { std::cell::OnceCell::new() };
}

/// A recorded click: one primary-key look-up, as the caller (an operator has
/// SELECT on postback.clicks), immune to its search_path.
fn find_click(click_id: &str) -> Option<FoundClick> {
    CLICK_LOOKUP.with(|cell| {
        Spi::connect(|client| {
            if cell.get().is_none() {
                let plan = client
                    .prepare(
                        "SELECT k.partner, k.attributes, k.clicked_at FROM postback.clicks k
                          WHERE k.click_id OPERATOR(pg_catalog.=) $1",
                        &[PgBuiltInOids::TEXTOID.oid()],
                    )?
                    .keep();
                let _ = cell.set(plan);
            }
            let plan = cell.get().expect("planned above");
            let rows = client.select(plan, Some(1), &[click_id.into()])?;
            let Some(row) = rows.into_iter().next() else {
                return Ok::<_, pgrx::spi::Error>(None);
            };
            Ok(Some(FoundClick {
                partner: row.get::<String>(1)?,
                attributes: row.get::<JsonB>(2)?.map(|j| j.0),
                clicked_at: row.get::<TimestampWithTimeZone>(3)?,
            }))
        })
        .unwrap_or_else(|e| invalid(format!("looking up the click of a conversion: {e}")))
    })
}

/// Returns and resets the count of proposed conversion rows (see above).
pub(crate) fn take_proposed() -> i64 {
    PROPOSED_CONVERSIONS.with(|c| c.replace(0))
}

/// SQL access to `take_proposed` (the 0.1.0 enqueue trigger's; kept for its install script).
#[pg_extern(volatile, parallel_unsafe)]
fn take_proposed_conversions() -> i64 {
    take_proposed()
}

/// Wakes the delivery worker when the current transaction commits. Called by
/// the enqueue triggers; harmless when the worker is not preloaded.
#[pg_extern(volatile, parallel_unsafe)]
fn wake_worker() {
    crate::worker::shared::wake_at_commit();
}

fn timestamp(unix_micros: i64) -> Option<TimestampWithTimeZone> {
    (unix_micros != 0).then(|| TimestampWithTimeZone::try_from(unix_micros - PG_EPOCH_OFFSET_MICROS).ok()).flatten()
}

/// The worker's own figures from shared memory (empty when not preloaded).
#[pg_extern(volatile)]
#[allow(clippy::type_complexity)]
fn worker_stats() -> TableIterator<
    'static,
    (
        name!(pid, Option<i32>),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(last_wake, Option<TimestampWithTimeZone>),
        name!(sent, i64),
        name!(succeeded, i64),
        name!(failed, i64),
        name!(in_flight, i32),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
    ),
> {
    if !crate::worker::shared::available() {
        return TableIterator::new(std::iter::empty());
    }
    let s = *crate::worker::shared::SHARED.share();
    TableIterator::once((
        (s.pid != 0).then_some(s.pid),
        timestamp(s.started_at),
        timestamp(s.last_wake),
        s.sent,
        s.succeeded,
        s.failed,
        s.in_flight,
        s.last_error(),
        timestamp(s.last_error_at),
    ))
}
