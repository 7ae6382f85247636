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

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::gucs;
use crate::http::{self, Client, Job};
use crate::rules::outgoing::{self, Signing};
use crate::rules::retry::{self, AttemptResult, Decision, Jitter, Limits, Outcome};
use crate::rules::scheduler::{BreakerSettings, BreakerState, Scheduler, Transition};

mod pool;
mod queue;
pub mod shared;
mod txn;

use pool::{Done, Pool, Work};
use queue::{Claimed, EndpointConfig, Record};

/// The worker's backend type and application name (`pg_stat_activity`); the
/// SQL side (`worker_status`, lease reclaim) looks for it under this name.
pub const WORKER_TYPE: &str = "pg_postback worker";
/// How often finished deliveries older than postback.retention are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// Rows per purge transaction, and transactions per purge run.
const PURGE_BATCH: i32 = 10_000;
const PURGE_MAX_BATCHES: usize = 100;

/// Deletes succeeded deliveries older than postback.retention, one bounded
/// batch per transaction, so no lock is held for long.
fn purge() {
    let retention = gucs::RETENTION_S.get() as i64;
    if retention <= 0 {
        return;
    }
    let mut total = 0;
    for _ in 0..PURGE_MAX_BATCHES {
        match txn::run("purging finished deliveries", || queue::purge_batch(retention, PURGE_BATCH)) {
            Ok(n) => {
                total += n;
                if n < PURGE_BATCH as i64 || shutdown_requested() {
                    break;
                }
            }
            Err(e) => {
                note_error(&e);
                break;
            }
        }
    }
    if total > 0 {
        log!("pg_postback worker: purged {total} finished deliveries older than postback.retention");
    }
}

/// How long in-flight requests may finish after SIGTERM before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_TYPE)
        .set_type(WORKER_TYPE)
        .set_library("pg_postback")
        .set_function("pg_postback_worker_main")
        .enable_spi_access()
        .enable_shmem_access(None)
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
        let appname = std::ffi::CString::new(WORKER_TYPE).expect("no NUL in the worker type");
        pg_sys::pgstat_report_appname(appname.as_ptr());
        // Only pg_catalog resolves unqualified names: an operator or function
        // planted in `public` or in a schema named after this role is never
        // found, whatever the database's or role's default search_path says.
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    shared::register_self(crate::rules::text::unix_micros_now());
    log!("pg_postback worker started, connected to database \"{database}\"");

    let mut worker = Worker::new();
    let mut waiting_for_update: Option<String> = None;
    // the first purge runs a minute after start, then every hour
    let mut last_purge = Instant::now() - PURGE_EVERY + Duration::from_secs(60);
    let mut last_housekeeping = Instant::now() - HOUSEKEEPING_EVERY;

    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if gucs::database_name() != database {
                log!("pg_postback worker: postback.database_name changed, restarting to reconnect");
                worker.stop();
                shared::unregister_self();
                unsafe { pg_sys::proc_exit(1) };
            }
            worker.reload();
        }
        let poll = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
        if !worker.ready {
            match txn::run("checking the schema", queue::installed_version) {
                Ok(Some(v)) if v == env!("CARGO_PKG_VERSION") => {
                    waiting_for_update = None;
                    worker.start();
                }
                Ok(other) => {
                    // not installed, or installed at another version: its schema is
                    // not the one this library speaks; deliveries wait (nothing is lost)
                    if let Some(v) = &other {
                        if waiting_for_update.as_deref() != Some(v.as_str()) {
                            log!(
                                "pg_postback worker: the extension is at version {v} but the library is {}; \
                                 deliveries wait until ALTER EXTENSION pg_postback UPDATE",
                                env!("CARGO_PKG_VERSION")
                            );
                        }
                    }
                    waiting_for_update = other;
                    BackgroundWorker::wait_latch(Some(poll.max(Duration::from_secs(1))));
                    continue;
                }
                Err(e) => {
                    note_error(&e);
                    BackgroundWorker::wait_latch(Some(poll));
                    continue;
                }
            }
        }

        worker.step(poll);

        if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            last_housekeeping = Instant::now();
            worker.housekeeping();
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = Instant::now();
            purge();
        }
    }
    worker.stop();
    shared::unregister_self();
    log!("pg_postback worker shutting down");
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
    shared::SHARED.exclusive().set_last_error(message, crate::rules::text::unix_micros_now());
}

/// What judging a delivery's result needs from its endpoint (shared, cheap to clone).
#[derive(Clone)]
struct Judging {
    rules: Arc<crate::rules::retry::StatusRules>,
    /// compiled and matched on the sending thread (its cost grows with the values in it)
    pattern: Option<Arc<str>>,
    schedule: Arc<Vec<Duration>>,
    max_attempts: i32,
}

