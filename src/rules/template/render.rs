//! Rendering a parsed template: URLs (each value percent-encoded for where it
//! stands; `{hash:…}` positions kept beside the URL), plain text, JSON bodies.

use serde_json::{Map, Value};

use super::filters::Filter;
use super::{lookup, Template, Token, Vars};
use crate::rules::text::push_encoded;

#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions {
    /// Drop a `key=value` query parameter whose macros all came out missing.
    pub drop_empty_params: bool,
}

/// One `key=value` piece of the query while rendering.
#[derive(Default)]
struct Param {
    text: String,
    has_missing: bool,
    has_present: bool,
}

/// Renders a URL template: values are encoded for the part they stand in.
/// A `{hash:…}` leaves nothing in the URL (see [`render_url_hashed`]).
pub fn render_url<V: Vars + ?Sized>(template: &Template, vars: &V, options: RenderOptions) -> Result<String, String> {
    render_url_hashed(template, vars, options).map(|(url, _)| url)
}

/// Stands, while one URL is rendered, where a `{hash:…}` goes. No value can
/// produce it: encoded values are printable ASCII, and a raw value with a
/// control character is refused.
const SLOT: char = '\u{1}';

/// A URL while it is rendered: what comes before the query, the query's
/// parameters, the fragment.
#[derive(Default)]
struct UrlParts {
    head: String,
    query: Option<Vec<Param>>,
    fragment: Option<String>,
}

impl UrlParts {
    /// Literal template text: `?`, `&` and `#` open the query, a parameter, the fragment.
    fn push_literal(&mut self, text: &str) {
        for c in text.chars() {
            match (&mut self.query, &mut self.fragment) {
                (_, Some(frag)) => frag.push(c),
                (_, None) if c == '#' => self.fragment = Some(String::new()),
                (None, None) if c == '?' => self.query = Some(vec![Param::default()]),
                (None, None) => self.head.push(c),
                (Some(params), None) if c == '&' => params.push(Param::default()),
                (Some(params), None) => params.last_mut().expect("one param").text.push(c),
            }
        }
    }

    /// Where a macro's value goes; a query parameter remembers whether it was present.
    fn target(&mut self, present: bool) -> &mut String {
        match (&mut self.query, &mut self.fragment) {
            (_, Some(frag)) => frag,
            (Some(params), None) => {
                let param = params.last_mut().expect("one param");
                param.has_present |= present;
                param.has_missing |= !present;
                &mut param.text
            }
            (None, None) => &mut self.head,
        }
    }

    fn assemble(self, options: RenderOptions) -> String {
        let mut out = self.head;
        if let Some(params) = self.query {
            let kept: Vec<&str> = params
                .iter()
                .filter(|p| !(options.drop_empty_params && p.has_missing && !p.has_present))
                .map(|p| p.text.as_str())
                .collect();
            if !kept.is_empty() {
                out.push('?');
                out.push_str(&kept.join("&"));
            }
        }
        if let Some(frag) = self.fragment {
            out.push('#');
            out.push_str(&frag);
        }
        out
    }
}

/// Renders a URL template and says where its `{hash:…}` digests go: the URL
/// has nothing at those positions, and the slots (out of band) carry the
/// offsets and the values to hash with the secret when the request is sent.
pub fn render_url_hashed<V: Vars + ?Sized>(
    template: &Template,
    vars: &V,
    options: RenderOptions,
) -> Result<(String, Vec<crate::rules::url_hash::HashSlot>), String> {
    let mut slots: Vec<crate::rules::url_hash::HashSlot> = Vec::new();
    let mut parts = UrlParts::default();
    for token in &template.tokens {
        let m = match token {
            Token::Literal(text) => {
                parts.push_literal(text);
                continue;
            }
            Token::Macro(m) => m,
        };
        let value = match &m.hash {
            Some(h) => {
                slots.push(crate::rules::url_hash::HashSlot {
                    at: 0,
                    algorithm: h.algorithm.clone(),
                    parts: h.parts(vars),
                });
                Some(SLOT.to_string())
            }
            None => m.value(vars)?,
        };
        if m.raw && value.as_deref().is_some_and(|v| v.contains(char::is_control)) {
            return Err(format!("{{{}|raw}}: the value has a control character", m.name));
        }
        let target = parts.target(value.is_some());
        let value = value.unwrap_or_default();
        if m.raw || m.hash.is_some() {
            target.push_str(&value);
        } else {
            push_encoded(target, &value);
        }
    }
    let out = parts.assemble(options);
    if slots.is_empty() {
        return Ok((out, slots));
    }
    take_slots(&out, slots)
}

/// The URL without its slot characters, each slot given the byte offset where it stood.
fn take_slots(
    out: &str,
    mut slots: Vec<crate::rules::url_hash::HashSlot>,
) -> Result<(String, Vec<crate::rules::url_hash::HashSlot>), String> {
    let mut url = String::with_capacity(out.len());
    let mut n = 0;
    for c in out.chars() {
        if c == SLOT {
            let slot = slots.get_mut(n).ok_or("a {hash:…} position was lost while rendering")?;
            slot.at = url.len();
            n += 1;
        } else {
            url.push(c);
        }
    }
    if n != slots.len() {
        return Err("a {hash:…} position was lost while rendering".into());
    }
    Ok((url, slots))
}

/// Renders a template as plain text (no URL encoding), e.g. a string inside a
/// JSON body template.
pub fn render_text(template: &Template, vars: &Map<String, Value>) -> Result<String, String> {
    let mut out = String::new();
    for token in &template.tokens {
        match token {
            Token::Literal(text) => out.push_str(text),
            Token::Macro(m) => out.push_str(&m.value(vars)?.unwrap_or_default()),
        }
    }
    Ok(out)
}

/// Renders a JSON body template: every string may hold macros; a string that
/// is exactly one macro without filters keeps the variable's JSON type
/// (`"{amount}"` → `12.5`).
pub fn render_json(body: &Value, vars: &Map<String, Value>) -> Result<Value, String> {
    Ok(match body {
        Value::String(s) => {
            let t = Template::parse(s).map_err(|e| e.to_string())?;
            match t.tokens.as_slice() {
                [Token::Macro(m)] if m.filters.is_empty() => match lookup(vars, &m.name) {
                    Some(v) if !v.is_null() => v.clone(),
                    _ => Value::Null,
                },
                [Token::Macro(m)] if m.filters.iter().all(|f| matches!(f, Filter::Default(_))) => {
                    match lookup(vars, &m.name) {
                        Some(v) if !v.is_null() => v.clone(),
                        _ => m.value(vars)?.map(Value::String).unwrap_or(Value::Null),
                    }
                }
                _ => Value::String(render_text(&t, vars)?),
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| render_json(v, vars)).collect::<Result<_, _>>()?),
        Value::Object(map) => Value::Object(
            map.iter().map(|(k, v)| Ok((k.clone(), render_json(v, vars)?))).collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}
