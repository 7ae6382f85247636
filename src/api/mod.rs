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

use crate::rules::refusal::{Kind, Refusal};
use crate::rules::request::PG_EPOCH_OFFSET_MICROS;

mod compat;
mod conversions;
mod endpoints;
mod explain;
mod functions;
mod preview;
mod rerender;
mod rows;
mod status;

/// The one mapping from a [`Refusal`] to a Postgres error: the SQLSTATE of its
/// kind, its column or argument in DETAIL, its hint.
fn raise(r: Refusal) -> ! {
    let code = match r.kind {
        Kind::InvalidValue => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        Kind::CheckViolation => PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
        Kind::RestrictViolation => PgSqlErrorCode::ERRCODE_RESTRICT_VIOLATION,
    };
    let detail = r.detail();
    let mut report = pgrx::pg_sys::panic::ErrorReport::new(code, r.message, "pg_postback").set_detail(detail);
    if let Some(hint) = r.hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Raises invalid_parameter_value (22023) about an argument the SQL layer reads itself.
fn invalid(argument: &str, message: impl Into<String>) -> ! {
    raise(Refusal::new(Kind::InvalidValue, argument, message).argument())
}

/// Values a rule refused become the Postgres error of [`raise`].
trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, Refusal> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|r| raise(r))
    }
}

fn object_of(value: JsonB, what: &str) -> Map<String, Value> {
    match value.0 {
        Value::Object(m) => m,
        _ => invalid(what, format!("{what} must be a JSON object")),
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
