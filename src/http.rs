//! Sending one request with ureq (knows nothing of Postgres; runs on pool threads).
//!
//! One agent per worker, shared by all sending threads: keep-alive connections
//! are reused, redirects are never followed, and every host name is resolved
//! through the address policy, so the connection goes to an address that was
//! checked (no window for DNS rebinding).

use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::rules::outgoing::USER_AGENT;
use crate::rules::retry::AttemptResult;
use crate::rules::target_policy::{self, Cidr};
use crate::rules::text::{redact_url, truncate_utf8, unix_micros_now};

#[derive(Debug, Clone)]
pub struct Job {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Sent {
    pub started_unix_micros: i64,
    pub duration_ms: f64,
    pub result: AttemptResult,
}

/// How long a connection may take to open, whatever the endpoint's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    agent: ureq::Agent,
    max_body: usize,
}

struct GuardedResolver {
    allowlist: Vec<Cidr>,
}

impl ureq::Resolver for GuardedResolver {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        let mut refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match target_policy::check_address(a.ip(), &self.allowlist) {
                Ok(()) => true,
                Err(e) => {
                    refusal.get_or_insert(e);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            let msg = refusal.unwrap_or_else(|| format!("no address found for {netloc}"));
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, msg));
        }
        Ok(allowed)
    }
}

impl Client {
    pub fn new(allowlist: Vec<Cidr>, max_body: usize, connections: usize) -> Client {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(CONNECT_TIMEOUT)
            .max_idle_connections(connections.max(1) * 4)
            .max_idle_connections_per_host(connections.max(1))
            .no_delay(true)
            .user_agent(USER_AGENT)
            .resolver(GuardedResolver { allowlist })
            .build();
        Client { agent, max_body }
    }

    fn read_body(&self, response: ureq::Response) -> String {
        let mut buf = Vec::with_capacity(self.max_body.min(8192));
        let _ = response.into_reader().take(self.max_body as u64).read_to_end(&mut buf);
        // a multi-byte character cut at the cap becomes U+FFFD, which may be
        // longer than what it replaces: cut again so the cap holds in bytes
        let text = String::from_utf8_lossy(&buf);
        truncate_utf8(&text, self.max_body).to_string()
    }

    fn response(&self, response: ureq::Response) -> AttemptResult {
        let status = response.status();
        let retry_after = response.header("retry-after").map(str::to_string);
        let location = response.header("location").map(str::to_string);
        let body = self.read_body(response);
        AttemptResult::Response { status, body, retry_after, location }
    }

    pub fn send(&self, job: &Job) -> Sent {
        let started_unix_micros = unix_micros_now();
        let start = Instant::now();
        let mut request = self.agent.request(&job.method, &job.url).timeout(job.timeout);
        for (name, value) in &job.headers {
            request = request.set(name, value);
        }
        let outcome = match &job.body {
            Some(body) => request.send_string(body),
            None => request.call(),
        };
        let result = match outcome {
            Ok(response) | Err(ureq::Error::Status(_, response)) => self.response(response),
            Err(ureq::Error::Transport(t)) => {
                let (message, permanent) = describe(&t, job.timeout);
                let message = redact_url(&message, &job.url);
                if permanent {
                    AttemptResult::Permanent(message)
                } else {
                    AttemptResult::Transient(message)
                }
            }
        };
        Sent { started_unix_micros, duration_ms: start.elapsed().as_secs_f64() * 1000.0, result }
    }
}

