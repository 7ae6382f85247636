//! The worker's SQL: claim due deliveries with a lease, read endpoint
//! settings, record attempts and new states, reclaim expired leases.

use std::collections::HashMap;
use std::time::Duration;

use pgrx::prelude::*;
use pgrx::spi::SpiResult;

/// How long a claim holds a delivery before it may be reclaimed: at start the
/// worker takes back every lease of a worker that no longer runs, later the
/// expired ones of dead workers and its own that it no longer holds.
pub const LEASE: &str = "10 minutes";

pub struct Claimed {
    pub id: i64,
    pub endpoint_id: i64,
    pub attempt_no: i32,
    /// attempts counted against max_attempts and the schedule (a manual retry restarts them)
    pub budget_no: i32,
    pub method: String,
    pub url: String,
    /// where the URL's {hash:…} digests go (jsonb text, out of band)
    pub url_hashes: Option<String>,
    pub body: Option<String>,
    pub idempotency_key: String,
    /// how long until created_at + max_age
    pub remaining_age_ms: i64,
    /// the endpoint's success_body_pattern with this delivery's values
    pub success_pattern: Option<String>,
    /// the endpoint's revised_at now (Unix µs): settings the worker holds from
    /// before it are read again (an edit has rendered the queue anew)
    pub endpoint_revised_at_us: i64,
}

pub struct EndpointConfig {
    /// the NOT NULL settings that read NULL, if any (deliveries fail naming them)
    pub missing: Result<(), String>,
    pub kind: String,
    /// an error when a stored list does not parse (deliveries fail with it)
    pub status_rules: Result<crate::rules::retry::StatusRules, String>,
    pub limits: crate::rules::scheduler::Limits,
    /// scheme, host and port every delivery URL of the endpoint must have
    pub origin: Result<crate::rules::url_policy::Origin, String>,
    /// the endpoint's own headers (credentials): read at send time, never stored
    /// per delivery; an error when the stored value does not parse (deliveries fail with it)
    pub headers: Result<Vec<(String, String)>, String>,
    pub timeout: Duration,
    pub schedule: Vec<Duration>,
    pub max_attempts: i32,
    pub success_body_pattern: Option<String>,
    pub signing_scheme: String,
    pub signature_header: Option<String>,
    pub timestamp_param: String,
    pub signature_param: String,
    pub secrets: Vec<String>,
    /// revised_at as read (Unix µs)
    pub revised_at_us: i64,
    /// it signs or its template has a {hash:…}: nothing is sent without a live secret
    pub needs_secret: bool,
}

/// A worker's share of a database's endpoints: those whose id modulo
/// `count` is `index` (see `rules::workers`).
#[derive(Clone, Copy, Debug)]
pub struct Share {
    pub index: i32,
    pub count: i32,
}

/// Where the worker's statements read and write: pg_postback's own tables,
/// or — its tables distributed by Citus — this node's shards: deliveries
/// through `postback.node_deliveries`, a local table every local deliveries
/// shard inherits (one claim reads them all, by their own indexes), attempts
/// into the shard co-located with their delivery's, and this node's placement
/// of the endpoints reference table. A query naming only these is planned by
/// PostgreSQL alone (Citus plans, and refuses to nest, queries on its tables).
#[derive(Debug)]
pub struct QueueTables {
    pub deliveries: String,
    pub endpoints: String,
    /// distributed: each local deliveries shard (its oid) with its attempts shard
    pub attempts_by_shard: Option<HashMap<u32, String>>,
}

impl QueueTables {
    fn own() -> Self {
        QueueTables {
            deliveries: "postback.deliveries".into(),
            endpoints: "postback.endpoints".into(),
            attempts_by_shard: None,
        }
    }
}

thread_local! {
    static TABLES: std::cell::RefCell<std::rc::Rc<QueueTables>> = std::cell::RefCell::new(std::rc::Rc::new(QueueTables::own()));
}

/// The tables the worker's statements use now.
pub fn tables() -> std::rc::Rc<QueueTables> {
    TABLES.with(|t| t.borrow().clone())
}

/// Finds where the worker's tables are (at start and every few seconds: a
/// rebalance moves shards in and out); on a node holding shards, makes every
/// local deliveries shard a child of postback.node_deliveries. The number of
/// local shards when the tables are distributed.
pub fn refresh_tables() -> SpiResult<Option<usize>> {
    if !tables_are_distributed()? {
        TABLES.with(|t| *t.borrow_mut() = std::rc::Rc::new(QueueTables::own()));
        return Ok(None);
    }
    if Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('postback.node_deliveries') IS NULL")? == Some(true) {
        // one creator at a time (the workers of a node start together)
        Spi::run("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('postback.node_deliveries'))")?;
        // with the indexes: the claim plans an index scan of the empty parent too
        // (a disabled sequential scan would cost it 1e10, and JIT each claim)
        Spi::run("CREATE TABLE IF NOT EXISTS postback.node_deliveries (LIKE postback.deliveries INCLUDING INDEXES)")?;
    }
    let (endpoints, shards) = Spi::connect_mut(|client| {
        // one row whatever the answer (no row is an error to get_one)
        let endpoints = client
            .select(
                "SELECT (SELECT pg_catalog.format('postback.%I', 'endpoints_' || e.shardid) FROM pg_catalog.pg_dist_shard e
                  WHERE e.logicalrelid = 'postback.endpoints'::pg_catalog.regclass
                    AND pg_catalog.to_regclass(pg_catalog.format('postback.%I', 'endpoints_' || e.shardid)) IS NOT NULL)",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<String>()?;
        let rows = client.select(
            "SELECT pg_catalog.to_regclass(pg_catalog.format('postback.%I', 'deliveries_' || d.shardid))::oid::bigint,
                    pg_catalog.format('postback.%I', 'deliveries_' || d.shardid),
                    pg_catalog.format('postback.%I', 'attempts_' || a.shardid),
                    EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i
                             WHERE i.inhrelid = pg_catalog.to_regclass(pg_catalog.format('postback.%I', 'deliveries_' || d.shardid))
                               AND i.inhparent = 'postback.node_deliveries'::pg_catalog.regclass)
               FROM pg_catalog.pg_dist_shard d
               JOIN pg_catalog.pg_dist_placement p ON p.shardid = d.shardid
                AND p.groupid = (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
               JOIN pg_catalog.pg_dist_shard a ON a.logicalrelid = 'postback.attempts'::pg_catalog.regclass
                AND a.shardminvalue = d.shardminvalue
              WHERE d.logicalrelid = 'postback.deliveries'::pg_catalog.regclass",
            None,
            &[],
        )?;
        let mut shards = Vec::new();
        for row in rows {
            let Some(oid) = row.get::<i64>(1)? else { continue };
            shards.push((
                oid as u32,
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<bool>(4)?.unwrap_or(false),
            ));
        }
        Ok::<_, pgrx::spi::Error>((endpoints, shards))
    })?;
    let Some(endpoints) = endpoints else {
        pgrx::error!(
            "this node has no placement of the reference table postback.endpoints yet; \
             run SELECT replicate_reference_tables() on the coordinator"
        );
    };
    let mut attempts_by_shard = HashMap::new();
    let count = shards.len();
    for (oid, deliveries, attempts, inherits) in shards {
        if !inherits {
            Spi::run(&format!("ALTER TABLE {deliveries} INHERIT postback.node_deliveries"))?;
        }
        attempts_by_shard.insert(oid, attempts);
    }
    TABLES.with(|t| {
        *t.borrow_mut() = std::rc::Rc::new(QueueTables {
            deliveries: "postback.node_deliveries".into(),
            endpoints,
            attempts_by_shard: Some(attempts_by_shard),
        })
    });
    Ok(Some(count))
}

