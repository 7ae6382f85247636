//! URL and body templates: the language (parse, variables, values). Rendering
//! is in `render`, success patterns in `pattern`, filters in `filters`; what
//! a URL may be is `crate::rules::url_policy`.
//!
//! Syntax: `{name}` (or `{{name}}`) inserts a variable; names hold letters,
//! digits, `_` and `.`. Filters follow `|` and chain left to right (`raw`,
//! `default:TEXT`, arithmetic, `tz`, `format`, hashes, `json`, `map`, … — see
//! `filters`). `{hash:ALG:part,…}` is a digest with the endpoint's secret,
//! computed at send time from slots kept beside the URL (`url_hash`). A `{{`
//! or `}}` that is no macro stands for a literal brace.
//!
//! In a URL every inserted value is percent-encoded for where it stands: in the
//! path, the query and the fragment only RFC 3986 unreserved characters
//! (`A-Z a-z 0-9 - . _ ~`) stay as they are, so `/`, `&`, `=`, `+`, `#`, `%`,
//! spaces and non-ASCII are encoded and decode back to exactly the input.

use crate::rules::template::filters::Filter;
use serde_json::{Map, Value};
use std::borrow::Cow;

pub mod filters;
pub mod pattern;
mod render;

pub use render::{render_json, render_url, render_url_hashed, RenderOptions};

pub const MAX_TEMPLATE_BYTES: usize = 8192;