/// A request on the wire: what is needed to judge and record its result.
struct InFlight {
    claimed: Claimed,
    judging: Judging,
}

/// An endpoint's settings as last read, and what the worker derived from them.
struct CachedEndpoint {
    read_at: Instant,
    config: Arc<EndpointConfig>,
    judging: Judging,
}

/// How long the worker uses an endpoint's settings (and live secrets) before
/// reading them again: a change applies to requests sent after that.
const ENDPOINT_TTL: Duration = Duration::from_secs(1);

/// The worker's state between passes of its loop.
struct Worker {
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
    jitter: Jitter,
    /// more deliveries may be due: claim again when there is room
    maybe_due: bool,
    /// when the earliest scheduled retry falls due
    next_due: Option<Instant>,
    /// the schema speaks this library's version and leases were reclaimed
    ready: bool,
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
    let client = Arc::new(Client::new(gucs::allowed_targets(), max_body, concurrency));
    Pool::new(concurrency, client)
}

impl Worker {
    fn new() -> Worker {
        Worker {
            endpoints: HashMap::new(),
            pool: build_pool(),
            rebuild_pool: false,
            scheduler: Scheduler::new(breaker_settings()),
            in_flight: HashMap::new(),
            next_key: 0,
            finished: Vec::new(),
            first_finished: None,
            records: Vec::new(),
            transitions: Vec::new(),
            jitter: Jitter::new(
                crate::rules::text::unix_micros_now() as u64 ^ ((unsafe { pg_sys::MyProcPid } as u64) << 32),
            ),
            maybe_due: true,
            next_due: None,
            ready: false,
        }
    }