/// An attempt's id on a Citus node: the node's range (its group id << 48, the
/// scheme Citus uses for sequences on worker nodes) plus the low 48 bits of the
/// node's own sequence, whether or not Citus already started it in that range:
/// unique across nodes, and right on a node added after `distribute()`.
const NODE_ATTEMPT_ID: &str = "((SELECT g.groupid::bigint << 48 FROM pg_catalog.pg_dist_local_group g) \
     + (pg_catalog.nextval('postback.attempts_id_seq'::pg_catalog.regclass) & 281474976710655))";

/// Whether Citus distributes postback.deliveries in this database (the one
/// definition: postback.is_distributed(); the worker runs only once the
/// schema is at its version, which has it).
pub fn tables_are_distributed() -> SpiResult<bool> {
    Ok(Spi::get_one::<bool>("SELECT postback.is_distributed()")? == Some(true))
}

/// The installed version of the extension in this database, if any.
pub fn installed_version() -> SpiResult<Option<String>> {
    Spi::get_one::<String>("SELECT (SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_postback')")
}

/// On a Citus worker node whose pg_postback tables are not distributed
/// (coordinator-only mode: they live on the coordinator, this node's copies
/// stay empty and refuse writes), where the coordinator is; None without
/// Citus, on the coordinator, or once the tables are distributed.
pub fn citus_coordinator_elsewhere() -> SpiResult<Option<String>> {
    if Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL")?
        != Some(true)
    {
        return Ok(None);
    }
    // one row whatever the answer (no row is an error to get_one)
    Spi::get_one::<String>(
        "SELECT (SELECT coalesce((SELECT n.nodename || ':' || n.nodeport FROM pg_catalog.pg_dist_node n
                                   WHERE n.groupid = 0 ORDER BY n.nodeid LIMIT 1), 'not in pg_dist_node')
                   FROM pg_catalog.pg_dist_local_group g
                  WHERE g.groupid <> 0
                    AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p
                                     WHERE p.logicalrelid = 'postback.deliveries'::pg_catalog.regclass))",
    )
}

