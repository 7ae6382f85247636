//! Signature schemes: sign and verify payloads exactly as receivers' libraries expect.
//!
//! | scheme               | header value                                                   | key                    |
//! |----------------------|----------------------------------------------------------------|------------------------|
//! | `hmac-sha256-hex`    | lower-case hex of HMAC-SHA256(payload)                         | secret bytes           |
//! | `hmac-sha256-base64` | base64 of the same (Shopify style)                             | secret bytes           |
//! | `github`             | `sha256=<hex>`                                                 | secret bytes           |
//! | `stripe`             | `t=<ts>,v1=<hex of HMAC over "<ts>.<payload>">`                | secret bytes as given  |
//! | `standard-webhooks`  | `v1,<base64 of HMAC over "<msg_id>.<ts>.<payload>">`           | base64 after `whsec_`  |

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    HmacHex,
    HmacBase64,
    Github,
    Stripe,
    StandardWebhooks,
}

pub const SCHEME_NAMES: &[&str] = &["hmac-sha256-hex", "hmac-sha256-base64", "github", "stripe", "standard-webhooks"];

/// Why a payload cannot be signed or verified (the scheme, the secret or a
/// missing input); it never quotes the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SignError {
    /// The input at fault: scheme, secret, msg_id or ts.
    pub argument: &'static str,
    pub message: String,
}

fn fail<T>(argument: &'static str, message: impl Into<String>) -> Result<T, SignError> {
    Err(SignError { argument, message: message.into() })
}

impl Scheme {
    pub fn parse(name: &str) -> Result<Scheme, SignError> {
        Ok(match name {
            "hmac-sha256-hex" => Scheme::HmacHex,
            "hmac-sha256-base64" => Scheme::HmacBase64,
            "github" => Scheme::Github,
            "stripe" => Scheme::Stripe,
            "standard-webhooks" => Scheme::StandardWebhooks,
            "none" => return fail("scheme", "signing scheme \"none\" does not sign"),
            other => {
                return fail(
                    "scheme",
                    format!("unknown signing scheme \"{other}\" (known: {})", SCHEME_NAMES.join(", ")),
                )
            }
        })
    }

    /// Whether the signed content carries a timestamp (and so needs replay protection).
    pub fn is_timestamped(self) -> bool {
        matches!(self, Scheme::Stripe | Scheme::StandardWebhooks)
    }

    /// The header a webhook signature travels in unless the endpoint names another.
    pub fn default_header(self) -> &'static str {
        match self {
            Scheme::HmacHex | Scheme::HmacBase64 => "X-Signature",
            Scheme::Github => "X-Hub-Signature-256",
            Scheme::Stripe => "Stripe-Signature",
            Scheme::StandardWebhooks => "webhook-signature",
        }
    }
}

/// Whether `secret` can sign with `scheme` (the error says why not, never quoting it).
pub fn check_secret(scheme: Scheme, secret: &str) -> Result<(), SignError> {
    key(scheme, secret).map(|_| ())
}

