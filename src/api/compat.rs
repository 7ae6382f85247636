//! Symbols only the frozen install scripts of earlier releases call (a
//! database whose `ALTER EXTENSION pg_postback UPDATE` has not run yet). They
//! keep their SQL signatures; none of them is part of the current install.

use pgrx::datetime::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use super::endpoints::cached_template;
use super::{now_unix_micros, unix_micros};
use crate::rules::request::{self, Conversion, Endpoint};

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

/// SQL access to `take_proposed` (the 0.1.0 enqueue trigger's; kept for its install script).
#[pg_extern(volatile, parallel_unsafe)]
fn take_proposed_conversions() -> i64 {
    super::conversions::take_proposed()
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

/// 0.2.0's `render_preview` (positional `text[]`:
/// `{idempotency_key, url, body, error, routed}`), for the 0.2.0 `preview`
/// that runs until the update. 0.3.0 has `preview_request`.
#[pg_extern(volatile, sql = false)]
fn render_preview(endpoint_id: i64, conversion_id: i64) -> Vec<Option<String>> {
    let (r, routed) = super::preview::preview_of(endpoint_id, conversion_id);
    vec![r.key, r.url, r.body, r.error, routed.map(|b| b.to_string())]
}

/// 0.2.0's `render_test` (positional `text[]`:
/// `{idempotency_key, url, body, error, event, status, success_pattern}`),
/// for the 0.2.0 `send_test` that runs until the update: it stores the URL
/// as it is, so digests go in 0.2.0's in-band form, which nothing sends
/// before the update and the update moves out of band (counting them).
/// 0.3.0 has `test_request`.
#[pg_extern(volatile, sql = false)]
fn render_test(endpoint_id: i64, sample: JsonB) -> Vec<Option<String>> {
    let t = super::preview::test_of(endpoint_id, sample);
    let r = t.rendered;
    let url = r.url.map(|u| crate::rules::url_hash::legacy_marked(&u, &r.hashes));
    vec![r.key, url, r.body, r.error, Some(t.event), Some(t.status), t.pattern]
}
