//! A fast loopback HTTP/1.1 receiver for benchmarks: keep-alive, one event-loop
//! thread (tokio) whatever the number of connections, so that it costs the
//! 2-core machine little beside the worker it measures. Answers `200 ok` to
//! everything and remembers when each request arrived; `GET /__arrivals` returns
//! "unix_micros path?query" lines, `GET /__reset` forgets them. Under `/fail20`
//! the first request of every fifth transaction (`t=…5`, `t=…10`, …) is
//! answered 500; under `/slow5` the answer comes after 5 seconds (a slow partner).
//!
//! usage: bench_receiver PORT

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    arrivals: Vec<(i64, String)>,
    failed: HashSet<String>,
}

type Shared = Rc<RefCell<State>>;

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// `/fail20…?…t=N…`: the first request for every fifth N is answered 500.
fn fails_once(target: &str, state: &Shared) -> bool {
    if !target.starts_with("/fail20") {
        return false;
    }
    let n: u64 = target.rsplit(['=', '-']).next().and_then(|d| d.parse().ok()).unwrap_or(1);
    n.is_multiple_of(5) && state.borrow_mut().failed.insert(target.to_string())
}

/// One request's head at the start of `buf`: (target, head length, body length).
fn parse_head(buf: &[u8]) -> Option<(String, usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let target = lines.next()?.split_whitespace().nth(1).unwrap_or("/").to_string();
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    Some((target, end, length))
}

async fn answer(target: &str, state: &Shared) -> (u16, String) {
    match target {
        "/__arrivals" => {
            let list = &state.borrow().arrivals;
            (200, list.iter().map(|(t, p)| format!("{t} {p}\n")).collect())
        }
        "/__reset" => {
            state.borrow_mut().arrivals.clear();
            (200, "reset".to_string())
        }
        _ if fails_once(target, state) => (500, "fail".to_string()),
        _ if target.starts_with("/slow5") => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (200, "slow".to_string())
        }
        _ => {
            state.borrow_mut().arrivals.push((now_micros(), target.to_string()));
            (200, "ok".to_string())
        }
    }
}

async fn serve(mut stream: TcpStream, state: Shared) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        // answer every whole request already read (pipelined ones too)
        while let Some((target, head, length)) = parse_head(&buf) {
            if buf.len() < head + length {
                break;
            }
            buf.drain(..head + length);
            let (status, body) = answer(&target, &state).await;
            let reason = if status == 200 { "OK" } else { "Internal Server Error" };
            let reply = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            stream.write_all(reply.as_bytes()).await?;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(18100);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let state: Shared = Rc::new(RefCell::new(State { arrivals: Vec::with_capacity(100_000), ..State::default() }));
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                tokio::task::spawn_local(serve(stream, Rc::clone(&state)));
            }
        }
    });
}
