//! The enqueue trigger: conversions become deliveries in the statement that
//! inserts them (or changes their status), in one set-based pass.
//!
//! One statement-level trigger for both INSERT and UPDATE reads the transition
//! table once (with each conversion's click), routes every conversion with a
//! `routing::Router` built from the active endpoints (a hash lookup by partner,
//! never a loop over endpoints), renders each request in Rust, and writes the
//! deliveries with one multi-row INSERT per chunk. It runs as the extension's
//! owner (SECURITY DEFINER, pinned search_path, set in sql/enqueue.sql).

use std::rc::Rc;

use pgrx::datetime::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};

use crate::api::{cached_template, now_unix_micros, CachedTemplate};
use crate::rules::request::{self, Click, Conversion, Endpoint, PG_EPOCH_OFFSET_MICROS};
use crate::rules::routing::{Filters, Router, Subject};

/// Conversions read from the transition table per fetch.
const FETCH: i64 = 2_000;
/// Deliveries written per INSERT. The arrays are unnested in the select list
/// (a ProjectSet node, rows streamed) rather than in FROM (a function scan,
/// which materialises every row into a tuplestore first: 40% slower here).
const CHUNK: usize = 10_000;

struct EndpointRow {
    id: i64,
    name: String,
    kind: String,
    method: String,
    url_template: CachedTemplate,
    body_template: Option<Value>,
    status_map: Option<Map<String, Value>>,
    drop_empty_params: bool,
    /// success_body_pattern when it uses the delivery's variables (rendered per delivery)
    pattern: Option<String>,
    /// initial_delay in seconds
    delay_secs: f64,
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

fn object(v: Option<JsonB>) -> Option<Map<String, Value>> {
    match v.map(|j| j.0) {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    }
}

const ENDPOINT_COLUMNS: &str = "id, name, kind, method, url_template, body_template, status_map, drop_empty_params,
                                 events, statuses, partners, conditions, success_body_pattern,
                                 extract(epoch FROM initial_delay)::float8";

fn load_endpoints(client: &SpiClient, filter: &str, endpoint_id: Option<i64>) -> SpiResult<(Vec<EndpointRow>, Router)> {
    let rows = client.select(
        &format!("SELECT {ENDPOINT_COLUMNS} FROM postback.endpoints WHERE {filter} ORDER BY id"),
        None,
        &endpoint_id.map(|id| vec![id.into()]).unwrap_or_default(),
    )?;
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
            pattern: row.get::<String>(13)?.filter(|p| crate::rules::template::pattern_has_variables(p)),
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

/// The columns a conversion is read with, its click's included.
const CONVERSION_COLUMNS: &str = "c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                                  c.attributes, c.occurred_at, c.partner, k.attributes, k.clicked_at";

/// The same without the click (an INSERT's clicks come from the validation trigger).
const NO_CLICK_COLUMNS: &str = "c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                                c.attributes, c.occurred_at, c.partner, NULL::jsonb, NULL::timestamptz";

/// A click the validation trigger did not see (another BEFORE trigger changed the click_id).
fn lookup_click(client: &SpiClient, click_id: &str) -> SpiResult<Option<Click>> {
    let rows = client.select(
        "SELECT k.attributes, k.clicked_at FROM postback.clicks k WHERE k.click_id = $1",
        Some(1),
        &[click_id.into()],
    )?;
    let Some(row) = rows.into_iter().next() else { return Ok(None) };
    Ok(Some(Click {
        attributes: object(row.get::<JsonB>(1)?).unwrap_or_default(),
        clicked_at_unix_micros: row.get::<TimestampWithTimeZone>(2)?.map(unix_micros).unwrap_or(0),
    }))
}

/// A conversion as read (owning its text); `as_conversion` lends it to the renderer.
struct ConversionRow {
    id: i64,
    click_id: String,
    transaction_id: String,
    event: String,
    status: String,
    amount: Option<String>,
    currency: Option<String>,
    attributes: Map<String, Value>,
    occurred_at: i64,
    partner: Option<String>,
    click: Option<Click>,
}

impl ConversionRow {
    fn read(row: &pgrx::spi::SpiHeapTupleData) -> SpiResult<ConversionRow> {
        Ok(ConversionRow {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            click_id: row.get::<String>(2)?.unwrap_or_default(),
            transaction_id: row.get::<String>(3)?.unwrap_or_default(),
            event: row.get::<String>(4)?.unwrap_or_default(),
            status: row.get::<String>(5)?.unwrap_or_default(),
            amount: row.get::<String>(6)?,
            currency: row.get::<String>(7)?,
            attributes: object(row.get::<JsonB>(8)?).unwrap_or_default(),
            occurred_at: row.get::<TimestampWithTimeZone>(9)?.map(unix_micros).unwrap_or(0),
            partner: row.get::<String>(10)?,
            click: match row.get::<JsonB>(11)? {
                Some(a) => Some(Click {
                    attributes: object(Some(a)).unwrap_or_default(),
                    clicked_at_unix_micros: row.get::<TimestampWithTimeZone>(12)?.map(unix_micros).unwrap_or(0),
                }),
                None => None,
            },
        })
    }

    fn subject(&self) -> Subject<'_> {
        Subject {
            partner: self.partner.as_deref(),
            event: &self.event,
            status: &self.status,
            attributes: &self.attributes,
        }
    }

    fn as_conversion(&mut self) -> Conversion<'_> {
        Conversion {
            id: self.id,
            click_id: &self.click_id,
            transaction_id: &self.transaction_id,
            event: &self.event,
            status: &self.status,
            amount: self.amount.as_deref(),
            currency: self.currency.as_deref(),
            attributes: std::mem::take(&mut self.attributes),
            occurred_at_unix_micros: self.occurred_at,
            partner: self.partner.as_deref(),
            click: self.click.take(),
        }
    }
}

