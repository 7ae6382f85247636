//! Judging finished requests and recording them: attempts, new states and
//! breaker transitions in one short transaction, one by one if that fails.

use super::*;

impl Worker {
    /// Judges finished requests and records them in one short transaction.
    pub(super) fn record(&mut self) {
        self.judge();
        self.flush();
    }

    /// Judges finished requests (no Postgres call): frees their slots in the
    /// scheduler and turns them into records waiting to be written.
    pub(super) fn judge(&mut self) {
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
            let error_text = error.as_deref().unwrap_or("");
            if let Some(t) = self.scheduler.finished(c.endpoint_id, f.started_us, health, now, error_text) {
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
        shared::mine(|s| {
            s.sent += ok + failed;
            s.succeeded += ok;
            s.failed += failed;
        });
    }

    /// Writes the waiting records, breaker changes and deliveries an open
    /// breaker sent back, in one short transaction.
    pub(super) fn flush(&mut self) {
        let now = now_us();
        // an open breaker sends its waiting deliveries back unspent
        let blocked: Vec<i64> = self.scheduler.take_blocked_queued(now).into_iter().map(|(c, _, _)| c.id).collect();
        self.slow_changes.extend(self.scheduler.take_slow_changes());
        if self.records.is_empty() && self.transitions.is_empty() && blocked.is_empty() && self.slow_changes.is_empty()
        {
            return;
        }
        self.first_finished = None;
        let records = std::mem::take(&mut self.records);
        let transitions = std::mem::take(&mut self.transitions);
        let slow = std::mem::take(&mut self.slow_changes);
        record_all(&records, &transitions, &slow, &blocked);
        self.maybe_due = true;
    }
}

pub(super) fn dead_record(c: &Claimed, error: String) -> Record {
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

/// Records finished attempts, breaker transitions, endpoints that became
/// slow or fast again, and unsent deliveries in
/// one transaction; if that fails, each record in its own subtransaction so
/// that one bad record cannot lose the others. A record that still fails
/// stays in flight and its lease brings it back.
pub(super) fn record_all(records: &[Record], transitions: &[Transition], slow: &[SlowChange], unsent: &[i64]) {
    if records.is_empty() && transitions.is_empty() && slow.is_empty() && unsent.is_empty() {
        return;
    }
    let whole = txn::run("recording attempts", || {
        txn::in_subtransaction(|| {
            queue::record(records)?;
            queue::record_transitions(transitions)?;
            queue::record_slow(slow)?;
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
                if let Err(e) = txn::in_subtransaction(|| queue::record_slow(slow)) {
                    note_error(&format!("could not record slow endpoints: {e}"));
                }
                if let Err(e) = txn::in_subtransaction(|| queue::release(unsent)) {
                    note_error(&format!("could not return unsent deliveries: {e}"));
                }
                Ok(())
            });
        }
    }
}
