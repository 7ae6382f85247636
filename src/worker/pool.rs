//! The sending threads: a tokio event loop on SENDING_THREADS threads, on which
//! every request is a task. Every Postgres call stays on the worker's main thread.
//! Each job's result comes back on its own as soon as its request finishes
//! (no batch barrier), tagged with the job's key.
//!
//! Why an event loop and not a thread per request: a request waiting on a
//! slow partner costs a socket and a small task (a few KiB), so thousands may
//! be open at once (`postback.concurrency`, default 1024) within a few MiB;
//! with threads, partners that were slow together took the whole pool. The
//! per-delivery work (building and signing the request, the body check) runs
//! in the task; a panic in it fails that delivery alone.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use crate::http::{Client, Sent};
use crate::rules::retry::{AttemptResult, BodyCheck};

/// One delivery's work on the sending thread: build the request (sign, fill the
/// digests), send it, check the body against its success pattern. Everything
/// whose cost grows with a value's size happens there, off the main thread.
pub type Work = Box<dyn FnOnce(Arc<Client>) -> Pin<Box<dyn Future<Output = Done> + Send>> + Send>;

/// What the sending thread hands back.
pub struct Done {
    pub sent: Sent,
    /// the success_body_pattern's verdict on the body, when there is a pattern and a response
    pub body_check: Option<BodyCheck>,
}

/// A panic while sending, as that delivery's transient failure (recorded and retried).
fn panicked(what: &str, started_unix_micros: i64) -> Done {
    Done {
        sent: Sent {
            started_unix_micros,
            duration_ms: 0.0,
            result: AttemptResult::Transient(format!(
                "the sending thread failed while sending ({}); retried",
                crate::rules::text::truncate_utf8(what, 200)
            )),
        },
        body_check: None,
    }
}

/// Threads of the event loop: two, so that a request's answer is read while
/// the other is busy (signing, a body check, a TLS handshake) or descheduled;
/// measured with 64 requests in flight, the median request took 1.5 ms on two
/// threads and 3.5-4.5 ms on one.
const SENDING_THREADS: usize = 2;
/// Most threads the event loop may start for blocking host-name lookups.
const LOOKUP_THREADS: usize = 4;

pub struct Pool {
    jobs: Option<tokio::sync::mpsc::UnboundedSender<(u64, Work)>>,
    results: Receiver<(u64, Done)>,
    cancel: Arc<AtomicBool>,
    size: usize,
}

impl Pool {
    /// `size`: most requests open at once.
    pub fn new(size: usize, client: Arc<Client>) -> Pool {
        raise_open_files_limit(size);
        let (job_tx, mut job_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Work)>();
        let (result_tx, results) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = Arc::clone(&cancel);
        // the threads started here inherit a mask that blocks every signal:
        // Postgres' signals (SIGTERM, SIGHUP, latch wake-ups) reach the main thread
        let restore = SignalsBlocked::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SENDING_THREADS)
            .thread_name("pg_postback-send")
            .enable_all()
            .max_blocking_threads(LOOKUP_THREADS)
            .build()
            .expect("building the sending thread's event loop");
        // hands each job to the event loop as a task (the tasks run on its threads)
        std::thread::Builder::new()
            .name("pg_postback-jobs".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some((key, work)) = job_rx.recv().await {
                        if cancelled.load(Ordering::Relaxed) {
                            continue; // abandoned: the lease brings it back later
                        }
                        let result_tx = result_tx.clone();
                        let client = Arc::clone(&client);
                        tokio::spawn(async move {
                            let started = crate::rules::text::unix_micros_now();
                            // its own task: a panic ends that task alone and is seen here
                            let done = match tokio::spawn(async move { work(client).await }).await {
                                Ok(done) => done,
                                Err(e) if e.is_panic() => {
                                    let panic = e.into_panic();
                                    let what = panic
                                        .downcast_ref::<&str>()
                                        .map(|s| s.to_string())
                                        .or_else(|| panic.downcast_ref::<String>().cloned())
                                        .unwrap_or_else(|| "unknown panic".into());
                                    panicked(&what, started)
                                }
                                Err(_) => return, // cancelled at shutdown: the lease brings it back
                            };
                            let _ = result_tx.send((key, done));
                        });
                    }
                });
                // the channel closed: in-flight requests are abandoned to their leases
                runtime.shutdown_background();
            })
            .expect("spawning the sending thread");
        drop(restore);
        Pool { jobs: Some(job_tx), results, cancel, size }
    }

    /// Most requests open at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Hands one request to the sending thread.
    pub fn submit(&self, key: u64, work: Work) {
        let tx = self.jobs.as_ref().expect("pool is running");
        tx.send((key, work)).expect("the sending thread is alive");
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

    /// Stops starting requests not yet started (they are abandoned to their leases).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // closing the channel ends the event loop; open requests are dropped
        self.cancel.store(true, Ordering::Relaxed);
        self.jobs.take();
    }
}

/// Blocks every signal in the calling thread until dropped (threads spawned
/// meanwhile keep the mask).
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> SignalsBlocked {
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// Each open request holds a socket: lets the process open as many as the
/// hard limit allows (the soft limit is often 1024, which Postgres' own files share).
fn raise_open_files_limit(requests: usize) {
    let wanted = (requests as u64).saturating_mul(2).saturating_add(1024);
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= wanted {
            return;
        }
        limit.rlim_cur = wanted.min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_send_is_a_transient_failure_of_that_delivery_alone() {
        let client = Arc::new(Client::new(vec![], 100, 1));
        let pool = Pool::new(1, client);
        // more panics than threads: each one comes back as a result, and the
        // one thread goes on to the next job
        for key in 0..3 {
            pool.submit(key, Box::new(|_| Box::pin(async { panic!("boom {}", 32 - 128i32) })));
        }
        pool.submit(
            3,
            Box::new(|_| {
                Box::pin(async {
                    Done {
                        sent: Sent {
                            started_unix_micros: 0,
                            duration_ms: 1.0,
                            result: AttemptResult::Permanent("fine".into()),
                        },
                        body_check: None,
                    }
                })
            }),
        );
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < 4 && std::time::Instant::now() < deadline {
            pool.finished(Duration::from_millis(100), &mut got);
        }
        assert_eq!(got.len(), 4);
        // two threads: results come back in any order
        got.sort_by_key(|(key, _)| *key);
        for (key, done) in &got[..3] {
            assert!(matches!(&done.sent.result, AttemptResult::Transient(e) if e.contains("boom -96")), "{key}");
        }
        assert!(matches!(&got[3].1.sent.result, AttemptResult::Permanent(_)));
    }
}
