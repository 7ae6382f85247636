//! What an operator gives an endpoint, checked field by field: each function
//! is the one definition of its field's rule and refuses with a [`Refusal`]
//! that names the field (the SQL validators and CHECK constraints call these).

use serde_json::Value;

use crate::rules::refusal::{Kind, Refusal};
use crate::rules::signing::{Scheme, SCHEME_NAMES};
use crate::rules::template::{self, Template};

/// An endpoint's url_template: its syntax and its literal origin.
pub fn url_template(text: &str) -> Result<Template, Refusal> {
    crate::rules::url_policy::validate_url_template(text).map_err(|e| {
        Refusal::invalid("url_template", e).hint(
            "Write the scheme and host literally (https://partner.example/…) and put {variables} in the path, \
             query or fragment; see postback.preview() for what a conversion would send.",
        )
    })
}

/// A webhook's body_template: JSON whose strings are templates.
pub fn body_template(body: &Value) -> Result<(), Refusal> {
    template::validate_body_template(body).map_err(|e| Refusal::invalid("body_template", e))
}

/// An endpoint's headers: a JSON object of header name to string value.
pub fn headers(headers: &Value) -> Result<(), Refusal> {
    let hint = "headers is a JSON object such as {\"Authorization\": \"Bearer …\"}";
    let Value::Object(map) = headers else {
        return Err(Refusal::invalid("headers", "must be a JSON object of header name to string value").hint(hint));
    };
    for (name, value) in map {
        let Value::String(value) = value else {
            let why = format!("the value of \"{}\" must be a string", name.escape_default());
            return Err(Refusal::invalid("headers", why).hint(hint));
        };
        crate::rules::outgoing::check_header(name, value).map_err(|e| Refusal::invalid("headers", e))?;
    }
    Ok(())
}

/// A success_body_pattern: a regular expression once its {variables} are
/// filled (checked with sample values; each delivery fills its own).
pub fn success_pattern(pattern: &str) -> Result<(), Refusal> {
    let filled = template::pattern::render_pattern(pattern, &template::sample_vars());
    regex::Regex::new(&filled).map(|_| ()).map_err(|e| {
        Refusal::new(
            Kind::InvalidValue,
            "success_body_pattern",
            format!("invalid regular expression in success_body_pattern: {e}"),
        )
    })
}

/// success_statuses / retry_statuses (`column`): codes 100-599 and ranges such as 200-302.
pub fn statuses(items: &[Option<String>], column: &str) -> Result<Vec<(u16, u16)>, Refusal> {
    let items: Vec<String> = items
        .iter()
        .map(|s| s.clone().ok_or_else(|| Refusal::invalid(column, "the list holds NULL")))
        .collect::<Result<_, _>>()?;
    crate::rules::retry::parse_statuses(&items, column).map_err(|e| {
        Refusal::new(Kind::InvalidValue, column, format!("invalid {e}")).hint("e.g. ARRAY['200-299', '302']")
    })
}

/// An endpoint's partners: NULL (every partner, not checked here) or a non-empty list of names.
pub fn partners(partners: &[Option<String>]) -> Result<(), Refusal> {
    if partners.is_empty() {
        return Err(Refusal::invalid("partners", "the list is empty (use NULL for every partner)"));
    }
    for p in partners {
        let Some(p) = p else { return Err(Refusal::invalid("partners", "the list holds NULL")) };
        crate::rules::routing::check_partner(p)
            .map_err(|e| Refusal::invalid("partners", format!("\"{}\" {e}", p.escape_default())))?;
    }
    Ok(())
}

/// An endpoint's conditions: a JSON object the conversion's attributes must contain.
pub fn conditions(conditions: &Value) -> Result<(), Refusal> {
    crate::rules::routing::check_conditions(conditions).map_err(|e| Refusal::invalid("conditions", e))
}

/// A signing scheme's name.
pub fn scheme(name: &str) -> Result<Scheme, Refusal> {
    Scheme::parse(name).map_err(|e| {
        Refusal::new(Kind::InvalidValue, "scheme", e.message)
            .argument()
            .hint(format!("one of {}", SCHEME_NAMES.join(", ")))
    })
}