/// Delivery rows waiting to be written, column by column.
#[derive(Default)]
struct Pending {
    endpoint_id: Vec<i64>,
    conversion_id: Vec<i64>,
    event: Vec<String>,
    status: Vec<String>,
    key: Vec<String>,
    method: Vec<String>,
    url: Vec<String>,
    body: Vec<Option<String>>,
    error: Vec<Option<String>>,
    delay: Vec<f64>,
    pattern: Vec<Option<String>>,
    /// where the URL's {hash:…} digests go (jsonb text), out of band
    hashes: Vec<Option<String>>,
    /// deliveries written that are pending (not dead at enqueue)
    live: u64,
    /// writing into a 0.2.0 schema (see `Pending::statement`)
    legacy: bool,
}

impl Pending {
    fn len(&self) -> usize {
        self.key.len()
    }

    fn push(&mut self, e: &EndpointRow, c: &Conversion, key: String, rendered: Result<request::Request, String>) {
        self.delay.push(e.delay_secs);
        let pattern = e.pattern.as_deref().map(|p| render_pattern(p, c, e)).transpose();
        let rendered = match (rendered, &pattern) {
            (Ok(_), Err(why)) => Err(why.clone()),
            (r, _) => r,
        };
        self.pattern.push(pattern.ok().flatten());
        self.endpoint_id.push(e.id);
        self.conversion_id.push(c.id);
        self.event.push(c.event.to_string());
        self.status.push(c.status.to_string());
        self.method.push(e.method.clone());
        match rendered {
            Ok(r) if self.legacy => {
                // 0.2.0's schema: its in-band form, which nothing sends before the
                // update and the update moves out of band (counting them)
                self.url.push(crate::rules::url_hash::legacy_marked(&r.url, &r.hashes));
                self.body.push(r.body);
                self.hashes.push(None);
                self.error.push(None);
            }
            Ok(r) => {
                self.url.push(r.url);
                self.body.push(r.body);
                self.hashes.push(crate::rules::url_hash::to_json(&r.hashes));
                self.error.push(None);
            }
            Err(err) => {
                // nothing was rendered: the row is dead with its reason, and
                // `rendered = false` keeps a retry from ever sending it
                self.url.push(String::new());
                self.body.push(None);
                self.hashes.push(None);
                self.error.push(Some(err));
            }
        }
        self.key.push(key);
    }

