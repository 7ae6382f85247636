//! The triggers on postback.conversions: validation (per row) and enqueue (per
//! statement), and the per-statement state they share (proposed rows, clicks
//! found).
//!
//! The enqueue trigger: conversions become deliveries in the statement that
//! inserts them (or changes their status), in one set-based pass.
//!
//! One statement-level trigger for both INSERT and UPDATE reads the transition
//! table once (with each conversion's click), routes every conversion with a
//! `routing::Router` built from the active endpoints (a hash lookup by partner,
//! never a loop over endpoints), renders each request in Rust, and writes the
//! deliveries with one multi-row INSERT per chunk. It runs as the extension's
//! owner (SECURITY DEFINER, pinned search_path, set in sql/enqueue.sql).

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datetime::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};

use super::endpoints::{load_endpoints, render_with_pattern, EndpointRow};
use super::rows::{self, FoundClick};
use super::{now_unix_micros, object, raise, unix_micros, OrRaise};
use crate::rules::request::{self, Click, Conversion};
use crate::rules::routing::Subject;

/// Conversions read from the transition table per fetch.
const FETCH: i64 = 2_000;
/// Deliveries written per INSERT. The arrays are unnested in the select list
/// (a ProjectSet node, rows streamed) rather than in FROM (a function scan,
/// which materialises every row into a tuplestore first: 40% slower here).
const CHUNK: usize = 10_000;

