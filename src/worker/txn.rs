//! Transactions for the worker that survive errors: an ERROR inside is caught,
//! the transaction (or subtransaction) rolled back, and the message returned,
//! so the worker records the failure instead of dying.

use std::panic::AssertUnwindSafe;

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::SpiResult;

fn describe(e: CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Runs `f`, turning a Postgres ERROR or a panic into `Err(message)`.
fn catching<T>(f: impl FnOnce() -> SpiResult<T>) -> Result<T, String> {
    let f = AssertUnwindSafe(f);
    PgTryBuilder::new(move || {
        let f = f;
        (f.0)().map_err(|e| e.to_string())
    })
    .catch_others(|e| Err(describe(e)))
    .execute()
}

/// Runs `f` in its own transaction, committed on success and rolled back on
/// any error.
pub fn run<T>(what: &str, f: impl FnOnce() -> SpiResult<T>) -> Result<T, String> {
    let activity = std::ffi::CString::new(format!("pg_postback: {what}")).unwrap_or_default();
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, activity.as_ptr());
    }
    let result = catching(f);
    unsafe {
        match result {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
        // A client backend flushes its table statistics when idle; a background
        // worker must ask. Without it autovacuum never saw the worker's updates
        // of deliveries or its inserts of attempts (no dead tuples counted, no
        // vacuum, ever-growing indexes). At most once a second (force = false).
        pg_sys::pgstat_report_stat(false);
    }
    result.map_err(|e| format!("{what}: {e}"))
}

/// Runs `f` in a subtransaction of the current transaction; on error only the
/// subtransaction is rolled back.
pub fn in_subtransaction<T>(f: impl FnOnce() -> SpiResult<T>) -> SpiResult<Result<T, String>> {
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe {
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
    }
    let result = catching(f);
    unsafe {
        match result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    Ok(result)
}