/// Claims up to `limit` due deliveries whose endpoint is active, not paused
/// and not in `blocked` (an open breaker), and whose predecessor (same
/// endpoint and conversion) is finished; no endpoint gets more than its room:
/// `rooms` for the endpoints the worker already holds requests of, else its
/// max_in_flight. The lease names this worker.
/// With `window`, the earliest due deliveries of any endpoint but the
/// `blocked` ones are claimed (each endpoint up to its room in `rooms`, the
/// healthy capacity for endpoints not listed): what a commit or a due retry
/// may have brought. The `listed` endpoints are claimed on their own, each up
/// to its room, through deliveries_endpoint_due: slow endpoints (their
/// backlog never fills the window), and without `window` the endpoints the
/// last claim filled up, so that a claim never reads the queued deliveries of
/// endpoints that cannot take more.
pub fn claim(
    limit: i32,
    blocked: &[i64],
    rooms: &[(i64, i32)],
    listed: &[(i64, i32)],
    window: bool,
    share: Share,
) -> SpiResult<Vec<Claimed>> {
    // rooms as jsonb objects keyed by endpoint id: a lookup per candidate is a
    // binary search, not a scan of 1,000 array elements
    let rooms: serde_json::Map<String, serde_json::Value> =
        rooms.iter().map(|(id, room)| (id.to_string(), (*room).into())).collect();
    let slow: serde_json::Map<String, serde_json::Value> =
        listed.iter().map(|(id, room)| (id.to_string(), (*room).into())).collect();
    let (rooms, slow) = (pgrx::JsonB(rooms.into()), pgrx::JsonB(slow.into()));
    let t = tables();
    let (deliveries, endpoints) = (&t.deliveries, &t.endpoints);
    Spi::connect_mut(|client| {
        // an index scan in due order, never a bitmap scan: only an index scan
        // marks the entries of rows that left the queue dead (kill bits), so
        // later claims skip them; a bitmap scan visits every one of them again
        // until VACUUM (3.4 ms per claim after 30k deliveries, 0.06 ms instead)
        client.update("SET LOCAL enable_bitmapscan = off", None, &[])?;
        // and endpoints are found by primary key: a small endpoints table is
        // otherwise read whole for each of the 4,000 candidates (5 pages each
        // with 100 endpoints, 20k of a claim's 58k page reads)
        client.update("SET LOCAL enable_seqscan = off", None, &[])?;
        let rows = client.update(
            &format!(
                "WITH candidates AS (
                     SELECT d.id, d.endpoint_id, d.next_attempt_at FROM {deliveries} d
                      WHERE $8::bool AND d.state = 'pending' AND d.next_attempt_at <= now()
                        -- a constant array (one-shot plan): hashed, one lookup per row
                        AND d.endpoint_id <> ALL ($2::bigint[])
                        -- this worker's endpoints only: id modulo the workers = its index
                        AND d.endpoint_id % $9 = $10
                        -- a scalar subquery: one index probe per candidate, never a hash of every pending row
                        AND (d.predecessor_id IS NULL
                             OR coalesce((SELECT p.state FROM {deliveries} p WHERE p.id = d.predecessor_id),
                                         'gone') NOT IN ('pending', 'in_flight'))
                      ORDER BY d.next_attempt_at
                      LIMIT $1 * 4),
                 ranked AS (
                     SELECT c.id, c.next_attempt_at,
                            row_number() OVER (PARTITION BY c.endpoint_id ORDER BY c.next_attempt_at) AS n,
                            -- scheduler::healthy_capacity, its constants passed as $4, $5, $6
                            coalesce(($3::jsonb ->> c.endpoint_id::text)::int,
                                     least(greatest(e.max_in_flight * $4, e.max_in_flight + $5), $6)) AS room
                       FROM candidates c
                       -- LATERAL … LIMIT 1 (never pulled up into a join): one primary-key probe
                       -- per candidate, whatever the planner believes of a freshly filled
                       -- endpoints table (a nested loop the other way round rescans every
                       -- candidate per endpoint: 0.5 s per claim with 1,000 endpoints)
                       CROSS JOIN LATERAL (SELECT x.max_in_flight FROM {endpoints} x
                                            WHERE x.id = c.endpoint_id AND x.active AND x.paused_at IS NULL
                                            LIMIT 1) e),
                 -- listed endpoints, each up to its room (deliveries_endpoint_due)
                 listed AS (
                     SELECT d.id, d.next_attempt_at
                       FROM jsonb_each_text($7::jsonb) AS s(endpoint, room)
                       CROSS JOIN LATERAL (
                           -- a row comparison and a two-column order only deliveries_endpoint_due
                           -- serves: with `endpoint_id = x` and statistics of an empty queue, the
                           -- planner walks all of deliveries_due for each listed endpoint
                           SELECT d.id, d.next_attempt_at FROM {deliveries} d
                            WHERE (d.endpoint_id, d.next_attempt_at) >= (s.endpoint::bigint, '-infinity'::timestamptz)
                              AND (d.endpoint_id, d.next_attempt_at) <= (s.endpoint::bigint, now())
                              AND d.state = 'pending'
                              AND (d.predecessor_id IS NULL
                                   OR coalesce((SELECT p.state FROM {deliveries} p WHERE p.id = d.predecessor_id),
                                               'gone') NOT IN ('pending', 'in_flight'))
                            ORDER BY d.endpoint_id, d.next_attempt_at
                            LIMIT s.room::int) d
                      WHERE EXISTS (SELECT 1 FROM {endpoints} x
                                     WHERE x.id = s.endpoint::bigint AND x.active AND x.paused_at IS NULL)),
                 -- = ANY (ARRAY(…)): primary-key probes, never a scan of the whole table;
                 -- the state is compared with a subquery's value, which no partial index
                 -- predicate matches: after an ANALYZE of an empty queue the planner
                 -- otherwise scans all of deliveries_due for every claim (a backlog of
                 -- 20k took 5k deliveries/s instead of 17k beside 1M finished ones)
                 due AS (
                     SELECT d.id FROM {deliveries} d
                      WHERE d.id = ANY (ARRAY(SELECT r.id FROM ranked r WHERE r.n <= r.room
                                               ORDER BY r.next_attempt_at LIMIT $1)
                                        || ARRAY(SELECT l.id FROM listed l ORDER BY l.next_attempt_at LIMIT $1))
                        AND d.state = (SELECT 'pending'::text)
                      FOR UPDATE OF d SKIP LOCKED)
                 UPDATE {deliveries} d
                    SET state = 'in_flight', lease_expires_at = now() + interval '{LEASE}',
                        attempts = d.attempts + 1, leased_by = pg_backend_pid()
                  WHERE d.id = ANY (ARRAY(SELECT due.id FROM due))
              RETURNING d.id, d.endpoint_id, d.attempts, d.method, d.url, d.body,
                        d.idempotency_key,
                        (SELECT (extract(epoch FROM d.created_at + e.max_age + coalesce(d.age_credit, interval '0')
                                                    - now()) * 1000.0)::bigint
                           FROM {endpoints} e WHERE e.id = d.endpoint_id),
                        d.attempts - d.attempt_offset, d.success_pattern, d.url_hashes::text,
                        (SELECT (extract(epoch FROM e.revised_at) * 1000000)::bigint
                           FROM {endpoints} e WHERE e.id = d.endpoint_id)"
            ),
            None,
            &[
                limit.into(),
                blocked.to_vec().into(),
                rooms.into(),
                (crate::rules::scheduler::QUEUE_FACTOR as i32).into(),
                (crate::rules::scheduler::QUEUE_EXTRA as i32).into(),
                (crate::rules::scheduler::MAX_HELD as i32).into(),
                slow.into(),
                window.into(),
                (share.count.max(1) as i64).into(),
                (share.index as i64).into(),
            ],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(Claimed {
                id: row.get::<i64>(1)?.unwrap_or_default(),
                endpoint_id: row.get::<i64>(2)?.unwrap_or_default(),
                attempt_no: row.get::<i32>(3)?.unwrap_or(1),
                // empty when NULL: the method check refuses it, naming the valid ones
                method: row.get::<String>(4)?.unwrap_or_default(),
                url: row.get::<String>(5)?.unwrap_or_default(),
                body: row.get::<String>(6)?,
                idempotency_key: row.get::<String>(7)?.unwrap_or_default(),
                remaining_age_ms: row.get::<i64>(8)?.unwrap_or(0),
                budget_no: row.get::<i32>(9)?.unwrap_or(1),
                success_pattern: row.get::<String>(10)?,
                url_hashes: row.get::<String>(11)?,
                endpoint_revised_at_us: row.get::<i64>(12)?.unwrap_or(i64::MAX),
            });
        }
        Ok(out)
    })
}

