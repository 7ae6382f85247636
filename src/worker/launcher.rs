//! The launcher: one background worker per cluster, connected to no
//! database, that runs the delivery workers `postback.database_name` and
//! `postback.workers` ask for — `postback.workers` per listed database, each
//! owning the endpoints whose id modulo the count is its index. On reload it
//! starts the workers of added databases, stops those of removed ones and,
//! when a database's count changes, stops all its workers before starting the
//! new set (an endpoint never has two owners). A worker that stops is started
//! again after 1 s, backing off to a minute while it keeps stopping at once (a
//! database that does not exist); the others run on.

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use super::{shared, shutdown_requested, MAINTENANCE_TYPE, WORKER_TYPE};
use crate::gucs;
use crate::rules::workers::{self, Assignment, MAX_WORKERS};

/// The launcher's backend type and name (`pg_stat_activity`).
pub const LAUNCHER_TYPE: &str = "pg_postback launcher";
/// How often the launcher looks at its workers.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks at a worker it asked to stop, until it has.
const STOP_LOOK_EVERY: Duration = Duration::from_millis(20);
/// How long a leftover worker of a previous launcher may take to stop.
const LEFTOVER_GRACE: Duration = Duration::from_secs(15);

pub fn register() {
    BackgroundWorkerBuilder::new(LAUNCHER_TYPE)
        .set_type(LAUNCHER_TYPE)
        .set_library("pg_postback")
        .set_function("pg_postback_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// The postmaster's handle of a dynamic worker, asked for its pid by
/// polling: the launcher never blocks waiting for a notification.
struct Handle(*mut pg_sys::BackgroundWorkerHandle);

impl Handle {
    fn start(builder: BackgroundWorkerBuilder) -> Option<Handle> {
        let mut bgw: pg_sys::BackgroundWorker = (&builder).into();
        let mut handle: *mut pg_sys::BackgroundWorkerHandle = std::ptr::null_mut();
        // SAFETY: bgw is a complete registration; the postmaster fills handle on success
        unsafe { pg_sys::RegisterDynamicBackgroundWorker(&mut bgw, &mut handle) }.then_some(Handle(handle))
    }

    /// False once the worker has stopped (or the postmaster forgot it).
    fn alive(&self) -> bool {
        let mut pid: pg_sys::pid_t = 0;
        let status = unsafe { pg_sys::GetBackgroundWorkerPid(self.0, &mut pid) };
        matches!(status, pg_sys::BgwHandleStatus::BGWH_STARTED | pg_sys::BgwHandleStatus::BGWH_NOT_YET_STARTED)
    }

    /// Asks the worker to stop (SIGTERM) and waits until it has.
    fn stop(self) {
        unsafe { pg_sys::TerminateBackgroundWorker(self.0) };
        while self.alive() && !shutdown_requested() {
            super::wait_latch(STOP_LOOK_EVERY);
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // allocated by RegisterDynamicBackgroundWorker in the launcher's memory
        unsafe { pg_sys::pfree(self.0.cast()) };
    }
}

/// One slot's worker as the launcher sees it.
struct Slot {
    assignment: Assignment,
    handle: Option<Handle>,
    started: Instant,
    /// when to start it again (after it stopped), and the delay that was used
    restart_at: Option<Instant>,
    delay: Option<Duration>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_postback_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // connected to no database (as the logical replication launcher): it reads
    // no table, but shows in pg_stat_activity
    BackgroundWorker::connect_worker_to_spi(None, None);
    stop_leftovers();
    shared::SHARED.exclusive().launcher_pid = unsafe { pg_sys::MyProcPid };
    log!("pg_postback launcher started");
    let mut slots: Vec<Option<Slot>> = (0..MAX_WORKERS).map(|_| None).collect();
    let mut reported: Option<String> = None;
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let (wanted, left) = desired(&mut reported);
        if !left.is_empty() {
            let message = format!(
                "no worker slot left for database(s) {}: at most {MAX_WORKERS} workers run in all \
                 (postback.workers × databases)",
                left.join(", ")
            );
            if reported.as_deref() != Some(message.as_str()) {
                warning!("pg_postback launcher: {message}");
                reported = Some(message);
            }
        }
        reconcile(&mut slots, &wanted);
        watch(&mut slots);
        super::wait_latch(next_look(&slots));
    }
    shared::SHARED.exclusive().launcher_pid = 0;
    log!("pg_postback launcher shutting down");
}

/// The workers the settings ask for now. A list that does not parse cannot
/// be set (the check hook refuses it), so the parse error here is only said.
fn desired(reported: &mut Option<String>) -> (Vec<Assignment>, Vec<String>) {
    match workers::parse_databases(&gucs::database_name()) {
        Ok(databases) => workers::plan(&databases, gucs::workers_per_database()),
        Err(message) => {
            if reported.as_deref() != Some(message.as_str()) {
                warning!("pg_postback launcher: postback.database_name: {message}");
                *reported = Some(message);
            }
            (Vec::new(), Vec::new())
        }
    }
}

/// Stops the workers no longer wanted — all of a database's workers when its
/// count changed — and starts the wanted ones not running.
fn reconcile(slots: &mut [Option<Slot>], wanted: &[Assignment]) {
    for i in 0..slots.len() {
        let Some(slot) = &slots[i] else { continue };
        if !wanted.contains(&slot.assignment) {
            let a = slot.assignment.clone();
            stop(slots, i);
            log!("pg_postback launcher: stopped {} of database \"{}\" (settings changed)", a.describe(), a.database);
        }
    }
    // a changed count: every worker of that database is stopped before any new one starts
    for a in wanted {
        if slots.iter().flatten().any(|s| s.assignment == *a) {
            continue;
        }
        let Some(free) = slots.iter().position(Option::is_none) else { break };
        shared::assign(free, a, "starting");
        slots[free] =
            Some(Slot { assignment: a.clone(), handle: None, started: Instant::now(), restart_at: None, delay: None });
        start(slots[free].as_mut().expect("just set"), free);
    }
}

/// Terminates a slot's worker, waits until it has stopped, frees the slot.
fn stop(slots: &mut [Option<Slot>], i: usize) {
    if let Some(Slot { handle: Some(handle), .. }) = slots[i].take() {
        handle.stop();
    }
    shared::unassign(i);
}

/// Starts a slot's worker (the slot number is its argument).
fn start(slot: &mut Slot, i: usize) {
    let a = &slot.assignment;
    let name = format!("{WORKER_TYPE} {} for {}", a.describe(), a.database);
    let builder = BackgroundWorkerBuilder::new(crate::rules::text::truncate_utf8(&name, 95))
        .set_type(if a.maintenance { MAINTENANCE_TYPE } else { WORKER_TYPE })
        .set_library("pg_postback")
        .set_function("pg_postback_worker_main")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(i)));
    slot.started = Instant::now();
    slot.restart_at = None;
    match Handle::start(builder) {
        Some(handle) => slot.handle = Some(handle),
        None => {
            let delay = workers::restart_delay(slot.delay, Duration::ZERO);
            slot.delay = Some(delay);
            slot.restart_at = Some(Instant::now() + delay);
            let message = format!(
                "no background worker slot free for the {} of database \"{}\": raise \
                 max_worker_processes (it needs one for the launcher, and per database one per \
                 worker and one for maintenance, beside parallel query's); next try in {} s",
                a.describe(),
                a.database,
                delay.as_secs()
            );
            warning!("pg_postback launcher: {message}");
            shared::set_state(i, &message);
        }
    }
}

