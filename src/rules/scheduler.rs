//! Which claimed delivery goes on the wire next (pure).
//!
//! Per endpoint: at most `max_in_flight` requests at once, at most
//! `rate_limit` requests per second (a token bucket), and a circuit breaker
//! that stops sending to an endpoint that fails continuously and lets one
//! probe through after a cool-down. Across endpoints: round robin, so a
//! backlog for one endpoint never starves another's due deliveries; and slow
//! endpoints (a request out for longer than `SLOW_AFTER_US`, or answers that
//! lately took that long) together hold at most `SLOW_SHARE` of the sending
//! capacity, so partners that are slow at once never take all of it.
//!
//! Times are microseconds on any monotonic or wall clock the caller chooses.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Deliveries a healthy endpoint may hold waiting beyond what it has in flight.
pub const QUEUE_EXTRA: u32 = 64;
/// ... or this many times its max_in_flight, whichever is more.
pub const QUEUE_FACTOR: u32 = 16;
/// Most deliveries held for one endpoint.
pub const MAX_HELD: u32 = 1024;

/// An endpoint is slow while one of its requests has been out this long, or
/// while its answers lately took this long (a moving average).
pub const SLOW_AFTER_US: i64 = 1_000_000;
/// The part of the sending capacity that slow endpoints may hold together
/// (the rest stays for the others).
pub const SLOW_SHARE: f64 = 0.5;
/// How often which endpoints are slow is worked out again.
const SLOW_TICK_US: i64 = 10_000;
/// Weight of the newest answer in the moving average of answer times.
const LATENCY_WEIGHT: f64 = 0.25;

/// How many deliveries a healthy endpoint may hold (in flight and waiting).
/// The claim asks SQL for the same figure with these constants as parameters.
pub fn healthy_capacity(max_in_flight: u32) -> u32 {
    (max_in_flight * QUEUE_FACTOR).max(max_in_flight + QUEUE_EXTRA).min(MAX_HELD)
}

/// An endpoint's limits, read from postback.endpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_in_flight: u32,
    /// requests per second; None = unlimited
    pub rate_per_sec: Option<f64>,
}

/// When breakers open and how long they stay open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// consecutive failed attempts that open the breaker (0 = never)
    pub failures_to_open: u32,
    /// first cool-down; each failed probe doubles it up to `max_cooldown_us`
    pub cooldown_us: i64,
    pub max_cooldown_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    pub fn parse(s: &str) -> BreakerState {
        match s {
            "open" => BreakerState::Open,
            "half_open" => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// A change of an endpoint's breaker, to record and announce.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub endpoint_id: i64,
    pub from: BreakerState,
    pub to: BreakerState,
    pub at_us: i64,
    pub reason: String,
}

/// How an attempt ended, as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// the endpoint answered as it should
    Success,
    /// the endpoint is unavailable: timeout, refused, reset, 5xx, 429, 408
    Failure,
    /// says nothing about the endpoint (a 4xx for one delivery, a refused address)
    Neutral,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    failures: u32,
    since_us: i64,
    cooldown_us: i64,
}

#[derive(Debug)]
struct Slot<T> {
    limits: Limits,
    in_flight: u32,
    /// when each request in flight started (a multiset: start → how many)
    started: BTreeMap<i64, u32>,
    /// moving average of how long answers took, µs (None before the first)
    latency_us: Option<f64>,
    /// counted among the slow endpoints (worked out every SLOW_TICK_US)
    slow: bool,
    /// the last claim filled it up (more of its deliveries are probably due):
    /// claimed again as soon as half its room is free
    backlogged: bool,
    /// listed in the scheduler's ring
    in_ring: bool,
    queue: VecDeque<T>,
    tokens: f64,
    refilled_us: i64,
    breaker: Breaker,
}

impl<T> Slot<T> {
    /// How many requests may be in flight now (a half-open breaker allows one
    /// probe; an endpoint that has not answered yet, one).
    fn allowed(&self, now_us: i64) -> u32 {
        match self.breaker.state {
            // slow start: one request until the endpoint has answered once, so
            // that partners hanging from the start hold one slot each, not max_in_flight
            BreakerState::Closed if self.latency_us.is_none() => 1,
            BreakerState::Closed => self.limits.max_in_flight.max(1),
            BreakerState::HalfOpen => 1,
            BreakerState::Open if now_us >= self.breaker.since_us + self.breaker.cooldown_us => 1,
            BreakerState::Open => 0,
        }
    }

    /// How many may be held here (in flight and waiting, leased): a healthy
    /// endpoint keeps a few rounds of work at hand so that claims stay large;
    /// an open or half-open one only what it may send.
    fn capacity(&self, now_us: i64) -> u32 {
        let allowed = self.allowed(now_us);
        match self.breaker.state {
            // while the last attempts failed, or it is slow, hold no more than can go out
            BreakerState::Closed if self.breaker.failures > 0 || self.slow => allowed,
            BreakerState::Closed => healthy_capacity(allowed),
            _ => allowed,
        }
    }