thread_local! {
    /// Rows proposed to INSERT on postback.conversions by the current statement
    /// (reset by the BEFORE STATEMENT trigger); rows skipped by ON CONFLICT DO
    /// NOTHING are counted here but never reach the transition table.
    static PROPOSED_CONVERSIONS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// BEFORE INSERT OR UPDATE trigger on postback.conversions. Per row: refuses
/// a bad row with a message naming the column and the transaction_id, and
/// counts proposed rows. Per statement: resets that count.
#[pg_trigger]
fn conversions_validate<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::datum::TryFromDatumError> {
    let Some(row) = trigger.new() else {
        PROPOSED_CONVERSIONS.with(|c| c.set(0));
        SEEN_CLICKS.with(|c| c.borrow_mut().clear());
        LATE.with(|l| {
            let mut l = l.borrow_mut();
            l.transaction_ids.clear();
            l.rolled_until = rows::conversions_rolled_until();
        });
        return Ok(None);
    };
    let click_id: Option<&str> = row.get_by_name("click_id")?;
    let transaction_id: Option<&str> = row.get_by_name("transaction_id")?;
    let event: Option<&str> = row.get_by_name("event")?;
    let status: Option<&str> = row.get_by_name("status")?;
    let currency: Option<&str> = row.get_by_name("currency")?;
    // a 0.1.0 schema (library upgraded, ALTER EXTENSION … UPDATE not yet run) has no partner
    let (has_partner, partner): (bool, Option<&str>) = match row.get_by_name("partner") {
        Ok(p) => (true, p),
        Err(pgrx::datum::TryFromDatumError::NoSuchAttributeName(_)) => (false, None),
        Err(e) => return Err(e),
    };
    let fields = crate::rules::conversion_rules::Fields { click_id, transaction_id, event, status, currency, partner };
    crate::rules::conversion_rules::check(&fields).or_raise();
    let inserting = matches!(trigger.op(), Ok(pgrx::PgTriggerOperation::Insert));
    if !has_partner {
        if inserting {
            PROPOSED_CONVERSIONS.with(|c| c.set(c.get() + 1));
        }
        return Ok(Some(row.into_owned()));
    }
    if !inserting {
        // a conversion's history stays with one partner
        let old_partner =
            trigger.old().and_then(|o| o.get_by_name::<&str>("partner").ok().flatten().map(str::to_string));
        if old_partner.as_deref() != partner {
            raise(crate::rules::conversion_rules::partner_change(transaction_id, old_partner.as_deref(), partner));
        }
        return Ok(Some(row.into_owned()));
    }
    PROPOSED_CONVERSIONS.with(|c| c.set(c.get() + 1));
    note_if_late(&row, transaction_id)?;
    let click_id = click_id.unwrap_or("");
    let tables =
        rows::Tables::for_trigger_on(trigger.relid().unwrap_or_else(|e| pgrx::error!("the trigger's relation: {e}")));
    let click = rows::find_click(&tables, click_id);
    let from_click = match (&click, partner) {
        (Some(k), None) => k.partner.clone(),
        _ => None,
    };
    SEEN_CLICKS.with(|c| c.borrow_mut().insert(click_id.to_string(), click));
    if let Some(found) = from_click {
        let mut row = row.into_owned();
        row.set_by_name("partner", found)?;
        return Ok(Some(row));
    }
    Ok(Some(row.into_owned()))
}

thread_local! {
    /// Clicks looked up for the rows of the current INSERT, by click_id, so
    /// that the enqueue trigger reads each click once per conversion without a
    /// second look-up (reset by the BEFORE STATEMENT trigger).
    static SEEN_CLICKS: RefCell<HashMap<String, Option<FoundClick>>> = RefCell::new(HashMap::new());
}

/// Rows of the current INSERT created before the hour conversion_rollup has
/// counted up to (a back-dated insert, or a transaction open for an hour): the
/// enqueue trigger has them counted in, from its transition table, so that only
/// rows actually inserted count (ON CONFLICT DO NOTHING skips some proposed
/// ones). Rows of the present, nearly all, cost one comparison.
#[derive(Default)]
struct Late {
    /// rollup_state.conversions_until in unix µs; None before the first roll-up
    /// (or on a schema older than 0.3.0)
    rolled_until: Option<i64>,
    transaction_ids: Vec<String>,
}

thread_local! {
    static LATE: RefCell<Late> = RefCell::new(Late::default());
}

fn note_if_late(
    row: &PgHeapTuple<'_, impl WhoAllocated>,
    transaction_id: Option<&str>,
) -> Result<(), pgrx::datum::TryFromDatumError> {
    let Some(until) = LATE.with(|l| l.borrow().rolled_until) else {
        return Ok(());
    };
    let created_at: Option<TimestampWithTimeZone> = row.get_by_name("created_at")?;
    if created_at.is_some_and(|t| unix_micros(t) < until) {
        LATE.with(|l| l.borrow_mut().transaction_ids.push(transaction_id.unwrap_or("").to_string()));
    }
    Ok(())
}

/// Returns and resets the current INSERT's late rows (see `Late`).
fn take_late() -> Vec<String> {
    LATE.with(|l| std::mem::take(&mut l.borrow_mut().transaction_ids))
}

/// The click the validation trigger found for `click_id` in this statement:
/// `Some(None)` when it looked and there was none, `None` when it did not look.
fn seen_click(click_id: &str) -> Option<Option<FoundClick>> {
    SEEN_CLICKS.with(|c| c.borrow().get(click_id).cloned())
}

/// Returns and resets the count of proposed conversion rows (see above).
pub(super) fn take_proposed() -> i64 {
    PROPOSED_CONVERSIONS.with(|c| c.replace(0))
}

/// A conversion as read (owning its text); `as_conversion` lends it to the renderer.
pub(super) struct ConversionRow {
    pub(super) id: i64,
    pub(super) click_id: String,
    pub(super) transaction_id: String,
    pub(super) event: String,
    pub(super) status: String,
    pub(super) amount: Option<String>,
    pub(super) currency: Option<String>,
    pub(super) attributes: Map<String, Value>,
    pub(super) occurred_at: i64,
    pub(super) partner: Option<String>,
    pub(super) click: Option<Click>,
}

impl ConversionRow {
    /// Reads `rows::CONVERSION_COLUMNS` (or `NO_CLICK_COLUMNS`) from the first column on.
    pub(super) fn read(row: &pgrx::spi::SpiHeapTupleData) -> SpiResult<ConversionRow> {
        Self::read_from(row, 1)
    }

    /// Reads the conversion columns starting at column `first`.
    pub(super) fn read_from(row: &pgrx::spi::SpiHeapTupleData, first: usize) -> SpiResult<ConversionRow> {
        let at = |n: usize| first + n - 1;
        Ok(ConversionRow {
            id: row.get::<i64>(at(1))?.unwrap_or_default(),
            click_id: row.get::<String>(at(2))?.unwrap_or_default(),
            transaction_id: row.get::<String>(at(3))?.unwrap_or_default(),
            event: row.get::<String>(at(4))?.unwrap_or_default(),
            status: row.get::<String>(at(5))?.unwrap_or_default(),
            amount: row.get::<String>(at(6))?,
            currency: row.get::<String>(at(7))?,
            attributes: object(row.get::<JsonB>(at(8))?).unwrap_or_default(),
            occurred_at: row.get::<TimestampWithTimeZone>(at(9))?.map(unix_micros).unwrap_or(0),
            partner: row.get::<String>(at(10))?,
            click: match row.get::<JsonB>(at(11))? {
                Some(a) => Some(Click {
                    attributes: object(Some(a)).unwrap_or_default(),
                    clicked_at_unix_micros: row.get::<TimestampWithTimeZone>(at(12))?.map(unix_micros).unwrap_or(0),
                }),
                None => None,
            },
        })
    }

    pub(super) fn subject(&self) -> Subject<'_> {
        Subject {
            partner: self.partner.as_deref(),
            event: &self.event,
            status: &self.status,
            attributes: &self.attributes,
        }
    }

    pub(super) fn as_conversion(&mut self) -> Conversion<'_> {
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
    /// the conversions' click ids, when deliveries carry them (Citus shards)
    click_id: Vec<String>,
    distributed: bool,
}

