//! The background worker: registration and main loop.
//!
//! Shape of one pass: take the requests that finished since the last pass and
//! record them (attempts, new states, breaker changes) in one short
//! transaction; claim due deliveries with a lease while there is room; hand
//! them to the scheduler, which puts on the wire what each endpoint's
//! max_in_flight, rate_limit and circuit breaker allow; wait for a result, a
//! commit, a due retry or the poll interval. No request waits for another:
//! a hanging endpoint holds at most its own max_in_flight slots. HTTP runs on
//! the pool's threads; every Postgres call stays on this thread.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::gucs;
use crate::http::{self, Client, Job};
use crate::rules::outgoing::{self, Signing};
use crate::rules::retry::{self, AttemptResult, Decision, Jitter, Limits, Outcome};
use crate::rules::scheduler::{BreakerSettings, BreakerState, Scheduler, SlowChange, Transition};

mod claim;
mod dispatch;
pub mod launcher;
mod maintenance;
mod pool;
mod queue;
mod record;
pub mod shared;
mod txn;

use claim::{CachedEndpoint, Judging};
use pool::{Done, Pool, Work};
use queue::{Claimed, EndpointConfig, Record, Share};
use record::dead_record;

/// The worker's backend type and application name (`pg_stat_activity`); the
/// SQL side (`worker_status`, lease reclaim) looks for it under this name.
pub const WORKER_TYPE: &str = "pg_postback worker";
/// The maintenance worker's backend type and application name.
pub const MAINTENANCE_TYPE: &str = "pg_postback maintenance";
/// How often finished deliveries older than postback.retention are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// How often finished deliveries are rolled up for postback.metrics.
const ROLLUP_EVERY: Duration = Duration::from_secs(60);
/// Rows per purge transaction, and transactions per purge run.
const PURGE_BATCH: i32 = 10_000;
const PURGE_MAX_BATCHES: usize = 100;

/// How long in-flight requests may finish after SIGTERM before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The launcher is registered at preload; it starts the workers.
pub fn register() {
    launcher::register();
}

/// True once SIGTERM arrived. `BackgroundWorker::sigterm_received` clears on
/// read, so the flag Postgres itself sets is the one consulted.
fn shutdown_requested() -> bool {
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

/// A worker, started by the launcher: its argument is its slot, where the
/// launcher wrote its database and either its share of the endpoints (a
/// delivery worker) or that it is the database's maintenance worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_postback_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(me) = shared::take_slot(arg.value()) else {
        log!("pg_postback worker: slot {} was not set up by the launcher; exiting", arg.value());
        return;
    };
    // whatever ends this process (an error, FATAL) clears its slot's pid and latch
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    BackgroundWorker::connect_worker_to_spi(Some(&me.database), None);
    pin_session(if me.maintenance { MAINTENANCE_TYPE } else { WORKER_TYPE });
    shared::register_self(crate::rules::text::unix_micros_now());
    log!("pg_postback {} started, connected to database \"{}\"", me.describe(), me.database);
    let schema = SchemaWait { logged: None, database: me.database.clone(), speaks: !me.maintenance };
    if me.maintenance {
        maintenance::run(schema);
    } else {
        deliver(Share { index: me.index as i32, count: me.count as i32 }, schema);
    }
    shared::unregister_self();
    log!("pg_postback worker shutting down ({} of database \"{}\")", me.describe(), me.database);
}

/// A delivery worker's loop: claim, send, record, wait; housekeeping every
/// few seconds. Roll-up and purge are the maintenance worker's.
fn deliver(share: Share, mut schema: SchemaWait) {
    let mut worker = Worker::new(share);
    let mut last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            worker.reload();
        }
        let poll = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
        if !worker.ready {
            if !schema.ready(poll) {
                continue;
            }
            shared::mine(|s| s.state.set("delivering"));
            worker.start();
        }
        worker.step(poll, last_housekeeping + HOUSEKEEPING_EVERY);
        if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            last_housekeeping = Instant::now();
            worker.housekeeping();
        }
    }
    worker.stop();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    shared::unregister_self();
}