/// The variables a conversion provides (besides `attributes.KEY`).
pub const CONVERSION_VARIABLES: &[&str] = &[
    "click_id",
    "transaction_id",
    "event",
    "status",
    "amount",
    "currency",
    "occurred_at",
    "occurred_at_unix",
    "conversion_id",
    "endpoint",
    "partner",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", .position.map(|p| format!(" at position {p}")).unwrap_or_default())]
pub struct TemplateError {
    /// 1-based character position, when the problem has one.
    pub position: Option<usize>,
    pub message: String,
}

pub(crate) fn err(position: Option<usize>, message: impl Into<String>) -> TemplateError {
    TemplateError { position, message: message.into() }
}

/// Where in a URL a piece of the template stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// scheme and host: no macros allowed in endpoint URLs
    Authority,
    Path,
    Query,
    Fragment,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Macro {
    pub name: String,
    /// inserted unencoded (the `raw` filter is in the chain)
    pub raw: bool,
    /// the filters after `|`, applied left to right (crate::rules::template::filters)
    pub filters: Vec<Filter>,
    /// 1-based character position of the opening brace
    pub position: usize,
    pub part: Part,
    /// `{hash:ALG:part,part,…}`: a digest over values and the endpoint's secret
    pub hash: Option<HashSpec>,
}

/// A digest computed at send time over literal text, variables and the
/// endpoint's live secret (Tapjoy's verifier: md5 of `id:snuid:currency:secret`).
#[derive(Debug, Clone, PartialEq)]
pub struct HashSpec {
    pub algorithm: String,
    pub parts: Vec<HashPart>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HashPart {
    Var(String),
    Literal(String),
    Secret,
}

impl HashSpec {
    fn parse(spec: &str, position: usize) -> Result<HashSpec, TemplateError> {
        let (algorithm, list) = spec.split_once(':').ok_or_else(|| {
            err(Some(position), "hash needs an algorithm and parts: {hash:md5:transaction_id,':',secret}")
        })?;
        let algorithm = algorithm.trim().to_string();
        if !crate::rules::url_hash::ALGORITHMS.contains(&algorithm.as_str()) {
            return Err(err(Some(position), format!("hash algorithm \"{algorithm}\" is not md5, sha1 or sha256")));
        }
        let mut parts = Vec::new();
        for piece in list.split(',') {
            let t = piece.trim();
            let part = if t == "secret" {
                HashPart::Secret
            } else if t.len() >= 2 && t.starts_with('\'') && t.ends_with('\'') {
                HashPart::Literal(t[1..t.len() - 1].to_string())
            } else if !t.is_empty() && t.chars().all(valid_name_char) {
                HashPart::Var(t.to_string())
            } else {
                return Err(err(
                    Some(position),
                    format!("hash part \"{t}\" is not a variable, 'literal text' or secret"),
                ));
            };
            parts.push(part);
        }
        if !parts.contains(&HashPart::Secret) {
            return Err(err(Some(position), "a hash without the secret is a plain filter: write {name|md5}"));
        }
        Ok(HashSpec { algorithm, parts })
    }

    /// The text to hash, in order: values and literals, `None` for the secret.
    pub fn parts<V: Vars + ?Sized>(&self, vars: &V) -> Vec<Option<String>> {
        self.parts
            .iter()
            .map(|p| match p {
                HashPart::Var(n) => Some(vars.text(n).map(Cow::into_owned).unwrap_or_default()),
                HashPart::Literal(l) => Some(l.clone()),
                HashPart::Secret => None,
            })
            .collect()
    }
}

impl Macro {
    /// The value to insert: the variable through the filters. `Err` when a
    /// filter cannot apply to the value (e.g. arithmetic on a non-number).
    pub fn value<V: Vars + ?Sized>(&self, vars: &V) -> Result<Option<String>, String> {
        if self.hash.is_some() {
            return Err("a {hash:…} digest is computed only in a URL template".into());
        }
        let start = if self.filters.is_empty() {
            return Ok(vars.text(&self.name).map(Cow::into_owned));
        } else if crate::rules::template::filters::wants_json(&self.filters) {
            vars.json(&self.name).map(crate::rules::template::filters::Val::Json)
        } else {
            vars.text(&self.name).map(|t| crate::rules::template::filters::Val::Text(t.into_owned()))
        };
        crate::rules::template::filters::apply(&self.filters, start)
            .map(|(v, _)| v)
            .map_err(|e| format!("{{{}}}: {e}", self.name))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Literal(String),
    Macro(Macro),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub tokens: Vec<Token>,
}

pub(crate) fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

impl Template {
    /// Parses a template, tracking which part of a URL each macro stands in.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        if text.len() > MAX_TEMPLATE_BYTES {
            return Err(err(None, format!("template is {} bytes; the limit is {MAX_TEMPLATE_BYTES}", text.len())));
        }
        let chars: Vec<char> = text.chars().collect();
        if let Some(i) = chars.iter().position(|c| c.is_control()) {
            return Err(err(Some(i + 1), format!("control character U+{:04X}", chars[i] as u32)));
        }
        let mut part = if text.contains("://") { Part::Authority } else { Part::Path };
        let mut slashes_after_scheme = 0;
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '{' if chars.get(i + 1) == Some(&'{') => {
                    // `{{name}}` is the same macro as `{name}` (Singular, GoAffPro
                    // and others document their macros so); otherwise `{{` is a
                    // literal brace
                    let close = chars[i + 2..]
                        .iter()
                        .position(|&c| c == '}' || c == '{')
                        .map(|off| i + 2 + off)
                        .filter(|&j| chars[j] == '}' && chars.get(j + 1) == Some(&'}'));
                    let inner: Option<String> = close.map(|j| chars[i + 2..j].iter().collect());
                    match inner.as_deref().map(|t| (t, parse_macro(t, i + 1, part))) {
                        Some((_, Ok(m))) => {
                            if !literal.is_empty() {
                                tokens.push(Token::Literal(std::mem::take(&mut literal)));
                            }
                            tokens.push(Token::Macro(m));
                            i = close.expect("found") + 2;
                        }
                        Some((t, Err(e))) if t.chars().next().is_some_and(valid_name_char) => return Err(e),
                        _ => {
                            literal.push('{');
                            i += 2;
                        }
                    }
                }
                '}' if chars.get(i + 1) == Some(&'}') => {
                    literal.push('}');
                    i += 2;
                }
                '}' => return Err(err(Some(i + 1), "unmatched '}' (write '}}' for a literal brace)")),
                '{' => {
                    let close = chars[i + 1..]
                        .iter()
                        .position(|&c| c == '}' || c == '{')
                        .map(|off| i + 1 + off)
                        .filter(|&j| chars[j] == '}')
                        .ok_or_else(|| err(Some(i + 1), "unclosed '{' (write '{{' for a literal brace)"))?;
                    let inner: String = chars[i + 1..close].iter().collect();
                    let m = parse_macro(&inner, i + 1, part)?;
                    if !literal.is_empty() {
                        tokens.push(Token::Literal(std::mem::take(&mut literal)));
                    }
                    tokens.push(Token::Macro(m));
                    i = close + 1;
                }
                _ => {
                    part = match (part, c) {
                        (Part::Authority, '/') => {
                            slashes_after_scheme += 1;
                            if slashes_after_scheme > 2 {
                                Part::Path
                            } else {
                                Part::Authority
                            }
                        }
                        (Part::Authority | Part::Path, '?') => Part::Query,
                        (Part::Authority | Part::Path | Part::Query, '#') => Part::Fragment,
                        (p, _) => p,
                    };
                    literal.push(c);
                    i += 1;
                }
            }
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Ok(Template { tokens })
    }

    /// Whether any macro inserts its value unencoded (the result then needs a URL check).
    pub fn has_raw(&self) -> bool {
        self.macros().any(|m| m.raw)
    }

    pub fn macros(&self) -> impl Iterator<Item = &Macro> {
        self.tokens.iter().filter_map(|t| match t {
            Token::Macro(m) => Some(m),
            Token::Literal(_) => None,
        })
    }
}