/// An endpoint's status_map: known conversion statuses to the text the
/// partner expects (a number is sent as its text).
pub fn status_map(map: &Value) -> Result<(), Refusal> {
    use crate::rules::conversion_rules::STATUSES;
    let hint = format!("e.g. {{\"approved\": \"1\", \"reversed\": \"2\"}}; the statuses are {}", STATUSES.join(", "));
    let Value::Object(map) = map else {
        return Err(Refusal::invalid("status_map", "must be a JSON object of status to value").hint(hint));
    };
    for (status, value) in map {
        if !STATUSES.contains(&status.as_str()) {
            let why =
                format!("\"{}\" is not a conversion status (one of {})", status.escape_default(), STATUSES.join(", "));
            return Err(Refusal::invalid("status_map", why).hint(hint));
        }
        if !matches!(value, Value::String(_) | Value::Number(_)) {
            let why = format!("the value of \"{status}\" must be a string or a number (got {value})");
            return Err(Refusal::invalid("status_map", why).hint(hint));
        }
    }
    Ok(())
}

/// An endpoint's events: NULL (every event, not checked here) or a non-empty
/// list of event names as conversions spell them.
pub fn events(events: &[Option<String>]) -> Result<(), Refusal> {
    let hint =
        "Events are written as conversions.event is: 1 to 64 of a-z, 0-9, '_', '.', '-'; NULL fires for every event.";
    if events.is_empty() {
        return Err(Refusal::invalid("events", "the list is empty (use NULL for every event)").hint(hint));
    }
    for e in events {
        let Some(e) = e else { return Err(Refusal::invalid("events", "the list holds NULL").hint(hint)) };
        if !crate::rules::conversion_rules::event_ok(e) {
            let why = format!("\"{}\" can never match a conversion's event", e.escape_default());
            return Err(Refusal::invalid("events", why).hint(hint));
        }
    }
    Ok(())
}

/// An endpoint's enumerated settings, each one of its valid values (refused
/// here, naming the column and the values, before a CHECK constraint would
/// answer with the whole row).
pub fn endpoint_choices(
    kind: &str,
    method: &str,
    signing_scheme: &str,
    statuses: Option<&[Option<String>]>,
) -> Result<(), Refusal> {
    use crate::rules::outgoing::{KINDS, METHODS};
    let one_of = |column: &str, value: &str, valid: &[&str]| {
        if valid.contains(&value) {
            Ok(())
        } else {
            Err(Refusal::invalid(column, format!("\"{}\" is not one of {}", value.escape_default(), valid.join(", "))))
        }
    };
    one_of("kind", kind, KINDS)?;
    one_of("method", method, METHODS)?;
    let mut schemes = vec!["none"];
    schemes.extend(SCHEME_NAMES);
    one_of("signing_scheme", signing_scheme, &schemes)?;
    for status in statuses.unwrap_or_default() {
        let Some(status) = status else { return Err(Refusal::invalid("statuses", "the list holds NULL")) };
        one_of("statuses", status, crate::rules::conversion_rules::STATUSES)?;
    }
    Ok(())
}

/// An endpoint's other bounded settings, as SQL reads them (intervals in
/// seconds); a value that is NULL here is left to its NOT NULL constraint.
#[derive(Debug, Default, Clone, Copy)]
pub struct EndpointSettings<'a> {
    pub name: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub signing_scheme: Option<&'a str>,
    pub retry_schedule_secs: Option<&'a [Option<f64>]>,
    pub max_attempts: Option<i32>,
    pub max_age_secs: Option<f64>,
    pub timeout_secs: Option<f64>,
    pub max_in_flight: Option<i32>,
    pub rate_limit: Option<f64>,
    pub initial_delay_secs: Option<f64>,
    pub signature_header: Option<&'a str>,
    pub timestamp_param: Option<&'a str>,
    pub signature_param: Option<&'a str>,
    pub has_body_template: bool,
}

