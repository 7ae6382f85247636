//! The last step before sending (pure): signature headers, signed postback
//! URLs and the fixed headers every request carries. Done at send time, not at
//! enqueue, so that a retry hours later carries a fresh timestamp.

use crate::rules::signing::{self, Scheme};

pub const USER_AGENT: &str = concat!("pg_postback/", env!("CARGO_PKG_VERSION"));

/// How an endpoint signs.
#[derive(Debug, Clone, Default)]
pub struct Signing {
    /// `none` or a scheme name
    pub scheme: String,
    /// live secrets, newest first
    pub secrets: Vec<String>,
    /// header name override for the signature (webhooks)
    pub header: Option<String>,
    /// query parameter names for signed postback URLs
    pub ts_param: String,
    pub sig_param: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

/// A stored headers object (JSON text) as (name, value) pairs, each checked;
/// anything else is an error naming the problem (never a request without them).
pub fn parse_stored_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| "the endpoint's headers do not parse as JSON".to_string())?;
    let serde_json::Value::Object(map) = value else {
        return Err("the endpoint's headers are not a JSON object".into());
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        let serde_json::Value::String(value) = value else {
            return Err(format!("the endpoint's header \"{}\" is not a string", name.escape_default()));
        };
        check_header(&name, &value)?;
        out.push((name, value));
    }
    Ok(out)
}

/// Header names an endpoint may not set: they frame the request, so a stored
/// value could smuggle a second request or redirect the first.
pub const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "expect",
];

/// The methods a delivery may use.
pub const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH"];

/// Endpoint kinds: a GET postback to a URL template, or a signed JSON webhook.
pub const KINDS: &[&str] = &["postback", "webhook"];

/// Longest header value an endpoint may set.
pub const MAX_HEADER_VALUE_BYTES: usize = 8192;

/// An RFC 7230 token character (header names).
pub fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Checks one endpoint header: an RFC 7230 token as its name, no framing
/// header, and a value without CR, LF, NUL or other control characters (tab
/// allowed). The error names the header but never quotes its value (it may
/// be a credential).
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 100 || !name.chars().all(is_token_char) {
        return Err(format!(
            "header name \"{}\" is not an HTTP token (1 to 100 of A-Z a-z 0-9 !#$%&'*+-.^_`|~)",
            name.escape_default()
        ));
    }
    if FORBIDDEN_HEADERS.iter().any(|f| f.eq_ignore_ascii_case(name)) {
        return Err(format!("header \"{name}\" is set by the HTTP client and may not be set by an endpoint"));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(format!("header \"{name}\" has a control character (U+{:04X}) in its value", c as u32));
    }
    if value.len() > MAX_HEADER_VALUE_BYTES {
        return Err(format!("header \"{name}\" value is {} bytes; the limit is {MAX_HEADER_VALUE_BYTES}", value.len()));
    }
    Ok(())
}

/// Whether an endpoint's requests cannot be sent without a live secret: it
/// signs (`signing_scheme` other than none) or its URL template has a
/// `{hash:…}` digest. Its deliveries wait while it has none.
pub fn needs_secret(signing_scheme: &str, url_template: &str) -> bool {
    signing_scheme != "none"
        || crate::rules::template::Template::parse(url_template)
            .map(|t| t.macros().any(|m| m.hash.is_some()))
            .unwrap_or(false)
}

/// A shell command line that sends a request as the worker would, with curl:
/// every argument single-quoted (safe in any POSIX shell for any text), no
/// redirects followed (curl's default), the endpoint's timeout as --max-time.
pub fn curl_command(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&str>,
    timeout_ms: i64,
) -> String {
    fn quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
    let mut out = format!("curl --silent --show-error --include --request {} {}", quote(method), quote(url));
    out.push_str(&format!(" --max-time {}", (timeout_ms.max(1) as f64 / 1000.0)));
    for (name, value) in headers {
        out.push_str(" \\\n  --header ");
        out.push_str(&quote(&format!("{name}: {value}")));
    }
    if let Some(body) = body {
        out.push_str(" \\\n  --data-binary ");
        out.push_str(&quote(body));
    }
    out
}

/// Checks a method before it goes on the request line.
pub fn check_method(method: &str) -> Result<(), String> {
    if METHODS.contains(&method) {
        Ok(())
    } else {
        Err(format!("method \"{}\" is not one of {}", method.escape_default(), METHODS.join(", ")))
    }
}

