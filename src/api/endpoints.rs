//! Endpoint rows as the enqueue and preview read them, and their URL
//! templates parsed once per backend.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::spi::{SpiClient, SpiResult};
use pgrx::JsonB;
use serde_json::{Map, Value};

use super::object;
use super::rows;
use crate::rules::request::{self, Conversion, Endpoint};
use crate::rules::routing::{Filters, Router};
use crate::rules::template::Template;

/// A parsed URL template and whether its renderings need no URL check.
pub(super) type CachedTemplate = Rc<Result<(Template, bool), String>>;

thread_local! {
    /// Parsed URL templates by text: a 100k-row insert parses each endpoint's once.
    static TEMPLATES: RefCell<HashMap<String, CachedTemplate>> = RefCell::new(HashMap::new());
}

pub(super) fn cached_template(text: &str) -> CachedTemplate {
    TEMPLATES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(t) = cache.get(text) {
            return t.clone();
        }
        // validated again here: a template may have bypassed the endpoint trigger
        let entry = Rc::new(match crate::rules::url_policy::validate_url_template(text) {
            Ok(t) => {
                let trusted = !t.has_raw();
                Ok((t, trusted))
            }
            Err(e) => match Template::parse(text) {
                Ok(t) => Ok((t, false)),
                Err(_) => Err(format!("invalid url_template: {e}")),
            },
        });
        if cache.len() > 1000 {
            cache.clear();
        }
        cache.insert(text.to_string(), entry.clone());
        entry
    })
}

pub(super) struct EndpointRow {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) method: String,
    pub(super) url_template: CachedTemplate,
    pub(super) body_template: Option<Value>,
    pub(super) status_map: Option<Map<String, Value>>,
    pub(super) drop_empty_params: bool,
    /// success_body_pattern when it uses the delivery's variables (rendered per delivery)
    pub(super) pattern: Option<String>,
    /// initial_delay in seconds
    pub(super) delay_secs: f64,
}

impl EndpointRow {
    /// The endpoint as the renderer sees it, with its parsed URL template.
    fn endpoint<'a>(&'a self, url_template: &'a crate::rules::template::Template, trusted: bool) -> Endpoint<'a> {
        Endpoint {
            name: &self.name,
            kind: &self.kind,
            url_template,
            url_template_trusted: trusted,
            body_template: self.body_template.as_ref(),
            status_map: self.status_map.as_ref(),
            drop_empty_params: self.drop_empty_params,
        }
    }
}

/// The endpoints `which` names, with their router.
pub(super) fn load_endpoints(
    client: &SpiClient,
    tables: &rows::Tables,
    which: rows::Which,
) -> SpiResult<(Vec<EndpointRow>, Router)> {
    let (query, args) = rows::endpoint_rows(tables, which);
    let rows = client.select(&query, None, &args)?;
    let mut endpoints = Vec::with_capacity(rows.len());
    let mut filters = Vec::with_capacity(rows.len());
    for row in rows {
        let url_template_text = row.get::<String>(5)?.unwrap_or_default();
        endpoints.push(EndpointRow {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            name: row.get::<String>(2)?.unwrap_or_default(),
            kind: row.get::<String>(3)?.unwrap_or_default(),
            method: row.get::<String>(4)?.unwrap_or_else(|| "GET".into()),
            url_template: cached_template(&url_template_text),
            body_template: row.get::<JsonB>(6)?.map(|b| b.0),
            status_map: object(row.get::<JsonB>(7)?),
            drop_empty_params: row.get::<bool>(8)?.unwrap_or(false),
            pattern: row.get::<String>(13)?.filter(|p| crate::rules::template::pattern::pattern_has_variables(p)),
            delay_secs: row.get::<f64>(14)?.unwrap_or(0.0),
        });
        filters.push(Filters {
            events: row.get::<Vec<String>>(9)?,
            statuses: row.get::<Vec<String>>(10)?,
            partners: row.get::<Vec<String>>(11)?,
            conditions: object(row.get::<JsonB>(12)?),
        });
    }
    Ok((endpoints, Router::new(filters)))
}

/// An endpoint's success_body_pattern with this delivery's values, regex-escaped;
/// an error (the delivery is dead with it) when it outgrows the bound.
fn render_pattern(pattern: &str, conversion: &Conversion, e: &EndpointRow) -> Result<String, String> {
    let empty = crate::rules::template::Template { tokens: Vec::new() };
    let template = Rc::as_ref(&e.url_template).as_ref().map_or(&empty, |(t, _)| t);
    let endpoint = e.endpoint(template, false);
    let rendered =
        crate::rules::template::pattern::render_pattern(pattern, &request::ConversionVars::new(conversion, &endpoint));
    crate::rules::retry::check_success_pattern_size(&rendered)?;
    Ok(rendered)
}

/// The request and the filled success pattern of one delivery; a pattern
/// that outgrows its bound fails the request with the reason (it is never
/// sent without its rule).
pub(super) fn render_with_pattern(
    conversion: &Conversion,
    e: &EndpointRow,
    key: &str,
    now: i64,
    limits: request::Limits,
) -> (Result<request::Request, String>, Option<String>) {
    let rendered = render(conversion, e, key, now, limits);
    match e.pattern.as_deref().map(|p| render_pattern(p, conversion, e)).transpose() {
        Ok(pattern) => (rendered, pattern),
        Err(why) => (rendered.and(Err(why)), None),
    }
}

pub(super) fn render(
    conversion: &Conversion,
    e: &EndpointRow,
    key: &str,
    now: i64,
    limits: request::Limits,
) -> Result<request::Request, String> {
    let (template, trusted) = Rc::as_ref(&e.url_template).as_ref().map_err(Clone::clone)?;
    request::render(conversion, &e.endpoint(template, *trusted), key, now, limits)
}