fn parse_macro(inner: &str, position: usize, part: Part) -> Result<Macro, TemplateError> {
    if let Some(spec) = inner.trim().strip_prefix("hash:") {
        let hash = HashSpec::parse(spec, position)?;
        return Ok(Macro { name: "hash".into(), raw: false, filters: Vec::new(), position, part, hash: Some(hash) });
    }
    let (name, chain) = match inner.split_once('|') {
        Some((n, c)) => (n.trim().to_string(), Some(c)),
        None => (inner.trim().to_string(), None),
    };
    if name.is_empty() {
        return Err(err(Some(position), "empty variable name"));
    }
    if let Some(bad) = name.chars().find(|c| !valid_name_char(*c)) {
        return Err(err(
            Some(position),
            format!("variable name \"{name}\" has '{bad}'; names hold letters, digits, '_' and '.'"),
        ));
    }
    let mut filters = Vec::new();
    for piece in chain.map(|c| c.split('|')).into_iter().flatten() {
        filters.push(crate::rules::template::filters::parse(piece).map_err(|e| err(Some(position), e))?);
    }
    let raw = filters.iter().any(|f| matches!(f, Filter::Raw));
    Ok(Macro { name, raw, filters, position, part, hash: None })
}

/// Looks a variable up: the flat key first, then a dotted path (`attributes.sub1`
/// finds `{"attributes": {"sub1": …}}`).
pub fn lookup<'a>(vars: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = vars.get(name) {
        return Some(v);
    }
    let (head, rest) = name.split_once('.')?;
    match vars.get(head)? {
        Value::Object(inner) => lookup(inner, rest),
        _ => None,
    }
}

/// The text a JSON value renders as: strings as themselves, null as nothing,
/// numbers, booleans, arrays and objects as their JSON text.
pub fn value_text(value: Option<&Value>) -> Option<String> {
    match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    }
}

/// Where templates find their values.
pub trait Vars {
    /// The text of a variable; None when missing or null.
    fn text(&self, name: &str) -> Option<Cow<'_, str>>;
    /// The variable as JSON (objects whole), for the `json` filter.
    fn json(&self, name: &str) -> Option<Value> {
        self.text(name).map(|t| Value::String(t.into_owned()))
    }
}

impl Vars for Map<String, Value> {
    fn text(&self, name: &str) -> Option<Cow<'_, str>> {
        match lookup(self, name) {
            Some(Value::String(s)) => Some(Cow::Borrowed(s)),
            other => value_text(other).map(Cow::Owned),
        }
    }

    fn json(&self, name: &str) -> Option<Value> {
        lookup(self, name).filter(|v| !v.is_null()).cloned()
    }
}