    /// The INSERT that writes a chunk; prepared once per statement. `legacy`:
    /// the schema is still 0.2.0's (library upgraded, ALTER EXTENSION … UPDATE
    /// not yet run), which has no url_hashes or rendered column.
    fn statement(lifecycle: bool, legacy: bool) -> String {
        // A status can come back (approved → pending → approved): its key
        // exists then, and the repeated announcement is a no-op. A lifecycle
        // delivery waits behind the latest earlier one of its pair. New
        // conversions have new ids: their keys cannot exist yet (a restore,
        // which brings its deliveries along, never enqueues), and a plain INSERT
        // costs a quarter less than ON CONFLICT per row (measured: 200k rows,
        // 1.03 s vs 1.29 s); the unique index still refuses a duplicate loudly.
        let conflict = if lifecycle { "ON CONFLICT (idempotency_key) DO NOTHING" } else { "" };
        let (predecessor_column, predecessor) = if lifecycle {
            (
                " predecessor_id,",
                // ordered as deliveries_conversion is: one backward probe of that
                // index per delivery, whatever the history (never a scan of the
                // primary key filtering every row)
                " (SELECT p.id FROM postback.deliveries p
                      WHERE p.conversion_id = r.c AND p.endpoint_id = r.e
                      ORDER BY p.conversion_id DESC, p.endpoint_id DESC, p.id DESC LIMIT 1),",
            )
        } else {
            ("", "")
        };
        let (hash_columns, hashes) =
            if legacy { ("", "") } else { (", url_hashes, rendered", ", r.h::jsonb, r.err IS NULL") };
        format!(
            "INSERT INTO postback.deliveries
                    (endpoint_id, conversion_id, event, status, idempotency_key,{predecessor_column} method, url,
                     body, state, completed_at, last_error, next_attempt_at, success_pattern{hash_columns})
             SELECT r.e, r.c, r.ev, r.st, r.k,{predecessor} r.m, r.u, r.b,
                    CASE WHEN r.err IS NULL THEN 'pending' ELSE 'dead' END,
                    CASE WHEN r.err IS NOT NULL THEN now() END, r.err,
                    CASE WHEN r.delay > 0 THEN now() + r.delay * interval '1 second' ELSE now() END, r.pat{hashes}
               FROM (SELECT unnest($1) AS e, unnest($2) AS c, unnest($3) AS ev, unnest($4) AS st,
                            unnest($5) AS k, unnest($6) AS m, unnest($7) AS u, unnest($8) AS b,
                            unnest($9) AS err, unnest($10) AS delay, unnest($11) AS pat, unnest($12) AS h) AS r
                 {conflict}"
        )
    }

    fn argument_types() -> Vec<PgOid> {
        let text = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
        let mut types = vec![PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID); 2];
        types.extend(std::iter::repeat_n(text, 7));
        types.push(PgOid::BuiltIn(PgBuiltInOids::FLOAT8ARRAYOID));
        types.push(text);
        types.push(text);
        types
    }

    fn flush<'conn>(
        &mut self,
        client: &mut SpiClient<'conn>,
        plan: &pgrx::spi::PreparedStatement<'conn>,
    ) -> SpiResult<()> {
        if self.len() == 0 {
            return Ok(());
        }
        self.live += self.error.iter().filter(|e| e.is_none()).count() as u64;
        let taken = std::mem::take(self);
        self.live = taken.live;
        self.legacy = taken.legacy;
        let args: [pgrx::datum::DatumWithOid; 12] = [
            taken.endpoint_id.into(),
            taken.conversion_id.into(),
            taken.event.into(),
            taken.status.into(),
            taken.key.into(),
            taken.method.into(),
            taken.url.into(),
            taken.body.into(),
            taken.error.into(),
            taken.delay.into(),
            taken.pattern.into(),
            taken.hashes.into(),
        ];
        client.update(plan, None, &args)?;
        Ok(())
    }
}

fn unix_micros(ts: TimestampWithTimeZone) -> i64 {
    let pg: pg_sys::TimestampTz = ts.into();
    pg + PG_EPOCH_OFFSET_MICROS
}

