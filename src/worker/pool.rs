//! Sending threads. Threads only do HTTP; every Postgres call stays on the
//! worker's main thread. Each job's result comes back on its own as soon as
//! its request finishes (no batch barrier), tagged with the job's key.
//!
//! Why threads and not an event loop: a waiting request costs a parked thread
//! with a small stack (256 KiB reserved, a few pages touched), and the number
//! of slots is a setting (`postback.concurrency`, default 64); with the
//! per-endpoint `max_in_flight` cap a hanging partner holds at most that many.
//! The blocking client (ureq) keeps the code simple and measured well enough
//! (worker private memory 16-27 MiB in `make bench`); an async client would add a runtime to the worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::{Client, Sent};
use crate::rules::retry::{AttemptResult, BodyCheck};

/// One delivery's work on a sending thread: build the request (sign, fill the
/// digests), send it, check the body against its success pattern. Everything
/// whose cost grows with a value's size happens here, off the main thread.
pub type Work = Box<dyn FnOnce(&Client) -> Done + Send>;

/// What a sending thread hands back.
pub struct Done {
    pub sent: Sent,
    /// the success_body_pattern's verdict on the body, when there is a pattern and a response
    pub body_check: Option<BodyCheck>,
}

/// Runs one delivery's work; a panic becomes a transient failure of that
/// delivery (recorded and retried), and the thread lives on to take the next.
pub fn run_guarded(work: Work, client: &Client) -> Done {
    let started_unix_micros = crate::rules::text::unix_micros_now();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(client))) {
        Ok(done) => done,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Done {
                sent: Sent {
                    started_unix_micros,
                    duration_ms: 0.0,
                    result: AttemptResult::Transient(format!(
                        "the sending thread failed while sending ({}); retried",
                        crate::rules::text::truncate_utf8(&what, 200)
                    )),
                },
                body_check: None,
            }
        }
    }
}

/// Stack reserved per sending thread; ureq and rustls need far less.
const STACK_BYTES: usize = 256 * 1024;

pub struct Pool {
    jobs: Option<Sender<(u64, Work)>>,
    results: Receiver<(u64, Done)>,
    cancel: Arc<AtomicBool>,
    size: usize,
}

impl Pool {
    pub fn new(size: usize, client: Arc<Client>) -> Pool {
        let (job_tx, job_rx) = mpsc::channel::<(u64, Work)>();
        let (result_tx, results) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let cancel = Arc::new(AtomicBool::new(false));
        for n in 0..size {
            let job_rx = Arc::clone(&job_rx);
            let result_tx = result_tx.clone();
            let client = Arc::clone(&client);
            let cancel = Arc::clone(&cancel);
            std::thread::Builder::new()
                .name(format!("pg_postback-send-{n}"))
                .stack_size(STACK_BYTES)
                .spawn(move || loop {
                    let next = job_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((key, work))) = next else { return };
                    if cancel.load(Ordering::Relaxed) {
                        continue; // abandoned: the lease brings it back later
                    }
                    if result_tx.send((key, run_guarded(work, &client))).is_err() {
                        return;
                    }
                })
                .expect("spawning a sending thread");
        }
        Pool { jobs: Some(job_tx), results, cancel, size }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Hands one request to the sending threads.
    pub fn submit(&self, key: u64, work: Work) {
        let tx = self.jobs.as_ref().expect("pool is running");
        tx.send((key, work)).expect("sending threads are alive");
    }

    /// Results that finished, waiting at most `wait` for the first one.
    pub fn finished(&self, wait: Duration, into: &mut Vec<(u64, Done)>) {
        match self.results.recv_timeout(wait) {
            Ok(r) => into.push(r),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(r) = self.results.try_recv() {
            into.push(r);
        }
    }

    /// Stops starting queued requests (they are abandoned to their leases).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // closing the channel ends the idle threads; busy ones end after their request
        self.cancel.store(true, Ordering::Relaxed);
        self.jobs.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_send_is_a_transient_failure_and_the_slot_comes_back() {
        let client = Arc::new(Client::new(vec![], 100, 1));
        let pool = Pool::new(1, client);
        // more panics than threads: each one comes back as a result, and the
        // one thread goes on to the next job
        for key in 0..3 {
            pool.submit(key, Box::new(|_: &Client| -> Done { panic!("boom {}", 32 - 128i32) }));
        }
        pool.submit(
            3,
            Box::new(|_: &Client| Done {
                sent: Sent {
                    started_unix_micros: 0,
                    duration_ms: 1.0,
                    result: AttemptResult::Permanent("fine".into()),
                },
                body_check: None,
            }),
        );
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 4 && std::time::Instant::now() < deadline {
            pool.finished(Duration::from_millis(100), &mut got);
        }
        assert_eq!(got.len(), 4);
        for (key, done) in &got[..3] {
            assert!(matches!(&done.sent.result, AttemptResult::Transient(e) if e.contains("boom -96")), "{key}");
        }
        assert!(matches!(&got[3].1.sent.result, AttemptResult::Permanent(_)));
    }
}