    fn refill(&mut self, now_us: i64) {
        if let Some(rate) = self.limits.rate_per_sec {
            // no burst: requests are spaced 1/rate apart, so no one-second
            // window ever holds more than rate + 1 of them
            let elapsed = (now_us - self.refilled_us).max(0) as f64 / 1e6;
            self.tokens = (self.tokens + elapsed * rate).min(1.0);
            self.refilled_us = now_us;
        }
    }

    fn has_token(&self) -> bool {
        self.limits.rate_per_sec.is_none() || self.tokens >= 1.0
    }

    /// When the next rate token comes (now, without a rate limit).
    fn next_token_us(&self) -> i64 {
        match self.limits.rate_per_sec {
            Some(rate) if self.tokens < 1.0 && rate > 0.0 => {
                self.refilled_us + ((1.0 - self.tokens) / rate * 1e6).ceil() as i64
            }
            _ => self.refilled_us,
        }
    }

    /// How many more deliveries it may hold.
    fn room(&self, now_us: i64) -> i32 {
        self.capacity(now_us) as i32 - self.in_flight as i32 - self.queue.len() as i32
    }

    /// Worth a claim: at least half of what it may hold is free.
    fn claimable(&self, now_us: i64) -> bool {
        let room = self.room(now_us);
        room > 0 && room >= (self.capacity(now_us) as i32 + 1) / 2
    }

    /// A request out for SLOW_AFTER_US, or answers lately that slow.
    fn is_slow(&self, now_us: i64) -> bool {
        let oldest_out = self.started.keys().next().is_some_and(|&t| now_us - t >= SLOW_AFTER_US);
        oldest_out || self.latency_us.is_some_and(|l| l >= SLOW_AFTER_US as f64)
    }

    fn request_started(&mut self, now_us: i64) {
        self.in_flight += 1;
        *self.started.entry(now_us).or_insert(0) += 1;
    }

    /// Forgets a request that finished (the oldest, when its start is not known here).
    fn request_finished(&mut self, started_us: i64, now_us: i64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let key =
            if self.started.contains_key(&started_us) { Some(started_us) } else { self.started.keys().next().copied() };
        if let Some(key) = key {
            match self.started.get_mut(&key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.started.remove(&key);
                }
            }
        }
        let took = (now_us - started_us).max(0) as f64;
        self.latency_us = Some(match self.latency_us {
            None => took,
            Some(avg) => avg + LATENCY_WEIGHT * (took - avg),
        });
    }
}

/// Keeps the earlier of a noted time and `at`; a noted time already past is
/// stale (what it waited for has happened) and gives way.
fn note_earliest(noted: &mut Option<i64>, at: i64, now_us: i64) {
    *noted = Some(match *noted {
        Some(t) if t > now_us => t.min(at),
        _ => at,
    });
}

/// How much of the sending capacity slow endpoints hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlowShare {
    /// endpoints slow now
    pub endpoints: u32,
    /// their requests in flight
    pub in_flight: u32,
    /// most requests they may have in flight together
    pub cap: u32,
}

/// An endpoint that became slow, or fast again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowChange {
    pub endpoint_id: i64,
    pub slow: bool,
    pub at_us: i64,
}

/// The worker's view of every endpoint it has claimed deliveries for.
pub struct Scheduler<T> {
    settings: BreakerSettings,
    slots: HashMap<i64, Slot<T>>,
    /// round-robin order of the endpoints with deliveries waiting here (an
    /// endpoint leaves it once found with none): a send looks only at those,
    /// never at every endpoint known
    ring: VecDeque<i64>,
    /// where the next slow_rooms starts, so that each slow endpoint gets its turn
    slow_cursor: usize,
    /// when the earliest open breaker's cool-down ends (worked out with the
    /// slow endpoints, and when a breaker opens)
    open_until: Option<i64>,
    /// when a waiting delivery of a rate-limited endpoint gets its token
    /// (noted when a send spends or lacks one)
    token_until: Option<i64>,
    /// open → half-open changes made by `next_ready`, for the caller to record
    probes: Vec<Transition>,
    /// the sending capacity (most requests in flight, all endpoints)
    capacity: u32,
    /// requests in flight of endpoints counted slow
    slow_in_flight: u32,
    slow_endpoints: u32,
    slow_ticked_us: i64,
    /// endpoints that became slow or fast again, for the caller to record
    slow_changes: Vec<SlowChange>,
}

impl<T> Scheduler<T> {
    pub fn new(settings: BreakerSettings) -> Scheduler<T> {
        Scheduler {
            settings,
            slots: HashMap::new(),
            ring: VecDeque::new(),
            slow_cursor: 0,
            open_until: None,
            token_until: None,
            probes: Vec::new(),
            capacity: u32::MAX,
            slow_in_flight: 0,
            slow_endpoints: 0,
            slow_ticked_us: i64::MIN,
            slow_changes: Vec::new(),
        }
    }