/// Each of an endpoint's bounded settings within its bounds, refused naming the
/// column, the bounds and the value given (never the whole row).
pub fn endpoint_settings(e: &EndpointSettings) -> Result<(), Refusal> {
    let within = |column: &str, value: Option<f64>, lo: f64, hi: f64, bounds: &str| match value {
        Some(v) if v.is_nan() || v < lo || v > hi => Err(Refusal::invalid(column, format!("{v} is outside {bounds}"))),
        _ => Ok(()),
    };
    if let Some(name) = e.name {
        let n = name.chars().count();
        if n == 0 || n > 100 || name.chars().any(char::is_control) {
            let why = format!("must be 1 to 100 characters without control characters (got {n})");
            return Err(Refusal::invalid("name", why));
        }
    }
    for (i, step) in e.retry_schedule_secs.unwrap_or_default().iter().enumerate() {
        match step {
            Some(s) if *s > 0.0 => {}
            Some(s) => {
                return Err(Refusal::invalid(
                    "retry_schedule",
                    format!("step {} is {s} s; every step must be positive", i + 1),
                ))
            }
            None => return Err(Refusal::invalid("retry_schedule", format!("step {} is NULL", i + 1))),
        }
    }
    within("max_attempts", e.max_attempts.map(f64::from), 1.0, 100.0, "1 to 100")?;
    within("max_age", e.max_age_secs, f64::MIN_POSITIVE, f64::MAX, "a positive interval (seconds)")?;
    within("timeout", e.timeout_secs, 0.001, 300.0, "1 millisecond to 5 minutes (seconds)")?;
    within("max_in_flight", e.max_in_flight.map(f64::from), 1.0, 256.0, "1 to 256")?;
    within("rate_limit", e.rate_limit, f64::MIN_POSITIVE, 100_000.0, "above 0 and up to 100000 requests per second")?;
    within("initial_delay", e.initial_delay_secs, 0.0, 86_400.0, "0 to 1 day (seconds)")?;
    if let Some(h) = e.signature_header {
        if h.is_empty() || h.len() > 100 || !h.chars().all(crate::rules::outgoing::is_token_char) {
            let why =
                format!("\"{}\" is not a header name (1 to 100 of A-Z a-z 0-9 !#$%&'*+-.^_`|~)", h.escape_default());
            return Err(Refusal::invalid("signature_header", why));
        }
    }
    for (column, value) in [("timestamp_param", e.timestamp_param), ("signature_param", e.signature_param)] {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '~' | '-');
        if let Some(v) = value.filter(|v| v.is_empty() || v.len() > 50 || !v.chars().all(plain)) {
            let why = format!(
                "\"{}\" is not a plain query parameter name (1 to 50 of A-Z a-z 0-9 _ . ~ -)",
                v.escape_default()
            );
            return Err(Refusal::invalid(column, why));
        }
    }
    if e.kind == Some("postback") {
        if let Some(s) = e.signing_scheme.filter(|s| !matches!(*s, "none" | "hmac-sha256-hex" | "hmac-sha256-base64")) {
            let why = format!("a postback (GET) is signed with hmac-sha256-hex or hmac-sha256-base64, not \"{s}\"");
            return Err(
                Refusal::invalid("signing_scheme", why).hint("Webhooks take every scheme: set kind = 'webhook'.")
            );
        }
        if e.has_body_template {
            return Err(Refusal::invalid("body_template", "only a webhook has a body (kind = 'webhook')"));
        }
    }
    Ok(())
}

/// A secret for an endpoint that signs with `scheme` (`none`: a secret for
/// `{hash:…}` digests, any non-empty text). The message never quotes it.
pub fn secret(scheme: &str, secret: &str) -> Result<(), Refusal> {
    let scheme = match scheme {
        "none" => crate::rules::signing::Scheme::HmacHex,
        other => Scheme::parse(other).map_err(|e| Refusal::new(Kind::InvalidValue, "secret", e.message))?,
    };
    crate::rules::signing::check_secret(scheme, secret).map_err(|e| {
        let hint = match scheme {
            Scheme::StandardWebhooks => "A standard-webhooks secret is \"whsec_\" followed by base64 of 24 to 64 random bytes, e.g. 'whsec_' || encode(gen_random_bytes(32), 'base64') with pgcrypto.",
            _ => "Use the secret the partner gave you, as text.",
        };
        Refusal::new(Kind::InvalidValue, "secret", format!("invalid secret: {}", e.message)).hint(hint)
    })
}

