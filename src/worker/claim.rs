//! Claiming due deliveries with a lease, and the endpoint settings the
//! worker keeps (read again once they are ENDPOINT_TTL old).

use super::*;

/// What judging a delivery's result needs from its endpoint (shared, cheap to clone).
#[derive(Clone)]
pub(super) struct Judging {
    pub(super) rules: Arc<crate::rules::retry::StatusRules>,
    /// compiled and matched on the sending thread (its cost grows with the values in it)
    pub(super) pattern: Option<Arc<str>>,
    pub(super) schedule: Arc<Vec<Duration>>,
    pub(super) max_attempts: i32,
}

/// An endpoint's settings as last read, and what the worker derived from them.
pub(super) struct CachedEndpoint {
    pub(super) read_at: Instant,
    pub(super) config: Arc<EndpointConfig>,
    pub(super) judging: Judging,
}

/// How long the worker uses an endpoint's settings (and live secrets) before
/// reading them again: a change applies to requests sent after that.
const ENDPOINT_TTL: Duration = Duration::from_secs(1);

/// Most endpoints claimed each on its own (deliveries_endpoint_due) when no
/// new work came in; with more, the window over the due index is cheaper
/// (measured: 1,000 probes per claim cost more than the window they replace).
const LISTED_AT_MOST: usize = 64;

impl Worker {
    /// Claims due deliveries up to the room left, reads their endpoints, and
    /// hands them to the scheduler (what has no room goes back unspent).
    pub(super) fn claim(&mut self) {
        // keep about one batch at hand; each endpoint's room bounds its share
        // (what slow endpoints hold beyond the slow share is not at hand)
        let queued = self.scheduler.sendable(now_us());
        let batch = gucs::BATCH_SIZE.get().max(1) as usize;
        if queued >= batch / 2 {
            return;
        }
        let limit = batch.saturating_sub(queued);
        if limit == 0 {
            return;
        }
        let now = now_us();
        let now_instant = Instant::now();
        self.held.retain(|_, until| *until > now_instant);
        let mut blocked = self.scheduler.blocked(now);
        blocked.extend(self.held.keys());
        let rooms = self.scheduler.rooms(now);
        let mut slow_rooms = self.scheduler.slow_rooms(now, self.fresh_work);
        slow_rooms.retain(|(id, _)| !self.held.contains_key(id));
        if !self.fresh_work && rooms.is_empty() && slow_rooms.is_empty() {
            // nothing new may be due and no endpoint known here has room to fill
            self.maybe_due = false;
            return;
        }
        // new work may be anywhere: the window; otherwise only the endpoints
        // known to have more, each on its own (one index probe each: past
        // LISTED_AT_MOST of them the window costs less)
        let window = self.fresh_work || rooms.len() > LISTED_AT_MOST;
        let listed: Vec<(i64, i32)> =
            if window { slow_rooms.clone() } else { rooms.iter().chain(slow_rooms.iter()).copied().collect() };
        let cache = &self.endpoints;
        let share = self.share;
        let claimed_and_endpoints = txn::run("claiming deliveries", || {
            let claimed = queue::claim(limit as i32, &blocked, &rooms, &listed, window, share)?;
            // endpoints are read again once their cached settings are ENDPOINT_TTL
            // old, or when the endpoint was edited since (its queue is rendered anew)
            let mut ids: Vec<i64> = claimed
                .iter()
                .filter(|c| {
                    cache.get(&c.endpoint_id).is_none_or(|e| {
                        now_instant.duration_since(e.read_at) >= ENDPOINT_TTL
                            || e.config.revised_at_us < c.endpoint_revised_at_us
                    })
                })
                .map(|c| c.endpoint_id)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let fresh = if ids.is_empty() { HashMap::new() } else { queue::endpoints(ids.clone())? };
            // nothing due: when the earliest retry is, by the same now() as the
            // claim (in a transaction of its own, one that came due in between
            // was neither claimed nor in the future, and waited for the poll)
            let next = if claimed.is_empty() { queue::ms_until_next_due(share)? } else { None };
            Ok((claimed, ids, fresh, next))
        });
        let (claimed, refreshed, fresh, next) = match claimed_and_endpoints {
            Ok(c) => c,
            Err(e) => {
                // the leases bring anything claimed back; nothing is lost
                note_error(&e);
                // the tables may have just been distributed (postback.distribute()):
                // look for this node's shards now, not at the next housekeeping
                super::refresh_tables();
                self.maybe_due = false;
                return;
            }
        };
        if self.fresh_work {
            // endpoints left out for want of room may have new work too
            self.scheduler.new_work_skipped(now);
        }
        self.remember_endpoints(&refreshed, fresh, now, now_instant);
        // more may be due if the claim was full or left endpoints out
        let full = claimed.len() >= limit;
        self.maybe_due = full || (!blocked.is_empty() && !claimed.is_empty());
        self.fresh_work = full;
        if claimed.is_empty() {
            self.next_due = next.map(|ms| Instant::now() + Duration::from_millis(ms.max(1) as u64));
        }
        let mut got: HashMap<i64, usize> = HashMap::new();
        for c in &claimed {
            *got.entry(c.endpoint_id).or_default() += 1;
        }
        self.offer(claimed, now);
        let asked: Vec<(i64, i32)> = rooms.iter().chain(slow_rooms.iter()).copied().collect();
        self.scheduler.claimed(&asked, &got, full, now);
    }

    /// Keeps the endpoints read again (and forgets those deleted since).
    fn remember_endpoints(
        &mut self,
        refreshed: &[i64],
        fresh: HashMap<i64, EndpointConfig>,
        now: i64,
        now_instant: Instant,
    ) {
        for id in refreshed.iter().filter(|id| !fresh.contains_key(id)) {
            self.endpoints.remove(id);
        }
        for (id, e) in fresh {
            self.scheduler.set_limits(id, e.limits, now);
            let judging = Judging {
                // never read when Err: build_job fails the delivery with the reason first
                rules: Arc::new(e.status_rules.clone().unwrap_or_default()),
                pattern: e.success_body_pattern.as_deref().map(Arc::from),
                schedule: Arc::new(e.schedule.clone()),
                max_attempts: e.max_attempts,
            };
            self.endpoints.insert(id, CachedEndpoint { read_at: now_instant, config: Arc::new(e), judging });
        }
    }

    /// Hands claimed deliveries to the scheduler; what has no room goes back unspent.
    fn offer(&mut self, claimed: Vec<Claimed>, now: i64) {
        let mut release = Vec::new();
        for mut c in claimed {
            let Some(endpoint) = self.endpoints.get(&c.endpoint_id) else {
                self.records.push(dead_record(&c, "endpoint no longer exists".into()));
                continue;
            };
            if endpoint.config.needs_secret && endpoint.config.secrets.is_empty() {
                // waits for a secret without spending an attempt; read again after ENDPOINT_TTL
                self.held.insert(c.endpoint_id, Instant::now() + ENDPOINT_TTL);
                release.push(c.id);
                continue;
            }
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
}
