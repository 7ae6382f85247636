//! Turning one conversion and one endpoint into the request to send (pure).

use serde_json::{Map, Number, Value};

use crate::template::{self, RenderOptions, Template};

/// Longest URL a delivery may have; receivers and proxies refuse longer ones.
pub const MAX_URL_BYTES: usize = 16_384;

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The conversion fields templates can use.
#[derive(Debug, Clone)]
pub struct Conversion {
    pub id: i64,
    pub click_id: String,
    pub transaction_id: String,
    pub event: String,
    pub status: String,
    /// numeric as text, so 12.50 stays 12.50
    pub amount: Option<String>,
    pub currency: Option<String>,
    pub attributes: Map<String, Value>,
    pub occurred_at_unix_micros: i64,
}

/// The endpoint settings that shape a request.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub kind: String,
    pub url_template: Template,
    pub body_template: Option<Value>,
    pub status_map: Option<Map<String, Value>>,
    pub drop_empty_params: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub url: String,
    pub body: Option<String>,
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

fn amount_value(amount: &Option<String>) -> Value {
    match amount {
        Some(a) => a.parse::<Number>().map(Value::Number).unwrap_or_else(|_| Value::String(a.clone())),
        None => Value::Null,
    }
}

/// The variables of one conversion as seen by one endpoint (status mapped).
pub fn variables(conv: &Conversion, endpoint: &Endpoint) -> Map<String, Value> {
    let status = endpoint
        .status_map
        .as_ref()
        .and_then(|m| m.get(&conv.status))
        .and_then(|v| template::value_text(Some(v)))
        .unwrap_or_else(|| conv.status.clone());
    let mut vars = Map::new();
    vars.insert("click_id".into(), conv.click_id.clone().into());
    vars.insert("transaction_id".into(), conv.transaction_id.clone().into());
    vars.insert("event".into(), conv.event.clone().into());
    vars.insert("status".into(), status.into());
    vars.insert("amount".into(), amount_value(&conv.amount));
    vars.insert("currency".into(), conv.currency.clone().map_or(Value::Null, Value::String));
    vars.insert("occurred_at".into(), iso_utc(conv.occurred_at_unix_micros).into());
    vars.insert("occurred_at_unix".into(), conv.occurred_at_unix_micros.div_euclid(1_000_000).into());
    vars.insert("conversion_id".into(), conv.id.into());
    vars.insert("endpoint".into(), endpoint.name.clone().into());
    vars.insert("attributes".into(), Value::Object(conv.attributes.clone()));
    vars
}

/// The default webhook body: a Standard Webhooks style envelope.
pub fn envelope(conv: &Conversion, idempotency_key: &str, now_unix_micros: i64) -> Value {
    let mut data = Map::new();
    data.insert("conversion_id".into(), conv.id.into());
    data.insert("click_id".into(), conv.click_id.clone().into());
    data.insert("transaction_id".into(), conv.transaction_id.clone().into());
    data.insert("event".into(), conv.event.clone().into());
    data.insert("status".into(), conv.status.clone().into());
    data.insert("amount".into(), amount_value(&conv.amount));
    data.insert("currency".into(), conv.currency.clone().map_or(Value::Null, Value::String));
    data.insert("occurred_at".into(), iso_utc(conv.occurred_at_unix_micros).into());
    data.insert("attributes".into(), Value::Object(conv.attributes.clone()));
    let mut env = Map::new();
    env.insert("id".into(), idempotency_key.into());
    env.insert("type".into(), conv.event.clone().into());
    env.insert("timestamp".into(), iso_utc(now_unix_micros - now_unix_micros.rem_euclid(1_000_000)).into());
    env.insert("data".into(), Value::Object(data));
    Value::Object(env)
}