/// Returns claimed deliveries that were never sent to the queue, unspent.
pub fn release(ids: &[i64]) -> SpiResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    Spi::run_with_args(
        &format!(
            "UPDATE {}
                SET state = 'pending', lease_expires_at = NULL, leased_by = NULL, attempts = attempts - 1
              WHERE id = ANY ($1::bigint[]) AND state = (SELECT 'in_flight'::text) AND leased_by = pg_backend_pid()",
            tables().deliveries
        ),
        &[ids.to_vec().into()],
    )
}

/// Breakers left open (or half-open) by a previous worker: (endpoint, state, failures, since µs).
pub fn open_breakers(share: Share) -> SpiResult<Vec<(i64, String, i32, i64)>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT endpoint_id, breaker, consecutive_failures,
                    (extract(epoch FROM breaker_since) * 1000000.0)::bigint
               FROM postback.endpoint_state WHERE breaker <> 'closed' AND endpoint_id % $1 = $2",
            None,
            &[(share.count.max(1) as i64).into(), (share.index as i64).into()],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push((
                row.get::<i64>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<i32>(3)?.unwrap_or(0),
                row.get::<i64>(4)?.unwrap_or(0),
            ));
        }
        Ok(out)
    })
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

/// `value`, noting `column` in `missing` when it is NULL.
fn need<T>(missing: &mut Vec<&'static str>, value: Option<T>, column: &'static str) -> Option<T> {
    if value.is_none() {
        missing.push(column);
    }
    value
}

/// An endpoint's success and retry status lists: NULL means the default; a
/// stored list that does not parse fails its deliveries with the reason (a
/// broken list never means the default).
fn status_rules(
    success: Option<Vec<String>>,
    retry: Option<Vec<String>>,
) -> Result<crate::rules::retry::StatusRules, String> {
    let defaults = crate::rules::retry::StatusRules::default();
    let parse = |v: Option<Vec<String>>, d: Vec<(u16, u16)>, what: &str| match v {
        None => Ok(d),
        Some(v) => crate::rules::retry::parse_statuses(&v, what),
    };
    Ok(crate::rules::retry::StatusRules {
        success: parse(success, defaults.success, "success_statuses")?,
        retry: parse(retry, defaults.retry, "retry_statuses")?,
    })
}

/// Settings and live secrets of the endpoints of a batch.
pub fn endpoints(ids: Vec<i64>) -> SpiResult<HashMap<i64, EndpointConfig>> {
    Spi::connect(|client| {
        let rows = client.select(
            &format!(
                "SELECT e.id, e.kind, (extract(epoch FROM e.timeout) * 1000.0)::bigint,
                    ARRAY(SELECT (extract(epoch FROM s) * 1000.0)::bigint FROM unnest(e.retry_schedule) s),
                    e.max_attempts, e.success_body_pattern, e.signing_scheme, e.signature_header,
                    e.timestamp_param, e.signature_param,
                    postback.live_secrets(e.id),
                    e.url_template, e.headers::text, e.max_in_flight, e.rate_limit::float8,
                    e.success_statuses, e.retry_statuses, (extract(epoch FROM e.revised_at) * 1000000)::bigint
               FROM {} e WHERE e.id = ANY ($1::bigint[])",
                tables().endpoints
            ),
            None,
            &[ids.into()],
        )?;
        let mut out = HashMap::new();
        for row in rows {
            let id = row.get::<i64>(1)?.unwrap_or_default();
            // the schema keeps these NOT NULL; should one read NULL anyway, the
            // endpoint's deliveries fail naming it (no default stands in)
            let mut missing = Vec::new();
            let kind = need(&mut missing, row.get::<String>(2)?, "kind").unwrap_or_default();
            let timeout = ms(need(&mut missing, row.get::<i64>(3)?, "timeout").unwrap_or_default());
            let schedule = need(&mut missing, row.get::<Vec<i64>>(4)?, "retry_schedule").unwrap_or_default();
            let max_attempts = need(&mut missing, row.get::<i32>(5)?, "max_attempts").unwrap_or_default();
            let signing_scheme = need(&mut missing, row.get::<String>(7)?, "signing_scheme").unwrap_or_default();
            let timestamp_param = need(&mut missing, row.get::<String>(9)?, "timestamp_param").unwrap_or_default();
            let signature_param = need(&mut missing, row.get::<String>(10)?, "signature_param").unwrap_or_default();
            let url_template = need(&mut missing, row.get::<String>(12)?, "url_template").unwrap_or_default();
            let max_in_flight = need(&mut missing, row.get::<i32>(14)?, "max_in_flight").unwrap_or(1);
            let needs_secret = crate::rules::outgoing::needs_secret(&signing_scheme, &url_template);
            let missing = if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("the endpoint's settings have no value for {}", missing.join(", ")))
            };
            out.insert(
                id,
                EndpointConfig {
                    missing,
                    kind,
                    timeout,
                    schedule: schedule.into_iter().map(ms).collect(),
                    max_attempts,
                    success_body_pattern: row.get::<String>(6)?,
                    signing_scheme,
                    signature_header: row.get::<String>(8)?,
                    timestamp_param,
                    signature_param,
                    secrets: row.get::<Vec<String>>(11)?.unwrap_or_default(),
                    revised_at_us: row.get::<i64>(18)?.unwrap_or(i64::MIN),
                    needs_secret,
                    origin: crate::rules::url_policy::literal_origin(&url_template)
                        .map_err(|e| format!("the endpoint's url_template is no longer valid: {e}")),
                    headers: match row.get::<String>(13)? {
                        None => Ok(Vec::new()),
                        Some(t) => crate::rules::outgoing::parse_stored_headers(&t),
                    },
                    status_rules: status_rules(row.get::<Vec<String>>(16)?, row.get::<Vec<String>>(17)?),
                    limits: crate::rules::scheduler::Limits {
                        max_in_flight: max_in_flight.max(1) as u32,
                        rate_per_sec: row.get::<f64>(15)?,
                    },
                },
            );
        }
        Ok(out)
    })
}