/// AFTER INSERT and AFTER UPDATE, FOR EACH STATEMENT, on postback.conversions.
#[pg_trigger]
fn enqueue_conversions<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, pgrx::spi::Error> {
    let lifecycle = matches!(trigger.op(), Ok(pgrx::PgTriggerOperation::Update));
    let proposed = if lifecycle { 0 } else { crate::api::take_proposed() };
    if !lifecycle && restoring_a_dump() {
        // the dump holds the deliveries of these conversions already (pg_restore -j
        // loads tables in any order): enqueueing them again would collide
        return Ok(None);
    }
    let trigger_data = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    let (conversions, live) = Spi::connect_mut(|client| {
        // SAFETY: the pointer is this trigger call's own TriggerData; registering
        // it makes new_rows / old_rows visible to this SPI connection.
        unsafe { pg_sys::SPI_register_trigger_data(trigger_data) };
        let (endpoints, router) = load_endpoints(client, "active", None)?;
        if router.is_empty() {
            let n = if lifecycle {
                0
            } else {
                client.select("SELECT count(*) FROM new_rows", None, &[])?.first().get_one::<i64>()?.unwrap_or(0)
            };
            return Ok::<_, pgrx::spi::Error>((n, 0));
        }
        let source = if lifecycle {
            "FROM new_rows c JOIN old_rows o ON o.id = c.id AND o.status IS DISTINCT FROM c.status"
        } else {
            "FROM new_rows c"
        };
        // an INSERT's clicks were read by the validation trigger, row by row
        let query = if lifecycle {
            format!("SELECT {CONVERSION_COLUMNS} {source} LEFT JOIN postback.clicks k ON k.click_id = c.click_id")
        } else {
            format!("SELECT {NO_CLICK_COLUMNS} {source}")
        };
        let now = now_unix_micros();
        let limits = crate::gucs::request_limits();
        let legacy = schema_is_0_2_0(client)?;
        let plan = client.prepare_mut(Pending::statement(lifecycle, legacy).as_str(), &Pending::argument_types())?;
        let mut pending = Pending { legacy, ..Pending::default() };
        let mut matched = Vec::new();
        let mut seen = 0i64;
        let mut cursor = client.open_cursor(query.as_str(), &[]);
        loop {
            let rows = cursor.fetch(FETCH)?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                seen += 1;
                let mut c = ConversionRow::read(&row)?;
                if !lifecycle {
                    c.click = match crate::api::seen_click(&c.click_id) {
                        Some(found) => found.map(|k| Click {
                            attributes: match k.attributes {
                                Some(Value::Object(m)) => m,
                                _ => Map::new(),
                            },
                            clicked_at_unix_micros: k.clicked_at.map(unix_micros).unwrap_or(0),
                        }),
                        None => lookup_click(client, &c.click_id)?,
                    };
                }
                router.route(&c.subject(), &mut matched);
                if matched.is_empty() {
                    continue;
                }
                let conversion = c.as_conversion();
                for &i in &matched {
                    let e = &endpoints[i];
                    let key = request::idempotency_key(conversion.id, e.id, conversion.event, conversion.status);
                    let rendered = render(&conversion, e, &key, now, limits);
                    pending.push(e, &conversion, key, rendered);
                    if pending.len() >= CHUNK {
                        pending.flush(client, &plan)?;
                    }
                }
            }
        }
        pending.flush(client, &plan)?;
        Ok((seen, pending.live))
    })?;
    if live > 0 {
        crate::worker::shared::wake_at_commit();
    }
    if !lifecycle && proposed > conversions {
        Spi::run_with_args(
            "INSERT INTO postback.conversion_duplicates (duplicates) VALUES ($1)",
            &[((proposed - conversions) as i32).into()],
        )?;
    }
    Ok(None)
}

/// Whether the installed schema is still 0.2.0's: the library was upgraded and
/// `ALTER EXTENSION pg_postback UPDATE` has not run yet (inserts keep working).
fn schema_is_0_2_0(client: &SpiClient) -> SpiResult<bool> {
    let version = client
        .select("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_postback'", Some(1), &[])?
        .first()
        .get_one::<String>()?;
    Ok(version.as_deref() == Some("0.2.0"))
}