/// Notices workers that stopped and starts them again when their delay is over.
fn watch(slots: &mut [Option<Slot>]) {
    for (i, entry) in slots.iter_mut().enumerate() {
        let Some(slot) = entry else { continue };
        if let Some(handle) = &slot.handle {
            if handle.alive() {
                continue;
            }
            slot.handle = None;
            let ran_for = slot.started.elapsed();
            let delay = workers::restart_delay(slot.delay, ran_for);
            slot.delay = Some(delay);
            slot.restart_at = Some(Instant::now() + delay);
            let connected = shared::SHARED.share().slots[i].database_oid != 0;
            let a = &slot.assignment;
            let message = if connected {
                format!("stopped after {} s; starting again in {} s", ran_for.as_secs(), delay.as_secs())
            } else {
                format!(
                    "could not connect to database \"{}\" (does it exist? see the server log); \
                     trying again in {} s",
                    a.database,
                    delay.as_secs()
                )
            };
            if delay >= Duration::from_secs(2) || connected {
                log!("pg_postback launcher: {} of database \"{}\" {message}", a.describe(), a.database);
            }
            shared::set_state(i, &message);
            let mut all = shared::SHARED.exclusive();
            let s = &mut all.slots[i];
            (s.pid, s.latch, s.database_oid, s.in_flight) = (0, 0, 0, 0);
        }
        if slot.restart_at.is_some_and(|t| Instant::now() >= t) {
            shared::set_state(i, "starting");
            start(slot, i);
        }
    }
}

/// How long to sleep: until the earliest restart, at most LOOK_EVERY.
fn next_look(slots: &[Option<Slot>]) -> Duration {
    let now = Instant::now();
    slots
        .iter()
        .flatten()
        .filter_map(|s| s.restart_at)
        .map(|t| t.saturating_duration_since(now))
        .fold(LOOK_EVERY, Duration::min)
        .max(Duration::from_millis(10))
}

/// Workers a previous launcher started (it stopped without the postmaster
/// restarting): asked to stop, so that no endpoint gets two owners.
fn stop_leftovers() {
    let pids: Vec<i32> = shared::SHARED.share().slots.iter().map(|s| s.pid).filter(|&p| p != 0).collect();
    for &pid in &pids {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while Instant::now() < deadline
        && pids.iter().any(|&pid| unsafe { libc::kill(pid, 0) } == 0)
        && !shutdown_requested()
    {
        super::wait_latch(Duration::from_millis(100));
    }
    *shared::SHARED.exclusive() = shared::Slots::default();
}
