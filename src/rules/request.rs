//! Turning one conversion and one endpoint into the request to send (pure).

use std::borrow::Cow;

use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::rules::template::{self, RenderOptions, Template, Vars};

/// Default longest URL a delivery may have (`postback.max_url_bytes`);
/// receivers and proxies refuse longer ones.
pub const MAX_URL_BYTES: usize = 16_384;
/// Default longest webhook body (`postback.max_body_bytes`).
pub const MAX_BODY_BYTES: usize = 262_144;

/// Size limits a rendered request must respect; over them the delivery is
/// dead with the reason (never truncated).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub url_bytes: usize,
    pub body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { url_bytes: MAX_URL_BYTES, body_bytes: MAX_BODY_BYTES }
    }
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The conversion fields templates can use.
#[derive(Debug, Clone)]
pub struct Conversion<'a> {
    pub id: i64,
    pub click_id: &'a str,
    pub transaction_id: &'a str,
    pub event: &'a str,
    pub status: &'a str,
    /// numeric as text, so 12.50 stays 12.50
    pub amount: Option<&'a str>,
    pub currency: Option<&'a str>,
    pub attributes: Map<String, Value>,
    pub occurred_at_unix_micros: i64,
    /// the network or affiliate the conversion came from
    pub partner: Option<&'a str>,
    /// the click it converts, when postback.clicks knows it
    pub click: Option<Click>,
}

/// A recorded click: the sub-ids the network passed, for `{click.KEY}`.
#[derive(Debug, Clone, Default)]
pub struct Click {
    pub attributes: Map<String, Value>,
    pub clicked_at_unix_micros: i64,
}

/// The endpoint settings that shape a request.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub url_template: &'a Template,
    /// the template passed validation and inserts nothing raw, so every
    /// rendering is a valid URL and need not be parsed again
    pub url_template_trusted: bool,
    pub body_template: Option<&'a Value>,
    pub status_map: Option<&'a Map<String, Value>>,
    pub drop_empty_params: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub url: String,
    pub body: Option<String>,
    /// where the URL's `{hash:…}` digests go (computed at send time with the secret)
    pub hashes: Vec<crate::rules::url_hash::HashSlot>,
}

/// `2024-03-01T12:34:56Z` (or with `.123456` when there are fractional seconds).
pub fn iso_utc(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if micros == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{micros:06}Z")
    }
}

fn amount_value(amount: Option<&str>) -> Value {
    match amount {
        Some(a) => a.parse::<Number>().map(Value::Number).unwrap_or_else(|_| Value::String(a.to_string())),
        None => Value::Null,
    }
}

/// The variables of one conversion as one endpoint sees them (status mapped).
pub struct ConversionVars<'a> {
    conv: &'a Conversion<'a>,
    endpoint: &'a str,
    status: Cow<'a, str>,
}