/// Checks a variable name against what a conversion provides.
pub fn check_variable(m: &Macro) -> Result<(), TemplateError> {
    if let Some(h) = &m.hash {
        for p in &h.parts {
            if let HashPart::Var(n) = p {
                let part = Macro {
                    name: n.clone(),
                    raw: false,
                    filters: vec![],
                    position: m.position,
                    part: m.part,
                    hash: None,
                };
                check_variable(&part)?;
            }
        }
        return Ok(());
    }
    let known = CONVERSION_VARIABLES.contains(&m.name.as_str())
        || m.name == "attributes"
        || m.name == "click"
        || m.name.strip_prefix("attributes.").is_some_and(|k| !k.is_empty())
        || m.name.strip_prefix("click.").is_some_and(|k| !k.is_empty());
    if known {
        Ok(())
    } else {
        Err(err(
            Some(m.position),
            format!(
                "unknown variable \"{}\" (known: {}, attributes, attributes.KEY, click, click.KEY, click.clicked_at)",
                m.name,
                CONVERSION_VARIABLES.join(", ")
            ),
        ))
    }
}

/// Sample values used to check that a template renders to a valid URL.
pub fn sample_vars() -> Map<String, Value> {
    let mut vars = Map::new();
    for name in CONVERSION_VARIABLES {
        vars.insert((*name).to_string(), Value::String(format!("sample_{name}")));
    }
    vars.insert("attributes".into(), Value::Object(Map::new()));
    vars
}