/// What went wrong on the wire, said once and plainly (ureq's own text
/// repeats its kind and says "Dns Failed: resolve dns name" for an address
/// the policy refused), and whether trying again cannot help.
fn describe(t: &ureq::Transport, timeout: Duration) -> (String, bool) {
    let io = std::error::Error::source(t).and_then(|s| s.downcast_ref::<io::Error>());
    let cause = io.map(|e| e.to_string()).or_else(|| t.message().map(str::to_string));
    let timed_out = io.is_some_and(|e| matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock));
    let seconds = timeout.as_secs_f64();
    match t.kind() {
        // the resolver's own refusal (PermissionDenied) names the address and the setting
        ureq::ErrorKind::Dns if io.is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied) => {
            (cause.unwrap_or_default(), true)
        }
        ureq::ErrorKind::Dns => (format!("the host name does not resolve: {}", cause.unwrap_or_default()), false),
        ureq::ErrorKind::ConnectionFailed if timed_out => {
            (format!("no connection within {} s (the connect timeout)", CONNECT_TIMEOUT.as_secs_f64()), false)
        }
        ureq::ErrorKind::ConnectionFailed => (format!("could not connect: {}", cause.unwrap_or_default()), false),
        ureq::ErrorKind::Io if timed_out => {
            (format!("no complete response within {seconds} s (the endpoint's timeout)"), false)
        }
        ureq::ErrorKind::Io => (format!("the connection failed: {}", cause.unwrap_or_default()), false),
        ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
            (format!("the URL cannot be sent: {}", cause.unwrap_or_default()), true)
        }
        kind => (format!("{kind}: {}", cause.unwrap_or_default()), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn job(url: String) -> Job {
        Job { method: "GET".into(), url, headers: vec![], body: None, timeout: Duration::from_secs(2) }
    }

    fn serve_once(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(response.as_bytes()).unwrap();
        });
        port
    }

    #[test]
    fn blocked_addresses_are_refused_permanently() {
        let client = Client::new(vec![], 100, 1);
        let sent = client.send(&job("http://127.0.0.1:9/".into()));
        assert!(matches!(&sent.result, AttemptResult::Permanent(e) if e.contains("loopback")), "{:?}", sent.result);
    }

    #[test]
    fn body_is_capped_and_redirects_not_followed() {
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let client = Client::new(allow.clone(), 5, 1);
        let port = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world");
        let sent = client.send(&job(format!("http://127.0.0.1:{port}/")));
        assert_eq!(
            sent.result,
            AttemptResult::Response { status: 200, body: "hello".into(), retry_after: None, location: None }
        );
        let port = serve_once("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/next\r\nContent-Length: 0\r\n\r\n");
        let sent = client.send(&job(format!("http://127.0.0.1:{port}/")));
        assert!(
            matches!(sent.result, AttemptResult::Response { status: 302, location: Some(ref l), .. } if l.ends_with("/next"))
        );
    }

    #[test]
    fn transport_errors_keep_no_query_string() {
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/pb?cid=1&ts=5&sig=deadbeef");
        let sent = Client::new(allow, 5, 1).send(&job(url));
        let AttemptResult::Transient(message) = sent.result else { panic!("{:?}", sent.result) };
        assert!(!message.contains("deadbeef") && !message.contains("cid=1"), "{message}");
        assert_eq!(
            redact_url("GET https://n.test/a?sig=x: refused", "https://n.test/a?sig=x"),
            "GET https://n.test/a?…: refused"
        );
    }

    #[test]
    fn transport_errors_are_said_once_with_the_timeout_and_the_policy_in_plain_words() {
        let client = Client::new(vec![], 100, 1);
        let AttemptResult::Permanent(e) = client.send(&job("http://10.1.2.3:80/".into())).result else { panic!() };
        assert!(e.starts_with("refused to connect to 10.1.2.3") && !e.contains("Dns Failed"), "{e}");
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let mut slow = job(format!("http://127.0.0.1:{port}/"));
        slow.timeout = Duration::from_millis(300);
        let AttemptResult::Transient(e) = Client::new(allow, 5, 1).send(&slow).result else { panic!() };
        assert_eq!(e, "no complete response within 0.3 s (the endpoint's timeout)");
    }

    #[test]
    fn refused_connection_is_transient() {
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let sent = Client::new(allow, 5, 1).send(&job(format!("http://127.0.0.1:{port}/")));
        assert!(matches!(sent.result, AttemptResult::Transient(_)), "{:?}", sent.result);
    }
}
