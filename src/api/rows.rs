//! Every SQL statement of the SQL-facing layer (the worker keeps its own in
//! worker/queue.rs): the columns read, the look-ups, the delivery INSERT.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datetime::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

/// Where the statements of the conversions' triggers read and write:
/// pg_postback's own tables, or — in a trigger on a Citus shard of
/// postback.conversions (its tables distributed) — the shards co-located with
/// it and this node's placements of the reference tables. A statement run
/// from a shard's trigger must never name a Citus table: Citus refuses a
/// distributed query from inside a query on a shard.
#[derive(Debug)]
pub(super) struct Tables {
    pub conversions: String,
    pub clicks: String,
    pub deliveries: String,
    pub endpoints: String,
    /// deliveries carry their conversion's click_id (the distribution column)
    pub distributed: bool,
}

impl Tables {
    fn own() -> Self {
        Tables {
            conversions: "postback.conversions".into(),
            clicks: "postback.clicks".into(),
            deliveries: "postback.deliveries".into(),
            endpoints: "postback.endpoints".into(),
            distributed: false,
        }
    }

    /// The tables for a trigger on `relid`: pg_postback's own unless `relid` is
    /// a shard (`conversions_<shardid>`); resolved once per relation and backend.
    /// The last relation asked about answers without a hash look-up (the
    /// validation trigger asks once per row).
    pub(super) fn for_trigger_on(relid: pg_sys::Oid) -> Rc<Tables> {
        RESOLVED.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some((last, t)) = &cache.last {
                if *last == relid {
                    return t.clone();
                }
            }
            let t = cache.all.entry(relid).or_insert_with(|| Rc::new(Self::resolve(relid))).clone();
            cache.last = Some((relid, t.clone()));
            t
        })
    }

    fn resolve(relid: pg_sys::Oid) -> Tables {
        // SAFETY: a catalog look-up of the trigger's own relation
        let name = unsafe {
            let n = pg_sys::get_rel_name(relid);
            if n.is_null() {
                return Self::own();
            }
            std::ffi::CStr::from_ptr(n).to_string_lossy().into_owned()
        };
        let Some(shard) = name.strip_prefix("conversions_").and_then(|id| id.parse::<i64>().ok()) else {
            return Self::own();
        };
        let found = Spi::get_three_with_args::<String, String, String>(SHARD_TABLES, &[shard.into()])
            .unwrap_or_else(|e| pgrx::error!("finding the shards co-located with postback.{name}: {e}"));
        match found {
            (Some(clicks), Some(deliveries), Some(endpoints)) => {
                Tables { conversions: format!("postback.{name}"), clicks, deliveries, endpoints, distributed: true }
            }
            _ => pgrx::error!(
                "postback.{name} looks like a Citus shard of postback.conversions, but its co-located shards of \
                 clicks and deliveries, or this node's placement of endpoints, are not in pg_dist_shard"
            ),
        }
    }
}

#[derive(Default)]
struct Resolved {
    all: HashMap<pg_sys::Oid, Rc<Tables>>,
    last: Option<(pg_sys::Oid, Rc<Tables>)>,
}

thread_local! {
    static RESOLVED: RefCell<Resolved> = RefCell::new(Resolved::default());
}

/// For a shard id of postback.conversions: the co-located shards of clicks and
/// deliveries (the same hash range in the colocation group) and the shard of
/// the endpoints reference table, schema-qualified. No rows without Citus.
const SHARD_TABLES: &str = "
    SELECT (SELECT pg_catalog.format('postback.%I', 'clicks_' || k.shardid) FROM pg_catalog.pg_dist_shard k
             WHERE k.logicalrelid = 'postback.clicks'::pg_catalog.regclass AND k.shardminvalue = s.shardminvalue),
           (SELECT pg_catalog.format('postback.%I', 'deliveries_' || d.shardid) FROM pg_catalog.pg_dist_shard d
             WHERE d.logicalrelid = 'postback.deliveries'::pg_catalog.regclass AND d.shardminvalue = s.shardminvalue),
           (SELECT pg_catalog.format('postback.%I', 'endpoints_' || e.shardid) FROM pg_catalog.pg_dist_shard e
             WHERE e.logicalrelid = 'postback.endpoints'::pg_catalog.regclass)
      FROM pg_catalog.pg_dist_shard s
     WHERE s.shardid = $1 AND s.logicalrelid = 'postback.conversions'::pg_catalog.regclass";

const ENDPOINT_COLUMNS: &str = "id, name, kind, method, url_template, body_template, status_map, drop_empty_params,
                                 events, statuses, partners, conditions, success_body_pattern,
                                 extract(epoch FROM initial_delay)::float8";