/// Validates a JSON body template: every string's macros must be known.
pub fn validate_body_template(body: &Value) -> Result<(), TemplateError> {
    match body {
        Value::String(s) => {
            let t = Template::parse(s).map_err(|e| err(None, format!("in body string \"{s}\": {e}")))?;
            for m in t.macros() {
                if m.hash.is_some() {
                    return Err(err(None, format!("in body string \"{s}\": a {{hash:…}} with the secret is for URL templates; sign webhooks with signing_scheme")));
                }
                check_variable(m).map_err(|e| err(None, format!("in body string \"{s}\": {e}")))?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(validate_body_template),
        Value::Object(map) => map.values().try_for_each(validate_body_template),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::pattern::{pattern_has_variables, render_pattern};
    use super::*;
    use crate::rules::url_policy::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn url(t: &str, v: Value) -> String {
        render_url(&Template::parse(t).unwrap(), &vars(v), RenderOptions::default()).unwrap()
    }

    fn decode(s: &str) -> String {
        url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().unwrap().1.into_owned()
    }

    #[test]
    fn every_reserved_character_is_encoded_in_a_query_value() {
        let nasty = "a&b=c+d#e/f?g%h i:j@k!l$m'n(o)p*q,r;s[t]u\"v<w>x\\y^z`{|}";
        let out = url("https://n.test/pb?v={x}", json!({"x": nasty}));
        let value = out.strip_prefix("https://n.test/pb?v=").unwrap();
        assert!(value.chars().all(|c| c.is_ascii_alphanumeric() || "%-._~".contains(c)), "{value}");
        assert_eq!(decode(value), nasty);
    }

    #[test]
    fn unicode_is_utf8_percent_encoded_and_round_trips() {
        let out = url("https://n.test/pb?v={x}", json!({"x": "Zoë 😀 日本"}));
        assert_eq!(out, "https://n.test/pb?v=Zo%C3%AB%20%F0%9F%98%80%20%E6%97%A5%E6%9C%AC");
        assert_eq!(decode(out.split('=').nth(1).unwrap()), "Zoë 😀 日本");
    }

    #[test]
    fn unreserved_characters_stay() {
        assert_eq!(url("https://n.test/?v={x}", json!({"x": "AZaz09-._~"})), "https://n.test/?v=AZaz09-._~");
    }

    #[test]
    fn slash_is_encoded_in_a_path_segment() {
        let out = url("https://n.test/c/{x}/done", json!({"x": "a/b c"}));
        assert_eq!(out, "https://n.test/c/a%2Fb%20c/done");
    }

    #[test]
    fn literal_text_is_copied_unchanged() {
        let out = url("https://n.test/p?a=1&b=%20x&c={x}", json!({"x": "y"}));
        assert_eq!(out, "https://n.test/p?a=1&b=%20x&c=y");
    }

    #[test]
    fn missing_and_null_render_empty_and_scalars_as_json_text() {
        let v = json!({"n": null, "num": 12.5, "int": 7, "t": true, "f": false});
        assert_eq!(url("https://n.test/?a={missing}&b={n}", v.clone()), "https://n.test/?a=&b=");
        assert_eq!(url("https://n.test/?a={num}&b={int}&c={t}&d={f}", v), "https://n.test/?a=12.5&b=7&c=true&d=false");
    }

    #[test]
    fn raw_inserts_unencoded_and_default_fills_missing() {
        let v = json!({"blob": "a%20b&c=d", "x": "has space"});
        assert_eq!(url("https://n.test/?{blob|raw}", v.clone()), "https://n.test/?a%20b&c=d");
        assert_eq!(
            url("https://n.test/?a={nope|default:0}&b={x|default:z}", v.clone()),
            "https://n.test/?a=0&b=has%20space"
        );
        assert_eq!(url("https://n.test/?a={nope|default:a b}", v), "https://n.test/?a=a%20b");
    }

    #[test]
    fn drop_empty_params_removes_only_missing_ones() {
        let t = Template::parse("https://n.test/pb?cid={click_id}&amount={amount}&cur={currency}&x=1#frag").unwrap();
        let opts = RenderOptions { drop_empty_params: true };
        let v = vars(json!({"click_id": "c1", "currency": "EUR"}));
        assert_eq!(render_url(&t, &v, opts).unwrap(), "https://n.test/pb?cid=c1&cur=EUR&x=1#frag");
        let v = vars(json!({"amount": "5"}));
        assert_eq!(render_url(&t, &v, opts).unwrap(), "https://n.test/pb?amount=5&x=1#frag");
        let t = Template::parse("https://n.test/pb?amount={amount}").unwrap();
        assert_eq!(render_url(&t, &Map::new(), opts).unwrap(), "https://n.test/pb");
        let t = Template::parse("https://n.test/pb?a={amount}&b={currency}").unwrap();
        assert_eq!(render_url(&t, &vars(json!({"currency": "X"})), opts).unwrap(), "https://n.test/pb?b=X");
    }

    #[test]
    fn attributes_resolve_nested_or_flat() {
        let v = json!({"attributes": {"sub1": "s/1"}, "attributes.flat": "f"});
        assert_eq!(url("https://n.test/?s={attributes.sub1}&f={attributes.flat}", v), "https://n.test/?s=s%2F1&f=f");
    }

    #[test]
    fn braces_and_syntax_errors_name_their_position() {
        assert_eq!(Template::parse("https://n.test/?a={x").unwrap_err().position, Some(19));
        let e = Template::parse("https://n.test/?a=x}").unwrap_err();
        assert_eq!(e.position, Some(20));
        assert!(e.message.contains("unmatched '}'"));
        let e = Template::parse("https://n.test/?a={x{y}}").unwrap_err();
        assert!(e.message.contains("unclosed"));
        assert!(Template::parse("a={}").unwrap_err().message.contains("empty variable name"));
        assert!(Template::parse("a={a-b}").unwrap_err().message.contains("has '-'"));
        assert!(Template::parse("a={a|shout}").unwrap_err().message.contains("unknown filter"));
        assert_eq!(url("https://n.test/?j={{\"a\"}}", json!({})), "https://n.test/?j={\"a\"}");
    }

    #[test]
    fn validation_refuses_bad_templates() {
        let e = validate_url_template("https://n.test/?a={clickid}").unwrap_err();
        assert!(e.message.contains("unknown variable \"clickid\""), "{e}");
        assert_eq!(e.position, Some(19));
        assert!(validate_url_template("https://n.test/?s={sub1}").is_err());
        assert!(validate_url_template("https://n.test/?s={attributes.sub1}").is_ok());
        assert!(validate_url_template("https://n.test/?s={attributes.}").is_err());
        let e = validate_url_template("ftp://n.test/{click_id}").unwrap_err();
        assert!(e.message.contains("scheme \"ftp\""), "{e}");
        let e = validate_url_template("https://{click_id}.n.test/").unwrap_err();
        assert!(e.message.contains("scheme or host"), "{e}");
        let e = validate_url_template("https://n.test/a\u{7}b").unwrap_err();
        assert!(e.message.contains("control character"), "{e}");
        assert_eq!(e.position, Some(17));
        let e = validate_url_template(&format!("https://n.test/?a={}", "x".repeat(9000))).unwrap_err();
        assert!(e.message.contains("limit is 8192"), "{e}");
        assert!(validate_url_template("https://").is_err());
        assert!(validate_url_template("not a url {click_id}").is_err());
        assert!(validate_url_template("https://user:pw@n.test/").is_err());
        assert!(
            validate_url_template("https://n.test:8080/p/{click_id}?t={transaction_id}&a={amount|default:0}").is_ok()
        );
    }

    #[test]
    fn double_braces_are_the_same_macro_and_filters_chain() {
        let v = json!({"app_id": "a 1", "order": {"number": 42}, "amount": "49.90", "status": "sale"});
        assert_eq!(url("https://n.test/?a={{app_id}}&n={{order.number}}", v.clone()), "https://n.test/?a=a%201&n=42");
        assert_eq!(
            url("https://n.test/?p={amount|mul:0.5|round:2}&s={status|map:lead=0,sale=1}", v.clone()),
            "https://n.test/?p=24.95&s=1"
        );
        assert_eq!(url("https://n.test/?x={{ amount | mul:2 }}", v.clone()), "https://n.test/?x=99.8");
        // literal braces that are no macro stay literal; a broken double-brace macro is refused
        assert_eq!(url("https://n.test/?j={{\"a\"}}", json!({})), "https://n.test/?j={\"a\"}");
        assert!(Template::parse("https://n.test/?a={{app_id|nope}}").unwrap_err().message.contains("unknown filter"));
        // a filter that cannot apply is an error at render time, naming the macro
        let t = Template::parse("https://n.test/?p={status|mul:2}").unwrap();
        let e = render_url(&t, &vars(v), RenderOptions::default()).unwrap_err();
        assert!(e.contains("{status}: arithmetic: \"sale\" is not a number"), "{e}");
        // validation accepts filters on sample values it cannot compute
        assert!(validate_url_template(
            "https://n.test/?p={amount|mul:0.5|round:2}&t={occurred_at|tz:Europe/Kyiv|format:%Y-%m-%d %H:%M:%S}"
        )
        .is_ok());
        assert!(validate_url_template("https://n.test/?p={{clickid}}")
            .unwrap_err()
            .message
            .contains("unknown variable"));
    }

    #[test]
    fn a_hash_over_values_and_the_secret_is_left_for_send_time() {
        let t = validate_url_template("https://n.test/pb?id={transaction_id}&v={hash:md5:transaction_id,':',attributes.snuid,':',currency,':',secret}").unwrap();
        let v = vars(json!({"transaction_id": "tx-1", "currency": "EUR", "attributes": {"snuid": "u 9"}}));
        let (out, slots) = render_url_hashed(&t, &v, RenderOptions::default()).unwrap();
        assert_eq!(out, "https://n.test/pb?id=tx-1&v=");
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].at, out.len());
        let parts: Vec<Option<&str>> = slots[0].parts.iter().map(Option::as_deref).collect();
        assert_eq!(parts, vec![Some("tx-1"), Some(":"), Some("u 9"), Some(":"), Some("EUR"), Some(":"), None]);
        // a value shaped like the marker of 0.2.0 is only text, percent-encoded where needed
        let hostile = vars(json!({"transaction_id": "~pgpb-hash~sha256~W251bGxd~", "currency": "{hash}"}));
        let (out, slots) = render_url_hashed(&t, &hostile, RenderOptions::default()).unwrap();
        assert_eq!(out, "https://n.test/pb?id=~pgpb-hash~sha256~W251bGxd~&v=");
        assert_eq!(slots.len(), 1);
        // a raw value may not smuggle the slot character
        let raw = Template::parse("https://n.test/pb?r={click_id|raw}&v={hash:md5:click_id,secret}").unwrap();
        assert!(render_url_hashed(&raw, &vars(json!({"click_id": "a\u{1}b"})), RenderOptions::default()).is_err());
        let e = validate_url_template("https://n.test/?v={hash:md5:transaction_id}").unwrap_err();
        assert!(e.message.contains("without the secret"), "{e}");
        assert!(validate_url_template("https://n.test/?v={hash:crc32:transaction_id,secret}").is_err());
        assert!(validate_url_template("https://n.test/?v={hash:md5:txid,secret}")
            .unwrap_err()
            .message
            .contains("unknown variable"));
        assert!(validate_body_template(&json!({"v": "{hash:md5:transaction_id,secret}"})).is_err());
    }

    #[test]
    fn success_patterns_take_the_delivery_values_regex_escaped() {
        let v = vars(json!({"transaction_id": "tx.1+2"}));
        assert_eq!(render_pattern("^{transaction_id}:OK$", &v), "^tx\\.1\\+2:OK$");
        assert_eq!(render_pattern("^\\d{3}:{transaction_id}$", &v), "^\\d{3}:tx\\.1\\+2$");
        assert!(pattern_has_variables("^{transaction_id}:OK$"));
        assert!(!pattern_has_variables("^\\d{3}$"));
        let re = regex::Regex::new(&render_pattern("^{transaction_id}:OK$", &v)).unwrap();
        assert!(re.is_match("tx.1+2:OK") && !re.is_match("txa1+2:OK"));
    }

    #[test]
    fn nested_urls_are_encoded_twice_and_json_is_encoded_once() {
        let v = json!({"cb": "https://x.test/?a=1&b=2", "attributes": {"k": "v", "n": [1, 2]}});
        assert_eq!(
            url("https://n.test/?callback={cb|twice}", v.clone()),
            "https://n.test/?callback=https%253A%252F%252Fx.test%252F%253Fa%253D1%2526b%253D2"
        );
        assert_eq!(
            url("https://n.test/?d={attributes|json}", v),
            "https://n.test/?d=%7B%22k%22%3A%22v%22%2C%22n%22%3A%5B1%2C2%5D%7D"
        );
    }

    #[test]
    fn no_template_form_lets_a_variable_reach_the_scheme_host_or_port() {
        for t in [
            "http:///{click_id}:56002/pb",
            "https:{click_id}/pb",
            "http:\\\\{click_id}\\pb",
            "https://n.test\\@{click_id}/pb",
            "https://{click_id}/pb",
            "https://n.test:{click_id}/pb",
            "https://{attributes.h|raw}/pb",
            "https://n.test{click_id}/pb",
            "//n.test/{click_id}",
            "{click_id}",
            "{attributes.base|raw}/pb",
            "https:/n.test/{click_id}",
        ] {
            assert!(validate_url_template(t).is_err(), "{t} was accepted");
        }
        let e = validate_url_template("http:\\\\n.test\\pb").unwrap_err();
        assert!(e.message.contains("backslash"), "{e}");
        assert_eq!(e.position, Some(6));
        let e = validate_url_template("http:///{click_id}:56002/pb").unwrap_err();
        assert!(e.message.contains("empty host"), "{e}");
        // raw values in the path or query cannot move the host either
        assert!(validate_url_template("https://n.test/{attributes.p|raw}?q={attributes.q|raw}").is_ok());
        let o = literal_origin("HTTPS://N.Test/pb?x={click_id}").unwrap();
        assert_eq!((o.scheme.as_str(), o.host.as_str(), o.port), ("https", "n.test", Some(443)));
        assert_eq!(literal_origin("http://127.0.0.1:8080?a=1").unwrap().to_string(), "http://127.0.0.1:8080");
    }

    #[test]
    fn json_body_keeps_types_of_whole_macros() {
        let body = json!({"cid": "{click_id}", "amt": "{amount}", "msg": "sale {transaction_id}!", "n": 1, "miss": "{nope}", "d": "{nope|default:x}"});
        let v = vars(json!({"click_id": "c&1", "amount": 12.5, "transaction_id": "t1"}));
        let out = render_json(&body, &v).unwrap();
        assert_eq!(out, json!({"cid": "c&1", "amt": 12.5, "msg": "sale t1!", "n": 1, "miss": null, "d": "x"}));
        assert!(validate_body_template(&json!({"a": ["{click_id}", {"b": "{bogus}"}]})).is_err());
        assert!(validate_body_template(&json!({"a": ["{click_id}", {"b": "{attributes.x}"}]})).is_ok());
    }
}
