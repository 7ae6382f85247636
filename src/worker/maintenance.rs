//! Housekeeping on a delivery worker's loop (expired leases, a schema that
//! changed version), and the maintenance worker: roll-up for
//! postback.metrics, the hourly purge and deactivating long-failing endpoints,
//! in a process of their own, so that no delivery waits while history is
//! counted or deleted (a roll-up of a minute at 20k deliveries/s reads 1.2M
//! rows; a purge deletes up to a million).

use super::*;

/// The maintenance worker's loop.
pub(super) fn run(mut schema: SchemaWait) {
    // the first purge runs 10 s after start (after the first roll-up), then every hour
    let mut last_purge = Instant::now() - PURGE_EVERY + Duration::from_secs(10);
    let mut last_rollup = Instant::now() - ROLLUP_EVERY + Duration::from_secs(5);
    let mut last_disable = Instant::now() - HOUSEKEEPING_EVERY;
    let mut ready = false;
    // distributed by Citus, a worker node only deactivates the endpoints its
    // own deliveries found failing; the coordinator rolls up and purges the
    // distributed tables through Citus (roll-up and purge are one job, so
    // that nothing is purged before it is counted)
    let mut rolls_up = true;
    let mut last_role_check = Instant::now();
    while !shutdown_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if !schema.ready(Duration::from_secs(1)) {
            ready = false;
            continue;
        }
        if !ready || last_role_check.elapsed() >= HOUSEKEEPING_EVERY {
            ready = true;
            last_role_check = Instant::now();
            let role =
                txn::run("checking for Citus", || Ok((queue::tables_are_distributed()?, queue::on_coordinator()?)));
            let (distributed, coordinator) = role.unwrap_or_else(|e| {
                note_error(&e);
                (false, true)
            });
            rolls_up = !distributed || coordinator;
            shared::mine(|s| {
                s.state.set(match (distributed, coordinator) {
                    (false, _) => "maintaining: roll-up every minute, purge every hour, auto-disable",
                    (true, true) => {
                        "maintaining the Citus cluster: roll-up every minute, purge every hour (through Citus); \
                         auto-disable of the endpoints this node's deliveries found failing"
                    }
                    (true, false) => {
                        "maintaining: auto-disable of the endpoints this node's deliveries found failing \
                         (the coordinator rolls up and purges)"
                    }
                })
            });
        }
        if last_disable.elapsed() >= HOUSEKEEPING_EVERY {
            last_disable = Instant::now();
            disable_failing();
        }
        if !rolls_up {
            wait_latch(Duration::from_secs(1));
            continue;
        }
        if last_rollup.elapsed() >= ROLLUP_EVERY {
            last_rollup = Instant::now();
            roll_up();
        }
        if last_purge.elapsed() >= PURGE_EVERY {
            last_purge = Instant::now();
            // finished deliveries are counted before any is deleted
            roll_up();
            purge();
        }
        wait_latch(Duration::from_secs(1));
    }
}

/// Deactivates endpoints failing longer than postback.disable_after.
fn disable_failing() {
    let disable_after = gucs::DISABLE_AFTER_S.get() as i64;
    if disable_after <= 0 {
        return;
    }
    match txn::run("disabling long-failing endpoints", || queue::disable_failing(disable_after)) {
        Ok(n) if n > 0 => {
            log!("pg_postback worker: deactivated {n} endpoints failing longer than postback.disable_after")
        }
        Ok(_) => {}
        Err(e) => note_error(&e),
    }
}

impl Worker {
    /// Expired leases, a schema that changed version.
    pub(super) fn housekeeping(&mut self) {
        // shards a rebalance moved in are claimed from, those moved away no
        // longer; what a moved-in shard brought was announced by no commit here
        if refresh_tables() {
            self.maybe_due = true;
        }
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
}

/// Brings postback.delivery_rollup up to the last minute, a day of history per
/// transaction (after an update from 0.2.0 the first call backfills).
fn roll_up() {
    for _ in 0..ROLLUP_MAX_STEPS {
        match txn::run("rolling up finished deliveries", queue::roll_up) {
            Ok(true) if !shutdown_requested() => {}
            Ok(_) => break,
            Err(e) => {
                note_error(&e);
                break;
            }
        }
    }
}

/// Most days of history one roll-up pass moves (the next pass goes on).
const ROLLUP_MAX_STEPS: usize = 60;

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
