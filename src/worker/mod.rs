//! The background worker: registration and main loop.
//!
//! Shape of one pass: claim a batch with a lease and commit; send it on the
//! pool (no transaction open, no Postgres call off this thread); record every
//! attempt and new state in one short transaction; repeat while work is due.
//! Sleeps on its latch; a commit that enqueued deliveries sets it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use regex::Regex;

use crate::gucs;
use crate::http::{self, Client, Job, Sent};
use crate::outgoing::{self, Signing};
use crate::retry::{self, AttemptResult, Decision, Jitter, Limits};

mod pool;
mod queue;
pub mod shared;
mod txn;

use pool::Pool;
use queue::{Claimed, EndpointConfig, Record};

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

fn build_pool() -> Pool {
    let concurrency = gucs::CONCURRENCY.get().max(1) as usize;
    let max_body = gucs::MAX_RESPONSE_BYTES.get().max(0) as usize;
    let client = Arc::new(Client::new(gucs::allowed_targets(), max_body, concurrency));
    Pool::new(concurrency, client)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_postback_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database_name();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    unsafe {
        pg_sys::pgstat_report_appname(c"pg_postback worker".as_ptr());
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
    shared::register_self(http::unix_micros_now());
    log!("pg_postback worker started, connected to database \"{database}\"");

    let mut pool = build_pool();
    let mut jitter = Jitter::new(http::unix_micros_now() as u64 ^ (unsafe { pg_sys::MyProcPid } as u64) << 32);
    let mut reclaimed_at_start = false;
    let mut waiting_for_update: Option<String> = None;
    // the first purge runs a minute after start, then every hour
    let mut last_purge = std::time::Instant::now() - PURGE_EVERY + Duration::from_secs(60);
    let mut sleep = Duration::from_millis(0);

    while !shutdown_requested() {
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if gucs::database_name() != database {
                log!("pg_postback worker: postback.database_name changed, restarting to reconnect");
                shared::unregister_self();
                unsafe { pg_sys::proc_exit(1) };
            }
            pool = build_pool();
        }
        shared::SHARED.exclusive().last_wake = http::unix_micros_now();
        let poll = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);

        match txn::run("checking the schema", queue::installed_version) {
            Ok(Some(v)) if v == env!("CARGO_PKG_VERSION") => {
                waiting_for_update = None;
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
                sleep = poll.max(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                note_error(&e);
                sleep = poll;
                continue;
            }
        }
        if !reclaimed_at_start {
            match txn::run("reclaiming leases", || queue::reclaim_leases(true)) {
                Ok(n) if n > 0 => log!("pg_postback worker: retrying {n} deliveries interrupted by a restart"),
                Ok(_) => {}
                Err(e) => note_error(&e),
            }
            reclaimed_at_start = true;
        }

        // Deliver while work is due, as a two-stage pipeline: while one batch
        // is on the wire, the previous one is recorded and the next one claimed.
        let mut on_the_wire: Option<Batch> = None;
        loop {
            let next = if shutdown_requested() { None } else { claim_and_prepare() };
            let Some(current) = on_the_wire.take() else {
                match next {
                    Some((batch, jobs)) => {
                        pool.submit(jobs);
                        on_the_wire = Some(batch);
                        continue;
                    }
                    None => break,
                }
            };
            let results = pool.collect(current.sent_for.len(), shutdown_requested, SHUTDOWN_GRACE);
            if let Some((batch, jobs)) = next {
                pool.submit(jobs);
                on_the_wire = Some(batch);
            }
            finish(current, results, &mut jitter);
            if on_the_wire.is_none() {
                break;
            }
        }
        shared::SHARED.exclusive().in_flight = 0;
        if shutdown_requested() {
            break;
        }
        if let Err(e) = txn::run("reclaiming expired leases", || queue::reclaim_leases(false)) {
            note_error(&e);
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = std::time::Instant::now();
            purge();
        }
        sleep = match txn::run("finding the next retry", queue::ms_until_next_due) {
            Ok(Some(ms)) => poll.min(Duration::from_millis(ms.max(1) as u64)),
            Ok(None) => poll,
            Err(e) => {
                note_error(&e);
                poll
            }
        };
    }
    shared::unregister_self();
    log!("pg_postback worker shutting down");
}

fn note_error(message: &str) {
    warning!("pg_postback worker: {message}");
    shared::SHARED.exclusive().set_last_error(message, http::unix_micros_now());
}

/// A claimed batch on its way: what is needed to judge and record its results.
struct Batch {
    endpoints: HashMap<i64, EndpointConfig>,
    patterns: HashMap<i64, Option<Regex>>,
    /// deliveries whose request is on the wire, in job order
    sent_for: Vec<Claimed>,
    /// deliveries that could not even be built: dead at once
    early: Vec<Record>,
}

