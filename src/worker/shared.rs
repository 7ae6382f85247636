//! State shared between the workers, their launcher and other backends: one
//! slot per worker with its latch (so a commit can wake the workers of its
//! database), its assignment (database, index, count) and the figures
//! `postback.worker_stats()` shows.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::rules::prepared::PreparedSet;
use crate::rules::workers::{Assignment, MAX_NAME_BYTES, MAX_WORKERS};

const ERROR_BYTES: usize = 256;
const STATE_BYTES: usize = 192;

/// A short text kept in shared memory (truncated at a character boundary).
#[derive(Copy, Clone)]
pub struct ShortText<const N: usize> {
    len: usize,
    bytes: [u8; N],
}

impl<const N: usize> Default for ShortText<N> {
    fn default() -> Self {
        ShortText { len: 0, bytes: [0; N] }
    }
}

impl<const N: usize> ShortText<N> {
    pub fn set(&mut self, text: &str) {
        let kept = crate::rules::text::truncate_utf8(text, N).as_bytes();
        self.bytes[..kept.len()].copy_from_slice(kept);
        self.len = kept.len();
    }

    pub fn get(&self) -> Option<String> {
        (self.len > 0).then(|| String::from_utf8_lossy(&self.bytes[..self.len]).into_owned())
    }
}

#[derive(Copy, Clone, Default)]
pub struct WorkerShared {
    /// the launcher gave this slot a worker (database, index, count below)
    pub assigned: bool,
    pub database: ShortText<{ MAX_NAME_BYTES + 1 }>,
    pub index: u32,
    pub count: u32,
    /// the database's maintenance worker (delivers nothing; commits do not wake it)
    pub maintenance: bool,
    /// the database's oid once the worker connected (0 before): commits in
    /// that database wake it
    pub database_oid: u32,
    /// what the launcher or the worker says of it (waiting, restarting…)
    pub state: ShortText<STATE_BYTES>,
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
    last_error: ShortText<ERROR_BYTES>,
}

impl WorkerShared {
    pub fn set_last_error(&mut self, message: &str, at: i64) {
        self.last_error.set(message);
        self.last_error_at = at;
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.get()
    }

    pub fn assignment(&self) -> Assignment {
        Assignment {
            database: self.database.get().unwrap_or_default(),
            index: self.index,
            count: self.count,
            maintenance: self.maintenance,
        }
    }
}

/// Every worker's slot, and the launcher's pid.
#[derive(Copy, Clone)]
pub struct Slots {
    pub launcher_pid: i32,
    pub slots: [WorkerShared; MAX_WORKERS],
}

impl Default for Slots {
    fn default() -> Self {
        Slots { launcher_pid: 0, slots: [WorkerShared::default(); MAX_WORKERS] }
    }
}

unsafe impl PGRXSharedMemory for Slots {}

pub static SHARED: PgLwLock<Slots> = unsafe { PgLwLock::new(c"pg_postback_workers") };

unsafe impl PGRXSharedMemory for PreparedSet {}

/// The prepared transactions that enqueued deliveries (see rules::prepared).
static PREPARED: PgLwLock<PreparedSet> = unsafe { PgLwLock::new(c"pg_postback_prepared") };

/// Set in _PG_init under shared_preload_libraries; inherited by every backend.
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// This worker's slot (workers only).
static MY_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);