/// Whether this statement is pg_restore loading table data (a COPY in a session
/// pg_restore named): restored conversions bring their deliveries with them.
fn restoring_a_dump() -> bool {
    // SAFETY: debug_query_string is the backend's current statement text (or NULL)
    let query = unsafe {
        let q = pg_sys::debug_query_string;
        if q.is_null() {
            None
        } else {
            Some(std::ffi::CStr::from_ptr(q).to_string_lossy())
        }
    };
    let is_copy = query.is_some_and(|q| q.trim_start().get(..5).is_some_and(|w| w.eq_ignore_ascii_case("copy ")));
    is_copy
        && Spi::get_one::<String>("SELECT pg_catalog.current_setting('application_name')")
            .ok()
            .flatten()
            .is_some_and(|name| name == "pg_restore")
}

/// An endpoint's success_body_pattern with this delivery's values, regex-escaped;
/// an error (the delivery is dead with it) when it outgrows the bound.
fn render_pattern(pattern: &str, conversion: &Conversion, e: &EndpointRow) -> Result<String, String> {
    let empty = crate::rules::template::Template { tokens: Vec::new() };
    let template = Rc::as_ref(&e.url_template).as_ref().map_or(&empty, |(t, _)| t);
    let endpoint = e.endpoint(template, false);
    let rendered =
        crate::rules::template::render_pattern(pattern, &request::ConversionVars::new(conversion, &endpoint));
    crate::rules::retry::check_success_pattern_size(&rendered)?;
    Ok(rendered)
}

fn render(
    conversion: &Conversion,
    e: &EndpointRow,
    key: &str,
    now: i64,
    limits: request::Limits,
) -> Result<request::Request, String> {
    let (template, trusted) = Rc::as_ref(&e.url_template).as_ref().map_err(Clone::clone)?;
    request::render(conversion, &e.endpoint(template, *trusted), key, now, limits)
}

/// What `postback.preview` shows: the request one endpoint would get for one
/// conversion, rendered as the enqueue trigger would, with whether the
/// endpoint's filters route the conversion to it.
/// Returns `{idempotency_key, url, body, error, routed, url_hashes}`.
#[pg_extern(volatile)]
fn render_preview(endpoint_id: i64, conversion_id: i64) -> Vec<Option<String>> {
    Spi::connect(|client| {
        let (endpoints, router) = load_endpoints(client, "id = $1", Some(endpoint_id))?;
        let Some(e) = endpoints.first() else {
            return Ok::<_, pgrx::spi::Error>(vec![
                None,
                None,
                None,
                Some(format!("unknown endpoint id {endpoint_id}")),
                None,
            ]);
        };
        let rows = client.select(
            &format!(
                "SELECT {CONVERSION_COLUMNS} FROM postback.conversions c
                   LEFT JOIN postback.clicks k ON k.click_id = c.click_id WHERE c.id = $1"
            ),
            Some(1),
            &[conversion_id.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(vec![None, None, None, Some(format!("unknown conversion id {conversion_id}")), None]);
        };
        let mut c = ConversionRow::read(&row)?;
        let mut matched = Vec::new();
        router.route(&c.subject(), &mut matched);
        let routed = if matched.is_empty() { "false" } else { "true" };
        let conversion = c.as_conversion();
        let key = request::idempotency_key(conversion.id, e.id, conversion.event, conversion.status);
        let rendered = render(&conversion, e, &key, now_unix_micros(), crate::gucs::request_limits());
        Ok(match rendered {
            Ok(r) => {
                vec![
                    Some(key),
                    Some(r.url),
                    r.body,
                    None,
                    Some(routed.into()),
                    crate::rules::url_hash::to_json(&r.hashes),
                ]
            }
            Err(err) => vec![Some(key), None, None, Some(err), Some(routed.into()), None],
        })
    })
    .unwrap_or_else(|e| pgrx::error!("rendering a preview: {e}"))
}

/// Checks an endpoint's `partners`: NULL, or a non-empty list of partner names.
#[pg_extern(immutable, parallel_safe)]
fn validate_partners(partners: Vec<Option<String>>) -> bool {
    if partners.is_empty() {
        invalid("invalid partners: the list is empty (use NULL for every partner)");
    }
    for p in &partners {
        let Some(p) = p else { invalid("invalid partners: the list holds NULL") };
        crate::rules::routing::check_partner(p)
            .unwrap_or_else(|e| invalid(format!("invalid partners: \"{}\" {e}", p.escape_default())));
    }
    true
}

/// Checks an endpoint's `conditions` (a JSON object the attributes must contain).
#[pg_extern(immutable, parallel_safe)]
fn validate_conditions(conditions: JsonB) -> bool {
    crate::rules::routing::check_conditions(&conditions.0)
        .unwrap_or_else(|e| invalid(format!("invalid conditions: {e}")));
    true
}

fn invalid(message: impl Into<String>) -> ! {
    ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message.into());
}

