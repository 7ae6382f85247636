//! What would be sent: `postback.preview` and `postback.send_test` render
//! here, and `sign_request` adds signatures and digests for the preview.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use super::conversions::ConversionRow;
use super::endpoints::{load_endpoints, render, render_with_pattern};
use super::rows::{self, live_secrets};
use super::{invalid, now_unix_micros};
use crate::rules::outgoing;
use crate::rules::request::{self, Click};

/// One request as it would be rendered now (a preview or a test delivery).
#[derive(Default)]
pub(super) struct Rendered {
    pub(super) key: Option<String>,
    pub(super) url: Option<String>,
    /// where the URL's {hash:…} digests go
    pub(super) hashes: Vec<crate::rules::url_hash::HashSlot>,
    pub(super) body: Option<String>,
    pub(super) error: Option<String>,
}

impl Rendered {
    fn of(key: String, rendered: Result<request::Request, String>) -> Rendered {
        match rendered {
            Ok(r) => Rendered { key: Some(key), url: Some(r.url), hashes: r.hashes, body: r.body, error: None },
            Err(e) => Rendered { key: Some(key), error: Some(e), ..Rendered::default() },
        }
    }

    fn failed(error: String) -> Rendered {
        Rendered { error: Some(error), ..Rendered::default() }
    }

    fn url_hashes(&self) -> Option<JsonB> {
        crate::rules::url_hash::to_value(&self.hashes).map(JsonB)
    }
}

/// What `postback.preview` shows: the request one endpoint would get for one
/// conversion, rendered as the enqueue trigger would, and whether the
/// endpoint's filters route the conversion to it.
pub(super) fn preview_of(endpoint_id: i64, conversion_id: i64) -> (Rendered, Option<bool>) {
    Spi::connect(|client| {
        let (endpoints, router) = load_endpoints(client, &rows::own_tables(), rows::Which::One(endpoint_id))?;
        let Some(e) = endpoints.first() else {
            return Ok::<_, pgrx::spi::Error>((Rendered::failed(format!("unknown endpoint id {endpoint_id}")), None));
        };
        let rows = client.select(&rows::conversion_with_click(), Some(1), &[conversion_id.into()])?;
        let Some(row) = rows.into_iter().next() else {
            return Ok((Rendered::failed(format!("unknown conversion id {conversion_id}")), None));
        };
        let mut c = ConversionRow::read(&row)?;
        let mut matched = Vec::new();
        router.route(&c.subject(), &mut matched);
        let conversion = c.as_conversion();
        let key = request::idempotency_key(conversion.id, e.id, conversion.event, conversion.status);
        let rendered = render(&conversion, e, &key, now_unix_micros(), crate::gucs::request_limits());
        Ok((Rendered::of(key, rendered), Some(!matched.is_empty())))
    })
    .unwrap_or_else(|e| pgrx::error!("rendering a preview: {e}"))
}

/// The request `postback.preview` shows for one endpoint and conversion, as
/// the enqueue trigger would render it now, and whether the endpoint's
/// filters route the conversion to it. `error` says why there is no URL.
#[pg_extern(volatile)]
#[allow(clippy::type_complexity)]
fn preview_request(
    endpoint_id: i64,
    conversion_id: i64,
) -> TableIterator<
    'static,
    (
        name!(idempotency_key, Option<String>),
        name!(url, Option<String>),
        name!(url_hashes, Option<JsonB>),
        name!(body, Option<String>),
        name!(error, Option<String>),
        name!(routed, Option<bool>),
    ),
> {
    let (r, routed) = preview_of(endpoint_id, conversion_id);
    let hashes = r.url_hashes();
    TableIterator::once((r.key, r.url, hashes, r.body, r.error, routed))
}

/// A test delivery's request, and the event, status and filled success
/// pattern it is stored with.
pub(super) struct TestRequest {
    pub(super) rendered: Rendered,
    pub(super) event: String,
    pub(super) status: String,
    pub(super) pattern: Option<String>,
}