impl Pending {
    fn len(&self) -> usize {
        self.key.len()
    }

    fn push(
        &mut self,
        e: &EndpointRow,
        c: &Conversion,
        key: String,
        (rendered, pattern): (Result<request::Request, String>, Option<String>),
    ) {
        self.delay.push(e.delay_secs);
        self.pattern.push(pattern);
        self.endpoint_id.push(e.id);
        self.conversion_id.push(c.id);
        if self.distributed {
            self.click_id.push(c.click_id.to_string());
        }
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

    /// The INSERT that writes a chunk; prepared once per statement.
    fn statement(tables: &rows::Tables, lifecycle: bool, legacy: bool) -> String {
        rows::delivery_insert(tables, lifecycle, legacy)
    }

    fn argument_types() -> Vec<PgOid> {
        let text = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
        let mut types = vec![PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID); 2];
        types.extend(std::iter::repeat_n(text, 7));
        types.push(PgOid::BuiltIn(PgBuiltInOids::FLOAT8ARRAYOID));
        types.push(text);
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
        self.distributed = taken.distributed;
        let args: [pgrx::datum::DatumWithOid; 13] = [
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
            taken.click_id.into(),
        ];
        client.update(plan, None, &args)?;
        Ok(())
    }
}

/// AFTER INSERT and AFTER UPDATE, FOR EACH STATEMENT, on postback.conversions.
#[pg_trigger]
fn enqueue_conversions<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, pgrx::spi::Error> {
    let lifecycle = matches!(trigger.op(), Ok(pgrx::PgTriggerOperation::Update));
    let proposed = if lifecycle { 0 } else { take_proposed() };
    let late = if lifecycle { Vec::new() } else { take_late() };
    if !lifecycle && restoring_a_dump() {
        // the dump holds the deliveries of these conversions already (pg_restore -j
        // loads tables in any order): enqueueing them again would collide
        return Ok(None);
    }
    let tables =
        rows::Tables::for_trigger_on(trigger.relid().unwrap_or_else(|e| pgrx::error!("the trigger's relation: {e}")));
    let trigger_data = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    let (conversions, live) = Spi::connect_mut(|client| {
        // SAFETY: the pointer is this trigger call's own TriggerData; registering
        // it makes new_rows / old_rows visible to this SPI connection.
        unsafe { pg_sys::SPI_register_trigger_data(trigger_data) };
        if !late.is_empty() {
            client.update(rows::count_late_conversions(&tables).as_str(), None, &[late.into()])?;
        }
        let (endpoints, router) = load_endpoints(client, &tables, rows::Which::Active)?;
        if router.is_empty() {
            let n = if lifecycle {
                0
            } else {
                client.select(rows::COUNT_NEW_ROWS, None, &[])?.first().get_one::<i64>()?.unwrap_or(0)
            };
            return Ok::<_, pgrx::spi::Error>((n, 0));
        }
        let query = rows::transition_rows(&tables, lifecycle);
        let now = now_unix_micros();
        let limits = crate::gucs::request_limits();
        let legacy = schema_is_0_2_0(client)?;
        let plan =
            client.prepare_mut(Pending::statement(&tables, lifecycle, legacy).as_str(), &Pending::argument_types())?;
        let mut pending = Pending { legacy, distributed: tables.distributed, ..Pending::default() };
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
                    // the validation trigger looked the click up, row by row
                    let found = seen_click(&c.click_id).unwrap_or_else(|| rows::find_click(&tables, &c.click_id));
                    c.click = found.map(click_of);
                }
                router.route(&c.subject(), &mut matched);
                if matched.is_empty() {
                    continue;
                }
                let conversion = c.as_conversion();
                for &i in &matched {
                    let e = &endpoints[i];
                    let key = request::idempotency_key(conversion.id, e.id, conversion.event, conversion.status);
                    let rendered = render_with_pattern(&conversion, e, &key, now, limits);
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
        Spi::run_with_args(rows::INSERT_DUPLICATES, &[((proposed - conversions) as i32).into()])?;
    }
    Ok(None)
}

/// A click the validation trigger found, as the templates read it.
fn click_of(k: FoundClick) -> Click {
    Click {
        attributes: match k.attributes {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        },
        clicked_at_unix_micros: k.clicked_at.map(unix_micros).unwrap_or(0),
    }
}

/// Whether the installed schema is still 0.2.0's: the library was upgraded and
/// `ALTER EXTENSION pg_postback UPDATE` has not run yet (inserts keep working).
pub(super) fn schema_is_0_2_0(client: &SpiClient) -> SpiResult<bool> {
    let version = client.select(rows::EXTENSION_VERSION, Some(1), &[])?.first().get_one::<String>()?;
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
    is_copy && Spi::get_one::<String>(rows::APPLICATION_NAME).ok().flatten().is_some_and(|name| name == "pg_restore")
}
