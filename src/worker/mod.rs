//! The background worker: registration and main loop.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::gucs;

pub mod shared;

pub const WORKER_TYPE: &str = "pg_postback worker";

pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_TYPE)
        .set_type(WORKER_TYPE)
        .set_library("pg_postback")
        .set_function("pg_postback_worker_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// True once SIGTERM arrived. `BackgroundWorker::sigterm_received` clears on
/// read, so the flag Postgres itself sets is the one consulted.
fn shutdown_requested() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_postback_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database_name();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    unsafe {
        pg_sys::pgstat_report_appname(c"pg_postback worker".as_ptr());
    }
    log!("pg_postback worker started, connected to database \"{database}\"");

    loop {
        let interval = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
        let alive = BackgroundWorker::wait_latch(Some(interval));
        if !alive || shutdown_requested() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if gucs::database_name() != database {
                log!("pg_postback worker: postback.database_name changed, restarting to reconnect");
                unsafe { pg_sys::proc_exit(1) };
            }
        }
    }
    log!("pg_postback worker shutting down");
}
