//! The last step before sending (pure): signature headers, signed postback
//! URLs and the fixed headers every request carries. Done at send time, not at
//! enqueue, so that a retry hours later carries a fresh timestamp.

use crate::signing::{self, Scheme};

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

/// Builds the URL and full header list of one attempt.
#[allow(clippy::too_many_arguments)]
pub fn finalize(
    kind: &str,
    url: &str,
    stored_headers: &[(String, String)],
    body: Option<&str>,
    idempotency_key: &str,
    signing: &Signing,
    now_unix: i64,
) -> Result<Outgoing, String> {
    let mut headers: Vec<(String, String)> = vec![("User-Agent".into(), USER_AGENT.into())];
    let mut url = url.to_string();
    if kind == "webhook" {
        headers.push(("Content-Type".into(), "application/json".into()));
        headers.push(("Idempotency-Key".into(), idempotency_key.into()));
    }
    if signing.scheme != "none" {
        let scheme = Scheme::parse(&signing.scheme).map_err(|e| e.to_string())?;
        if signing.secrets.is_empty() {
            return Err(format!("endpoint signs with {} but has no live secret in postback.endpoint_secrets", signing.scheme));
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
        let o = finalize("webhook", "https://n.test/h", &[], Some("{}"), "1.2.sale.approved", &s, 1700000000).unwrap();
        assert_eq!(header(&o, "webhook-id"), Some("1.2.sale.approved"));
        assert_eq!(header(&o, "webhook-timestamp"), Some("1700000000"));
        assert_eq!(header(&o, "Idempotency-Key"), Some("1.2.sale.approved"));
        assert_eq!(header(&o, "Content-Type"), Some("application/json"));
        assert!(header(&o, "User-Agent").unwrap().starts_with("pg_postback/"));
        let sig = header(&o, "webhook-signature").unwrap();
        let ok = signing::verify("{}", &s.secrets[0], Scheme::StandardWebhooks, sig, Some("1.2.sale.approved"), Some(1700000000), 300, 1700000000);
        assert_eq!(ok, Ok(true));
    }

    #[test]
    fn header_name_override_and_endpoint_headers_win() {
        let s = Signing { scheme: "stripe".into(), secrets: vec!["k".into()], header: Some("X-Sig".into()), ..Default::default() };
        let o = finalize("webhook", "https://n.test/h", &[("user-agent".into(), "custom".into())], Some("{}"), "k", &s, 5).unwrap();
        assert!(header(&o, "X-Sig").unwrap().starts_with("t=5,v1="));
        assert_eq!(header(&o, "User-Agent"), Some("custom"));
        assert_eq!(o.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("user-agent")).count(), 1);
    }

    #[test]
    fn postback_url_is_signed_with_query_parameters() {
        let s = Signing { scheme: "hmac-sha256-hex".into(), secrets: vec!["k".into()], ts_param: "ts".into(), sig_param: "sig".into(), header: None };
        let o = finalize("postback", "https://n.test/pb?c=1", &[], None, "k", &s, 7).unwrap();
        assert!(o.url.starts_with("https://n.test/pb?c=1&ts=7&sig="), "{}", o.url);
        assert_eq!(header(&o, "Idempotency-Key"), None);
    }

    #[test]
    fn signing_without_a_secret_is_an_error() {
        let s = Signing { scheme: "github".into(), ..Default::default() };
        let e = finalize("webhook", "https://n.test/h", &[], Some("{}"), "k", &s, 0).unwrap_err();
        assert!(e.contains("no live secret"), "{e}");
    }
}