/// The columns a conversion is read with, its click's included.
pub(super) const CONVERSION_COLUMNS: &str =
    "c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                                  c.attributes, c.occurred_at, c.partner, k.attributes, k.clicked_at";

/// The same without the click (an INSERT's clicks come from the validation trigger).
pub(super) const NO_CLICK_COLUMNS: &str =
    "c.id, c.click_id, c.transaction_id, c.event, c.status, c.amount::text, c.currency,
                                c.attributes, c.occurred_at, c.partner, NULL::jsonb, NULL::timestamptz";

/// A recorded click as the validation trigger found it.
#[derive(Debug, Clone)]
pub(super) struct FoundClick {
    pub partner: Option<String>,
    pub attributes: Option<Value>,
    pub clicked_at: Option<TimestampWithTimeZone>,
}

thread_local! {
    /// The click look-up, planned once per backend and clicks table.
    static CLICK_LOOKUP: RefCell<HashMap<String, pgrx::spi::OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// A recorded click: one primary-key look-up, as the caller (an operator has
/// SELECT on postback.clicks), immune to its search_path.
pub(super) fn find_click(tables: &Tables, click_id: &str) -> Option<FoundClick> {
    CLICK_LOOKUP.with(|cell| {
        Spi::connect(|client| {
            let mut plans = cell.borrow_mut();
            let plan = match plans.entry(tables.clicks.clone()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    client
                        .prepare(
                            &format!(
                                "SELECT k.partner, k.attributes, k.clicked_at FROM {} k
                                  WHERE k.click_id OPERATOR(pg_catalog.=) $1",
                                tables.clicks
                            ),
                            &[PgBuiltInOids::TEXTOID.oid()],
                        )?
                        .keep(),
                ),
            };
            let rows = client.select(&*plan, Some(1), &[click_id.into()])?;
            let Some(row) = rows.into_iter().next() else {
                return Ok::<_, pgrx::spi::Error>(None);
            };
            Ok(Some(FoundClick {
                partner: row.get::<String>(1)?,
                attributes: row.get::<JsonB>(2)?.map(|j| j.0),
                clicked_at: row.get::<TimestampWithTimeZone>(3)?,
            }))
        })
        .unwrap_or_else(|e| pgrx::error!("looking up the click of a conversion: {e}"))
    })
}

/// Live secrets of an endpoint, newest first (`postback.live_secrets`, the
/// one definition the worker reads too).
pub(super) fn live_secrets(endpoint_id: i64) -> Vec<String> {
    Spi::get_one_with_args::<Vec<String>>("SELECT postback.live_secrets($1)", &[endpoint_id.into()])
        .map(Option::unwrap_or_default)
        .unwrap_or_else(|e| pgrx::error!("reading secrets: {e}"))
}

/// The conversions a statement trigger reads from its transition tables; an
/// UPDATE's with their clicks (an INSERT's clicks were read by the validation
/// trigger, row by row), and only rows whose status changed.
pub(super) fn transition_rows(tables: &Tables, lifecycle: bool) -> String {
    if lifecycle {
        format!(
            "SELECT {CONVERSION_COLUMNS} FROM new_rows c
               JOIN old_rows o ON o.id = c.id AND o.status IS DISTINCT FROM c.status
               LEFT JOIN {} k ON k.click_id = c.click_id",
            tables.clicks
        )
    } else {
        format!("SELECT {NO_CLICK_COLUMNS} FROM new_rows c")
    }
}

/// One conversion with its click, for the preview.
pub(super) fn conversion_with_click() -> String {
    format!(
        "SELECT {CONVERSION_COLUMNS} FROM postback.conversions c
           LEFT JOIN postback.clicks k ON k.click_id = c.click_id WHERE c.id = $1"
    )
}

/// Which endpoints to read.
#[derive(Debug, Clone, Copy)]
pub(super) enum Which {
    /// the active ones (the enqueue)
    Active,
    /// the one with this id, active or not (preview, send_test, rendering again)
    One(i64),
    /// every endpoint (explain)
    All,
}

/// Endpoints as the enqueue reads them, and the arguments of the query.
pub(super) fn endpoint_rows(tables: &Tables, which: Which) -> (String, Vec<pgrx::datum::DatumWithOid<'static>>) {
    let (filter, args) = match which {
        Which::Active => ("WHERE active", vec![]),
        Which::One(id) => ("WHERE id = $1", vec![id.into()]),
        Which::All => ("", vec![]),
    };
    (format!("SELECT {ENDPOINT_COLUMNS} FROM {} {filter} ORDER BY id", tables.endpoints), args)
}

/// pg_postback's own tables (everything but the conversions' triggers).
pub(super) fn own_tables() -> Tables {
    Tables::own()
}