/// The HMAC key of a secret for a scheme.
fn key(scheme: Scheme, secret: &str) -> Result<Vec<u8>, SignError> {
    if secret.is_empty() {
        return fail("secret", "signing secret must not be empty");
    }
    if scheme != Scheme::StandardWebhooks {
        return Ok(secret.as_bytes().to_vec());
    }
    let encoded = secret
        .strip_prefix("whsec_")
        .map_or_else(|| fail("secret", "standard-webhooks secret must start with \"whsec_\""), Ok)?;
    match B64.decode(encoded) {
        Ok(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => fail("secret", "standard-webhooks secret must be \"whsec_\" followed by base64"),
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

fn require_msg_id(scheme: Scheme, msg_id: Option<&str>) -> Result<&str, SignError> {
    match msg_id {
        Some(id) if !id.is_empty() => Ok(id),
        _ if scheme == Scheme::StandardWebhooks => fail("msg_id", "standard-webhooks needs a message id (msg_id)"),
        _ => Ok(""),
    }
}

/// The bytes HMAC'd for a scheme.
fn signed_content(scheme: Scheme, payload: &str, msg_id: &str, ts: i64) -> Vec<u8> {
    match scheme {
        Scheme::Stripe => format!("{ts}.{payload}").into_bytes(),
        Scheme::StandardWebhooks => format!("{msg_id}.{ts}.{payload}").into_bytes(),
        _ => payload.as_bytes().to_vec(),
    }
}

/// Signs `payload`; returns the signature in the exact header format of the scheme.
pub fn sign(payload: &str, secret: &str, scheme: Scheme, msg_id: Option<&str>, ts: i64) -> Result<String, SignError> {
    let key = key(scheme, secret)?;
    let msg_id = require_msg_id(scheme, msg_id)?;
    let digest = mac(&key, &[&signed_content(scheme, payload, msg_id, ts)]).finalize().into_bytes();
    Ok(match scheme {
        Scheme::HmacHex => hex(&digest),
        Scheme::HmacBase64 => B64.encode(digest),
        Scheme::Github => format!("sha256={}", hex(&digest)),
        Scheme::Stripe => format!("t={ts},v1={}", hex(&digest)),
        Scheme::StandardWebhooks => format!("v1,{}", B64.encode(digest)),
    })
}

/// Signs with every secret and joins the results the way the scheme carries
/// several signatures (used while a key rotates). Schemes without a list form
/// sign with the first (newest) secret only.
pub fn sign_all(
    payload: &str,
    secrets: &[String],
    scheme: Scheme,
    msg_id: Option<&str>,
    ts: i64,
) -> Result<String, SignError> {
    let first = secrets.first().map_or_else(|| fail("secret", "no live signing secret"), Ok)?;
    match scheme {
        Scheme::StandardWebhooks => {
            Ok(secrets.iter().map(|s| sign(payload, s, scheme, msg_id, ts)).collect::<Result<Vec<_>, _>>()?.join(" "))
        }
        Scheme::Stripe => {
            let mut out = format!("t={ts}");
            for s in secrets {
                let sig = sign(payload, s, scheme, msg_id, ts)?;
                out.push_str(&sig[sig.find(",v1=").expect("stripe format")..]);
            }
            Ok(out)
        }
        _ => sign(payload, first, scheme, msg_id, ts),
    }
}

/// Verifies a signature header. Accepts when any of the signatures it holds
/// matches (key rotation); compares in constant time; for timestamped schemes
/// refuses timestamps further than `tolerance_secs` from `now`.
#[allow(clippy::too_many_arguments)] // the inputs a receiver has; a struct would only rename them
pub fn verify(
    payload: &str,
    secret: &str,
    scheme: Scheme,
    signature: &str,
    msg_id: Option<&str>,
    ts: Option<i64>,
    tolerance_secs: i64,
    now: i64,
) -> Result<bool, SignError> {
    let key = key(scheme, secret)?;
    let msg_id = require_msg_id(scheme, msg_id)?;
    let (ts, candidates): (i64, Vec<Vec<u8>>) = match scheme {
        Scheme::HmacHex => (0, signature.split_whitespace().filter_map(unhex).collect()),
        Scheme::HmacBase64 => (0, signature.split_whitespace().filter_map(|s| B64.decode(s).ok()).collect()),
        Scheme::Github => {
            (0, signature.split_whitespace().filter_map(|s| s.strip_prefix("sha256=").and_then(unhex)).collect())
        }
        Scheme::Stripe => {
            let mut t = None;
            let mut sigs = Vec::new();
            for item in signature.split(',') {
                match item.trim().split_once('=') {
                    Some(("t", v)) => t = v.parse::<i64>().ok(),
                    Some(("v1", v)) => sigs.extend(unhex(v)),
                    _ => {}
                }
            }
            match t {
                Some(t) => (t, sigs),
                None => return Ok(false),
            }
        }
        Scheme::StandardWebhooks => {
            let ts = ts.map_or_else(|| fail("ts", "standard-webhooks needs the timestamp (ts)"), Ok)?;
            (
                ts,
                signature
                    .split_whitespace()
                    .filter_map(|s| s.strip_prefix("v1,").and_then(|b| B64.decode(b).ok()))
                    .collect(),
            )
        }
    };
    if scheme.is_timestamped() && (now - ts).abs() > tolerance_secs {
        return Ok(false);
    }
    let content = signed_content(scheme, payload, msg_id, ts);
    Ok(candidates.iter().any(|c| mac(&key, &[&content]).verify_slice(c).is_ok()))
}

/// Signs a GET postback URL: appends `ts_param=<ts>` and then `sig_param=<sig>`,
/// the signature being HMAC-SHA256 over the whole URL up to (not including)
/// `&sig_param=`.
pub fn sign_url(
    url: &str,
    secret: &str,
    scheme: Scheme,
    ts: i64,
    ts_param: &str,
    sig_param: &str,
) -> Result<String, SignError> {
    let (base, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let with_ts = format!("{base}{sep}{ts_param}={ts}");
    let sig = match scheme {
        Scheme::HmacHex | Scheme::HmacBase64 => sign(&with_ts, secret, scheme, None, ts)?,
        _ => return fail("scheme", "postback URLs are signed with hmac-sha256-hex or hmac-sha256-base64"),
    };
    let mut out = format!("{with_ts}&{sig_param}={}", crate::rules::text::encode_component(&sig));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Public vectors, ../shared/signing-vectors.md
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: i64 = 1614265330;
    const SW_PAYLOAD: &str = r#"{"test": 2432232314}"#;
    const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    const GH_SECRET: &str = "It's a Secret to Everybody";
    const GH_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn standard_webhooks_vector() {
        let sig = sign(SW_PAYLOAD, SW_SECRET, Scheme::StandardWebhooks, Some(SW_ID), SW_TS).unwrap();
        assert_eq!(sig, SW_SIG);
        let ok = |sig: &str, now| {
            verify(SW_PAYLOAD, SW_SECRET, Scheme::StandardWebhooks, sig, Some(SW_ID), Some(SW_TS), 300, now)
        };
        assert_eq!(ok(SW_SIG, SW_TS), Ok(true));
        assert_eq!(ok(&format!("v1,bm90IHRoaXM= {SW_SIG}"), SW_TS + 299), Ok(true));
        assert_eq!(ok(SW_SIG, SW_TS + 301), Ok(false), "replay outside tolerance");
        assert_eq!(ok(SW_SIG, SW_TS - 301), Ok(false), "timestamp from the future");
        assert_eq!(ok("v1,bm90IHRoaXM=", SW_TS), Ok(false));
        let tampered = verify(
            r#"{"test": 2432232315}"#,
            SW_SECRET,
            Scheme::StandardWebhooks,
            SW_SIG,
            Some(SW_ID),
            Some(SW_TS),
            300,
            SW_TS,
        );
        assert_eq!(tampered, Ok(false));
    }

    #[test]
    fn github_vector() {
        assert_eq!(sign("Hello, World!", GH_SECRET, Scheme::Github, None, 0).unwrap(), GH_SIG);
        assert_eq!(verify("Hello, World!", GH_SECRET, Scheme::Github, GH_SIG, None, None, 300, 0), Ok(true));
        assert_eq!(verify("Hello, World?", GH_SECRET, Scheme::Github, GH_SIG, None, None, 300, 0), Ok(false));
    }

    #[test]
    fn hex_and_base64_are_the_same_mac() {
        let hex_sig = sign("Hello, World!", GH_SECRET, Scheme::HmacHex, None, 0).unwrap();
        assert_eq!(format!("sha256={hex_sig}"), GH_SIG);
        let b64 = sign("Hello, World!", GH_SECRET, Scheme::HmacBase64, None, 0).unwrap();
        assert_eq!(B64.decode(&b64).unwrap(), unhex(&hex_sig).unwrap());
        assert_eq!(verify("Hello, World!", GH_SECRET, Scheme::HmacBase64, &b64, None, None, 300, 0), Ok(true));
        assert_eq!(
            verify("Hello, World!", GH_SECRET, Scheme::HmacHex, &hex_sig.to_uppercase(), None, None, 300, 0),
            Ok(true)
        );
    }

    #[test]
    fn stripe_signs_timestamp_dot_payload_with_the_secret_as_given() {
        let sig = sign("{}", "whsec_abc", Scheme::Stripe, None, 1700000000).unwrap();
        let expected = hex(&mac(b"whsec_abc", &[b"1700000000.{}"]).finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000,v1={expected}"));
        assert_eq!(verify("{}", "whsec_abc", Scheme::Stripe, &sig, None, None, 300, 1700000100), Ok(true));
        assert_eq!(verify("{}", "whsec_abc", Scheme::Stripe, &sig, None, None, 300, 1700000400), Ok(false));
        assert_eq!(verify("{}", "whsec_abc", Scheme::Stripe, "v1=00", None, None, 300, 1700000000), Ok(false));
    }

    #[test]
    fn rotation_signs_with_every_live_secret() {
        let secrets = vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string(), "whsec_c2Vjb25k".to_string()];
        let header = sign_all(SW_PAYLOAD, &secrets, Scheme::StandardWebhooks, Some(SW_ID), SW_TS).unwrap();
        assert_eq!(header.split(' ').count(), 2);
        for s in &secrets {
            assert_eq!(
                verify(SW_PAYLOAD, s, Scheme::StandardWebhooks, &header, Some(SW_ID), Some(SW_TS), 300, SW_TS),
                Ok(true)
            );
        }
        let stripe = sign_all("{}", &["a".into(), "b".into()], Scheme::Stripe, None, 5).unwrap();
        assert!(stripe.starts_with("t=5,v1=") && stripe.matches(",v1=").count() == 2, "{stripe}");
        assert_eq!(verify("{}", "b", Scheme::Stripe, &stripe, None, None, 300, 5), Ok(true));
        assert!(sign_all("{}", &[], Scheme::Github, None, 0).is_err());
    }

    #[test]
    fn errors_are_clear_and_name_their_input() {
        let e = |r: Result<String, SignError>| r.map(|_| ()).unwrap_err();
        let s = Scheme::parse("md5").unwrap_err();
        assert!(s.argument == "scheme" && s.message.contains("unknown signing scheme \"md5\""), "{s:?}");
        assert!(Scheme::parse("none").unwrap_err().message.contains("does not sign"));
        assert_eq!(e(sign("x", "", Scheme::HmacHex, None, 0)).argument, "secret");
        assert!(e(sign("x", "MfKQ", Scheme::StandardWebhooks, Some("m"), 0)).message.contains("whsec_"));
        assert!(e(sign("x", "whsec_!!!", Scheme::StandardWebhooks, Some("m"), 0)).message.contains("base64"));
        let m = e(sign("x", SW_SECRET, Scheme::StandardWebhooks, None, 0));
        assert!(m.argument == "msg_id" && m.message.contains("message id"), "{m:?}");
        let t = verify("x", SW_SECRET, Scheme::StandardWebhooks, SW_SIG, Some("m"), None, 300, 0).unwrap_err();
        assert!(t.argument == "ts" && t.message.contains("timestamp"), "{t:?}");
    }

    #[test]
    fn url_signature_covers_the_url_with_its_timestamp() {
        let signed = sign_url("https://n.test/pb?cid=1#f", "k", Scheme::HmacHex, 1700000000, "ts", "sig").unwrap();
        let (base, rest) = signed.split_once("&sig=").unwrap();
        assert_eq!(base, "https://n.test/pb?cid=1&ts=1700000000");
        let sig = rest.strip_suffix("#f").unwrap();
        assert_eq!(verify(base, "k", Scheme::HmacHex, sig, None, None, 300, 0), Ok(true));
        let bare = sign_url("https://n.test/pb", "k", Scheme::HmacHex, 1, "t", "s").unwrap();
        assert!(bare.starts_with("https://n.test/pb?t=1&s="));
        assert!(sign_url("https://n.test/", "k", Scheme::Stripe, 1, "t", "s").is_err());
    }
}