pub fn init() {
    pg_shmem_init!(SHARED);
    pg_shmem_init!(PREPARED);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn available() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Changes this worker's own slot.
pub fn mine<R>(f: impl FnOnce(&mut WorkerShared) -> R) -> R {
    let slot = MY_SLOT.load(Ordering::Relaxed);
    let mut all = SHARED.exclusive();
    f(&mut all.slots[slot.min(MAX_WORKERS - 1)])
}

/// The launcher sets a slot up for a worker it is about to start.
pub fn assign(slot: usize, a: &Assignment, state: &str) {
    let mut all = SHARED.exclusive();
    let s = &mut all.slots[slot];
    *s = WorkerShared::default();
    s.assigned = true;
    s.database.set(&a.database);
    s.index = a.index;
    s.count = a.count;
    s.maintenance = a.maintenance;
    s.state.set(state);
}

/// The launcher frees a slot (its worker stopped for good).
pub fn unassign(slot: usize) {
    SHARED.exclusive().slots[slot] = WorkerShared::default();
}

/// The launcher says what became of a slot's worker.
pub fn set_state(slot: usize, state: &str) {
    SHARED.exclusive().slots[slot].state.set(state);
}

/// A worker takes its slot (its start argument) and learns its assignment;
/// None when the launcher has not set that slot up.
pub fn take_slot(slot: usize) -> Option<Assignment> {
    if slot >= MAX_WORKERS {
        return None;
    }
    let all = SHARED.share();
    let s = &all.slots[slot];
    if !s.assigned {
        return None;
    }
    MY_SLOT.store(slot, Ordering::Relaxed);
    Some(s.assignment())
}

/// Called by the worker once connected: publishes its latch and pid.
pub fn register_self(now: i64) {
    mine(|s| {
        let kept = (s.assigned, s.database, s.index, s.count, s.maintenance);
        *s = WorkerShared::default();
        (s.assigned, s.database, s.index, s.count, s.maintenance) = kept;
        s.latch = unsafe { &raw mut (*pg_sys::MyProc).procLatch } as usize;
        s.pid = unsafe { pg_sys::MyProcPid };
        s.database_oid = unsafe { pg_sys::MyDatabaseId }.to_u32();
        s.started_at = now;
    });
}

pub fn unregister_self() {
    mine(|s| {
        s.latch = 0;
        s.pid = 0;
        s.in_flight = 0;
        s.slow_endpoints = 0;
        s.in_flight_slow = 0;
    });
}

/// Sets the latches of the delivery workers serving this database.
pub fn wake() {
    if !available() {
        return;
    }
    let here = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut latches = [0usize; MAX_WORKERS];
    {
        let all = SHARED.share();
        for (i, s) in all.slots.iter().enumerate() {
            if s.database_oid == here && !s.maintenance {
                latches[i] = s.latch;
            }
        }
    }
    for latch in latches.into_iter().filter(|&l| l != 0) {
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
        // a prepared transaction's rows are seen once COMMIT PREPARED ran, in
        // whichever session runs it (see on_utility)
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
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

static mut PREVIOUS_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Makes COMMIT PREPARED wake the delivery workers of its database when its
/// transaction enqueued deliveries: a transaction committed in two phases
/// (Citus writing to several nodes, a transaction manager) becomes visible
/// only then, often in another session than the one that wrote it. PREPARE
/// TRANSACTION remembers the ones that enqueued (rules::prepared). Installed
/// when pg_postback is preloaded.
pub fn wake_on_commit_prepared() {
    unsafe {
        PREVIOUS_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(on_utility);
    }
}

/// A two-phase statement's kind and its prepared transaction's key.
fn two_phase(statement: *mut pg_sys::Node) -> Option<(pg_sys::TransactionStmtKind::Type, u64)> {
    use pg_sys::TransactionStmtKind::*;
    if statement.is_null() || unsafe { (*statement).type_ } != pg_sys::NodeTag::T_TransactionStmt {
        return None;
    }
    let t = unsafe { &*(statement as *mut pg_sys::TransactionStmt) };
    if !matches!(t.kind, TRANS_STMT_PREPARE | TRANS_STMT_COMMIT_PREPARED | TRANS_STMT_ROLLBACK_PREPARED)
        || t.gid.is_null()
    {
        return None;
    }
    let gid = unsafe { std::ffi::CStr::from_ptr(t.gid) };
    Some((t.kind, PreparedSet::key(unsafe { pg_sys::MyDatabaseId }.to_u32(), gid.to_bytes())))
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn on_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    use pg_sys::TransactionStmtKind::*;
    let two_phase = two_phase(unsafe { (*pstmt).utilityStmt });
    if let Some((TRANS_STMT_PREPARE, key)) = two_phase {
        // this transaction enqueued: its COMMIT PREPARED wakes the workers
        if WAKE_AT_COMMIT.load(Ordering::Relaxed) {
            PREPARED.exclusive().remember(key);
        }
    }
    match unsafe { PREVIOUS_UTILITY_HOOK } {
        // another library's hook (Citus'): its ERROR becomes a Rust panic here,
        // raised again as that ERROR past this frame
        Some(previous) => unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(pstmt, query, read_only_tree, context, params, query_env, dest, qc)
            })
        },
        None => unsafe {
            pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, query_env, dest, qc)
        },
    }
    let Some((kind, key)) = two_phase else { return };
    if kind == TRANS_STMT_PREPARE {
        return;
    }
    // most two-phase commits enqueued nothing: looked up under the shared lock
    // first (a statement of its own: the exclusive lock is taken after it is let go)
    let known = PREPARED.share().wakes_for(key);
    if known && PREPARED.exclusive().take(key) && kind == TRANS_STMT_COMMIT_PREPARED {
        // COMMIT PREPARED runs in a transaction of its own: wake as it ends
        wake_at_commit();
    }
}