/// Claims the next batch and builds its requests; None when nothing is due.
fn claim_and_prepare() -> Option<(Batch, Vec<Job>)> {
    let batch_size = gucs::BATCH_SIZE.get().max(1);
    let claimed = match txn::run("claiming deliveries", || queue::claim(batch_size)) {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return None,
        Err(e) => {
            note_error(&e);
            return None;
        }
    };
    let mut endpoint_ids: Vec<i64> = claimed.iter().map(|c| c.endpoint_id).collect();
    endpoint_ids.sort_unstable();
    endpoint_ids.dedup();
    let endpoints = match txn::run("reading endpoints", || queue::endpoints(endpoint_ids)) {
        Ok(e) => e,
        Err(e) => {
            // the leases bring the batch back; nothing is lost
            note_error(&e);
            return None;
        }
    };
    let patterns: HashMap<i64, Option<Regex>> = endpoints
        .iter()
        .map(|(id, e)| (*id, e.success_body_pattern.as_deref().and_then(|p| Regex::new(p).ok())))
        .collect();
    let now_unix = http::unix_micros_now() / 1_000_000;
    let mut batch = Batch { endpoints, patterns, sent_for: Vec::new(), early: Vec::new() };
    let mut jobs = Vec::with_capacity(claimed.len());
    for c in claimed {
        let built = match batch.endpoints.get(&c.endpoint_id) {
            Some(endpoint) => build_job(&c, endpoint, now_unix),
            None => Err("endpoint no longer exists".to_string()),
        };
        match built {
            Ok(job) => {
                jobs.push(job);
                batch.sent_for.push(c);
            }
            Err(e) => batch.early.push(dead_record(&c, e)),
        }
    }
    shared::SHARED.exclusive().in_flight = jobs.len() as i32;
    Some((batch, jobs))
}

/// Judges a batch's results and records them with the deliveries' new states.
fn finish(batch: Batch, results: Vec<Option<Sent>>, jitter: &mut Jitter) {
    let mut records = batch.early;
    let (mut ok, mut failed) = (0i64, 0i64);
    for (c, sent) in batch.sent_for.iter().zip(results) {
        // None: abandoned at shutdown; the lease brings it back after restart
        let Some(sent) = sent else { continue };
        let endpoint = &batch.endpoints[&c.endpoint_id];
        let limits = Limits {
            schedule: &endpoint.schedule,
            max_attempts: endpoint.max_attempts,
            remaining_age: Duration::from_millis(c.remaining_age_ms.max(0) as u64),
        };
        let verdict = retry::classify(&sent.result, batch.patterns[&c.endpoint_id].as_ref());
        let decision = retry::decide(verdict, c.budget_no, &limits, jitter.next_unit());
        let (status_code, body) = match &sent.result {
            AttemptResult::Response { status, body, .. } => (Some(*status as i32), Some(body.clone())),
            _ => (None, None),
        };
        let (outcome, error, retry_in_ms) = match decision {
            Decision::Succeeded => ("succeeded", None, None),
            Decision::RetryIn(d, e) => ("retry", Some(e), Some(d.as_millis() as i64)),
            Decision::Dead(e) => ("dead", Some(e), None),
        };
        if outcome == "succeeded" {
            ok += 1
        } else {
            failed += 1
        }
        records.push(Record {
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
    }
    record_all(&records);
    let mut s = shared::SHARED.exclusive();
    s.sent += ok + failed;
    s.succeeded += ok;
    s.failed += failed;
}

fn dead_record(c: &Claimed, error: String) -> Record {
    Record {
        delivery_id: c.id,
        endpoint_id: c.endpoint_id,
        attempt_no: c.attempt_no,
        started_unix_micros: http::unix_micros_now(),
        duration_ms: Some(0.0),
        status_code: None,
        response_body: None,
        error: Some(error),
        outcome: "dead",
        retry_in_ms: None,
    }
}

fn build_job(c: &Claimed, endpoint: &EndpointConfig, now_unix: i64) -> Result<Job, String> {
    outgoing::check_method(&c.method)?;
    // defence in depth: whatever is stored, a delivery only goes where its
    // endpoint's template says (the endpoint's credentials go with it)
    let origin = endpoint.origin.as_ref().map_err(Clone::clone)?;
    let url = url::Url::parse(&c.url).map_err(|e| format!("delivery URL does not parse: {e}"))?;
    let actual = crate::template::Origin::of(&url);
    if &actual != origin {
        return Err(format!("delivery URL goes to {actual}, not to its endpoint's {origin}; refused"));
    }
    let signing = Signing {
        scheme: endpoint.signing_scheme.clone(),
        secrets: endpoint.secrets.clone(),
        header: endpoint.signature_header.clone(),
        ts_param: endpoint.timestamp_param.clone(),
        sig_param: endpoint.signature_param.clone(),
    };
    let out = outgoing::finalize(&endpoint.kind, &c.url, &endpoint.headers, c.body.as_deref(), &c.idempotency_key, &signing, now_unix)?;
    Ok(Job { method: c.method.clone(), url: out.url, headers: out.headers, body: c.body.clone(), timeout: endpoint.timeout })
}

/// Records the batch in one transaction; if that fails, each record in its own
/// subtransaction so that one bad record cannot lose the others. A record that
/// still fails stays in flight and its lease brings it back.
fn record_all(records: &[Record]) {
    if records.is_empty() {
        return;
    }
    let whole = txn::run("recording attempts", || txn::in_subtransaction(|| queue::record(records)));
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
                Ok(())
            });
        }
    }
}