    /// The sending capacity: most requests in flight, all endpoints together.
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity.max(1);
    }

    /// Most requests slow endpoints may have in flight together.
    fn slow_cap(&self) -> u32 {
        ((self.capacity as f64 * SLOW_SHARE) as u32).max(1)
    }

    /// Works out again which endpoints are slow (at most every SLOW_TICK_US).
    fn tick(&mut self, now_us: i64) {
        if now_us.saturating_sub(self.slow_ticked_us) < SLOW_TICK_US {
            return;
        }
        self.slow_ticked_us = now_us;
        let (mut endpoints, mut in_flight) = (0, 0);
        let mut open_until: Option<i64> = None;
        for (&id, slot) in self.slots.iter_mut() {
            if slot.breaker.state == BreakerState::Open {
                let until = slot.breaker.since_us + slot.breaker.cooldown_us;
                open_until = Some(open_until.map_or(until, |t| t.min(until)));
            }
            let slow = slot.is_slow(now_us);
            if slow != slot.slow {
                slot.slow = slow;
                self.slow_changes.push(SlowChange { endpoint_id: id, slow, at_us: now_us });
            }
            if slow {
                endpoints += 1;
                in_flight += slot.in_flight;
            }
        }
        self.slow_endpoints = endpoints;
        self.slow_in_flight = in_flight;
        self.open_until = open_until;
    }

    /// How much of the sending capacity slow endpoints hold now.
    pub fn slow_share(&mut self, now_us: i64) -> SlowShare {
        self.tick(now_us);
        SlowShare { endpoints: self.slow_endpoints, in_flight: self.slow_in_flight, cap: self.slow_cap() }
    }

    /// Endpoints that became slow or fast again since the last call.
    pub fn take_slow_changes(&mut self) -> Vec<SlowChange> {
        std::mem::take(&mut self.slow_changes)
    }

    pub fn set_settings(&mut self, settings: BreakerSettings) {
        self.settings = settings;
    }

    fn slot(&mut self, endpoint_id: i64, now_us: i64) -> &mut Slot<T> {
        self.slots.entry(endpoint_id).or_insert_with(|| Slot {
            limits: Limits { max_in_flight: 1, rate_per_sec: None },
            in_flight: 0,
            started: BTreeMap::new(),
            latency_us: None,
            slow: false,
            backlogged: false,
            in_ring: false,
            queue: VecDeque::new(),
            tokens: 1.0,
            refilled_us: now_us,
            breaker: Breaker { state: BreakerState::Closed, failures: 0, since_us: now_us, cooldown_us: 0 },
        })
    }

    /// Updates an endpoint's limits (read with each claim).
    pub fn set_limits(&mut self, endpoint_id: i64, limits: Limits, now_us: i64) {
        let slot = self.slot(endpoint_id, now_us);
        if slot.limits.rate_per_sec != limits.rate_per_sec {
            slot.tokens = 1.0;
            slot.refilled_us = now_us;
        }
        slot.limits = limits;
    }

    /// Restores a breaker from its recorded state (at worker start).
    pub fn restore_breaker(
        &mut self,
        endpoint_id: i64,
        state: BreakerState,
        failures: u32,
        since_us: i64,
        now_us: i64,
    ) {
        let cooldown = self.settings.cooldown_us;
        let slot = self.slot(endpoint_id, now_us);
        slot.breaker = Breaker { state, failures, since_us, cooldown_us: cooldown };
        if state == BreakerState::HalfOpen {
            // the probe was lost with the previous worker: wait out a cool-down again
            slot.breaker.state = BreakerState::Open;
        }
    }

    /// Endpoints whose deliveries should not be claimed with the others: those
    /// with less than half their room free (in flight + waiting here, against
    /// what they may hold: claims come in batches, not one by one), an open
    /// breaker, or slow (claimed on their own: `slow_rooms`).
    pub fn blocked(&self, now_us: i64) -> Vec<i64> {
        let mut out: Vec<i64> =
            self.slots.iter().filter(|(_, s)| s.slow || !s.claimable(now_us)).map(|(id, _)| *id).collect();
        out.sort_unstable();
        out
    }

    /// Room left per endpoint known here (what it may hold minus in flight and
    /// waiting), for the endpoints that are not blocked and that the last
    /// claim filled up (an endpoint that got less has nothing more due).
    pub fn rooms(&self, now_us: i64) -> Vec<(i64, i32)> {
        let mut out: Vec<(i64, i32)> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.slow && s.backlogged && s.claimable(now_us))
            .map(|(id, s)| (*id, s.room(now_us)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Room of the slow endpoints, claimed on their own: what each may send,
    /// within what is left of the slow share (each in turn).
    /// `all`: also those the last claim did not fill up (new deliveries may be due).
    pub fn slow_rooms(&mut self, now_us: i64, all: bool) -> Vec<(i64, i32)> {
        self.tick(now_us);
        let waiting: u32 = self.slots.values().filter(|s| s.slow).map(|s| s.queue.len() as u32).sum();
        let mut left = self.slow_cap().saturating_sub(self.slow_in_flight + waiting) as i32;
        let mut slow: Vec<i64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.slow && (all || s.backlogged) && s.room(now_us) > 0)
            .map(|(id, _)| *id)
            .collect();
        slow.sort_unstable();
        let mut out = Vec::new();
        if slow.is_empty() {
            return out;
        }
        // each call starts one further along, so that every slow endpoint gets its turn
        self.slow_cursor = (self.slow_cursor + 1) % slow.len();
        for i in 0..slow.len() {
            if left <= 0 {
                break;
            }
            let id = slow[(self.slow_cursor + i) % slow.len()];
            let room = self.slots[&id].room(now_us).min(left);
            out.push((id, room));
            left -= room;
        }
        out.sort_unstable();
        out
    }

    /// A claim for new work (a commit woke the worker, or the poll) leaves out
    /// the endpoints without room for a batch (`blocked`): what that commit
    /// brought for them may be due, so each is claimed on its own as soon as
    /// half its room is free, as if the last claim had filled it up.
    pub fn new_work_skipped(&mut self, now_us: i64) {
        for slot in self.slots.values_mut() {
            if !slot.slow && !slot.claimable(now_us) {
                slot.backlogged = true;
            }
        }
    }

    /// After a claim: which endpoints it filled up. `asked` are the rooms the
    /// claim was given; `got` how many each received. An endpoint that got
    /// what it asked for, or that was filled up, probably has more due.
    /// `full`: the claim stopped at its limit (whoever got some may have more).
    pub fn claimed(&mut self, asked: &[(i64, i32)], got: &HashMap<i64, usize>, full: bool, now_us: i64) {
        for (id, room) in asked {
            if let Some(slot) = self.slots.get_mut(id) {
                let n = got.get(id).copied().unwrap_or(0);
                slot.backlogged = n >= *room as usize || (full && n > 0);
            }
        }
        for id in got.keys() {
            if asked.iter().any(|(a, _)| a == id) {
                continue;
            }
            if let Some(slot) = self.slots.get_mut(id) {
                slot.backlogged = full || slot.room(now_us) <= 0;
            }
        }
    }

    /// Takes a claimed delivery. When the endpoint has no room for it, it
    /// comes back (`Err`) to be returned to the queue unspent.
    pub fn offer(&mut self, endpoint_id: i64, item: T, now_us: i64) -> Result<(), T> {
        let slot = self.slot(endpoint_id, now_us);
        if slot.in_flight + slot.queue.len() as u32 >= slot.capacity(now_us) {
            return Err(item);
        }
        slot.queue.push_back(item);
        if !slot.in_ring {
            slot.in_ring = true;
            self.ring.push_back(endpoint_id);
        }
        Ok(())
    }

    /// The next delivery to send, round robin over endpoints that have room,
    /// a rate token and a breaker that lets it through (a slow endpoint also
    /// needs room in the slow endpoints' share).
    pub fn next_ready(&mut self, now_us: i64) -> Option<(i64, T)> {
        self.tick(now_us);
        let slow_full = self.slow_in_flight >= self.slow_cap();
        for _ in 0..self.ring.len() {
            let id = self.ring.pop_front()?;
            let Some(slot) = self.slots.get_mut(&id) else { continue };
            if slot.queue.is_empty() {
                slot.in_ring = false; // back in with its next delivery
                continue;
            }
            self.ring.push_back(id);
            if slot.in_flight >= slot.allowed(now_us) || (slot.slow && slow_full) {
                continue;
            }
            slot.refill(now_us);
            if !slot.has_token() {
                let at = slot.next_token_us();
                note_earliest(&mut self.token_until, at, now_us);
                continue;
            }
            if slot.limits.rate_per_sec.is_some() {
                slot.tokens -= 1.0;
                if slot.queue.len() > 1 {
                    let at = slot.next_token_us();
                    note_earliest(&mut self.token_until, at, now_us);
                }
            }
            if slot.breaker.state == BreakerState::Open {
                // the cool-down is over: this request is the probe
                slot.breaker.state = BreakerState::HalfOpen;
                slot.breaker.since_us = now_us;
                self.probes.push(Transition {
                    endpoint_id: id,
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                    at_us: now_us,
                    reason: "cool-down over; one probe request".into(),
                });
            }
            slot.request_started(now_us);
            if slot.slow {
                self.slow_in_flight += 1;
            }
            let item = slot.queue.pop_front()?;
            return Some((id, item));
        }
        None
    }

    /// Open → half-open changes since the last call.
    pub fn take_probes(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.probes)
    }

    /// Records that a request (started at `started_us`, as `next_ready` was
    /// told) finished; returns the breaker's transition, if any.
    pub fn finished(
        &mut self,
        endpoint_id: i64,
        started_us: i64,
        health: Health,
        now_us: i64,
        error: &str,
    ) -> Option<Transition> {
        let settings = self.settings;
        let slot = self.slot(endpoint_id, now_us);
        slot.request_finished(started_us, now_us);
        if slot.slow {
            self.slow_in_flight = self.slow_in_flight.saturating_sub(1);
        } else if slot.is_slow(now_us) {
            // a first slow answer counts at once, before its max_in_flight opens up
            slot.slow = true;
            let in_flight = slot.in_flight;
            self.slow_endpoints += 1;
            self.slow_in_flight += in_flight;
            self.slow_changes.push(SlowChange { endpoint_id, slow: true, at_us: now_us });
        }
        let slot = self.slot(endpoint_id, now_us);
        let b = &mut slot.breaker;
        let from = b.state;
        match health {
            Health::Neutral => None,
            Health::Success => {
                b.failures = 0;
                if b.state == BreakerState::Closed {
                    return None;
                }
                b.state = BreakerState::Closed;
                b.since_us = now_us;
                b.cooldown_us = settings.cooldown_us;
                Some(Transition {
                    endpoint_id,
                    from,
                    to: BreakerState::Closed,
                    at_us: now_us,
                    reason: "probe succeeded".into(),
                })
            }
            Health::Failure => {
                b.failures = b.failures.saturating_add(1);
                let open = match b.state {
                    BreakerState::Closed => settings.failures_to_open > 0 && b.failures >= settings.failures_to_open,
                    BreakerState::HalfOpen => true,
                    BreakerState::Open => false,
                };
                if !open {
                    return None;
                }
                b.cooldown_us = if b.state == BreakerState::HalfOpen {
                    (b.cooldown_us.max(settings.cooldown_us) * 2).min(settings.max_cooldown_us)
                } else {
                    settings.cooldown_us
                };
                b.state = BreakerState::Open;
                b.since_us = now_us;
                let until = now_us + b.cooldown_us;
                let reason = if from == BreakerState::HalfOpen {
                    format!("probe failed: {error}")
                } else {
                    format!("{} consecutive failures; last: {error}", b.failures)
                };
                // (one already over is stale: a tick has not seen it go half-open yet)
                note_earliest(&mut self.open_until, until, now_us);
                Some(Transition { endpoint_id, from, to: BreakerState::Open, at_us: now_us, reason })
            }
        }
    }

    /// Deliveries waiting here for endpoints whose breaker is open: to be
    /// returned to the queue unspent.
    pub fn take_blocked_queued(&mut self, now_us: i64) -> Vec<T> {
        let mut out = Vec::new();
        for id in &self.ring {
            let Some(slot) = self.slots.get_mut(id) else { continue };
            let keep = slot.capacity(now_us) as usize;
            let room = keep.saturating_sub(slot.in_flight as usize);
            while slot.queue.len() > room {
                out.extend(slot.queue.pop_back());
            }
        }
        out
    }

    /// Everything waiting here (at shutdown).
    pub fn take_all_queued(&mut self) -> Vec<T> {
        self.slots.values_mut().flat_map(|s| s.queue.drain(..)).collect()
    }

    /// Everything waiting here, without taking it.
    pub fn queued_items(&self) -> impl Iterator<Item = &T> {
        self.slots.values().flat_map(|s| s.queue.iter())
    }

    /// Deliveries waiting here, all endpoints.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.slots.values().map(|s| s.queue.len()).sum()
    }

    /// Deliveries waiting here that could go on the wire now: those behind
    /// their endpoint's max_in_flight, of slow endpoints while the slow share
    /// is full, and of open breakers are left out (they must not stop the
    /// claim of other endpoints' deliveries).
    pub fn sendable(&self, now_us: i64) -> usize {
        let slow_full = self.slow_in_flight >= self.slow_cap();
        self.ring
            .iter()
            .filter_map(|id| self.slots.get(id))
            .filter(|s| !(s.slow && slow_full))
            .map(|s| s.queue.len().min(s.allowed(now_us).saturating_sub(s.in_flight) as usize))
            .sum()
    }

    /// When a waiting delivery may next become ready (a rate token or the end
    /// of a cool-down), if that is later than now.
    pub fn next_wakeup(&self, now_us: i64) -> Option<i64> {
        // noted as sends happen: no walk over the endpoints on every pass
        self.token_until.into_iter().chain(self.open_until).filter(|&t| t > now_us).min()
    }

    #[cfg(test)]
    pub fn breaker(&self, endpoint_id: i64) -> Option<BreakerState> {
        self.slots.get(&endpoint_id).map(|s| s.breaker.state)
    }

    #[cfg(test)]
    pub fn in_flight(&self, endpoint_id: i64) -> u32 {
        self.slots.get(&endpoint_id).map_or(0, |s| s.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_endpoint_holds_sixteen_rounds_or_sixty_four_more_at_most_1024() {
        assert_eq!(healthy_capacity(1), 65);
        assert_eq!(healthy_capacity(8), 128);
        assert_eq!(healthy_capacity(64), 1024);
        assert_eq!(healthy_capacity(256), 1024);
    }

    const S: i64 = 1_000_000;

    fn settings() -> BreakerSettings {
        BreakerSettings { failures_to_open: 3, cooldown_us: 10 * S, max_cooldown_us: 60 * S }
    }

    /// Endpoints that have answered before (past the slow start).
    fn sched(endpoints: &[(i64, u32, Option<f64>)]) -> Scheduler<u32> {
        let mut s = Scheduler::new(settings());
        for &(id, max, rate) in endpoints {
            s.set_limits(id, Limits { max_in_flight: max, rate_per_sec: rate }, 0);
            s.slot(id, 0).latency_us = Some(0.0);
        }
        s
    }

    #[test]
    fn an_endpoint_never_has_more_than_max_in_flight() {
        let mut s = sched(&[(1, 2, None)]);
        // a healthy endpoint holds max_in_flight + 64 (or 16x, at most 1024) deliveries, sends max_in_flight
        for i in 0..66 {
            assert_eq!(s.offer(1, i, 0), Ok(()));
        }
        assert_eq!(s.offer(1, 99, 0), Err(99), "no room beyond what it may hold");
        assert_eq!(s.blocked(0), vec![1]);
        assert_eq!(s.rooms(0), vec![]);
        assert!(s.next_ready(0).is_some() && s.next_ready(0).is_some());
        assert_eq!(s.next_ready(0), None, "never more than max_in_flight on the wire");
        assert_eq!(s.in_flight(1), 2);
        s.finished(1, 0, Health::Success, 1, "");
        assert_eq!(s.offer(1, 3, 1), Ok(()), "one finished: room for one");
        // claimed again once half of what it may hold is free (claims come in batches)
        assert_eq!(s.blocked(1), vec![1]);
        while s.next_ready(1).is_some() {
            s.finished(1, 0, Health::Success, 1, "");
        }
        assert_eq!(s.blocked(1), Vec::<i64>::new());
        assert_eq!(s.rooms(1), vec![], "the last claim did not fill it up: nothing more is due");
        s.claimed(&[(1, 66)], &[(1, 66)].into_iter().collect(), false, 1);
        assert_eq!(s.rooms(1), vec![(1, 65)], "one still in flight");
    }

    #[test]
    fn new_work_for_an_endpoint_without_room_is_claimed_once_it_has_room() {
        let mut s = sched(&[(1, 2, None), (2, 2, None)]);
        // 1 is busy (all it may hold is here), the last claim got all that was due
        for i in 0..66 {
            s.offer(1, i, 0).unwrap();
        }
        s.claimed(&[], &[(1, 66)].into_iter().collect(), false, 0);
        assert_eq!(s.blocked(0), vec![1]);
        // a commit brings more for 1: the claim for new work leaves 1 out (no room)
        s.new_work_skipped(0);
        while s.next_ready(1).is_some() {
            s.finished(1, 0, Health::Success, 1, "");
        }
        assert_eq!(s.rooms(1), vec![(1, 66)], "claimed on its own once it has room again");
        assert!(s.rooms(1).iter().all(|(id, _)| *id != 2), "2 had room: the claim for new work looked at it");
    }

    #[test]
    fn round_robin_serves_every_endpoint_in_turn() {
        let mut s = sched(&[(1, 100, None), (2, 100, None), (3, 100, None)]);
        for i in 0..50 {
            s.offer(1, i, 0).unwrap();
        }
        s.offer(2, 100, 0).unwrap();
        s.offer(3, 200, 0).unwrap();
        let first: Vec<i64> = (0..3).map(|_| s.next_ready(0).unwrap().0).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 2, 3], "the backlog of 1 does not starve 2 and 3: {first:?}");
    }

    #[test]
    fn the_rate_limit_paces_requests() {
        let mut s = sched(&[(1, 100, Some(2.0))]);
        for i in 0..10 {
            s.offer(1, i, 0).unwrap();
        }
        let mut sent = 0;
        let mut t = 0;
        while t <= 3 * S {
            while s.next_ready(t).is_some() {
                sent += 1;
                s.finished(1, t, Health::Success, t, "");
            }
            t += S / 100;
        }
        // one at once, then one every half second for 3 seconds
        assert!((6..=7).contains(&sent), "{sent}");
        assert!(s.next_wakeup(t).is_some());
    }

    #[test]
    fn the_breaker_opens_probes_and_closes() {
        let mut s = sched(&[(1, 8, None)]);
        for i in 0..8 {
            s.offer(1, i, 0).unwrap();
        }
        for _ in 0..3 {
            s.next_ready(0).unwrap();
        }
        assert_eq!(s.finished(1, 0, Health::Failure, 1, "HTTP 503"), None);
        assert_eq!(s.finished(1, 0, Health::Failure, 2, "HTTP 503"), None);
        let t = s.finished(1, 0, Health::Failure, 3, "timeout").unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert!(t.reason.contains("3 consecutive failures; last: timeout"), "{}", t.reason);
        // open: nothing is sent, and the waiting deliveries go back unspent
        assert_eq!(s.next_ready(4), None);
        assert_eq!(s.blocked(4), vec![1]);
        assert_eq!(s.take_blocked_queued(4).len(), 5);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.offer(1, 99, 5), Err(99));
        assert_eq!(s.next_wakeup(5), Some(3 + 10 * S));
        // after the cool-down exactly one probe goes through
        let later = 3 + 10 * S;
        assert_eq!(s.offer(1, 100, later), Ok(()));
        assert_eq!(s.offer(1, 101, later), Err(101));
        assert_eq!(s.next_ready(later), Some((1, 100)));
        assert_eq!(s.breaker(1), Some(BreakerState::HalfOpen));
        let probes = s.take_probes();
        assert_eq!((probes.len(), probes[0].to), (1, BreakerState::HalfOpen));
        // a failed probe re-opens with a doubled cool-down
        let t = s.finished(1, later, Health::Failure, later + 1, "refused").unwrap();
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
        assert_eq!(s.next_wakeup(later + 2), Some(later + 1 + 20 * S));
        // a successful probe closes it
        let again = later + 1 + 20 * S;
        s.offer(1, 102, again).unwrap();
        s.next_ready(again).unwrap();
        let t = s.finished(1, again, Health::Success, again + 1, "").unwrap();
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Closed));
        assert_eq!(s.blocked(again + 2), Vec::<i64>::new());
    }

    #[test]
    fn neutral_outcomes_and_successes_keep_it_closed() {
        let mut s = sched(&[(1, 8, None)]);
        for _ in 0..10 {
            s.offer(1, 0, 0).unwrap();
            s.next_ready(0).unwrap();
            assert_eq!(s.finished(1, 0, Health::Neutral, 0, "HTTP 404"), None);
        }
        for _ in 0..2 {
            s.offer(1, 0, 0).unwrap();
            s.next_ready(0).unwrap();
            s.finished(1, 0, Health::Failure, 0, "x");
        }
        s.offer(1, 0, 0).unwrap();
        s.next_ready(0).unwrap();
        s.finished(1, 0, Health::Success, 0, "");
        for _ in 0..2 {
            s.offer(1, 0, 0).unwrap();
            s.next_ready(0).unwrap();
            assert_eq!(s.finished(1, 0, Health::Failure, 0, "x"), None, "the success reset the count");
        }
    }

    #[test]
    fn a_restored_half_open_breaker_waits_a_cool_down() {
        let mut s = sched(&[(1, 8, None)]);
        s.restore_breaker(1, BreakerState::HalfOpen, 5, 0, 0);
        assert_eq!(s.blocked(1), vec![1]);
        assert_eq!(s.offer(1, 7, 10 * S), Ok(()));
        assert_eq!(s.next_ready(10 * S), Some((1, 7)));
    }

    #[test]
    fn slow_endpoints_together_hold_at_most_half_the_capacity() {
        // ten slow partners with max_in_flight 8 (80 > 64) beside a fast one
        let mut s = sched(&(1..=11).map(|id| (id, 8, None)).collect::<Vec<_>>());
        s.set_capacity(64);
        for id in 1..=11 {
            for i in 0..8 {
                s.offer(id, i, 0).unwrap();
            }
        }
        // at first nobody is known to be slow: everything may go out
        let mut out = 0;
        while let Some((id, _)) = s.next_ready(0) {
            if id != 11 {
                out += 1;
            }
        }
        assert_eq!(out, 80);
        // the fast one answers at once; the others keep their requests out
        for _ in 0..8 {
            s.finished(11, 0, Health::Success, 1_000, "");
        }
        let t = 2 * S;
        let share = s.slow_share(t);
        assert_eq!(share, SlowShare { endpoints: 10, in_flight: 80, cap: 32 });
        let changes = s.take_slow_changes();
        assert_eq!(changes.len(), 10);
        assert!(changes.iter().all(|c| c.slow && c.endpoint_id != 11 && c.at_us == t));
        // the slow ones finish one round (5 s answers) and are offered more:
        // they hold no more than they may send, and only 32 go out
        for id in 1..=10 {
            for _ in 0..8 {
                s.finished(id, 0, Health::Success, 5 * S, "");
            }
        }
        let t = 5 * S + SLOW_TICK_US;
        for id in 1..=10 {
            for i in 0..8 {
                s.offer(id, i, t).unwrap();
            }
            assert_eq!(s.offer(id, 99, t), Err(99), "a slow endpoint holds only what it may send");
        }
        for i in 0..8 {
            s.offer(11, 100 + i, t).unwrap();
        }
        let mut slow_out = 0;
        let mut fast_out = 0;
        while let Some((id, _)) = s.next_ready(t) {
            if id == 11 {
                fast_out += 1;
            } else {
                slow_out += 1;
            }
        }
        assert_eq!((slow_out, fast_out), (32, 8), "the fast partner gets its max_in_flight");
        assert_eq!(s.slow_share(t).in_flight, 32);
        // what the slow ones still hold does not count as work at hand
        assert_eq!(s.queued(), 80 - 32);
        assert_eq!(s.sendable(t), 0);
        // slow endpoints are claimed on their own, within what is left of the share
        let blocked = s.blocked(t);
        assert!((1..=10).all(|id| blocked.contains(&id)), "{blocked:?}");
        assert!(s.rooms(t).iter().all(|(id, _)| *id == 11));
        assert_eq!(s.slow_rooms(t, true), vec![], "32 out and 48 waiting: the share is taken");
        let mut u = sched(&[(1, 8, None), (2, 8, None)]);
        u.set_capacity(20);
        for id in [1, 2] {
            u.offer(id, 0, 0).unwrap();
            u.next_ready(0).unwrap();
        }
        // both slow with one request out each: 10 - 2 = 8 left, 7 rooms each
        assert_eq!(u.slow_rooms(2 * S, true).iter().map(|(_, r)| r).sum::<i32>(), 8);
    }

    #[test]
    fn an_endpoint_is_slow_while_a_request_is_out_long_and_fast_again_after_quick_answers() {
        let mut s: Scheduler<u32> = Scheduler::new(settings());
        s.set_limits(1, Limits { max_in_flight: 4, rate_per_sec: None }, 0);
        s.set_capacity(8);
        s.offer(1, 0, 0).unwrap();
        s.next_ready(0).unwrap();
        assert_eq!(s.slow_share(S / 2).endpoints, 0, "half a second out is not slow yet");
        assert_eq!(s.slow_share(S).endpoints, 1);
        s.finished(1, 0, Health::Success, 3 * S, "");
        // nothing out, but its answers lately took 3 s
        assert_eq!(s.slow_share(3 * S + SLOW_TICK_US).endpoints, 1);
        let mut t = 3 * S + SLOW_TICK_US;
        let mut quick = 0;
        while s.slow_share(t).endpoints == 1 {
            s.offer(1, 0, t).unwrap();
            s.next_ready(t).unwrap();
            s.finished(1, t, Health::Success, t + 1_000, "");
            t += SLOW_TICK_US;
            quick += 1;
            assert!(quick < 20);
        }
        assert!((4..=8).contains(&quick), "{quick} quick answers");
        let changes = s.take_slow_changes();
        assert_eq!(changes.iter().map(|c| c.slow).collect::<Vec<_>>(), vec![true, false]);
    }

    #[test]
    fn an_endpoint_sends_one_request_until_it_has_answered_once() {
        let mut s: Scheduler<u32> = Scheduler::new(settings());
        s.set_limits(1, Limits { max_in_flight: 8, rate_per_sec: None }, 0);
        for i in 0..8 {
            s.offer(1, i, 0).unwrap();
        }
        assert!(s.next_ready(0).is_some());
        assert_eq!(s.next_ready(0), None, "a partner that hangs from the start holds one slot");
        assert_eq!(s.sendable(0), 0);
        s.finished(1, 0, Health::Success, 2_000, "");
        assert_eq!(s.sendable(2_000), 7);
        assert_eq!((0..8).filter_map(|_| s.next_ready(2_000)).count(), 7, "then its max_in_flight");
    }

    #[test]
    fn only_endpoints_the_last_claim_filled_up_ask_for_another() {
        let mut s = sched(&[(1, 2, None), (2, 2, None)]);
        // 1 got all it asked for, 2 got less: 2 has nothing more due
        let got: HashMap<i64, usize> = [(1, 66), (2, 3)].into_iter().collect();
        for _ in 0..66 {
            s.offer(1, 0, 0).unwrap();
        }
        for _ in 0..3 {
            s.offer(2, 0, 0).unwrap();
        }
        s.claimed(&[(1, 66), (2, 66)], &got, false, 0);
        while let Some((id, _)) = s.next_ready(0) {
            s.finished(id, 0, Health::Success, 0, "");
        }
        assert_eq!(s.rooms(0), vec![(1, 66)], "2 is idle: no claim on its account");
        assert_eq!(s.blocked(0), Vec::<i64>::new(), "but a claim for new work still takes its deliveries");
    }
}