/// One attempt's record and the delivery's next state.
#[derive(Debug, Clone)]
pub struct Record {
    pub delivery_id: i64,
    pub endpoint_id: i64,
    pub attempt_no: i32,
    pub started_unix_micros: i64,
    pub duration_ms: Option<f64>,
    pub status_code: Option<i32>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    /// succeeded, retry or dead
    pub outcome: crate::rules::retry::Outcome,
    /// for retry: delay before the next attempt
    pub retry_in_ms: Option<i64>,
}

/// Records a set of attempts and their deliveries' new states in one statement.
pub fn record(records: &[Record]) -> SpiResult<()> {
    if records.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = records.iter().map(|r| r.delivery_id).collect();
    let attempt_nos: Vec<i32> = records.iter().map(|r| r.attempt_no).collect();
    let started: Vec<f64> = records.iter().map(|r| r.started_unix_micros as f64 / 1e6).collect();
    let durations: Vec<Option<f64>> = records.iter().map(|r| r.duration_ms).collect();
    let codes: Vec<Option<i32>> = records.iter().map(|r| r.status_code).collect();
    let bodies: Vec<Option<String>> = records.iter().map(|r| r.response_body.clone()).collect();
    let errors: Vec<Option<String>> = records.iter().map(|r| r.error.clone()).collect();
    let outcomes: Vec<&str> = records.iter().map(|r| r.outcome.as_str()).collect();
    let retry_in: Vec<Option<f64>> = records.iter().map(|r| r.retry_in_ms.map(|ms| ms as f64)).collect();
    let t = tables();
    // distributed: each attempt goes into the attempts shard beside its delivery's
    // (a statement can only name one), before the deliveries' new states
    let attempts_cte = if t.attempts_by_shard.is_some() {
        ""
    } else {
        ",
             a AS (
                 INSERT INTO postback.attempts
                        (delivery_id, attempt_no, started_at, duration_ms, status_code, response_body, error, outcome)
                 SELECT id, attempt_no, to_timestamp(started_s), duration_ms, status_code, body, error, outcome
                   FROM r)"
    };
    Spi::connect_mut(|client| {
        if let Some(by_shard) = &t.attempts_by_shard {
            record_attempts_in_shards(client, &t.deliveries, by_shard, records)?;
        }
        // a hash join of the results with their deliveries, found by primary
        // key: the planner believes the deliveries leased by this worker are
        // one row (their statistics lag behind the queue), and otherwise loops
        // over every result for each delivery (120 ms per 773 results:
        // quadratic in the batch) or, with the loop forbidden, scans the table
        client.update("SET LOCAL enable_nestloop = off", None, &[])?;
        client.update("SET LOCAL enable_seqscan = off", None, &[])?;
        client.update(
            &format!(
                "WITH r AS (
                 SELECT * FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::float8[], $5::int[],
                                      $6::text[], $7::text[], $8::text[], $9::float8[])
                        AS r(id, attempt_no, started_s, duration_ms, status_code, body, error, outcome, retry_ms)){attempts_cte}
             UPDATE {deliveries} d
                SET state = CASE r.outcome WHEN 'retry' THEN 'pending' ELSE r.outcome END,
                    lease_expires_at = NULL, leased_by = NULL,
                    next_attempt_at = CASE WHEN r.outcome = 'retry'
                                           THEN now() + r.retry_ms * interval '1 millisecond'
                                           ELSE d.next_attempt_at END,
                    completed_at = CASE WHEN r.outcome = 'retry' THEN NULL ELSE now() END,
                    last_error = r.error
               FROM r
              -- id = ANY: the primary key finds the rows. The state is compared with a
              -- subquery's value, which no partial index predicate matches: otherwise the
              -- planner takes a bitmap scan of deliveries_leased, whose entries of every
              -- delivery leased since the last VACUUM it visits each time (a bitmap scan
              -- never marks them dead): 111 ms per 579 results after 60k deliveries
              WHERE d.id = r.id AND d.id = ANY ($1::bigint[]) AND d.state = (SELECT 'in_flight'::text)
                AND d.leased_by = pg_backend_pid()",
                deliveries = t.deliveries
            ),
            None,
            &[
                ids.into(),
                attempt_nos.into(),
                started.into(),
                durations.into(),
                codes.into(),
                bodies.into(),
                errors.into(),
                outcomes.into(),
                retry_in.into(),
            ],
        )?;
        client.update("SET LOCAL enable_nestloop = on", None, &[])?;
        client.update("SET LOCAL enable_seqscan = on", None, &[])?;
        record_endpoint_state(client, records)
    })
}

