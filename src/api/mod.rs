//! The SQL-facing layer: `#[pg_extern]` functions and triggers, converting
//! between Postgres types and the rules (`crate::rules`), by area:
//! `functions` (validators, render, sign/verify), `conversions` (the
//! validation and enqueue triggers and the per-statement state they share),
//! `endpoints` (endpoint rows and their parsed templates), `preview`
//! (preview, send_test, signing for preview), `status` (worker figures),
//! `compat` (symbols only older install scripts call), `rows` (every SQL
//! statement of this layer).

use pgrx::datetime::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use crate::rules::request::PG_EPOCH_OFFSET_MICROS;

mod compat;
mod conversions;
mod endpoints;
mod functions;
mod preview;
mod rows;
mod status;

/// Raises invalid_parameter_value (22023) with `message`.
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

fn timestamp(unix_micros: i64) -> Option<TimestampWithTimeZone> {
    (unix_micros != 0).then(|| TimestampWithTimeZone::try_from(unix_micros - PG_EPOCH_OFFSET_MICROS).ok()).flatten()
}

fn object(v: Option<JsonB>) -> Option<Map<String, Value>> {
    match v.map(|j| j.0) {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    }
}