impl<'a> ConversionVars<'a> {
    pub fn new(conv: &'a Conversion<'a>, endpoint: &Endpoint<'a>) -> ConversionVars<'a> {
        let status = match endpoint.status_map.and_then(|m| m.get(conv.status)) {
            Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
            Some(v) if !v.is_null() => Cow::Owned(v.to_string()),
            _ => Cow::Borrowed(conv.status),
        };
        ConversionVars { conv, endpoint: endpoint.name, status }
    }

    /// The same variables as a JSON object (for body templates, which keep types).
    pub fn to_map(&self) -> Map<String, Value> {
        let c = self.conv;
        let mut vars = Map::new();
        vars.insert("click_id".into(), c.click_id.into());
        vars.insert("transaction_id".into(), c.transaction_id.into());
        vars.insert("event".into(), c.event.into());
        vars.insert("status".into(), self.status.as_ref().into());
        vars.insert("amount".into(), amount_value(c.amount));
        vars.insert("currency".into(), c.currency.map_or(Value::Null, Value::from));
        vars.insert("occurred_at".into(), iso_utc(c.occurred_at_unix_micros).into());
        vars.insert("occurred_at_unix".into(), c.occurred_at_unix_micros.div_euclid(1_000_000).into());
        vars.insert("conversion_id".into(), c.id.into());
        vars.insert("endpoint".into(), self.endpoint.into());
        vars.insert("attributes".into(), Value::Object(c.attributes.clone()));
        vars.insert("partner".into(), c.partner.map_or(Value::Null, Value::from));
        if let Some(click) = &c.click {
            let mut k = click.attributes.clone();
            k.insert("clicked_at".into(), iso_utc(click.clicked_at_unix_micros).into());
            vars.insert("click".into(), Value::Object(k));
        }
        vars
    }
}

impl Vars for ConversionVars<'_> {
    fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        let c = self.conv;
        match name {
            "click_id" => Some(Cow::Borrowed(c.click_id)),
            "transaction_id" => Some(Cow::Borrowed(c.transaction_id)),
            "event" => Some(Cow::Borrowed(c.event)),
            "status" => Some(Cow::Borrowed(self.status.as_ref())),
            "amount" => c.amount.map(Cow::Borrowed),
            "currency" => c.currency.map(Cow::Borrowed),
            "occurred_at" => Some(Cow::Owned(iso_utc(c.occurred_at_unix_micros))),
            "occurred_at_unix" => Some(Cow::Owned(c.occurred_at_unix_micros.div_euclid(1_000_000).to_string())),
            "conversion_id" => Some(Cow::Owned(c.id.to_string())),
            "endpoint" => Some(Cow::Borrowed(self.endpoint)),
            "partner" => c.partner.map(Cow::Borrowed),
            "attributes" => Some(Cow::Owned(Value::Object(c.attributes.clone()).to_string())),
            "click" => c.click.as_ref().map(|k| Cow::Owned(Value::Object(k.attributes.clone()).to_string())),
            "click.clicked_at" => c.click.as_ref().map(|k| Cow::Owned(iso_utc(k.clicked_at_unix_micros))),
            _ => match name.strip_prefix("attributes.") {
                Some(key) => c.attributes.text(key),
                None => {
                    name.strip_prefix("click.").and_then(|key| c.click.as_ref().and_then(|k| k.attributes.text(key)))
                }
            },
        }
    }

    fn json(&self, name: &str) -> Option<Value> {
        let c = self.conv;
        match name {
            "attributes" => Some(Value::Object(c.attributes.clone())),
            "click" => c.click.as_ref().map(|k| Value::Object(k.attributes.clone())),
            "amount" => Some(amount_value(c.amount)).filter(|v| !v.is_null()),
            _ => match name.strip_prefix("attributes.") {
                Some(key) => crate::rules::template::lookup(&c.attributes, key).filter(|v| !v.is_null()).cloned(),
                None => match name.strip_prefix("click.") {
                    Some(key) => c
                        .click
                        .as_ref()
                        .and_then(|k| crate::rules::template::lookup(&k.attributes, key))
                        .filter(|v| !v.is_null())
                        .cloned(),
                    None => self.text(name).map(|t| Value::String(t.into_owned())),
                },
            },
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    timestamp: String,
    data: EnvelopeData<'a>,
}

#[derive(Serialize)]
struct EnvelopeData<'a> {
    conversion_id: i64,
    click_id: &'a str,
    transaction_id: &'a str,
    event: &'a str,
    status: &'a str,
    amount: Value,
    currency: Option<&'a str>,
    occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    partner: Option<&'a str>,
    attributes: &'a Map<String, Value>,
}

/// The default webhook body: a Standard Webhooks style envelope.
pub fn envelope(conv: &Conversion, idempotency_key: &str, now_unix_micros: i64) -> String {
    let env = Envelope {
        id: idempotency_key,
        kind: conv.event,
        timestamp: iso_utc(now_unix_micros - now_unix_micros.rem_euclid(1_000_000)),
        data: EnvelopeData {
            conversion_id: conv.id,
            click_id: conv.click_id,
            transaction_id: conv.transaction_id,
            event: conv.event,
            status: conv.status,
            amount: amount_value(conv.amount),
            currency: conv.currency,
            occurred_at: iso_utc(conv.occurred_at_unix_micros),
            partner: conv.partner,
            attributes: &conv.attributes,
        },
    };
    serde_json::to_string(&env).expect("the envelope serialises")
}