/// The request a test delivery sends: clearly marked sample values
/// (`TEST-CLICK-…`, amount 0.00, the endpoint's first partner and event),
/// each overridable by a key of `sample` (click_id, transaction_id, event,
/// status, amount, currency, partner, attributes, click).
/// Returns `{idempotency_key, url, body, error, event, status, success_pattern, url_hashes}`.
#[pg_extern(volatile)]
fn render_test(endpoint_id: i64, sample: JsonB) -> Vec<Option<String>> {
    let Value::Object(sample) = sample.0 else { invalid("sample must be a JSON object") };
    let text = |key: &str, default: String| -> String {
        match sample.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => default,
            Some(other) => other.to_string(),
        }
    };
    Spi::connect(|client| {
        let (endpoints, router) = load_endpoints(client, "id = $1", Some(endpoint_id))?;
        let Some(e) = endpoints.first() else { invalid(format!("unknown endpoint id {endpoint_id}")) };
        let filters = router.filters(0);
        let now = now_unix_micros();
        let marker = format!("{:x}", now);
        let first = |list: &Option<Vec<String>>| list.as_ref().and_then(|l| l.first().cloned());
        let mut c = ConversionRow {
            id: 0,
            click_id: text("click_id", format!("TEST-CLICK-{marker}")),
            transaction_id: text("transaction_id", format!("TEST-{marker}")),
            event: text("event", first(&filters.events).unwrap_or_else(|| "test".into())),
            status: text("status", first(&filters.statuses).unwrap_or_else(|| "approved".into())),
            amount: Some(text("amount", "0.00".into())),
            currency: Some(text("currency", "USD".into())),
            attributes: match sample.get("attributes") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            },
            occurred_at: now,
            partner: sample
                .get("partner")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| first(&filters.partners)),
            click: Some(Click {
                attributes: match sample.get("click") {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                },
                clicked_at_unix_micros: now,
            }),
        };
        let (event, status) = (c.event.clone(), c.status.clone());
        let conversion = c.as_conversion();
        let key = format!("test.{}.{marker}", e.id);
        let rendered = render(&conversion, e, &key, now, crate::gucs::request_limits());
        let pattern = e.pattern.as_deref().map(|p| render_pattern(p, &conversion, e)).transpose();
        let rendered = match (rendered, &pattern) {
            (Ok(_), Err(why)) => Err(why.clone()),
            (r, _) => r,
        };
        let pattern = pattern.ok().flatten();
        Ok::<_, pgrx::spi::Error>(match rendered {
            // a 0.2.0 schema's send_test stores the URL as it is (see Pending::statement)
            Ok(r) if schema_is_0_2_0(client)? => {
                vec![
                    Some(key),
                    Some(crate::rules::url_hash::legacy_marked(&r.url, &r.hashes)),
                    r.body,
                    None,
                    Some(event),
                    Some(status),
                    pattern,
                ]
            }
            Ok(r) => vec![
                Some(key),
                Some(r.url),
                r.body,
                None,
                Some(event),
                Some(status),
                pattern,
                crate::rules::url_hash::to_json(&r.hashes),
            ],
            Err(err) => vec![Some(key), None, None, Some(err), Some(event), Some(status), pattern, None],
        })
    })
    .unwrap_or_else(|e| pgrx::error!("rendering a test request: {e}"))
}
