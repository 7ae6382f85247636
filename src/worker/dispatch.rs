//! Putting claimed deliveries on the wire: what the scheduler lets through
//! goes to the sending thread with everything it needs (request building,
//! signing and the body check happen there, off the main loop).

use super::*;

impl Worker {
    /// Puts on the wire what the scheduler lets through, while slots are free.
    pub(super) fn send(&mut self) {
        let now = now_us();
        while self.slots_free() > 0 {
            let Some((_, (mut c, config, judging))) = self.scheduler.next_ready(now) else { break };
            let payload = Payload::take(&mut c);
            let pattern = judging.pattern.clone();
            let work: Work = Box::new(move |client: Arc<Client>| {
                Box::pin(async move { send_one(&client, &payload, &config, pattern.as_deref()).await })
            });
            let key = self.next_key;
            self.next_key += 1;
            self.in_flight.insert(key, InFlight { claimed: c, judging, started_us: now });
            self.pool.submit(key, work);
        }
        self.transitions.extend(self.scheduler.take_probes());
        self.slow_changes.extend(self.scheduler.take_slow_changes());
        if (!self.records.is_empty() || !self.transitions.is_empty() || !self.slow_changes.is_empty())
            && self.first_finished.is_none()
        {
            // probes and the dead-at-once (could not be built) are written within RECORD_WITHIN
            self.first_finished = Some(Instant::now());
        }
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

/// On the sending thread: build the request, send it, check the body. A request
/// that cannot be built is a permanent failure (dead with the reason).
async fn send_one(client: &Client, p: &Payload, endpoint: &EndpointConfig, pattern: Option<&str>) -> Done {
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
    let sent = client.send(&job).await;
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
    let actual = crate::rules::url_policy::Origin::of(&url);
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
