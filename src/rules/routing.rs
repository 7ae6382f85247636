//! Which endpoints receive a conversion (pure).
//!
//! An endpoint receives a conversion when it is active and every filter it
//! sets matches: `partners` (the conversion's partner is in the list; NULL =
//! every partner, for global receivers such as the operator's own CRM),
//! `events`, `statuses`, and `conditions` (the conversion's attributes contain
//! that JSON object, with PostgreSQL's `jsonb @>` semantics).
//!
//! Matching costs no loop over endpoints: a router built once per statement
//! keeps the global endpoints apart and the partner-scoped ones in a hash map
//! by partner, so 1,000 partners cost what 3 do.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// An endpoint's filters.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub partners: Option<Vec<String>>,
    pub events: Option<Vec<String>>,
    pub statuses: Option<Vec<String>>,
    pub conditions: Option<Map<String, Value>>,
}

/// What of a conversion the filters look at.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub partner: Option<&'a str>,
    pub event: &'a str,
    pub status: &'a str,
    pub attributes: &'a Map<String, Value>,
}

fn listed(list: &Option<Vec<String>>, value: &str) -> bool {
    list.as_ref().is_none_or(|l| l.iter().any(|v| v == value))
}

impl Filters {
    /// Whether the filters other than `partners` match.
    fn others_match(&self, s: &Subject) -> bool {
        listed(&self.events, s.event)
            && listed(&self.statuses, s.status)
            && self.conditions.as_ref().is_none_or(|c| object_contains(s.attributes, c))
    }

    /// Whether every filter matches (the router's answer for one endpoint,
    /// written plainly: the tests hold the router against it).
    #[cfg(test)]
    pub fn matches(&self, s: &Subject) -> bool {
        let partner_ok = match (&self.partners, s.partner) {
            (None, _) => true,
            (Some(list), Some(p)) => list.iter().any(|v| v == p),
            (Some(_), None) => false,
        };
        partner_ok && self.others_match(s)
    }
}

/// Why an endpoint's filters leave a conversion out: the first filter that
/// does not match, with what it wants and what the conversion has.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Miss {
    #[error("partner {} is not in partners {}", show(.got), list(.wanted))]
    Partner { wanted: Vec<String>, got: Option<String> },
    #[error("event \"{got}\" is not in events {}", list(.wanted))]
    Event { wanted: Vec<String>, got: String },
    #[error("status \"{got}\" is not in statuses {}", list(.wanted))]
    Status { wanted: Vec<String>, got: String },
    #[error("condition {key} = {wanted} does not match: the attributes have {}", .got.as_ref().map_or("no such key".to_string(), |v| format!("{key} = {v}")))]
    Condition { key: String, wanted: Value, got: Option<Value> },
}

fn show(p: &Option<String>) -> String {
    p.as_ref().map_or("NULL (none recorded)".to_string(), |p| format!("\"{p}\""))
}

fn list(l: &[String]) -> String {
    format!("{{{}}}", l.join(","))
}

impl Filters {
    /// The first filter that leaves the conversion out, or None when all match.
    pub fn why_not(&self, s: &Subject) -> Option<Miss> {
        if let Some(wanted) = &self.partners {
            if !s.partner.is_some_and(|p| wanted.iter().any(|w| w == p)) {
                return Some(Miss::Partner { wanted: wanted.clone(), got: s.partner.map(str::to_string) });
            }
        }
        if !listed(&self.events, s.event) {
            return Some(Miss::Event { wanted: self.events.clone().unwrap_or_default(), got: s.event.to_string() });
        }
        if !listed(&self.statuses, s.status) {
            return Some(Miss::Status { wanted: self.statuses.clone().unwrap_or_default(), got: s.status.to_string() });
        }
        let conditions = self.conditions.as_ref()?;
        let (key, wanted) = conditions.iter().find(|(k, v)| !s.attributes.get(*k).is_some_and(|a| contains(a, v)))?;
        Some(Miss::Condition { key: key.clone(), wanted: wanted.clone(), got: s.attributes.get(key).cloned() })
    }
}