/// Renders the request once, at enqueue. An error names what is wrong so the
/// delivery can be recorded as dead with that reason.
pub fn render(conv: &Conversion, endpoint: &Endpoint, idempotency_key: &str, now_unix_micros: i64) -> Result<Request, String> {
    let vars = variables(conv, endpoint);
    let url = template::render_url(
        &endpoint.url_template,
        &vars,
        RenderOptions { drop_empty_params: endpoint.drop_empty_params },
    );
    if url.len() > MAX_URL_BYTES {
        return Err(format!("rendered URL is {} bytes; the limit is {MAX_URL_BYTES}", url.len()));
    }
    template::check_url(&url).map_err(|e| format!("rendered URL is not valid: {e}"))?;
    let body = if endpoint.kind == "webhook" {
        let value = match &endpoint.body_template {
            Some(t) => template::render_json(t, &vars).map_err(|e| format!("body template: {e}"))?,
            None => envelope(conv, idempotency_key, now_unix_micros),
        };
        Some(serde_json::to_string(&value).expect("JSON values serialise"))
    } else {
        None
    };
    Ok(Request { url, body })
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

    fn conv() -> Conversion {
        Conversion {
            id: 42,
            click_id: "clk 1&2".into(),
            transaction_id: "tx-9".into(),
            event: "sale".into(),
            status: "approved".into(),
            amount: Some("12.50".into()),
            currency: Some("EUR".into()),
            attributes: json!({"sub1": "a/b", "n": 3}).as_object().unwrap().clone(),
            occurred_at_unix_micros: 1_709_296_496_000_000,
        }
    }

    fn endpoint(kind: &str, url: &str) -> Endpoint {
        Endpoint {
            name: "net".into(),
            kind: kind.into(),
            url_template: Template::parse(url).unwrap(),
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
        let r = render(&conv(), &e, "k", 0).unwrap();
        assert_eq!(r.url, "https://n.test/pb?cid=clk%201%262&tx=tx-9&ev=sale&st=approved&a=12.50&c=EUR&t=2024-03-01T12%3A34%3A56Z&u=1709296496&id=42&e=net&s1=a%2Fb&n=3");
        assert_eq!(r.body, None);
    }

    #[test]
    fn status_map_applies_to_status() {
        let mut e = endpoint("postback", "https://n.test/pb?s={status}");
        e.status_map = Some(json!({"approved": "1", "rejected": 2}).as_object().unwrap().clone());
        assert_eq!(render(&conv(), &e, "k", 0).unwrap().url, "https://n.test/pb?s=1");
        let mut c = conv();
        c.status = "rejected".into();
        assert_eq!(render(&c, &e, "k", 0).unwrap().url, "https://n.test/pb?s=2");
        c.status = "pending".into();
        assert_eq!(render(&c, &e, "k", 0).unwrap().url, "https://n.test/pb?s=pending");
    }

    #[test]
    fn webhook_envelope_is_standard_webhooks_shaped() {
        let r = render(&conv(), &endpoint("webhook", "https://n.test/hook"), "42.1.sale.approved", 1_709_296_500_250_000).unwrap();
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
        e.body_template = Some(json!({"cid": "{click_id}", "value": "{amount}", "note": "tx \"{transaction_id}\""}));
        let body = render(&conv(), &e, "k", 0).unwrap().body.unwrap();
        assert_eq!(body, r#"{"cid":"clk 1&2","note":"tx \"tx-9\"","value":12.50}"#);
    }

    #[test]
    fn urls_that_cannot_be_sent_are_an_error() {
        // templates that bypassed validation (e.g. written with triggers disabled)
        let e = endpoint("postback", "{attributes.base|raw}/pb");
        assert!(render(&conv(), &e, "k", 0).unwrap_err().contains("not valid"));
        let e = endpoint("postback", "https://n.test/pb?x={click_id}");
        let mut c = conv();
        c.click_id = "x".repeat(MAX_URL_BYTES);
        assert!(render(&c, &e, "k", 0).unwrap_err().contains("the limit is 16384"));
    }
}