/// The worker's session: its name in pg_stat_activity, and a search_path in
/// which only pg_catalog resolves unqualified names (an operator or function
/// planted in `public` or in a schema named after this role is never found,
/// whatever the database's or role's default search_path says).
fn pin_session(kind: &str) {
    let appname = std::ffi::CString::new(kind).expect("no NUL in the worker type");
    unsafe {
        pg_sys::pgstat_report_appname(appname.as_ptr());
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
}

/// Waiting for a schema this library speaks (installed, at its version).
struct SchemaWait {
    /// what was last logged while waiting: the version waiting for ALTER
    /// EXTENSION … UPDATE, or that the extension is not installed
    logged: Option<String>,
    /// the database served, named in what is logged
    database: String,
    /// whether this process logs it (the delivery workers do; the maintenance
    /// worker only shows it in worker_status, so that it is said once)
    speaks: bool,
}

impl SchemaWait {
    /// True once the schema is ready; otherwise waits a while and says false.
    /// Deliveries of another version's schema wait (nothing is lost).
    fn ready(&mut self, poll: Duration) -> bool {
        match txn::run("checking the schema", queue::installed_version) {
            Ok(Some(v)) if v == env!("CARGO_PKG_VERSION") => self.not_a_citus_worker_node(poll),
            Ok(None) => {
                const MISSING: &str = "pg_postback is not installed in this database (CREATE EXTENSION pg_postback)";
                if self.logged.as_deref() != Some(MISSING) {
                    // said once, not at every look (a database listed before the extension is created)
                    if self.speaks {
                        log!(
                            "pg_postback worker of database \"{}\": {MISSING}; looking again every second",
                            self.database
                        );
                    }
                    shared::mine(|s| s.state.set(&format!("waiting: {MISSING}")));
                    self.logged = Some(MISSING.to_string());
                }
                BackgroundWorker::wait_latch(Some(poll.max(Duration::from_secs(1))));
                false
            }
            Ok(other) => {
                if let Some(v) = &other {
                    if self.logged.as_deref() != Some(v.as_str()) {
                        let message = format!(
                            "the extension is at version {v} but the library is {}; \
                             deliveries wait until ALTER EXTENSION pg_postback UPDATE",
                            env!("CARGO_PKG_VERSION")
                        );
                        if self.speaks {
                            log!("pg_postback worker: {message}");
                        }
                        // worker_status (whatever the schema's version) shows it as last_error
                        shared::mine(|s| {
                            s.set_last_error(&message, crate::rules::text::unix_micros_now());
                            s.state.set("waiting for ALTER EXTENSION pg_postback UPDATE");
                        });
                    }
                }
                self.logged = other;
                BackgroundWorker::wait_latch(Some(poll.max(Duration::from_secs(1))));
                false
            }
            Err(e) => {
                note_error(&e);
                BackgroundWorker::wait_latch(Some(poll));
                false
            }
        }
    }
}

impl SchemaWait {
    /// False (after a wait) on a Citus worker node in coordinator-only mode:
    /// its copies of the tables are empty and refuse writes, the coordinator's
    /// worker delivers; said once, and shown in worker_status, instead of a
    /// refused claim logged at every loop.
    fn not_a_citus_worker_node(&mut self, poll: Duration) -> bool {
        match txn::run("checking for a Citus worker node", queue::citus_coordinator_elsewhere) {
            Ok(None) => {
                self.logged = None;
                true
            }
            Ok(Some(coordinator)) => {
                let message = format!(
                    "a Citus worker node: pg_postback's tables live on the coordinator ({coordinator}), \
                     whose worker delivers (coordinator-only mode); this one waits"
                );
                if self.logged.as_deref() != Some(message.as_str()) {
                    if self.speaks {
                        log!("pg_postback worker of database \"{}\": {message}", self.database);
                    }
                    shared::mine(|s| s.state.set(&format!("idle: {message}")));
                    self.logged = Some(message);
                }
                BackgroundWorker::wait_latch(Some(poll.max(Duration::from_secs(5))));
                false
            }
            Err(e) => {
                note_error(&e);
                BackgroundWorker::wait_latch(Some(poll));
                false
            }
        }
    }
}

/// Finds where the queue is (pg_postback's tables, or this node's Citus shards)
/// and says it in worker_status.
/// True when the tables are distributed (this node's shards were looked up).
fn refresh_tables() -> bool {
    match txn::run("finding this node's shards", queue::refresh_tables) {
        Ok(None) => false,
        Ok(Some(n)) => {
            shared::mine(|s| s.state.set(&format!("delivering: {n} Citus shards of postback.deliveries on this node")));
            true
        }
        Err(e) => {
            note_error(&e);
            false
        }
    }
}

/// How often expired leases are reclaimed, the extension's version checked and
/// long-failing endpoints disabled.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);
/// Longest a finished request waits before it is recorded (results that finish
/// within this window share one transaction).
const RECORD_WITHIN: Duration = Duration::from_millis(2);
/// Results that are recorded at once, without waiting for RECORD_WITHIN.
const RECORD_BATCH: usize = 256;

fn note_error(message: &str) {
    warning!("pg_postback worker: {message}");
    shared::mine(|s| s.set_last_error(message, crate::rules::text::unix_micros_now()));
}

/// A request on the wire: what is needed to judge and record its result.
struct InFlight {
    claimed: Claimed,
    judging: Judging,
    /// when the scheduler let it out (its clock: now_us)
    started_us: i64,
}

/// The worker's state between passes of its loop.
struct Worker {
    /// the endpoints this worker owns
    share: Share,
    endpoints: HashMap<i64, CachedEndpoint>,
    pool: Pool,
    rebuild_pool: bool,
    scheduler: Scheduler<(Claimed, Arc<EndpointConfig>, Judging)>,
    in_flight: HashMap<u64, InFlight>,
    next_key: u64,
    finished: Vec<(u64, Done)>,
    /// when the oldest result not yet recorded came back
    first_finished: Option<Instant>,
    records: Vec<Record>,
    transitions: Vec<Transition>,
    /// endpoints that became slow or fast again, to record
    slow_changes: Vec<SlowChange>,
    jitter: Jitter,
    /// more deliveries may be due: claim again when there is room
    maybe_due: bool,
    /// deliveries may have been committed or fallen due since the last claim
    /// (a commit, a due retry, the poll interval, a claim that came back
    /// full); without it a claim runs only for endpoints with room to fill
    fresh_work: bool,
    /// when fresh_work was last set by the poll interval
    last_poll: Instant,
    /// when the earliest scheduled retry falls due
    next_due: Option<Instant>,
    /// the schema speaks this library's version and leases were reclaimed
    ready: bool,
    /// endpoints that need a live secret and have none, until when their
    /// deliveries are left unclaimed (then their settings are read again)
    held: HashMap<i64, Instant>,
}

fn now_us() -> i64 {
    crate::rules::text::unix_micros_now()
}

fn breaker_settings() -> BreakerSettings {
    BreakerSettings {
        failures_to_open: gucs::BREAKER_FAILURES.get().max(0) as u32,
        cooldown_us: gucs::BREAKER_COOLDOWN_MS.get().max(1) as i64 * 1000,
        max_cooldown_us: (gucs::BREAKER_COOLDOWN_MS.get().max(1) as i64 * 1000 * 32).min(3_600_000_000),
    }
}

fn build_pool() -> Pool {
    let concurrency = gucs::CONCURRENCY.get().max(1) as usize;
    let max_body = gucs::MAX_RESPONSE_BYTES.get().max(0) as usize;
    // keep-alive connections per host: as many as requests may be open (several
    // endpoints often share a host; with 256, 100 busy endpoints of one host
    // opened a new connection for most requests: 9.2k deliveries/s, the
    // receiver spawning a thread per connection)
    let client = Arc::new(Client::new(gucs::allowed_targets(), max_body, concurrency));
    Pool::new(concurrency, client)
}

impl Worker {
    fn new(share: Share) -> Worker {
        let pool = build_pool();
        let mut scheduler = Scheduler::new(breaker_settings());
        scheduler.set_capacity(pool.size() as u32);
        Worker {
            share,
            endpoints: HashMap::new(),
            pool,
            rebuild_pool: false,
            scheduler,
            in_flight: HashMap::new(),
            next_key: 0,
            finished: Vec::new(),
            first_finished: None,
            records: Vec::new(),
            transitions: Vec::new(),
            slow_changes: Vec::new(),
            jitter: Jitter::new(
                crate::rules::text::unix_micros_now() as u64 ^ ((unsafe { pg_sys::MyProcPid } as u64) << 32),
            ),
            maybe_due: true,
            fresh_work: true,
            last_poll: Instant::now(),
            next_due: None,
            ready: false,
            held: HashMap::new(),
        }
    }

    /// The schema is ready: take back leases no live worker holds and restore
    /// the breakers a previous worker left open.
    fn start(&mut self) {
        refresh_tables();
        match txn::run("reclaiming leases", || queue::reclaim_leases(true, &[])) {
            Ok(n) if n > 0 => log!("pg_postback worker: retrying {n} deliveries interrupted by a restart"),
            Ok(_) => {}
            Err(e) => note_error(&e),
        }
        if let Err(e) = txn::run("forgetting slow endpoints", || queue::forget_slow(self.share)) {
            note_error(&e);
        }
        match txn::run("reading breakers", || queue::open_breakers(self.share)) {
            Ok(open) => {
                let now = now_us();
                for (endpoint, state, failures, since) in open {
                    self.scheduler.restore_breaker(
                        endpoint,
                        BreakerState::parse(&state),
                        failures.max(0) as u32,
                        since,
                        now,
                    );
                }
            }
            Err(e) => note_error(&e),
        }
        self.ready = true;
        self.maybe_due = true;
        self.fresh_work = true;
    }

    fn reload(&mut self) {
        self.scheduler.set_settings(breaker_settings());
        self.rebuild_pool = true;
        self.maybe_due = true;
        self.fresh_work = true;
    }

    fn slots_free(&self) -> usize {
        self.pool.size().saturating_sub(self.in_flight.len())
    }

    /// One pass: take finished results, record them, claim, send, wait (at
    /// most until `housekeeping_at`: a lease to reclaim, a shard moved in).
    fn step(&mut self, poll: Duration, housekeeping_at: Instant) {
        shared::mine(|s| s.last_wake = crate::rules::text::unix_micros_now());
        // 1. results that finished, judged and recorded together: at once when
        //    nothing else is out, else once RECORD_WITHIN has passed or a
        //    batch has gathered (one transaction for many results)
        //    (what is waiting goes on the wire first, so that HTTP and the
        //    recording transaction overlap)
        self.collect(Duration::ZERO);
        self.judge();
        self.send();
        let gathered = self.records.len() >= RECORD_BATCH
            || self.in_flight.is_empty()
            || self.first_finished.is_some_and(|t| t.elapsed() >= RECORD_WITHIN);
        if gathered {
            self.flush();
        }
        if self.rebuild_pool && self.in_flight.is_empty() {
            self.pool = build_pool();
            self.scheduler.set_capacity(self.pool.size() as u32);
            self.rebuild_pool = false;
        }
        // 2. claim while there is room and work may be due
        let due_now = self.next_due.is_some_and(|t| Instant::now() >= t);
        if due_now || self.last_poll.elapsed() >= poll {
            self.fresh_work = true;
            self.last_poll = Instant::now();
        }
        if (self.maybe_due || self.fresh_work) && !shutdown_requested() {
            self.claim();
        }
        // 3. send what the per-endpoint limits allow
        self.send();
        let share = self.scheduler.slow_share(now_us());
        shared::mine(|s| {
            s.in_flight = self.in_flight.len() as i32;
            s.concurrency = self.pool.size() as i32;
            s.slow_endpoints = share.endpoints as i32;
            s.in_flight_slow = share.in_flight as i32;
        });
        // 4. wait for a result, a commit, a due retry or the poll interval
        let now = now_us();
        let mut wait = poll;
        if let Some(t) = self.next_due {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        wait = wait.min(housekeeping_at.saturating_duration_since(Instant::now()));
        if let Some(t) = self.scheduler.next_wakeup(now) {
            wait = wait.min(Duration::from_micros((t - now).max(0) as u64));
        }
        if !self.in_flight.is_empty() {
            // requests are out: look at the latch without sleeping on it, and
            // wait on the results instead (a commit is seen within RECORD_WITHIN)
            if wait_latch(Duration::ZERO) {
                self.maybe_due = true;
                self.fresh_work = true;
            }
            self.collect(wait.min(RECORD_WITHIN));
        } else if self.maybe_due && self.slots_free() > self.scheduler.sendable(now) {
            // the last claim was full: go on at once
        } else {
            // a commit sets the latch; the poll interval is only the fallback
            wait_latch(wait.max(Duration::from_millis(1)));
            self.maybe_due = true;
            self.fresh_work = true;
        }
    }

    /// Gathers finished requests (waiting at most `wait` for the first).
    fn collect(&mut self, wait: Duration) {
        self.pool.finished(wait, &mut self.finished);
    }

    /// Stops sending: queued deliveries go back unspent, in-flight requests
    /// get SHUTDOWN_GRACE to finish and are recorded; the rest keep their
    /// leases and are retried after a restart.
    fn stop(&mut self) {
        let unsent: Vec<i64> = self.scheduler.take_all_queued().into_iter().map(|(c, _, _)| c.id).collect();
        if !unsent.is_empty() {
            if let Err(e) = txn::run("returning unsent deliveries", || queue::release(&unsent)) {
                note_error(&e);
            }
        }
        self.pool.cancel();
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !self.in_flight.is_empty() && Instant::now() < deadline {
            self.collect(Duration::from_millis(50));
            self.record();
        }
        self.record();
        self.in_flight.clear();
        shared::mine(|s| s.in_flight = 0);
    }
}

/// Sleeps on the worker's latch for at most `timeout`; true when the latch
/// was set (a commit enqueued deliveries, or a signal arrived).
fn wait_latch(timeout: Duration) -> bool {
    unsafe {
        let events = pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            // rounded up: waking a millisecond early would find nothing due yet
            timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::check_for_interrupts!();
        events & pg_sys::WL_LATCH_SET as i32 != 0
    }
}