/// Distributed: inserts each attempt into the attempts shard co-located with
/// its delivery's shard (found by the delivery's tableoid under
/// postback.node_deliveries), with the delivery's click_id and an id from this
/// node's sequence.
fn record_attempts_in_shards(
    client: &mut pgrx::spi::SpiClient,
    deliveries: &str,
    by_shard: &HashMap<u32, String>,
    records: &[Record],
) -> SpiResult<()> {
    let ids: Vec<i64> = records.iter().map(|r| r.delivery_id).collect();
    let found = client.select(
        &format!(
            "SELECT d.id, d.tableoid::oid::bigint, d.click_id FROM {deliveries} d WHERE d.id = ANY ($1::bigint[])"
        ),
        None,
        &[ids.into()],
    )?;
    let mut place: HashMap<i64, (u32, String)> = HashMap::new();
    for row in found {
        if let (Some(id), Some(oid), Some(click)) = (row.get::<i64>(1)?, row.get::<i64>(2)?, row.get::<String>(3)?) {
            place.insert(id, (oid as u32, click));
        }
    }
    let mut groups: HashMap<&str, Vec<(&Record, &str)>> = HashMap::new();
    for r in records {
        // a delivery no longer here (its shard moved away meanwhile) has no attempt to keep here
        let Some((oid, click)) = place.get(&r.delivery_id) else { continue };
        let Some(attempts) = by_shard.get(oid) else { continue };
        groups.entry(attempts.as_str()).or_default().push((r, click.as_str()));
    }
    for (attempts, rows) in groups {
        let clicks: Vec<&str> = rows.iter().map(|(_, c)| *c).collect();
        let ids: Vec<i64> = rows.iter().map(|(r, _)| r.delivery_id).collect();
        let nos: Vec<i32> = rows.iter().map(|(r, _)| r.attempt_no).collect();
        let started: Vec<f64> = rows.iter().map(|(r, _)| r.started_unix_micros as f64 / 1e6).collect();
        let durations: Vec<Option<f64>> = rows.iter().map(|(r, _)| r.duration_ms).collect();
        let codes: Vec<Option<i32>> = rows.iter().map(|(r, _)| r.status_code).collect();
        let bodies: Vec<Option<String>> = rows.iter().map(|(r, _)| r.response_body.clone()).collect();
        let errors: Vec<Option<String>> = rows.iter().map(|(r, _)| r.error.clone()).collect();
        let outcomes: Vec<&str> = rows.iter().map(|(r, _)| r.outcome.as_str()).collect();
        client.update(
            &format!(
                "INSERT INTO {attempts}
                        (id, click_id, delivery_id, attempt_no, started_at, duration_ms, status_code, response_body,
                         error, outcome)
                 SELECT {NODE_ATTEMPT_ID}, click, id, attempt_no,
                        to_timestamp(started_s), duration_ms, status_code, body, error, outcome
                   FROM unnest($1::text[], $2::bigint[], $3::int[], $4::float8[], $5::float8[], $6::int[],
                               $7::text[], $8::text[], $9::text[])
                        AS r(click, id, attempt_no, started_s, duration_ms, status_code, body, error, outcome)"
            ),
            None,
            &[
                clicks.into(),
                ids.into(),
                nos.into(),
                started.into(),
                durations.into(),
                codes.into(),
                bodies.into(),
                errors.into(),
                outcomes.into(),
            ],
        )?;
    }
    Ok(())
}

/// Folds a batch's outcomes into postback.endpoint_state: consecutive
/// failures (reset by a success), since when an endpoint fails, its last error.
fn record_endpoint_state(client: &mut pgrx::spi::SpiClient, records: &[Record]) -> SpiResult<()> {
    let mut order: Vec<i64> = Vec::new();
    let mut folded: HashMap<i64, crate::rules::health::Fold> = HashMap::new();
    for r in records {
        let f = folded.entry(r.endpoint_id).or_insert_with(|| {
            order.push(r.endpoint_id);
            crate::rules::health::Fold::default()
        });
        let at = r.started_unix_micros as f64 / 1e6;
        f.add(r.outcome == crate::rules::retry::Outcome::Succeeded, at, r.error.as_deref());
    }
    let folds: Vec<&crate::rules::health::Fold> = order.iter().map(|id| &folded[id]).collect();
    client.update(
        "INSERT INTO postback.endpoint_state AS s
                (endpoint_id, consecutive_failures, last_success_at, last_failure_at, failing_since, last_error, updated_at)
         SELECT r.e, r.f, to_timestamp(r.ok), to_timestamp(r.bad), to_timestamp(r.since), r.err, now()
           FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::float8[], $5::float8[], $6::text[])
                AS r(e, f, ok, bad, since, err)
         ON CONFLICT (endpoint_id) DO UPDATE SET
             consecutive_failures = CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.consecutive_failures
                                         ELSE s.consecutive_failures + excluded.consecutive_failures END,
             failing_since = CASE WHEN excluded.consecutive_failures = 0 THEN NULL
                                  WHEN excluded.last_success_at IS NOT NULL THEN excluded.failing_since
                                  ELSE coalesce(s.failing_since, excluded.failing_since) END,
             last_success_at = coalesce(excluded.last_success_at, s.last_success_at),
             last_failure_at = coalesce(excluded.last_failure_at, s.last_failure_at),
             last_error = coalesce(excluded.last_error, s.last_error),
             updated_at = now()",
        None,
        &[
            order.clone().into(),
            folds.iter().map(|f| f.failures_after_success).collect::<Vec<i32>>().into(),
            folds.iter().map(|f| f.last_success).collect::<Vec<Option<f64>>>().into(),
            folds.iter().map(|f| f.last_failure).collect::<Vec<Option<f64>>>().into(),
            folds.iter().map(|f| f.first_failure_after_success).collect::<Vec<Option<f64>>>().into(),
            folds.iter().map(|f| f.last_error.clone()).collect::<Vec<Option<String>>>().into(),
        ],
    )?;
    Ok(())
}

/// Deletes one bounded batch of succeeded deliveries older than `older_than_secs`.
pub fn purge_batch(older_than_secs: i64, batch: i32) -> SpiResult<i64> {
    Spi::get_one_with_args::<i64>(
        "SELECT postback.purge(make_interval(secs => $1::float8), $2, false, 1)",
        &[(older_than_secs as f64).into(), batch.into()],
    )
    .map(|n| n.unwrap_or(0))
}

