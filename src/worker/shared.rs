//! State shared between the worker and other backends: the worker's latch
//! (so a commit can wake it) and the figures `postback.worker_stats()` shows.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

const ERROR_BYTES: usize = 256;

#[derive(Copy, Clone)]
pub struct WorkerShared {
    /// address of the worker's PGPROC latch (shared memory), 0 when not running
    pub latch: usize,
    pub pid: i32,
    pub started_at: i64,
    pub last_wake: i64,
    pub sent: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub in_flight: i32,
    /// most requests open at once (postback.concurrency)
    pub concurrency: i32,
    /// endpoints slow now, and their requests in flight
    pub slow_endpoints: i32,
    pub in_flight_slow: i32,
    pub last_error_at: i64,
    last_error_len: usize,
    last_error: [u8; ERROR_BYTES],
}

impl Default for WorkerShared {
    fn default() -> Self {
        WorkerShared {
            latch: 0,
            pid: 0,
            started_at: 0,
            last_wake: 0,
            sent: 0,
            succeeded: 0,
            failed: 0,
            in_flight: 0,
            concurrency: 0,
            slow_endpoints: 0,
            in_flight_slow: 0,
            last_error_at: 0,
            last_error_len: 0,
            last_error: [0; ERROR_BYTES],
        }
    }
}

unsafe impl PGRXSharedMemory for WorkerShared {}

impl WorkerShared {
    pub fn set_last_error(&mut self, message: &str, at: i64) {
        let kept = crate::rules::text::truncate_utf8(message, ERROR_BYTES).as_bytes();
        self.last_error[..kept.len()].copy_from_slice(kept);
        self.last_error_len = kept.len();
        self.last_error_at = at;
    }

    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0).then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len]).into_owned())
    }
}

pub static SHARED: PgLwLock<WorkerShared> = unsafe { PgLwLock::new(c"pg_postback_worker") };

/// Set in _PG_init under shared_preload_libraries; inherited by every backend.
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(SHARED);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn available() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Called by the worker when it starts: publishes its latch and pid.
pub fn register_self(now: i64) {
    let mut s = SHARED.exclusive();
    *s = WorkerShared::default();
    s.latch = unsafe { &raw mut (*pg_sys::MyProc).procLatch } as usize;
    s.pid = unsafe { pg_sys::MyProcPid };
    s.started_at = now;
}

pub fn unregister_self() {
    let mut s = SHARED.exclusive();
    s.latch = 0;
    s.pid = 0;
    s.in_flight = 0;
    s.slow_endpoints = 0;
    s.in_flight_slow = 0;
}

/// Sets the worker's latch, if a worker is running.
pub fn wake() {
    if !available() {
        return;
    }
    let latch = SHARED.share().latch;
    if latch != 0 {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) =>
        {
            wake();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Asks for the worker to be woken when the current transaction commits
/// (nothing happens on rollback).
pub fn wake_at_commit() {
    if !available() {
        return;
    }
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}
