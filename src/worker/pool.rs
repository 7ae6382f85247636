//! Sending threads. Threads only do HTTP; every Postgres call stays on the
//! worker's main thread. Each job's result comes back on its own as soon as
//! its request finishes (no batch barrier), tagged with the job's key.
//!
//! Why threads and not an event loop: a waiting request costs a parked thread
//! with a small stack (256 KiB reserved, a few pages touched), and the number
//! of slots is a setting (`postback.concurrency`, default 64); with the
//! per-endpoint `max_in_flight` cap a hanging partner holds at most that many.
//! The blocking client (ureq) keeps the code simple and measured well enough
//! (see the closing notes); an async client would add a runtime to the worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::{Client, Job, Sent};

/// Stack reserved per sending thread; ureq and rustls need far less.
const STACK_BYTES: usize = 256 * 1024;

pub struct Pool {
    jobs: Option<Sender<(u64, Job)>>,
    results: Receiver<(u64, Sent)>,
    cancel: Arc<AtomicBool>,
    size: usize,
}

impl Pool {
    pub fn new(size: usize, client: Arc<Client>) -> Pool {
        let (job_tx, job_rx) = mpsc::channel::<(u64, Job)>();
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
                    let Ok(Ok((key, job))) = next else { return };
                    if cancel.load(Ordering::Relaxed) {
                        continue; // abandoned: the lease brings it back later
                    }
                    if result_tx.send((key, client.send(&job))).is_err() {
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
    pub fn submit(&self, key: u64, job: Job) {
        let tx = self.jobs.as_ref().expect("pool is running");
        tx.send((key, job)).expect("sending threads are alive");
    }

    /// Results that finished, waiting at most `wait` for the first one.
    pub fn finished(&self, wait: Duration, into: &mut Vec<(u64, Sent)>) {
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