/// The request a test delivery sends: clearly marked sample values
/// (`TEST-CLICK-…`, amount 0.00, the endpoint's first partner and event),
/// each overridable by a key of `sample` (click_id, transaction_id, event,
/// status, amount, currency, partner, attributes, click).
pub(super) fn test_of(endpoint_id: i64, sample: JsonB) -> TestRequest {
    let Value::Object(sample) = sample.0 else { invalid("sample", "sample must be a JSON object") };
    let text = |key: &str, default: String| -> String {
        match sample.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => default,
            Some(other) => other.to_string(),
        }
    };
    Spi::connect(|client| {
        let (endpoints, router) = load_endpoints(client, &rows::own_tables(), rows::Which::One(endpoint_id))?;
        let Some(e) = endpoints.first() else { invalid("endpoint_id", format!("unknown endpoint id {endpoint_id}")) };
        let filters = router.filters(0);
        let now = now_unix_micros();
        let marker = format!("{:x}", now);
        let first = |list: &Option<Vec<String>>| list.as_ref().and_then(|l| l.first().cloned());
        let mut c = ConversionRow {
            id: 0,
            click_id: text("click_id", format!("TEST-CLICK-{marker}")),
            transaction_id: text("transaction_id", format!("TEST-{marker}")),
            event: text("event", first(&filters.events).unwrap_or_else(|| "test".into())),
            status: text("status", first(&filters.statuses).unwrap_or_else(|| "approved".into())),
            amount: Some(text("amount", "0.00".into())),
            currency: Some(text("currency", "USD".into())),
            attributes: match sample.get("attributes") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            },
            occurred_at: now,
            partner: sample
                .get("partner")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| first(&filters.partners)),
            click: Some(Click {
                attributes: match sample.get("click") {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                },
                clicked_at_unix_micros: now,
            }),
        };
        let (event, status) = (c.event.clone(), c.status.clone());
        let conversion = c.as_conversion();
        let key = format!("test.{}.{marker}", e.id);
        let (rendered, pattern) = render_with_pattern(&conversion, e, &key, now, crate::gucs::request_limits());
        Ok::<_, pgrx::spi::Error>(TestRequest { rendered: Rendered::of(key, rendered), event, status, pattern })
    })
    .unwrap_or_else(|e| pgrx::error!("rendering a test request: {e}"))
}

/// The request `postback.send_test` enqueues (see `test_of`); `error` says
/// why it could not be rendered (the test delivery is then dead with it).
#[pg_extern(volatile)]
#[allow(clippy::type_complexity)]
fn test_request(
    endpoint_id: i64,
    sample: JsonB,
) -> TableIterator<
    'static,
    (
        name!(idempotency_key, Option<String>),
        name!(url, Option<String>),
        name!(url_hashes, Option<JsonB>),
        name!(body, Option<String>),
        name!(error, Option<String>),
        name!(event, String),
        name!(status, String),
        name!(success_pattern, Option<String>),
    ),
> {
    let t = test_of(endpoint_id, sample);
    let hashes = t.rendered.url_hashes();
    let r = t.rendered;
    TableIterator::once((r.key, r.url, hashes, r.body, r.error, t.event, t.status, t.pattern))
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
    let hashes = url_hashes
        .map_or(Ok(Vec::new()), |h| crate::rules::url_hash::from_value(&h.0))
        .unwrap_or_else(|e| invalid("url_hashes", e));
    let signing = outgoing::Signing {
        scheme: signing_scheme.to_string(),
        secrets: if signing_scheme == "none" && hashes.is_empty() { Vec::new() } else { live_secrets(endpoint_id) },
        header: signature_header.map(str::to_string),
        ts_param: timestamp_param.to_string(),
        sig_param: signature_param.to_string(),
    };
    // the same reading as the worker's: headers that do not parse are an error, never left out
    let stored = match headers {
        Some(h) => outgoing::parse_stored_headers(&h.0.to_string()).unwrap_or_else(|e| invalid("headers", e)),
        None => Vec::new(),
    };
    let now = now_unix_micros().div_euclid(1_000_000);
    let out = outgoing::finalize(kind, url, &hashes, &stored, body, idempotency_key, &signing, now)
        .unwrap_or_else(|e| invalid("url", e));
    let headers: Map<String, Value> = out.headers.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    TableIterator::once((out.url, JsonB(Value::Object(headers))))
}
