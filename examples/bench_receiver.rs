//! A fast loopback HTTP/1.1 receiver for benchmarks (std only, keep-alive,
//! a thread per connection). Answers `200 ok` to everything and remembers when
//! each request arrived; `GET /__arrivals` returns "unix_micros path?query"
//! lines, `GET /__reset` forgets them. Under `/fail20` the first request of
//! every fifth transaction (`t=…5`, `t=…10`, …) is answered 500; under
//! `/slow5` the answer comes after 5 seconds (a slow partner).
//!
//! usage: bench_receiver PORT

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

type Arrivals = Arc<Mutex<Vec<(i64, String)>>>;
type Failed = Arc<Mutex<std::collections::HashSet<String>>>;

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// `/fail20…?…t=N…`: the first request for every fifth N is answered 500.
fn fails_once(target: &str, failed: &Failed) -> bool {
    if !target.starts_with("/fail20") {
        return false;
    }
    let n: u64 = target.rsplit(['=', '-']).next().and_then(|d| d.parse().ok()).unwrap_or(1);
    n.is_multiple_of(5) && failed.lock().unwrap().insert(target.to_string())
}

fn serve(stream: TcpStream, arrivals: Arrivals, failed: Failed) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let reply = match target.as_str() {
            "/__arrivals" => {
                let list = arrivals.lock().unwrap();
                list.iter().map(|(t, p)| format!("{t} {p}\n")).collect::<String>()
            }
            "/__reset" => {
                arrivals.lock().unwrap().clear();
                "reset".to_string()
            }
            _ if fails_once(&target, &failed) => {
                write!(writer, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail")?;
                continue;
            }
            _ if target.starts_with("/slow5") => {
                std::thread::sleep(std::time::Duration::from_secs(5));
                "slow".to_string()
            }
            _ => {
                arrivals.lock().unwrap().push((now_micros(), target));
                "ok".to_string()
            }
        };
        write!(writer, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}", reply.len(), reply)?;
    }
}

fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(18100);
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::with_capacity(100_000)));
    let failed: Failed = Arc::new(Mutex::new(std::collections::HashSet::new()));
    for stream in listener.incoming().flatten() {
        let arrivals = Arc::clone(&arrivals);
        let failed = Arc::clone(&failed);
        std::thread::spawn(move || serve(stream, arrivals, failed));
    }
}
