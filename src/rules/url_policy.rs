//! What an endpoint URL may be (pure): a literal http(s) scheme, host and port
//! that no value can move, a URL that parses once rendered.

use std::fmt;

use crate::rules::template::{
    check_variable, err, render_url, sample_vars, Part, RenderOptions, Template, TemplateError, Token,
};
use serde_json::{Map, Value};

/// Validates an endpoint URL template: syntax, known variables, no macros in
/// the scheme or host, http(s) only, and a URL that parses once rendered.
pub fn validate_url_template(text: &str) -> Result<Template, TemplateError> {
    let template = Template::parse(text)?;
    let origin = literal_origin(text)?;
    for m in template.macros() {
        check_variable(m)?;
        if m.part == Part::Authority {
            return Err(err(
                Some(m.position),
                format!(
                    "variable \"{}\" in the scheme or host; only the path, query and fragment may hold variables",
                    m.name
                ),
            ));
        }
    }
    let mut vars = sample_vars();
    // attributes and click values used by the template get a sample value too
    let mut click = Map::new();
    if let Some(Value::Object(attrs)) = vars.get_mut("attributes") {
        for m in template.macros() {
            if let Some(key) = m.name.strip_prefix("attributes.") {
                attrs.insert(key.to_string(), Value::String("sample".into()));
            }
            if let Some(key) = m.name.strip_prefix("click.") {
                click.insert(key.to_string(), Value::String("sample".into()));
            }
        }
    }
    vars.insert("click".into(), Value::Object(click));
    let rendered =
        render_url(&template, &vars, RenderOptions::default()).unwrap_or_else(|_| sample_fallback(&template));
    let first = check_url(&rendered)?;
    // A second rendering with different, hostile-looking values must land on
    // the same scheme, host and port: no value can move the request elsewhere.
    let mut other = vars.clone();
    for (name, value) in other.iter_mut() {
        if name != "attributes" && name != "click" {
            *value = Value::String(format!("x.{name}:1@other.test\\/?#"));
        }
    }
    for nested in ["attributes", "click"] {
        if let Some(Value::Object(attrs)) = other.get_mut(nested) {
            for value in attrs.values_mut() {
                *value = Value::String("y:2@elsewhere.test/\\".into());
            }
        }
    }
    let second = check_url(
        &render_url(&template, &other, RenderOptions::default()).unwrap_or_else(|_| sample_fallback(&template)),
    )?;
    for parsed in [&first, &second] {
        if Origin::of(parsed) != origin {
            return Err(err(
                None,
                format!(
                    "a variable can change the scheme, host or port (renders to {}); they must be literal",
                    parsed.origin().ascii_serialization()
                ),
            ));
        }
    }
    Ok(template)
}

/// The template with every macro left out: what validation checks when a
/// filter cannot apply to sample values (arithmetic on a sample text).
fn sample_fallback(template: &Template) -> String {
    template
        .tokens
        .iter()
        .map(|t| match t {
            Token::Literal(l) => l.clone(),
            Token::Macro(_) => "x".to_string(),
        })
        .collect()
}

/// Scheme, host and port of a URL: what a delivery may never change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Origin {
    pub fn of(url: &url::Url) -> Origin {
        Origin {
            scheme: url.scheme().to_string(),
            host: url.host_str().unwrap_or("").to_ascii_lowercase(),
            port: url.port_or_known_default(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}://{}:{}", self.scheme, self.host, p),
            None => write!(f, "{}://{}", self.scheme, self.host),
        }
    }
}

/// The scheme, host and port an endpoint URL template spells out literally:
/// it must start with `http://` or `https://`, hold no backslash, and have a
/// non-empty authority free of macros before the first `/`, `?` or `#`.
pub fn literal_origin(text: &str) -> Result<Origin, TemplateError> {
    if let Some(i) = text.find('\\') {
        return Err(err(
            Some(text[..i].chars().count() + 1),
            "backslash in the URL template (write %5C for a literal one)",
        ));
    }
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    let rest_at = if lower.starts_with("https://") {
        8
    } else if lower.starts_with("http://") {
        7
    } else {
        let scheme = text.split(':').next().unwrap_or("");
        let looks_like_scheme = !scheme.is_empty()
            && scheme.len() < text.len()
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
        return Err(err(
            Some(1),
            if looks_like_scheme && !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                format!("scheme \"{scheme}\" is not allowed; use http or https")
            } else {
                "the URL template must start with http:// or https:// followed by a literal host".to_string()
            },
        ));
    };
    let rest = &text[rest_at..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() {
        return Err(err(Some(rest_at + 1), "empty host after the scheme; the host must be literal"));
    }
    if let Some(i) = authority.find(['{', '}']) {
        return Err(err(
            Some(text[..rest_at + i].chars().count() + 1),
            "variable in the scheme or host; only the path, query and fragment may hold variables",
        ));
    }
    let parsed = check_url(&format!("{}{}/", &text[..rest_at], authority))?;
    Ok(Origin::of(&parsed))
}

/// Checks a rendered URL: it parses, its scheme is http or https, it has a host.
pub fn check_url(rendered: &str) -> Result<url::Url, TemplateError> {
    let parsed = url::Url::parse(rendered).map_err(|e| err(None, format!("URL \"{rendered}\" does not parse: {e}")))?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(err(None, format!("scheme \"{}\" is not allowed; use http or https", parsed.scheme())));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(err(None, format!("URL \"{rendered}\" has no host")));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(err(None, "credentials in the URL are not allowed; use the endpoint's headers"));
    }
    Ok(parsed)
}