    /// The schema is ready: take back leases no live worker holds and restore
    /// the breakers a previous worker left open.
    fn start(&mut self) {
        match txn::run("reclaiming leases", || queue::reclaim_leases(true, &[])) {
            Ok(n) if n > 0 => log!("pg_postback worker: retrying {n} deliveries interrupted by a restart"),
            Ok(_) => {}
            Err(e) => note_error(&e),
        }
        match txn::run("reading breakers", queue::open_breakers) {
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
    }

    fn reload(&mut self) {
        self.scheduler.set_settings(breaker_settings());
        self.rebuild_pool = true;
        self.maybe_due = true;
    }

    fn slots_free(&self) -> usize {
        self.pool.size().saturating_sub(self.in_flight.len())
    }

    /// One pass: take finished results, record them, claim, send, wait.
    fn step(&mut self, poll: Duration) {
        shared::SHARED.exclusive().last_wake = crate::rules::text::unix_micros_now();
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
            self.rebuild_pool = false;
        }
        // 2. claim while there is room and work may be due
        let due_now = self.next_due.is_some_and(|t| Instant::now() >= t);
        if (self.maybe_due || due_now) && !shutdown_requested() {
            self.claim();
        }
        // 3. send what the per-endpoint limits allow
        self.send();
        shared::SHARED.exclusive().in_flight = self.in_flight.len() as i32;
        // 4. wait for a result, a commit, a due retry or the poll interval
        let now = now_us();
        let mut wait = poll;
        if let Some(t) = self.next_due {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        if let Some(t) = self.scheduler.next_wakeup(now) {
            wait = wait.min(Duration::from_micros((t - now).max(0) as u64));
        }
        if !self.in_flight.is_empty() {
            // requests are out: look at the latch without sleeping on it, and
            // wait on the results instead (a commit is seen within RECORD_WITHIN)
            if wait_latch(Duration::ZERO) {
                self.maybe_due = true;
            }
            self.collect(wait.min(RECORD_WITHIN));
        } else if self.maybe_due && self.slots_free() > self.scheduler.queued() {
            // the last claim was full: go on at once
        } else {
            // a commit sets the latch; the poll interval is only the fallback
            wait_latch(wait.max(Duration::from_millis(1)));
            self.maybe_due = true;
        }
    }

    /// Gathers finished requests (waiting at most `wait` for the first).
    fn collect(&mut self, wait: Duration) {
        self.pool.finished(wait, &mut self.finished);
    }

    /// Judges finished requests and records them in one short transaction.
    fn record(&mut self) {
        self.judge();
        self.flush();
    }

    /// Judges finished requests (no Postgres call): frees their slots in the
    /// scheduler and turns them into records waiting to be written.
    fn judge(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        if self.first_finished.is_none() {
            self.first_finished = Some(Instant::now());
        }
        let now = now_us();
        let (mut ok, mut failed) = (0i64, 0i64);
        for (key, done) in std::mem::take(&mut self.finished) {
            let sent = done.sent;
            let Some(f) = self.in_flight.remove(&key) else { continue };
            let (c, j) = (&f.claimed, &f.judging);
            let limits = Limits {
                schedule: &j.schedule,
                max_attempts: j.max_attempts,
                remaining_age: Duration::from_millis(c.remaining_age_ms.max(0) as u64),
            };
            let verdict = retry::judge(&sent.result, done.body_check.as_ref(), &j.rules);
            let health = retry::endpoint_health(&sent.result, &verdict);
            let decision = retry::decide(verdict, c.budget_no, &limits, self.jitter.next_unit());
            let (status_code, body) = match &sent.result {
                // a status line beyond 100-599 is recorded without a code (the error says which)
                AttemptResult::Response { status, body, .. } => {
                    (retry::is_http_status(*status).then_some(*status as i32), Some(body.clone()))
                }
                _ => (None, None),
            };
            let (outcome, error, retry_in_ms) = match decision {
                Decision::Succeeded => (Outcome::Succeeded, None, None),
                Decision::RetryIn(d, e) => (Outcome::Retry, Some(retry::cap_error(e)), Some(d.as_millis() as i64)),
                Decision::Dead(e) => (Outcome::Dead, Some(retry::cap_error(e)), None),
            };
            if outcome == Outcome::Succeeded {
                ok += 1
            } else {
                failed += 1
            }
            if let Some(t) = self.scheduler.finished(c.endpoint_id, health, now, error.as_deref().unwrap_or("")) {
                self.transitions.push(t);
            }
            self.records.push(Record {
                delivery_id: c.id,
                endpoint_id: c.endpoint_id,
                attempt_no: c.attempt_no,
                started_unix_micros: sent.started_unix_micros,
                duration_ms: Some(sent.duration_ms),
                status_code,
                response_body: body,
                error,
                outcome,
                retry_in_ms,
            });
            if let Some(ms) = retry_in_ms {
                let at = Instant::now() + Duration::from_millis(ms.max(0) as u64);
                self.next_due = Some(self.next_due.map_or(at, |t| t.min(at)));
            }
        }
        let mut s = shared::SHARED.exclusive();
        s.sent += ok + failed;
        s.succeeded += ok;
        s.failed += failed;
    }

    /// Writes the waiting records, breaker changes and deliveries an open
    /// breaker sent back, in one short transaction.
    fn flush(&mut self) {
        let now = now_us();
        // an open breaker sends its waiting deliveries back unspent
        let blocked: Vec<i64> = self.scheduler.take_blocked_queued(now).into_iter().map(|(c, _, _)| c.id).collect();
        if self.records.is_empty() && self.transitions.is_empty() && blocked.is_empty() {
            return;
        }
        self.first_finished = None;
        let records = std::mem::take(&mut self.records);
        let transitions = std::mem::take(&mut self.transitions);
        record_all(&records, &transitions, &blocked);
        self.maybe_due = true;
    }

    /// Claims due deliveries up to the room left, reads their endpoints, and
    /// hands them to the scheduler (what has no room goes back unspent).
    fn claim(&mut self) {
        // keep about one batch at hand; each endpoint's room bounds its share
        let queued = self.scheduler.queued();
        let batch = gucs::BATCH_SIZE.get().max(1) as usize;
        if queued >= batch / 2 {
            return;
        }
        let limit = batch.saturating_sub(queued);
        if limit == 0 {
            return;
        }
        let now = now_us();
        let blocked = self.scheduler.blocked(now);
        let rooms = self.scheduler.rooms(now);
        let now_instant = Instant::now();
        let cache = &self.endpoints;
        let claimed_and_endpoints = txn::run("claiming deliveries", || {
            let claimed = queue::claim(limit as i32, &blocked, &rooms)?;
            // endpoints are read again once their cached settings are ENDPOINT_TTL old
            let mut ids: Vec<i64> = claimed
                .iter()
                .map(|c| c.endpoint_id)
                .filter(|id| cache.get(id).is_none_or(|e| now_instant.duration_since(e.read_at) >= ENDPOINT_TTL))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let fresh = if ids.is_empty() { HashMap::new() } else { queue::endpoints(ids.clone())? };
            Ok((claimed, ids, fresh))
        });
        let (claimed, refreshed, fresh) = match claimed_and_endpoints {
            Ok(c) => c,
            Err(e) => {
                // the leases bring anything claimed back; nothing is lost
                note_error(&e);
                self.maybe_due = false;
                return;
            }
        };
        for id in refreshed.iter().filter(|id| !fresh.contains_key(id)) {
            self.endpoints.remove(id); // deleted since
        }
        for (id, e) in fresh {
            self.scheduler.set_limits(id, e.limits, now);
            let judging = Judging {
                rules: Arc::new(e.status_rules.clone().unwrap_or_default()),
                pattern: e.success_body_pattern.as_deref().map(Arc::from),
                schedule: Arc::new(e.schedule.clone()),
                max_attempts: e.max_attempts,
            };
            self.endpoints.insert(id, CachedEndpoint { read_at: now_instant, config: Arc::new(e), judging });
        }
        // more may be due if the claim was full or left endpoints out
        self.maybe_due = claimed.len() >= limit;
        if !blocked.is_empty() && !claimed.is_empty() {
            self.maybe_due = true;
        }
        if claimed.is_empty() {
            self.next_due = match txn::run("finding the next retry", queue::ms_until_next_due) {
                Ok(Some(ms)) => Some(Instant::now() + Duration::from_millis(ms.max(1) as u64)),
                Ok(None) => None,
                Err(e) => {
                    note_error(&e);
                    None
                }
            };
            return;
        }
        let mut release = Vec::new();
        for mut c in claimed {
            let Some(endpoint) = self.endpoints.get(&c.endpoint_id) else {
                self.records.push(dead_record(&c, "endpoint no longer exists".into()));
                continue;
            };
            let mut judging = endpoint.judging.clone();
            if let Some(p) = c.success_pattern.take() {
                // the pattern holds this delivery's values
                judging.pattern = Some(Arc::from(p));
            }
            let config = Arc::clone(&endpoint.config);
            let endpoint_id = c.endpoint_id;
            if let Err((c, _, _)) = self.scheduler.offer(endpoint_id, (c, config, judging), now) {
                release.push(c.id);
            }
        }
        if !release.is_empty() {
            if let Err(e) = txn::run("returning unsent deliveries", || queue::release(&release)) {
                note_error(&e);
            }
            self.maybe_due = true;
        }
    }

    /// Puts on the wire what the scheduler lets through, while slots are free.
    fn send(&mut self) {
        let now = now_us();
        while self.slots_free() > 0 {
            let Some((_, (mut c, config, judging))) = self.scheduler.next_ready(now) else { break };
            let payload = Payload::take(&mut c);
            let pattern = judging.pattern.clone();
            let work: Work = Box::new(move |client: &Client| send_one(client, &payload, &config, pattern.as_deref()));
            let key = self.next_key;
            self.next_key += 1;
            self.in_flight.insert(key, InFlight { claimed: c, judging });
            self.pool.submit(key, work);
        }
        self.transitions.extend(self.scheduler.take_probes());
        if (!self.records.is_empty() || !self.transitions.is_empty()) && self.first_finished.is_none() {
            // probes and the dead-at-once (could not be built) are written within RECORD_WITHIN
            self.first_finished = Some(Instant::now());
        }
    }

    /// Expired leases, long-failing endpoints, a schema that changed version.
    fn housekeeping(&mut self) {
        let holding: Vec<i64> = self
            .in_flight
            .values()
            .map(|f| f.claimed.id)
            .chain(self.scheduler.queued_items().map(|(c, _, _)| c.id))
            .collect();
        match txn::run("reclaiming expired leases", || queue::reclaim_leases(false, &holding)) {
            Ok(n) if n > 0 => log!("pg_postback worker: {n} deliveries whose lease expired are due again"),
            Ok(_) => {}
            Err(e) => note_error(&e),
        }
        let disable_after = gucs::DISABLE_AFTER_S.get() as i64;
        if disable_after > 0 {
            match txn::run("disabling long-failing endpoints", || queue::disable_failing(disable_after)) {
                Ok(n) if n > 0 => {
                    log!("pg_postback worker: deactivated {n} endpoints failing longer than postback.disable_after")
                }
                Ok(_) => {}
                Err(e) => note_error(&e),
            }
        }
        match txn::run("checking the schema", queue::installed_version) {
            Ok(Some(v)) if v == env!("CARGO_PKG_VERSION") => {}
            Ok(_) => {
                self.stop();
                self.rebuild_pool = true;
                self.ready = false;
            }
            Err(e) => note_error(&e),
        }
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
        shared::SHARED.exclusive().in_flight = 0;
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

fn dead_record(c: &Claimed, error: String) -> Record {
    Record {
        delivery_id: c.id,
        endpoint_id: c.endpoint_id,
        attempt_no: c.attempt_no,
        started_unix_micros: crate::rules::text::unix_micros_now(),
        duration_ms: Some(0.0),
        status_code: None,
        response_body: None,
        error: Some(error),
        outcome: Outcome::Dead,
        retry_in_ms: None,
    }
}

/// What goes on the wire for one delivery, moved off the main thread with it.
struct Payload {
    method: String,
    url: String,
    url_hashes: Option<String>,
    body: Option<String>,
    idempotency_key: String,
}

impl Payload {
    fn take(c: &mut Claimed) -> Payload {
        Payload {
            method: std::mem::take(&mut c.method),
            url: std::mem::take(&mut c.url),
            url_hashes: c.url_hashes.take(),
            body: c.body.take(),
            idempotency_key: std::mem::take(&mut c.idempotency_key),
        }
    }
}

/// On a sending thread: build the request, send it, check the body. A request
/// that cannot be built is a permanent failure (dead with the reason).
fn send_one(client: &Client, p: &Payload, endpoint: &EndpointConfig, pattern: Option<&str>) -> Done {
    let job = match build_job(p, endpoint, crate::rules::text::unix_micros_now() / 1_000_000) {
        Ok(job) => job,
        Err(e) => {
            return Done {
                sent: http::Sent {
                    started_unix_micros: crate::rules::text::unix_micros_now(),
                    duration_ms: 0.0,
                    result: AttemptResult::Permanent(e),
                },
                body_check: None,
            };
        }
    };
    let sent = client.send(&job);
    let body_check = match (&sent.result, pattern) {
        (AttemptResult::Response { body, .. }, Some(p)) => Some(retry::BodyCheck::of(p, body)),
        _ => None,
    };
    Done { sent, body_check }
}

fn build_job(p: &Payload, endpoint: &EndpointConfig, now_unix: i64) -> Result<Job, String> {
    endpoint.missing.clone()?;
    outgoing::check_method(&p.method)?;
    // defence in depth: whatever is stored, a delivery only goes where its
    // endpoint's template says (the endpoint's credentials go with it)
    let origin = endpoint.origin.as_ref().map_err(Clone::clone)?;
    let url = url::Url::parse(&p.url).map_err(|e| format!("delivery URL does not parse: {e}"))?;
    let actual = crate::rules::template::Origin::of(&url);
    if &actual != origin {
        return Err(format!("delivery URL goes to {actual}, not to its endpoint's {origin}; refused"));
    }
    let headers = endpoint.headers.as_ref().map_err(Clone::clone)?;
    // judged with the default rules only if sent, and a broken list never is
    endpoint.status_rules.as_ref().map_err(Clone::clone)?;
    let signing = Signing {
        scheme: endpoint.signing_scheme.clone(),
        secrets: endpoint.secrets.clone(),
        header: endpoint.signature_header.clone(),
        ts_param: endpoint.timestamp_param.clone(),
        sig_param: endpoint.signature_param.clone(),
    };
    let hashes = crate::rules::url_hash::from_json(p.url_hashes.as_deref())?;
    let out = outgoing::finalize(
        &endpoint.kind,
        &p.url,
        &hashes,
        headers,
        p.body.as_deref(),
        &p.idempotency_key,
        &signing,
        now_unix,
    )?;
    Ok(Job {
        method: p.method.clone(),
        url: out.url,
        headers: out.headers,
        body: p.body.clone(),
        timeout: endpoint.timeout,
    })
}

/// Records finished attempts, breaker transitions and unsent deliveries in
/// one transaction; if that fails, each record in its own subtransaction so
/// that one bad record cannot lose the others. A record that still fails
/// stays in flight and its lease brings it back.
fn record_all(records: &[Record], transitions: &[Transition], unsent: &[i64]) {
    if records.is_empty() && transitions.is_empty() && unsent.is_empty() {
        return;
    }
    let whole = txn::run("recording attempts", || {
        txn::in_subtransaction(|| {
            queue::record(records)?;
            queue::record_transitions(transitions)?;
            queue::release(unsent)
        })
    });
    match whole {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => {
            note_error(&format!("recording a batch failed ({e}); recording one by one"));
            let _ = txn::run("recording attempts one by one", || {
                for r in records {
                    if let Err(e) = txn::in_subtransaction(|| queue::record(std::slice::from_ref(r))) {
                        note_error(&format!("could not record delivery {}: {e}", r.delivery_id));
                    }
                }
                if let Err(e) = txn::in_subtransaction(|| queue::record_transitions(transitions)) {
                    note_error(&format!("could not record breaker transitions: {e}"));
                }
                if let Err(e) = txn::in_subtransaction(|| queue::release(unsent)) {
                    note_error(&format!("could not return unsent deliveries: {e}"));
                }
                Ok(())
            });
        }
    }
}
