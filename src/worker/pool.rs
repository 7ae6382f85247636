//! A fixed pool of sending threads. Threads only do HTTP; every Postgres call
//! stays on the worker's main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{Client, Job, Sent};

pub struct Pool {
    jobs: Option<Sender<(usize, Job)>>,
    results: Receiver<(usize, Sent)>,
    cancel: Arc<AtomicBool>,
}

impl Pool {
    pub fn new(size: usize, client: Arc<Client>) -> Pool {
        let (job_tx, job_rx) = mpsc::channel::<(usize, Job)>();
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
                .spawn(move || loop {
                    let next = job_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok((index, job))) = next else { return };
                    if cancel.load(Ordering::Relaxed) {
                        continue; // abandoned: the lease brings it back later
                    }
                    if result_tx.send((index, client.send(&job))).is_err() {
                        return;
                    }
                })
                .expect("spawning a sending thread");
        }
        Pool { jobs: Some(job_tx), results, cancel }
    }

    /// Hands a batch to the sending threads and returns at once.
    pub fn submit(&self, jobs: Vec<Job>) {
        let tx = self.jobs.as_ref().expect("pool is running");
        for (index, job) in jobs.into_iter().enumerate() {
            tx.send((index, job)).expect("sending threads are alive");
        }
    }

    /// Waits for the `n` results of the batch last submitted. When `stop()`
    /// turns true the pool waits at most `grace` longer, then returns what
    /// finished; the rest are None (their leases bring them back).
    pub fn collect(&self, n: usize, stop: impl Fn() -> bool, grace: Duration) -> Vec<Option<Sent>> {
        let mut results: Vec<Option<Sent>> = (0..n).map(|_| None).collect();
        let mut received = 0;
        let mut deadline: Option<Instant> = None;
        while received < n {
            match self.results.recv_timeout(Duration::from_millis(50)) {
                Ok((index, sent)) => {
                    results[index] = Some(sent);
                    received += 1;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if deadline.is_none() && stop() {
                deadline = Some(Instant::now() + grace);
                self.cancel.store(true, Ordering::Relaxed);
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                break;
            }
        }
        results
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // closing the channel ends the idle threads; busy ones end after their request
        self.cancel.store(true, Ordering::Relaxed);
        self.jobs.take();
    }
}
