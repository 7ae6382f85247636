//! The worker's figures and its wake-up, for SQL.

use pgrx::datetime::TimestampWithTimeZone;
use pgrx::prelude::*;

use super::timestamp;

/// Wakes the delivery worker when the current transaction commits. Called by
/// the enqueue triggers; harmless when the worker is not preloaded.
#[pg_extern(volatile, parallel_unsafe)]
fn wake_worker() {
    crate::worker::shared::wake_at_commit();
}

/// Every worker's figures from shared memory, one row per worker the
/// launcher runs (every database's; empty when not preloaded).
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
        name!(concurrency, i32),
        name!(slow_endpoints, i32),
        name!(in_flight_slow, i32),
        name!(database, Option<String>),
        name!(worker, Option<i32>),
        name!(workers, i32),
        name!(state, Option<String>),
        name!(role, String),
    ),
> {
    if !crate::worker::shared::available() {
        return TableIterator::new(Vec::new());
    }
    let all = *crate::worker::shared::SHARED.share();
    let rows: Vec<_> = all
        .slots
        .iter()
        .filter(|s| s.assigned)
        .map(|s| {
            (
                (s.pid != 0).then_some(s.pid),
                timestamp(s.started_at),
                timestamp(s.last_wake),
                s.sent,
                s.succeeded,
                s.failed,
                s.in_flight,
                s.last_error(),
                timestamp(s.last_error_at),
                s.concurrency,
                s.slow_endpoints,
                s.in_flight_slow,
                s.database.get(),
                (!s.maintenance).then_some(s.index as i32 + 1),
                s.count as i32,
                s.state.get(),
                if s.maintenance { "maintenance" } else { "delivery" }.to_string(),
            )
        })
        .collect();
    TableIterator::new(rows)
}