/// Renders the request once, at enqueue. An error names what is wrong so the
/// delivery can be recorded as dead with that reason.
pub fn render(
    conv: &Conversion,
    endpoint: &Endpoint,
    idempotency_key: &str,
    now_unix_micros: i64,
    limits: Limits,
) -> Result<Request, String> {
    let vars = ConversionVars::new(conv, endpoint);
    let (url, hashes) = template::render_url_hashed(
        endpoint.url_template,
        &vars,
        RenderOptions { drop_empty_params: endpoint.drop_empty_params },
    )?;
    if url.len() > limits.url_bytes {
        return Err(format!(
            "rendered URL is {} bytes; the limit is {} (postback.max_url_bytes)",
            url.len(),
            limits.url_bytes
        ));
    }
    if !endpoint.url_template_trusted {
        crate::rules::url_policy::check_url(&url).map_err(|e| format!("rendered URL is not valid: {e}"))?;
    }
    let body = if endpoint.kind == "webhook" {
        Some(match endpoint.body_template {
            Some(t) => {
                let value = template::render_json(t, &vars.to_map()).map_err(|e| format!("body template: {e}"))?;
                serde_json::to_string(&value).expect("JSON values serialise")
            }
            None => envelope(conv, idempotency_key, now_unix_micros),
        })
    } else {
        None
    };
    if let Some(b) = &body {
        if b.len() > limits.body_bytes {
            return Err(format!(
                "rendered body is {} bytes; the limit is {} (postback.max_body_bytes)",
                b.len(),
                limits.body_bytes
            ));
        }
    }
    Ok(Request { url, body, hashes })
}

