//! Sending one request (knows nothing of Postgres; runs on the sending
//! thread's event loop, never on the worker's main thread).
//!
//! One client per worker: hyper's HTTP/1.1 connection pool on a tokio
//! runtime, so a request that waits on a slow partner costs a socket and a
//! small task, not a thread. Keep-alive connections are reused, redirects are
//! never followed (hyper follows none), and every connection goes through
//! `GuardedConnector`, which resolves the host (IP literals included) and
//! connects only to an address the target policy allows: no window for DNS
//! rebinding. The endpoint's timeout bounds the whole exchange, from connect
//! to the last byte of the (capped) body, so a partner that trickles its
//! headers a byte a second is cut off like one that never answers.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

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
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a connection was not made, as the connector saw it.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// the target policy refused every address (the message names one and the setting)
    #[error("{0}")]
    Refused(String),
    #[error("the host name does not resolve: {0}")]
    Dns(String),
    #[error("no connection within {} s (the connect timeout)", CONNECT_TIMEOUT.as_secs_f64())]
    Timeout,
    #[error("could not connect: {0}")]
    Connect(io::Error),
    #[error("the URL cannot be sent: {0}")]
    Url(String),
}

/// Resolves and connects, only to addresses the target policy allows.
#[derive(Clone)]
struct GuardedConnector {
    allowlist: Arc<Vec<Cidr>>,
}

impl GuardedConnector {
    async fn connect(allowlist: Arc<Vec<Cidr>>, uri: http::Uri) -> Result<TokioIo<TcpStream>, ConnectError> {
        let host = uri.host().ok_or_else(|| ConnectError::Url("no host".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let netloc = format!("{host}:{port}");
                // the system resolver blocks: off the event loop
                let found =
                    tokio::task::spawn_blocking(move || netloc.to_socket_addrs().map(|a| a.collect::<Vec<_>>()))
                        .await
                        .map_err(|e| ConnectError::Dns(e.to_string()))?;
                found.map_err(|e| ConnectError::Dns(e.to_string()))?
            }
        };
        let mut refusal = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match target_policy::check_address(a.ip(), &allowlist) {
                Ok(()) => true,
                Err(e) => {
                    refusal.get_or_insert(e);
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(match refusal {
                Some(r) => ConnectError::Refused(r),
                None => ConnectError::Dns(format!("no address found for {host}")),
            });
        }
        let mut last = ConnectError::Timeout;
        for addr in allowed {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => last = ConnectError::Connect(e),
                Err(_) => last = ConnectError::Timeout,
            }
        }
        Err(last)
    }
}

impl tower_service::Service<http::Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(Self::connect(Arc::clone(&self.allowlist), uri))
    }
}

pub struct Client {
    inner: HyperClient<HttpsConnector<GuardedConnector>, Full<Bytes>>,
    max_body: usize,
}

impl Client {
    /// `connections`: keep-alive connections kept per host.
    pub fn new(allowlist: Vec<Cidr>, max_body: usize, connections: usize) -> Client {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(GuardedConnector { allowlist: Arc::new(allowlist) });
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(connections.max(1))
            .http1_title_case_headers(true)
            .build(connector);
        Client { inner, max_body }
    }

    /// Sends one request; the endpoint's timeout bounds all of it.
    pub async fn send(&self, job: &Job) -> Sent {
        let started_unix_micros = unix_micros_now();
        let start = Instant::now();
        let result = match tokio::time::timeout(job.timeout, self.exchange(job)).await {
            Ok(result) => result,
            Err(_) => AttemptResult::Transient(format!(
                "no complete response within {} s (the endpoint's timeout)",
                job.timeout.as_secs_f64()
            )),
        };
        let result = match result {
            AttemptResult::Transient(m) => AttemptResult::Transient(redact_url(&m, &job.url)),
            AttemptResult::Permanent(m) => AttemptResult::Permanent(redact_url(&m, &job.url)),
            other => other,
        };
        Sent { started_unix_micros, duration_ms: start.elapsed().as_secs_f64() * 1000.0, result }
    }