/// Builds the URL and full header list of one attempt.
#[allow(clippy::too_many_arguments)]
pub fn finalize(
    kind: &str,
    url: &str,
    hashes: &[crate::rules::url_hash::HashSlot],
    stored_headers: &[(String, String)],
    body: Option<&str>,
    idempotency_key: &str,
    signing: &Signing,
    now_unix: i64,
) -> Result<Outgoing, String> {
    let mut headers: Vec<(String, String)> = vec![("User-Agent".into(), USER_AGENT.into())];
    let mut url = crate::rules::url_hash::expand(url, hashes, signing.secrets.first().map(String::as_str))?;
    if kind == "webhook" {
        headers.push(("Content-Type".into(), "application/json".into()));
        headers.push(("Idempotency-Key".into(), idempotency_key.into()));
    }
    if signing.scheme != "none" {
        let scheme = Scheme::parse(&signing.scheme).map_err(|e| e.to_string())?;
        if signing.secrets.is_empty() {
            return Err(format!(
                "endpoint signs with {} but has no live secret in postback.endpoint_secrets",
                signing.scheme
            ));
        }
        if kind == "webhook" {
            let payload = body.unwrap_or("");
            let signature = signing::sign_all(payload, &signing.secrets, scheme, Some(idempotency_key), now_unix)
                .map_err(|e| e.to_string())?;
            if scheme == Scheme::StandardWebhooks {
                headers.push(("webhook-id".into(), idempotency_key.into()));
                headers.push(("webhook-timestamp".into(), now_unix.to_string()));
            }
            let name = signing.header.clone().unwrap_or_else(|| scheme.default_header().to_string());
            headers.push((name, signature));
        } else {
            url = signing::sign_url(&url, &signing.secrets[0], scheme, now_unix, &signing.ts_param, &signing.sig_param)
                .map_err(|e| e.to_string())?;
        }
    }
    // the endpoint's own headers come last and win over the defaults above
    for (name, value) in stored_headers {
        check_header(name, value)?;
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        headers.push((name.clone(), value.clone()));
    }
    Ok(Outgoing { url, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(o: &'a Outgoing, name: &str) -> Option<&'a str> {
        o.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    #[test]
    fn webhook_gets_standard_webhooks_headers() {
        let s = Signing {
            scheme: "standard-webhooks".into(),
            secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
            ..Default::default()
        };
        let o =
            finalize("webhook", "https://n.test/h", &[], &[], Some("{}"), "1.2.sale.approved", &s, 1700000000).unwrap();
        assert_eq!(header(&o, "webhook-id"), Some("1.2.sale.approved"));
        assert_eq!(header(&o, "webhook-timestamp"), Some("1700000000"));
        assert_eq!(header(&o, "Idempotency-Key"), Some("1.2.sale.approved"));
        assert_eq!(header(&o, "Content-Type"), Some("application/json"));
        assert!(header(&o, "User-Agent").unwrap().starts_with("pg_postback/"));
        let sig = header(&o, "webhook-signature").unwrap();
        let ok = signing::verify(
            "{}",
            &s.secrets[0],
            Scheme::StandardWebhooks,
            sig,
            Some("1.2.sale.approved"),
            Some(1700000000),
            300,
            1700000000,
        );
        assert_eq!(ok, Ok(true));
    }

    #[test]
    fn header_name_override_and_endpoint_headers_win() {
        let s = Signing {
            scheme: "stripe".into(),
            secrets: vec!["k".into()],
            header: Some("X-Sig".into()),
            ..Default::default()
        };
        let o = finalize(
            "webhook",
            "https://n.test/h",
            &[],
            &[("user-agent".into(), "custom".into())],
            Some("{}"),
            "k",
            &s,
            5,
        )
        .unwrap();
        assert!(header(&o, "X-Sig").unwrap().starts_with("t=5,v1="));
        assert_eq!(header(&o, "User-Agent"), Some("custom"));
        assert_eq!(o.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("user-agent")).count(), 1);
    }

    #[test]
    fn postback_url_is_signed_with_query_parameters() {
        let s = Signing {
            scheme: "hmac-sha256-hex".into(),
            secrets: vec!["k".into()],
            ts_param: "ts".into(),
            sig_param: "sig".into(),
            header: None,
        };
        let o = finalize("postback", "https://n.test/pb?c=1", &[], &[], None, "k", &s, 7).unwrap();
        assert!(o.url.starts_with("https://n.test/pb?c=1&ts=7&sig="), "{}", o.url);
        assert_eq!(header(&o, "Idempotency-Key"), None);
    }

    #[test]
    fn framing_and_injected_headers_are_refused() {
        for (name, value) in [
            ("Host", "evil.test"),
            ("content-length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("Upgrade", "h2c"),
            ("TE", "trailers"),
            ("X-Key", "a\r\nX-Injected: 1"),
            ("X-Key", "a\nb"),
            ("X-Key", "a\0b"),
            ("X Key", "v"),
            ("X-Key:", "v"),
            ("", "v"),
            ("X-\r\nKey", "v"),
        ] {
            assert!(check_header(name, value).is_err(), "{name:?}: {value:?} accepted");
            let e = finalize(
                "postback",
                "https://n.test/",
                &[],
                &[(name.into(), value.into())],
                None,
                "k",
                &Signing { scheme: "none".into(), ..Default::default() },
                0,
            );
            assert!(e.is_err(), "{name:?} reached the wire");
        }
        assert!(check_header("Authorization", "Bearer abc\tdef").is_ok());
        let e = check_header("X-Api-Key", "secret-value\r\n").unwrap_err();
        assert!(!e.contains("secret-value"), "the value leaked into the error: {e}");
        assert!(check_method("GET").is_ok());
        assert!(check_method("GET / HTTP/1.1\r\nX: y").is_err());
        assert!(check_method("get").is_err());
    }

    #[test]
    fn hash_markers_are_computed_with_the_newest_secret() {
        let t = crate::rules::url_policy::validate_url_template(
            "https://n.test/pb?id={transaction_id}&v={hash:md5:transaction_id,':',attributes.snuid,':',currency,':',secret}",
        )
        .unwrap();
        let vars = serde_json::json!({"transaction_id": "tx-1", "currency": "EUR", "attributes": {"snuid": "u9"}});
        let (url, hashes) =
            crate::rules::template::render_url_hashed(&t, vars.as_object().unwrap(), Default::default()).unwrap();
        let s = Signing { scheme: "none".into(), secrets: vec!["k2".into(), "k1".into()], ..Default::default() };
        let o = finalize("postback", &url, &hashes, &[], None, "k", &s, 0).unwrap();
        // md5("tx-1:u9:EUR:k2")
        assert_eq!(o.url, "https://n.test/pb?id=tx-1&v=1cb5416805278a478e2115b6889bc9c1");
        let none = Signing { scheme: "none".into(), ..Default::default() };
        assert!(finalize("postback", &url, &hashes, &[], None, "k", &none, 0).unwrap_err().contains("no live secret"));
    }

    #[test]
    fn stored_headers_that_do_not_parse_are_an_error_not_an_empty_list() {
        assert_eq!(parse_stored_headers(r#"{"X-Key": "v"}"#).unwrap(), vec![("X-Key".to_string(), "v".to_string())]);
        for bad in ["[]", "\"x\"", r#"{"X-Key": 1}"#, r#"{"X-Key": "a\r\nb"}"#, "{", r#"{"Host": "x"}"#] {
            assert!(parse_stored_headers(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signing_without_a_secret_is_an_error() {
        let s = Signing { scheme: "github".into(), ..Default::default() };
        let e = finalize("webhook", "https://n.test/h", &[], &[], Some("{}"), "k", &s, 0).unwrap_err();
        assert!(e.contains("no live secret"), "{e}");
    }

    #[test]
    fn a_curl_command_quotes_every_argument_for_the_shell() {
        let headers = vec![("X-Signature".to_string(), "ab'cd".to_string())];
        let cmd = curl_command("POST", "https://p.example/h?a=1&b=2", &headers, Some("{\"n\": \"O'Brien\"}"), 10_000);
        assert_eq!(
            cmd,
            "curl --silent --show-error --include --request 'POST' 'https://p.example/h?a=1&b=2' --max-time 10 \\\n  \
             --header 'X-Signature: ab'\\''cd' \\\n  --data-binary '{\"n\": \"O'\\''Brien\"}'"
        );
        let get = curl_command("GET", "https://p.example/pb?c=$(id)", &[], None, 1500);
        assert_eq!(
            get,
            "curl --silent --show-error --include --request 'GET' 'https://p.example/pb?c=$(id)' --max-time 1.5"
        );
    }
}
