//! Rendering deliveries again from their conversions, with their endpoints as
//! they are now: after an endpoint's request settings were edited (its queued
//! deliveries), and when a delivery is resent that never rendered or whose
//! endpoint changed since. A delivery keeps its id, idempotency key, event,
//! status, attempts and place in its lifecycle order.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::spi::SpiResult;

use super::conversions::ConversionRow;
use super::endpoints::{load_endpoints, render_with_pattern, EndpointRow};
use super::{now_unix_micros, rows};

/// Requests rendered again, column by column.
#[derive(Default)]
struct Rendered {
    id: Vec<i64>,
    method: Vec<String>,
    url: Vec<String>,
    body: Vec<Option<String>>,
    hashes: Vec<Option<String>>,
    pattern: Vec<Option<String>>,
    error: Vec<Option<String>>,
}

/// Renders the deliveries `ids` again (those with a conversion; others are
/// left as they are) and returns how many now have a request to send. One
/// that no longer renders is dead with the reason.
#[pg_extern(volatile)]
fn rerender(ids: Vec<i64>) -> i64 {
    if ids.is_empty() {
        return 0;
    }
    Spi::connect_mut(|client| {
        let distributed = client.select(rows::IS_DISTRIBUTED, Some(1), &[])?.first().get::<bool>(1)?.unwrap_or(false);
        let tables = rows::own_tables_on_citus(distributed);
        render_again(client, &tables, rows::ToRender::Ids, ids.into())
    })
    .unwrap_or_else(|e| pgrx::error!("rendering deliveries again: {e}"))
}

/// On a Citus node whose tables are distributed: renders again the queued
/// postbacks of an edited endpoint in this node's shards (each with the
/// conversions and clicks beside it, and this node's placement of the
/// endpoints), as `rerender` does on one node. Called by the trigger on this
/// node's placement of the endpoints reference table, which Citus updates on
/// every node. Returns how many have a request to send.
#[pg_extern(volatile)]
fn rerender_queued_here(endpoint_id: i64) -> i64 {
    Spi::connect_mut(|client| {
        let mut shards = Vec::new();
        for row in client.select(rows::LOCAL_CONVERSIONS_SHARDS, None, &[])? {
            // a shard moved away meanwhile has no relation here
            if let Some(oid) = row.get::<pg_sys::Oid>(1)? {
                shards.push(oid);
            }
        }
        let mut sendable = 0;
        for oid in shards {
            let tables = rows::Tables::for_trigger_on(oid);
            sendable += render_again(client, &tables, rows::ToRender::QueuedOf, endpoint_id.into())?;
        }
        SpiResult::Ok(sendable)
    })
    .unwrap_or_else(|e| pgrx::error!("rendering an edited endpoint's queued postbacks again: {e}"))
}

/// Renders again the deliveries `which` selects (with `argument`) in `tables`.
fn render_again(
    client: &mut pgrx::spi::SpiClient<'_>,
    tables: &rows::Tables,
    which: rows::ToRender,
    argument: pgrx::datum::DatumWithOid<'static>,
) -> SpiResult<i64> {
    let rows = client.select(&rows::deliveries_to_render(tables, which), None, &[argument])?;
    let now = now_unix_micros();
    let limits = crate::gucs::request_limits();
    let mut endpoints: HashMap<i64, Option<EndpointRow>> = HashMap::new();
    let mut out = Rendered::default();
    for row in rows {
        let id = row.get::<i64>(1)?.unwrap_or_default();
        let endpoint_id = row.get::<i64>(2)?.unwrap_or_default();
        let mut c = ConversionRow::read_from(&row, 6)?;
        // the delivery announces the event and status it was made for
        c.event = row.get::<String>(3)?.unwrap_or_default();
        c.status = row.get::<String>(4)?.unwrap_or_default();
        let key = row.get::<String>(5)?.unwrap_or_default();
        let e = match endpoints.entry(endpoint_id) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(load_endpoints(client, tables, rows::Which::One(endpoint_id))?.0.pop())
            }
        };
        let Some(e) = e.as_ref() else { continue };
        let conversion = c.as_conversion();
        let (request, pattern) = render_with_pattern(&conversion, e, &key, now, limits);
        out.id.push(id);
        out.method.push(e.method.clone());
        match request {
            Ok(r) => {
                out.url.push(r.url);
                out.body.push(r.body);
                out.hashes.push(crate::rules::url_hash::to_json(&r.hashes));
                out.pattern.push(pattern);
                out.error.push(None);
            }
            Err(why) => {
                out.url.push(String::new());
                out.body.push(None);
                out.hashes.push(None);
                out.pattern.push(None);
                out.error.push(Some(format!("rendering again from the conversion: {why}")));
            }
        }
    }
    let sendable = out.error.iter().filter(|e| e.is_none()).count() as i64;
    if !out.id.is_empty() {
        let args: [pgrx::datum::DatumWithOid; 7] = [
            out.id.into(),
            out.method.into(),
            out.url.into(),
            out.body.into(),
            out.hashes.into(),
            out.pattern.into(),
            out.error.into(),
        ];
        client.update(&rows::update_rendered(tables), None, &args)?;
    }
    Ok(sendable)
}
