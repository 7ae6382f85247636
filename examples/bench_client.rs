//! The ceiling a plain keep-alive HTTP client reaches against the bench
//! receiver: THREADS threads sharing one ureq agent send TOTAL GET requests.
//!
//! usage: bench_client URL TOTAL THREADS   (prints requests/s)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "http://127.0.0.1:18100/x".into());
    let total: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let agent =
        ureq::AgentBuilder::new().max_idle_connections_per_host(threads).timeout(Duration::from_secs(10)).build();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (agent, next, url) = (agent.clone(), Arc::clone(&next), url.clone());
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let _ = agent.get(&url).call().map(|r| r.into_string());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    println!("{:.0}", total as f64 / start.elapsed().as_secs_f64());
}