/// pg_postback's own tables, named from the coordinator: `distributed`, they
/// are Citus tables, whose deliveries carry their conversion's click_id.
pub(super) fn own_tables_on_citus(distributed: bool) -> Tables {
    Tables { distributed, ..Tables::own() }
}

/// This node's shards of postback.conversions (their relations; none when the
/// tables are not distributed): a trigger on this node's placement of the
/// endpoints reference table renders again what their co-located deliveries
/// shards hold.
pub(super) const LOCAL_CONVERSIONS_SHARDS: &str =
    "SELECT pg_catalog.to_regclass(s) FROM postback.local_shards('conversions') AS s";

/// rollup_state.conversions_until in unix µs, when the schema has it (0.3.0 on)
/// and a roll-up has run; read once per INSERT statement by the validation trigger.
pub(super) fn conversions_rolled_until() -> Option<i64> {
    // a catalog look-up, no SPI, for a schema older than 0.3.0 (library upgraded first)
    let exists = unsafe {
        let schema = pg_sys::get_namespace_oid(c"postback".as_ptr(), true);
        schema != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(c"rollup_state".as_ptr(), schema) != pg_sys::InvalidOid
    };
    if !exists {
        return None;
    }
    Spi::get_one::<pgrx::datetime::TimestampWithTimeZone>(
        "SELECT (SELECT s.conversions_until FROM postback.rollup_state s)",
    )
    .unwrap_or_else(|e| pgrx::error!("reading postback.rollup_state: {e}"))
    .map(super::unix_micros)
}

/// Counts an INSERT's rows created before conversions_until into
/// conversion_rollup_changes: those of `$1` (their transaction ids) that its
/// transition table holds (a row ON CONFLICT DO NOTHING skipped is not there).
pub(super) fn count_late_conversions(tables: &Tables) -> String {
    format!(
        "INSERT INTO postback.conversion_rollup_changes (hour, partner, status, matched, conversions)
         SELECT pg_catalog.date_trunc('hour', n.created_at, 'UTC'), coalesce(n.partner, ''), n.status,
                EXISTS (SELECT 1 FROM {} k WHERE k.click_id OPERATOR(pg_catalog.=) n.click_id), count(*)
           FROM new_rows n
          WHERE n.transaction_id OPERATOR(pg_catalog.=) ANY ($1)
          GROUP BY 1, 2, 3, 4",
        tables.clicks
    )
}

/// How many rows an INSERT statement wrote (its transition table).
pub(super) const COUNT_NEW_ROWS: &str = "SELECT count(*) FROM new_rows";

/// Rows an INSERT … ON CONFLICT DO NOTHING skipped, one row per statement.
pub(super) const INSERT_DUPLICATES: &str = "INSERT INTO postback.conversion_duplicates (duplicates) VALUES ($1)";

/// The extension's installed version in this database.
pub(super) const EXTENSION_VERSION: &str =
    "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_postback'";

/// Whether pg_postback's tables are distributed by Citus (postback.distribute()).
pub(super) const IS_DISTRIBUTED: &str = "SELECT postback.is_distributed()";

/// The session's application_name (pg_restore names its own).
pub(super) const APPLICATION_NAME: &str = "SELECT pg_catalog.current_setting('application_name')";