/// The deterministic idempotency key of (conversion, endpoint, event, status).
/// It starts with `conversion.endpoint.` so that deliveries of one pair sort together.
pub fn idempotency_key(conversion_id: i64, endpoint_id: i64, event: &str, status: &str) -> String {
    format!("{conversion_id}.{endpoint_id}.{event}.{status}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv() -> Conversion<'static> {
        Conversion {
            id: 42,
            click_id: "clk 1&2",
            transaction_id: "tx-9",
            event: "sale",
            status: "approved",
            amount: Some("12.50"),
            currency: Some("EUR"),
            attributes: json!({"sub1": "a/b", "n": 3}).as_object().unwrap().clone(),
            occurred_at_unix_micros: 1_709_296_496_000_000,
            partner: None,
            click: None,
        }
    }

    fn endpoint(kind: &'static str, url: &str) -> Endpoint<'static> {
        Endpoint {
            name: "net",
            kind,
            url_template: Box::leak(Box::new(Template::parse(url).unwrap())),
            url_template_trusted: false,
            body_template: None,
            status_map: None,
            drop_empty_params: false,
        }
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(1_709_296_496_000_000), "2024-03-01T12:34:56Z");
        assert_eq!(iso_utc(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(iso_utc(-1_000_000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn postback_url_uses_every_variable() {
        let e = endpoint(
            "postback",
            "https://n.test/pb?cid={click_id}&tx={transaction_id}&ev={event}&st={status}&a={amount}&c={currency}&t={occurred_at}&u={occurred_at_unix}&id={conversion_id}&e={endpoint}&s1={attributes.sub1}&n={attributes.n}",
        );
        let r = render(&conv(), &e, "k", 0, Limits::default()).unwrap();
        assert_eq!(r.url, "https://n.test/pb?cid=clk%201%262&tx=tx-9&ev=sale&st=approved&a=12.50&c=EUR&t=2024-03-01T12%3A34%3A56Z&u=1709296496&id=42&e=net&s1=a%2Fb&n=3");
        assert_eq!(r.body, None);
    }

    #[test]
    fn partner_and_click_variables() {
        let mut c = conv();
        c.partner = Some("net a");
        c.click = Some(Click {
            attributes: json!({"sub1": "x&y", "aff_id": 7}).as_object().unwrap().clone(),
            clicked_at_unix_micros: 1_709_290_000_000_000,
        });
        let e = endpoint(
            "postback",
            "https://n.test/pb?p={partner}&s={click.sub1}&a={click.aff_id}&t={click.clicked_at}&m={click.missing}",
        );
        let r = render(&c, &e, "k", 0, Limits::default()).unwrap();
        assert_eq!(r.url, "https://n.test/pb?p=net%20a&s=x%26y&a=7&t=2024-03-01T10%3A46%3A40Z&m=");
        // no click known: click variables render empty (or their default)
        c.click = None;
        let e = endpoint("postback", "https://n.test/pb?s={click.sub1|default:none}");
        assert_eq!(render(&c, &e, "k", 0, Limits::default()).unwrap().url, "https://n.test/pb?s=none");
        let body =
            render(&c, &endpoint("webhook", "https://n.test/h"), "k", 0, Limits::default()).unwrap().body.unwrap();
        assert!(body.contains(r#""partner":"net a""#), "{body}");
    }

    #[test]
    fn status_map_applies_to_status() {
        let mut e = endpoint("postback", "https://n.test/pb?s={status}");
        let map = json!({"approved": "1", "rejected": 2}).as_object().unwrap().clone();
        e.status_map = Some(&map);
        assert_eq!(render(&conv(), &e, "k", 0, Limits::default()).unwrap().url, "https://n.test/pb?s=1");
        let mut c = conv();
        c.status = "rejected";
        assert_eq!(render(&c, &e, "k", 0, Limits::default()).unwrap().url, "https://n.test/pb?s=2");
        c.status = "pending";
        assert_eq!(render(&c, &e, "k", 0, Limits::default()).unwrap().url, "https://n.test/pb?s=pending");
    }

    #[test]
    fn webhook_envelope_is_standard_webhooks_shaped() {
        let r = render(
            &conv(),
            &endpoint("webhook", "https://n.test/hook"),
            "42.1.sale.approved",
            1_709_296_500_250_000,
            Limits::default(),
        )
        .unwrap();
        let body: Value = serde_json::from_str(&r.body.unwrap()).unwrap();
        assert_eq!(body["id"], "42.1.sale.approved");
        assert_eq!(body["type"], "sale");
        assert_eq!(body["timestamp"], "2024-03-01T12:35:00Z");
        assert_eq!(body["data"]["amount"].to_string(), "12.50");
        assert_eq!(body["data"]["click_id"], "clk 1&2");
        assert_eq!(body["data"]["attributes"]["sub1"], "a/b");
    }

    #[test]
    fn webhook_body_template_is_rendered_as_json() {
        let mut e = endpoint("webhook", "https://n.test/hook");
        let body = json!({"cid": "{click_id}", "value": "{amount}", "note": "tx \"{transaction_id}\""});
        e.body_template = Some(&body);
        let body = render(&conv(), &e, "k", 0, Limits::default()).unwrap().body.unwrap();
        assert_eq!(body, r#"{"cid":"clk 1&2","note":"tx \"tx-9\"","value":12.50}"#);
    }

    #[test]
    fn urls_that_cannot_be_sent_are_an_error() {
        // templates that bypassed validation (e.g. written with triggers disabled)
        let e = endpoint("postback", "{attributes.base|raw}/pb");
        assert!(render(&conv(), &e, "k", 0, Limits::default()).unwrap_err().contains("not valid"));
        let e = endpoint("postback", "https://n.test/pb?x={click_id}");
        let long = "x".repeat(MAX_URL_BYTES);
        let mut c = conv();
        c.click_id = &long;
        assert!(render(&c, &e, "k", 0, Limits::default()).unwrap_err().contains("the limit is 16384"));
        // a webhook body over the limit is refused, not truncated
        let mut big = conv();
        big.attributes.insert("blob".into(), Value::String("x".repeat(300_000)));
        let e = render(&big, &endpoint("webhook", "https://n.test/h"), "k", 0, Limits::default()).unwrap_err();
        assert!(e.contains("the limit is 262144 (postback.max_body_bytes)"), "{e}");
        let small = Limits { url_bytes: 30, body_bytes: 10 };
        assert!(render(&conv(), &endpoint("postback", "https://n.test/pb?x={transaction_id}"), "k", 0, small).is_ok());
        assert!(render(&conv(), &endpoint("postback", "https://n.test/pb?x={click_id}&y=long"), "k", 0, small).is_err());
    }
}