/// Moves at most a day of finished deliveries into postback.delivery_rollup;
/// true when more is left to roll up.
pub fn roll_up() -> SpiResult<bool> {
    Spi::get_one::<bool>("SELECT postback.roll_up()").map(|more| more.unwrap_or(false))
}

/// Returns leased deliveries to the queue, recording the interrupted attempt
/// so that a request the receiver may have seen is explained. Leases of a
/// worker that no longer runs are taken: at start all of them, later only
/// expired ones. Another live worker's lease stands however long its endpoint
/// hangs; this worker's own expired leases are taken unless the delivery is
/// one it still holds (`holding`: on the wire or waiting in its scheduler), so
/// a delivery this worker lost track of comes back.
/// Interrupted attempts bound for one attempts shard: click ids, delivery ids,
/// attempt numbers, when they started (Unix seconds).
#[derive(Default)]
struct Interrupted(Vec<String>, Vec<i64>, Vec<i32>, Vec<f64>);

pub fn reclaim_leases(at_start: bool, holding: &[i64]) -> SpiResult<u64> {
    let t = tables();
    let expired = format!(
        "expired AS (
                 SELECT d.id, d.attempts, d.lease_expires_at, d.tableoid FROM {} d
                  WHERE d.state = 'in_flight'
                    AND CASE WHEN d.leased_by = pg_backend_pid()
                             -- this worker's own: only once expired (one claimed or
                             -- sent but not recorded yet is in no list it holds); at
                             -- start a reused pid's are an earlier worker's
                             THEN ($4 OR d.lease_expires_at < now()) AND d.id <> ALL ($2::bigint[])
                             ELSE ($1 OR d.lease_expires_at < now())
                                  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                                   WHERE a.pid = d.leased_by AND a.backend_type = $3)
                        END
                  FOR UPDATE SKIP LOCKED)",
        t.deliveries
    );
    const INTERRUPTED: &str = "'interrupted: the worker stopped while this attempt was in flight; \
                               the receiver may or may not have received it'";
    // distributed: a lease taken on another node (its shard moved here since) names
    // a pid no worker of this node has; it is taken back at once, not when it expires
    let everything_not_live = at_start || t.attempts_by_shard.is_some();
    let args = [everything_not_live.into(), holding.to_vec().into(), super::WORKER_TYPE.into(), at_start.into()];
    Spi::connect_mut(|client| {
        let Some(by_shard) = &t.attempts_by_shard else {
            let result = client.update(
                &format!(
                    "WITH {expired},
                     a AS (
                         INSERT INTO postback.attempts (delivery_id, attempt_no, started_at, error, outcome)
                         SELECT e.id, e.attempts, e.lease_expires_at - interval '{LEASE}', {INTERRUPTED}, 'retry'
                           FROM expired e
                         ON CONFLICT (delivery_id, attempt_no) DO NOTHING)
                     UPDATE postback.deliveries d
                        SET state = 'pending', lease_expires_at = NULL, leased_by = NULL, next_attempt_at = now(),
                            last_error = 'interrupted attempt; retried'
                       FROM expired WHERE d.id = expired.id"
                ),
                None,
                &args,
            )?;
            return Ok(result.len() as u64);
        };
        // distributed: the deliveries first, then each interrupted attempt into the
        // attempts shard beside its delivery's
        let rows = client.update(
            &format!(
                "WITH {expired}
                 UPDATE {deliveries} d
                    SET state = 'pending', lease_expires_at = NULL, leased_by = NULL, next_attempt_at = now(),
                        last_error = 'interrupted attempt; retried'
                   FROM expired WHERE d.id = expired.id
                 RETURNING expired.tableoid::oid::bigint, d.click_id, d.id, d.attempts,
                           extract(epoch FROM expired.lease_expires_at - interval '{LEASE}')::float8",
                deliveries = t.deliveries
            ),
            None,
            &args,
        )?;
        let mut groups: HashMap<&str, Interrupted> = HashMap::new();
        let mut n = 0u64;
        for row in rows {
            n += 1;
            let Some(attempts) = row.get::<i64>(1)?.and_then(|oid| by_shard.get(&(oid as u32))) else { continue };
            let g = groups.entry(attempts.as_str()).or_default();
            g.0.push(row.get::<String>(2)?.unwrap_or_default());
            g.1.push(row.get::<i64>(3)?.unwrap_or_default());
            g.2.push(row.get::<i32>(4)?.unwrap_or(1));
            g.3.push(row.get::<f64>(5)?.unwrap_or_default());
        }
        for (attempts, Interrupted(clicks, ids, nos, started)) in groups {
            client.update(
                &format!(
                    "INSERT INTO {attempts} (id, click_id, delivery_id, attempt_no, started_at, error, outcome)
                     SELECT {NODE_ATTEMPT_ID}, r.c, r.d, r.n,
                            to_timestamp(r.s), {INTERRUPTED}, 'retry'
                       FROM unnest($1::text[], $2::bigint[], $3::int[], $4::float8[]) AS r(c, d, n, s)
                     ON CONFLICT (click_id, delivery_id, attempt_no) DO NOTHING"
                ),
                None,
                &[clicks.into(), ids.into(), nos.into(), started.into()],
            )?;
        }
        Ok(n)
    })
}

/// The `postback_alerts` payload, as a SQL expression over the given column
/// expressions: ids and states only (any role that can connect may LISTEN),
/// and the worker's pid, which tells its alerts from forged ones.
fn alert_payload(endpoint_id: &str, state: &str, previous: &str, since: &str) -> String {
    format!(
        "json_build_object('endpoint_id', {endpoint_id}, 'state', {state}, 'previous', {previous}, \
         'since', {since}, 'worker_pid', pg_backend_pid())::text"
    )
}