    async fn exchange(&self, job: &Job) -> AttemptResult {
        let request = match request(job) {
            Ok(r) => r,
            Err(e) => return AttemptResult::Permanent(format!("the URL cannot be sent: {e}")),
        };
        let response = match self.inner.request(request).await {
            Ok(r) => r,
            Err(e) => {
                let (message, permanent) = describe(&e);
                return if permanent { AttemptResult::Permanent(message) } else { AttemptResult::Transient(message) };
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let retry_after = header("retry-after");
        let location = header("location");
        let body = self.read_body(response.into_body()).await;
        AttemptResult::Response { status, body, retry_after, location }
    }

    /// The body up to the cap (what arrived before an error counts; the rest
    /// is never read, and that connection is not reused).
    async fn read_body(&self, mut body: hyper::body::Incoming) -> String {
        let mut buf: Vec<u8> = Vec::new();
        while buf.len() < self.max_body {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let room = self.max_body - buf.len();
                        buf.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        // a multi-byte character cut at the cap becomes U+FFFD, which may be
        // longer than what it replaces: cut again so the cap holds in bytes
        let text = String::from_utf8_lossy(&buf);
        truncate_utf8(&text, self.max_body).to_string()
    }
}

/// The request as hyper takes it; our User-Agent unless the endpoint sets one.
fn request(job: &Job) -> Result<http::Request<Full<Bytes>>, String> {
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(job.method.as_bytes()).map_err(|e| e.to_string())?)
        .uri(job.url.parse::<http::Uri>().map_err(|e| e.to_string())?);
    if !job.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("user-agent")) {
        builder = builder.header(http::header::USER_AGENT, USER_AGENT);
    }
    for (name, value) in &job.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let body = job.body.clone().map(Bytes::from).unwrap_or_default();
    builder.body(Full::new(body)).map_err(|e| e.to_string())
}

/// What went wrong on the wire, said once and plainly, and whether trying
/// again cannot help (the policy's refusal, a URL that cannot be sent).
fn describe(e: &hyper_util::client::legacy::Error) -> (String, bool) {
    let mut cause: &(dyn StdError + 'static) = e;
    loop {
        if let Some(c) = cause.downcast_ref::<ConnectError>() {
            let permanent = matches!(c, ConnectError::Refused(_) | ConnectError::Url(_));
            return (c.to_string(), permanent);
        }
        match cause.source() {
            Some(next) => cause = next,
            None => break,
        }
    }
    if e.is_connect() {
        (format!("could not connect: {cause}"), false)
    } else {
        (format!("the connection failed: {cause}"), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn send(client: &Client, job: &Job) -> Sent {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(client.send(job))
    }

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
        let sent = send(&client, &job("http://127.0.0.1:9/".into()));
        assert!(matches!(&sent.result, AttemptResult::Permanent(e) if e.contains("loopback")), "{:?}", sent.result);
    }

    #[test]
    fn body_is_capped_and_redirects_not_followed() {
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let client = Client::new(allow.clone(), 5, 1);
        let port = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world");
        let sent = send(&client, &job(format!("http://127.0.0.1:{port}/")));
        assert_eq!(
            sent.result,
            AttemptResult::Response { status: 200, body: "hello".into(), retry_after: None, location: None }
        );
        let port = serve_once("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/next\r\nContent-Length: 0\r\n\r\n");
        let sent = send(&client, &job(format!("http://127.0.0.1:{port}/")));
        assert!(
            matches!(sent.result, AttemptResult::Response { status: 302, location: Some(ref l), .. } if l.ends_with("/next"))
        );
    }

    #[test]
    fn transport_errors_keep_no_query_string() {
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/pb?cid=1&ts=5&sig=deadbeef");
        let sent = send(&Client::new(allow, 5, 1), &job(url));
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
        let AttemptResult::Permanent(e) = send(&client, &job("http://10.1.2.3:80/".into())).result else { panic!() };
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
        let AttemptResult::Transient(e) = send(&Client::new(allow, 5, 1), &slow).result else { panic!() };
        assert_eq!(e, "no complete response within 0.3 s (the endpoint's timeout)");
    }

    #[test]
    fn refused_connection_is_transient() {
        let allow = target_policy::parse_allowlist("127.0.0.1/32").unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let sent = send(&Client::new(allow, 5, 1), &job(format!("http://127.0.0.1:{port}/")));
        assert!(matches!(sent.result, AttemptResult::Transient(_)), "{:?}", sent.result);
    }
}