/// The endpoints of one statement, indexed for matching.
#[derive(Debug, Default)]
pub struct Router {
    filters: Vec<Filters>,
    global: Vec<usize>,
    by_partner: HashMap<String, Vec<usize>>,
}

impl Router {
    /// `filters[i]` belongs to the i-th endpoint; matches come back as indexes
    /// into it, in ascending order.
    pub fn new(filters: Vec<Filters>) -> Router {
        let mut global = Vec::new();
        let mut by_partner: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, f) in filters.iter().enumerate() {
            match &f.partners {
                None => global.push(i),
                Some(list) => {
                    for p in list {
                        let slot = by_partner.entry(p.clone()).or_default();
                        if slot.last() != Some(&i) {
                            slot.push(i);
                        }
                    }
                }
            }
        }
        Router { filters, global, by_partner }
    }

    /// Indexes of the endpoints that receive this conversion, ascending.
    pub fn route(&self, s: &Subject, out: &mut Vec<usize>) {
        out.clear();
        let scoped: &[usize] = s.partner.and_then(|p| self.by_partner.get(p)).map_or(&[], Vec::as_slice);
        // merge two ascending lists
        let (mut a, mut b) = (self.global.iter().peekable(), scoped.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x <= y => {
                    a.next();
                    x
                }
                (_, Some(&&y)) => {
                    b.next();
                    y
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, None) => break,
            };
            if self.filters[next].others_match(s) {
                out.push(next);
            }
        }
    }

    /// The filters of the i-th endpoint.
    pub fn filters(&self, i: usize) -> &Filters {
        &self.filters[i]
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }
}

/// A JSON number's exact value as (negative, significant digits, exponent):
/// `1.50`, `15e-1` and `1.5` give the same triple; zero is (false, "", 0).
fn exact(number: &str) -> Option<(bool, String, i64)> {
    let (negative, rest) = match number.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, number),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let exponent = exponent.checked_sub(frac.len() as i64)?;
    let trimmed_end = digits.trim_end_matches('0');
    let exponent = exponent.checked_add((digits.len() - trimmed_end.len()) as i64)?;
    let significant = trimmed_end.trim_start_matches('0');
    if significant.is_empty() {
        return Some((false, String::new(), 0));
    }
    Some((negative, significant.to_string(), exponent))
}

/// Numbers are equal as PostgreSQL's numeric compares them: exactly, never
/// through f64 (9007199254740992 and …993 differ).
fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    let (a, b) = (a.to_string(), b.to_string());
    a == b || matches!((exact(&a), exact(&b)), (Some(x), Some(y)) if x == y)
}

/// `container @> contained` for JSON values, as PostgreSQL's jsonb defines it:
/// objects contain objects key by key, arrays contain arrays element by
/// element (order and repetition ignored), scalars must be equal.
pub fn contains(container: &Value, contained: &Value) -> bool {
    match (container, contained) {
        (Value::Object(a), Value::Object(b)) => object_contains(a, b),
        (Value::Array(a), Value::Array(b)) => b.iter().all(|x| a.iter().any(|y| contains(y, x))),
        (Value::Number(a), Value::Number(b)) => numbers_equal(a, b),
        (a, b) => a == b,
    }
}

/// `container @> contained` for two JSON objects.
pub fn object_contains(container: &Map<String, Value>, contained: &Map<String, Value>) -> bool {
    contained.iter().all(|(k, v)| container.get(k).is_some_and(|c| contains(c, v)))
}

/// Checks a partner name: 1 to 100 characters, no control characters.
pub fn check_partner(p: &str) -> Result<(), String> {
    let n = p.chars().count();
    if n == 0 || n > 100 {
        return Err(format!("must be 1 to 100 characters (got {n})"));
    }
    if let Some(c) = p.chars().find(|c| c.is_control()) {
        return Err(format!("must not hold control characters (U+{:04X})", c as u32));
    }
    Ok(())
}