/// The INSERT that writes a chunk of deliveries (`conversions::Pending`). `legacy`:
/// the schema is still 0.2.0's (library upgraded, ALTER EXTENSION … UPDATE
/// not yet run), which has no url_hashes or rendered column.
pub(super) fn delivery_insert(tables: &Tables, lifecycle: bool, legacy: bool) -> String {
    // A status can come back (approved → pending → approved): its key
    // exists then, and the repeated announcement is a no-op. A lifecycle
    // delivery waits behind the latest earlier one of its pair. New
    // conversions have new ids: their keys cannot exist yet (a restore,
    // which brings its deliveries along, never enqueues), and a plain INSERT
    // costs a quarter less than ON CONFLICT per row (measured: 200k rows,
    // 1.03 s vs 1.29 s); the unique index still refuses a duplicate loudly.
    // (distributed, the key is unique with the click_id, the distribution column)
    let conflict = match (lifecycle, tables.distributed) {
        (true, false) => "ON CONFLICT (idempotency_key) DO NOTHING",
        (true, true) => "ON CONFLICT (click_id, idempotency_key) DO NOTHING",
        (false, _) => "",
    };
    let (predecessor_column, predecessor) = if lifecycle {
        (
            " predecessor_id,",
            // ordered as deliveries_conversion is: one backward probe of that
            // index per delivery, whatever the history (never a scan of the
            // primary key filtering every row)
            format!(
                " (SELECT p.id FROM {} p
                  WHERE p.conversion_id = r.c AND p.endpoint_id = r.e
                  ORDER BY p.conversion_id DESC, p.endpoint_id DESC, p.id DESC LIMIT 1),",
                tables.deliveries
            ),
        )
    } else {
        ("", String::new())
    };
    // distributed: each delivery carries its conversion's click_id ($13), and its
    // id from this node's sequence (a shard has no column default: Citus
    // evaluates a distributed table's defaults where a statement is planned)
    let (click_column, click) = if tables.distributed {
        (
            ", click_id, id",
            // this node's range (its group id << 48, as Citus does for sequences on
            // worker nodes) plus the low 48 bits of its sequence: unique across
            // nodes, also on a node added after distribute()
            ", r.click, (SELECT g.groupid::bigint << 48 FROM pg_catalog.pg_dist_local_group g)
               + (pg_catalog.nextval('postback.deliveries_id_seq'::pg_catalog.regclass) & 281474976710655)",
        )
    } else {
        ("", "")
    };
    let (hash_columns, hashes) =
        if legacy { ("", "") } else { (", url_hashes, rendered", ", r.h::jsonb, r.err IS NULL") };
    format!(
        "INSERT INTO {deliveries}
                (endpoint_id, conversion_id, event, status, idempotency_key,{predecessor_column} method, url,
                 body, state, completed_at, last_error, next_attempt_at, success_pattern{hash_columns}{click_column})
         SELECT r.e, r.c, r.ev, r.st, r.k,{predecessor} r.m, r.u, r.b,
                CASE WHEN r.err IS NULL THEN 'pending' ELSE 'dead' END,
                CASE WHEN r.err IS NOT NULL THEN now() END, r.err,
                CASE WHEN r.delay > 0 THEN now() + r.delay * interval '1 second' ELSE now() END, r.pat{hashes}{click}
           FROM (SELECT unnest($1) AS e, unnest($2) AS c, unnest($3) AS ev, unnest($4) AS st,
                        unnest($5) AS k, unnest($6) AS m, unnest($7) AS u, unnest($8) AS b,
                        unnest($9) AS err, unnest($10) AS delay, unnest($11) AS pat, unnest($12) AS h,
                        unnest($13::text[]) AS click) AS r
             {conflict}",
        deliveries = tables.deliveries
    )
}

/// Which deliveries to render again.
#[derive(Debug, Clone, Copy)]
pub(super) enum ToRender {
    /// these (`$1`, bigint[])
    Ids,
    /// an endpoint's (`$1`) queued and in-flight postbacks
    QueuedOf,
}

/// Deliveries with their conversions (and clicks), to render again: the
/// delivery's id, endpoint, event, status and key, then the conversion columns.
/// On Citus a conversion is joined to its deliveries on the distribution column too.
pub(super) fn deliveries_to_render(tables: &Tables, which: ToRender) -> String {
    let co_located = if tables.distributed { " AND c.click_id = d.click_id" } else { "" };
    let filter = match which {
        ToRender::Ids => "d.id = ANY ($1::bigint[])",
        ToRender::QueuedOf => {
            "d.endpoint_id = $1 AND d.state IN ('pending', 'in_flight') AND d.conversion_id IS NOT NULL"
        }
    };
    format!(
        "SELECT d.id, d.endpoint_id, d.event, d.status, d.idempotency_key, {CONVERSION_COLUMNS}
           FROM {} d
           JOIN {} c ON c.id = d.conversion_id{co_located}
           LEFT JOIN {} k ON k.click_id = c.click_id
          WHERE {filter}
          ORDER BY d.id",
        tables.deliveries, tables.conversions, tables.clicks
    )
}

/// Writes requests rendered again, keeping each delivery's id, key, attempts and
/// place in its lifecycle order. One queued or dead that no longer renders is
/// dead with the reason and nothing to send (`rendered = false`); one being
/// sent right now or that succeeded keeps what it sent.
pub(super) fn update_rendered(tables: &Tables) -> String {
    format!(
        "UPDATE {} d
       SET method = r.m, url = r.u, body = r.b, url_hashes = r.h::jsonb, success_pattern = r.pat,
           rendered = r.err IS NULL, rendered_at = now(),
           state = CASE WHEN r.err IS NULL THEN d.state ELSE 'dead' END,
           completed_at = CASE WHEN r.err IS NULL THEN d.completed_at ELSE coalesce(d.completed_at, now()) END,
           last_error = coalesce(r.err, d.last_error)
      FROM (SELECT unnest($1::bigint[]) AS id, unnest($2::text[]) AS m, unnest($3::text[]) AS u,
                   unnest($4::text[]) AS b, unnest($5::text[]) AS h, unnest($6::text[]) AS pat,
                   unnest($7::text[]) AS err) AS r
     WHERE d.id = r.id AND (r.err IS NULL OR d.state IN ('pending', 'dead'))",
        tables.deliveries
    )
}