/// A JSON value (as text) nesting at most `MAX_JSON_NESTING` deep; `column`
/// is named. A CHECK constraint: the value is refused when its row is
/// written, never when a later import reads it.
pub fn nesting(value: &str, column: &str) -> Result<(), Refusal> {
    crate::rules::conversion_rules::check_nesting(value, column).map_err(|e| {
        Refusal::new(Kind::CheckViolation, column, e)
            .hint("Store deeply nested data elsewhere; attributes are read by routing and templates.")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused<T: std::fmt::Debug>(r: Result<T, Refusal>) -> Refusal {
        r.expect_err("must be refused")
    }

    #[test]
    fn each_field_names_itself_and_its_kind() {
        let r = refused(url_template("https://{click_id}.example/x"));
        assert_eq!((r.kind, r.field.as_str()), (Kind::InvalidValue, "url_template"));
        assert!(r.message.starts_with("invalid url_template: ") && r.hint.is_some(), "{r:?}");
        assert_eq!(refused(body_template(&json!({"a": "{nope"}))).field, "body_template");
        assert_eq!(
            refused(conditions(&json!({}))).message,
            "invalid conditions: must not be empty (use NULL for no condition)"
        );
        assert_eq!(refused(scheme("md5")).field, "scheme");
        assert!(refused(scheme("md5")).hint.unwrap().contains("standard-webhooks"));
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        let r = refused(nesting(&deep, "conversions.attributes"));
        assert_eq!((r.kind, r.field.as_str()), (Kind::CheckViolation, "conversions.attributes"));
        assert!(nesting("[[1]]", "x").is_ok() && url_template("https://p.example/?c={click_id}").is_ok());
    }

    #[test]
    fn status_maps_name_known_statuses_and_events_are_spelled_as_conversions_spell_them() {
        assert!(status_map(&json!({"approved": "1", "reversed": 2})).is_ok());
        let r = refused(status_map(&json!({"aproved": "1"})));
        assert!(r.message.contains("\"aproved\" is not a conversion status (one of pending, approved"), "{r:?}");
        assert!(refused(status_map(&json!({"approved": null}))).message.contains("string or a number (got null)"));
        assert!(refused(status_map(&json!({"approved": {"x": 1}}))).message.contains("string or a number"));
        assert!(refused(status_map(&json!([1]))).message.contains("JSON object"));
        assert!(events(&[Some("sale".into()), Some("first_deposit".into())]).is_ok());
        assert!(refused(events(&[Some("Sale".into())])).message.contains("\"Sale\" can never match"));
        assert!(refused(events(&[])).message.contains("use NULL for every event"));
        assert_eq!(refused(events(&[None])).field, "events");
    }

    #[test]
    fn enumerated_settings_name_the_column_and_the_valid_values() {
        assert!(endpoint_choices("webhook", "POST", "github", Some(&[Some("approved".into())])).is_ok());
        assert_eq!(
            refused(endpoint_choices("sms", "GET", "none", None)).message,
            "invalid kind: \"sms\" is not one of postback, webhook"
        );
        assert_eq!(
            refused(endpoint_choices("postback", "DELETE", "none", None)).message,
            "invalid method: \"DELETE\" is not one of GET, POST, PUT, PATCH"
        );
        assert!(refused(endpoint_choices("webhook", "POST", "md5", None)).message.contains("none, hmac-sha256-hex"));
        let r = refused(endpoint_choices("postback", "GET", "none", Some(&[Some("paid".into())])));
        assert_eq!(
            r.message,
            "invalid statuses: \"paid\" is not one of pending, approved, rejected, reversed, refunded, chargeback"
        );
    }

    #[test]
    fn bounded_settings_name_the_column_the_bounds_and_the_value() {
        let ok = EndpointSettings {
            name: Some("n"),
            kind: Some("postback"),
            signing_scheme: Some("none"),
            ..Default::default()
        };
        assert!(endpoint_settings(&ok).is_ok());
        let r = refused(endpoint_settings(&EndpointSettings { timeout_secs: Some(600.0), ..ok }));
        assert_eq!(r.message, "invalid timeout: 600 is outside 1 millisecond to 5 minutes (seconds)");
        let r = refused(endpoint_settings(&EndpointSettings { max_attempts: Some(0), ..ok }));
        assert_eq!(r.message, "invalid max_attempts: 0 is outside 1 to 100");
        let steps = [Some(60.0), Some(-1.0)];
        let r = refused(endpoint_settings(&EndpointSettings { retry_schedule_secs: Some(&steps), ..ok }));
        assert_eq!(r.message, "invalid retry_schedule: step 2 is -1 s; every step must be positive");
        let r = refused(endpoint_settings(&EndpointSettings { rate_limit: Some(0.0), ..ok }));
        assert_eq!(r.field, "rate_limit");
        let r = refused(endpoint_settings(&EndpointSettings { signing_scheme: Some("stripe"), ..ok }));
        assert!(r.message.contains("hmac-sha256-hex or hmac-sha256-base64, not \"stripe\"") && r.hint.is_some());
        let r = refused(endpoint_settings(&EndpointSettings { has_body_template: true, ..ok }));
        assert_eq!(r.field, "body_template");
        let r = refused(endpoint_settings(&EndpointSettings { signature_header: Some("X Sig"), ..ok }));
        assert_eq!(r.field, "signature_header");
        let r = refused(endpoint_settings(&EndpointSettings { timestamp_param: Some("t&s"), ..ok }));
        assert_eq!(r.field, "timestamp_param");
        assert_eq!(refused(endpoint_settings(&EndpointSettings { name: Some(""), ..ok })).field, "name");
        let webhook =
            EndpointSettings { kind: Some("webhook"), signing_scheme: Some("stripe"), has_body_template: true, ..ok };
        assert!(endpoint_settings(&webhook).is_ok());
    }

    #[test]
    fn a_secret_must_fit_its_endpoints_scheme_and_is_never_quoted() {
        assert!(secret("hmac-sha256-hex", "my-plain-secret").is_ok());
        assert!(secret("none", "k").is_ok());
        assert!(secret("standard-webhooks", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        let r = refused(secret("standard-webhooks", "my-plain-secret"));
        assert_eq!((r.kind, r.field.as_str()), (Kind::InvalidValue, "secret"));
        assert!(r.message.contains("whsec_") && !r.message.contains("my-plain-secret"), "{r:?}");
        assert!(r.hint.unwrap().contains("base64"));
        assert!(refused(secret("github", "")).message.contains("must not be empty"));
        assert!(crate::rules::outgoing::needs_secret("github", "https://p.example/"));
        assert!(crate::rules::outgoing::needs_secret("none", "https://p.example/?s={hash:sha256:click_id,secret}"));
        assert!(!crate::rules::outgoing::needs_secret("none", "https://p.example/?c={click_id}"));
    }

    #[test]
    fn headers_are_an_object_of_strings_with_token_names() {
        assert!(headers(&json!({"Authorization": "Bearer x", "X-Tab": "a\tb"})).is_ok());
        assert!(refused(headers(&json!(["a"]))).message.contains("JSON object"));
        assert!(refused(headers(&json!({"X-N": 1}))).message.contains("\"X-N\" must be a string"));
        assert!(refused(headers(&json!({"Bad Name": "v"}))).message.contains("not an HTTP token"));
        let r = refused(headers(&json!({"X-Key": "secret\r\nInjected: 1"})));
        assert!(r.message.contains("control character") && !r.message.contains("secret"), "{r:?}");
    }

    #[test]
    fn status_lists_and_partner_lists_refuse_null_and_empty() {
        assert_eq!(statuses(&[Some("200-302".into())], "success_statuses").unwrap(), vec![(200, 302)]);
        assert_eq!(refused(statuses(&[None], "retry_statuses")).message, "invalid retry_statuses: the list holds NULL");
        let r = refused(statuses(&[Some("99".into())], "success_statuses"));
        assert!(r.message.starts_with("invalid success_statuses: \"99\""), "{r:?}");
        assert!(refused(partners(&[])).message.contains("use NULL for every partner"));
        assert_eq!(refused(partners(&[None])).message, "invalid partners: the list holds NULL");
        assert!(refused(partners(&[Some("a\u{7}".into())])).message.contains("U+0007"));
        assert!(partners(&[Some("acme".into())]).is_ok());
        assert!(success_pattern("\"ok\":\\s*true").is_ok());
        assert_eq!(refused(success_pattern("(")).field, "success_body_pattern");
    }
}