/// Checks an endpoint's `conditions`: a JSON object (containment is then well defined).
pub fn check_conditions(c: &Value) -> Result<(), String> {
    match c {
        Value::Object(m) if m.is_empty() => Err("must not be empty (use NULL for no condition)".into()),
        Value::Object(_) => Ok(()),
        other => Err(format!(
            "must be a JSON object the conversion's attributes must contain, e.g. {{\"offer_id\": \"12\"}} (got {})",
            match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn list(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn containment_follows_jsonb() {
        let attrs = json!({"offer_id": "12", "geo": {"country": "DE", "city": "Berlin"}, "tags": ["a", "b"], "n": 1.0});
        for (cond, expected) in [
            (json!({"offer_id": "12"}), true),
            (json!({"offer_id": 12}), false),
            (json!({"offer_id": "13"}), false),
            (json!({"geo": {"country": "DE"}}), true),
            (json!({"geo": {"country": "FR"}}), false),
            (json!({"tags": ["b"]}), true),
            (json!({"tags": ["b", "a", "a"]}), true),
            (json!({"tags": ["c"]}), false),
            (json!({"n": 1}), true),
            (json!({"missing": null}), false),
            (json!({"offer_id": "12", "geo": {"city": "Berlin"}}), true),
        ] {
            assert_eq!(contains(&attrs, &cond), expected, "{cond}");
        }
    }

    #[test]
    fn partner_scope_events_statuses_and_conditions_combine() {
        let f = Filters {
            partners: list(&["net-a", "net-b"]),
            events: list(&["sale"]),
            statuses: None,
            conditions: Some(obj(json!({"offer_id": "12"}))),
        };
        let attrs = obj(json!({"offer_id": "12"}));
        let s = Subject { partner: Some("net-a"), event: "sale", status: "approved", attributes: &attrs };
        assert!(f.matches(&s));
        assert!(!f.matches(&Subject { partner: Some("net-c"), ..s }));
        assert!(!f.matches(&Subject { partner: None, ..s }));
        assert!(!f.matches(&Subject { event: "lead", ..s }));
        let other = obj(json!({"offer_id": "13"}));
        assert!(!f.matches(&Subject { attributes: &other, ..s }));
    }

    #[test]
    fn the_router_sends_a_conversion_to_its_partner_and_the_global_endpoints_only() {
        let mut filters = vec![Filters::default()]; // 0: global
        for i in 0..1000 {
            filters.push(Filters { partners: list(&[&format!("p{i}")]), ..Default::default() });
        }
        filters.push(Filters { events: list(&["sale"]), ..Default::default() }); // 1001: global, sales only
        filters.push(Filters { partners: list(&["p7", "p8"]), ..Default::default() }); // 1002
        let router = Router::new(filters.clone());
        let attrs = Map::new();
        let mut out = Vec::new();
        router.route(&Subject { partner: Some("p7"), event: "sale", status: "approved", attributes: &attrs }, &mut out);
        assert_eq!(out, vec![0, 8, 1001, 1002]);
        router
            .route(&Subject { partner: Some("p999"), event: "lead", status: "approved", attributes: &attrs }, &mut out);
        assert_eq!(out, vec![0, 1000]);
        router.route(&Subject { partner: None, event: "sale", status: "approved", attributes: &attrs }, &mut out);
        assert_eq!(out, vec![0, 1001]);
        router.route(
            &Subject { partner: Some("unknown"), event: "lead", status: "approved", attributes: &attrs },
            &mut out,
        );
        assert_eq!(out, vec![0]);
        // the router answers exactly what checking every endpoint would
        for partner in [Some("p7"), Some("p8"), Some("p500"), None, Some("x")] {
            for event in ["sale", "lead"] {
                let s = Subject { partner, event, status: "approved", attributes: &attrs };
                router.route(&s, &mut out);
                let brute: Vec<usize> = (0..filters.len()).filter(|&i| filters[i].matches(&s)).collect();
                assert_eq!(out, brute);
            }
        }
    }

    #[test]
    fn a_partner_listed_twice_routes_once() {
        let router = Router::new(vec![Filters { partners: list(&["a", "a"]), ..Default::default() }]);
        let mut out = Vec::new();
        router
            .route(&Subject { partner: Some("a"), event: "e", status: "approved", attributes: &Map::new() }, &mut out);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn partner_and_condition_checks() {
        assert!(check_partner("network-a").is_ok());
        assert!(check_partner("").is_err());
        assert!(check_partner(&"x".repeat(101)).unwrap_err().contains("got 101"));
        assert!(check_partner("a\nb").unwrap_err().contains("U+000A"));
        assert!(check_conditions(&json!({"offer_id": "12"})).is_ok());
        assert!(check_conditions(&json!({})).is_err());
        assert!(check_conditions(&json!(["x"])).unwrap_err().contains("an array"));
    }

    #[test]
    fn numbers_compare_exactly_as_numeric_does() {
        let n = |t: &str| serde_json::from_str::<Value>(t).unwrap();
        assert!(!contains(&n(r#"{"id": 9007199254740993}"#), &n(r#"{"id": 9007199254740992}"#)));
        assert!(contains(&n(r#"{"a": 1.50}"#), &n(r#"{"a": 1.5}"#)));
        assert!(contains(&n(r#"{"a": 100}"#), &n(r#"{"a": 1e2}"#)));
        assert!(contains(&n(r#"{"a": 0.0}"#), &n(r#"{"a": -0}"#)));
        assert!(!contains(&n(r#"{"a": 0.1}"#), &n(r#"{"a": 0.10000000000000001}"#)));
        assert!(!contains(&n(r#"{"a": -5}"#), &n(r#"{"a": 5}"#)));
    }

    #[test]
    fn why_not_names_the_first_filter_that_fails_with_both_values() {
        let attributes = obj(json!({"offer_id": 12, "geo": "DE"}));
        let subject = Subject { partner: Some("net-a"), event: "sale", status: "approved", attributes: &attributes };
        let f = |partners: Option<Vec<&str>>, events: Option<Vec<&str>>, conditions: Option<Value>| Filters {
            partners: partners.map(|l| l.into_iter().map(String::from).collect()),
            events: events.map(|l| l.into_iter().map(String::from).collect()),
            statuses: None,
            conditions: conditions.map(obj),
        };
        assert_eq!(f(None, None, None).why_not(&subject), None);
        let miss = f(Some(vec!["net-b"]), None, None).why_not(&subject).unwrap();
        assert_eq!(miss.to_string(), "partner \"net-a\" is not in partners {net-b}");
        let miss = f(None, Some(vec!["sales", "lead"]), None).why_not(&subject).unwrap();
        assert_eq!(miss.to_string(), "event \"sale\" is not in events {sales,lead}");
        let miss = f(None, None, Some(json!({"offer_id": "12"}))).why_not(&subject).unwrap();
        assert_eq!(miss.to_string(), "condition offer_id = \"12\" does not match: the attributes have offer_id = 12");
        let miss = f(None, None, Some(json!({"sub": "x"}))).why_not(&subject).unwrap();
        assert_eq!(miss.to_string(), "condition sub = \"x\" does not match: the attributes have no such key");
        let none = Subject { partner: None, ..subject };
        let miss = f(Some(vec!["net-a"]), None, None).why_not(&none).unwrap();
        assert_eq!(miss.to_string(), "partner NULL (none recorded) is not in partners {net-a}");
        // why_not agrees with matches
        for filters in [f(None, None, Some(json!({"geo": "DE"}))), f(Some(vec!["net-a"]), Some(vec!["sale"]), None)] {
            assert_eq!(filters.why_not(&subject).is_none(), filters.matches(&subject));
        }
    }
}