/// Records breaker transitions on postback.endpoint_state and announces each
/// one with NOTIFY postback_alerts (a JSON payload operators can page on).
pub fn record_transitions(transitions: &[crate::rules::scheduler::Transition]) -> SpiResult<()> {
    if transitions.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = transitions.iter().map(|t| t.endpoint_id).collect();
    let to: Vec<String> = transitions.iter().map(|t| t.to.as_str().to_string()).collect();
    let from: Vec<String> = transitions.iter().map(|t| t.from.as_str().to_string()).collect();
    let at: Vec<f64> = transitions.iter().map(|t| t.at_us as f64 / 1e6).collect();
    let reasons: Vec<String> = transitions.iter().map(|t| t.reason.clone()).collect();
    Spi::run_with_args(
        &format!(
            "WITH t AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[], $5::text[])
                              AS t(e, state, previous, at, reason)),
              s AS (INSERT INTO postback.endpoint_state AS s (endpoint_id, breaker, breaker_since, breaker_reason)
                    SELECT DISTINCT ON (t.e) t.e, t.state, to_timestamp(t.at), t.reason FROM t ORDER BY t.e, t.at DESC
                    ON CONFLICT (endpoint_id) DO UPDATE
                       SET breaker = excluded.breaker, breaker_since = excluded.breaker_since,
                           breaker_reason = excluded.breaker_reason, updated_at = now())
         SELECT pg_notify('postback_alerts', x.payload)
           FROM (SELECT {} AS payload FROM t ORDER BY t.at OFFSET 0) AS x",
            alert_payload("t.e", "t.state", "t.previous", "to_timestamp(t.at)")
        ),
        &[ids.into(), to.into(), from.into(), at.into(), reasons.into()],
    )
}

/// Records when endpoints became slow (`endpoint_state.slow_since`), or
/// clears it when they are fast again.
pub fn record_slow(changes: &[crate::rules::scheduler::SlowChange]) -> SpiResult<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = changes.iter().map(|c| c.endpoint_id).collect();
    let since: Vec<Option<f64>> = changes.iter().map(|c| c.slow.then_some(c.at_us as f64 / 1e6)).collect();
    let order: Vec<i64> = (0..changes.len() as i64).collect();
    Spi::run_with_args(
        &format!(
            "INSERT INTO postback.endpoint_state AS s (endpoint_id, slow_since)
             SELECT DISTINCT ON (t.e) t.e, to_timestamp(t.since)
               FROM unnest($1::bigint[], $2::float8[], $3::bigint[]) AS t(e, since, n)
              WHERE EXISTS (SELECT 1 FROM {} x WHERE x.id = t.e)
              ORDER BY t.e, t.n DESC
             ON CONFLICT (endpoint_id) DO UPDATE SET slow_since = excluded.slow_since",
            tables().endpoints
        ),
        &[ids.into(), since.into(), order.into()],
    )
}

/// Forgets which of its endpoints a previous worker found slow (at start).
pub fn forget_slow(share: Share) -> SpiResult<()> {
    Spi::run_with_args(
        "UPDATE postback.endpoint_state SET slow_since = NULL
          WHERE slow_since IS NOT NULL AND endpoint_id % $1 = $2",
        &[(share.count.max(1) as i64).into(), (share.index as i64).into()],
    )
}

/// Deactivates endpoints that have failed for longer than `after_secs`, and
/// announces it (state "disabled"). Returns how many. The failing endpoints
/// are found first, then deactivated by id: on Citus endpoint_state is this
/// node's own table and endpoints a reference table, which one statement may
/// not join.
pub fn disable_failing(after_secs: i64) -> SpiResult<i64> {
    let failing = Spi::get_one_with_args::<Vec<i64>>(
        "SELECT coalesce(array_agg(s.endpoint_id), '{}') FROM postback.endpoint_state s
          WHERE s.failing_since < now() - make_interval(secs => $1::float8)",
        &[(after_secs as f64).into()],
    )?
    .unwrap_or_default();
    if failing.is_empty() {
        return Ok(0);
    }
    let off = Spi::get_one_with_args::<Vec<i64>>(
        "WITH off AS (UPDATE postback.endpoints e SET active = false
                        WHERE e.id = ANY ($1) AND e.active RETURNING e.id)
         SELECT coalesce(array_agg(off.id), '{}') FROM off",
        &[failing.into()],
    )?
    .unwrap_or_default();
    if off.is_empty() {
        return Ok(0);
    }
    Spi::get_one_with_args::<i64>(
        &format!(
            "SELECT count(pg_notify('postback_alerts', {})) FROM unnest($1::bigint[]) AS off(id)",
            alert_payload("off.id", "'disabled'", "'open'", "now()")
        ),
        &[off.into()],
    )
    .map(|n| n.unwrap_or(0))
}

/// Whether this node is the Citus coordinator (or Citus is not there): the
/// node whose maintenance worker rolls up and purges the distributed tables.
pub fn on_coordinator() -> SpiResult<bool> {
    if Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_local_group') IS NOT NULL")?
        != Some(true)
    {
        return Ok(true);
    }
    Spi::get_one::<bool>("SELECT (SELECT g.groupid = 0 FROM pg_catalog.pg_dist_local_group g)")
        .map(|c| c.unwrap_or(true))
}

/// Milliseconds until the earliest scheduled retry of this worker's
/// endpoints, if any is in the future.
pub fn ms_until_next_due(share: Share) -> SpiResult<Option<i64>> {
    Spi::get_one_with_args::<i64>(
        &format!(
            "SELECT ceil(extract(epoch FROM min(next_attempt_at) - now()) * 1000.0)::bigint
               FROM {}
              WHERE state = 'pending' AND next_attempt_at > now() AND endpoint_id % $1 = $2",
            tables().deliveries
        ),
        &[(share.count.max(1) as i64).into(), (share.index as i64).into()],
    )
}
