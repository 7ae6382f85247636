//! Why an endpoint did or did not receive a conversion: its filters read
//! against the conversion as it is now (`postback.explain` adds the
//! deliveries and the endpoint's state).

use pgrx::prelude::*;

use super::conversions::ConversionRow;
use super::endpoints::load_endpoints;
use super::rows;

/// For every endpoint (by id): the first of its filters that leaves the
/// conversion out (naming what it wants and what the conversion has), or
/// NULL when all of them match. No rows for an unknown conversion.
#[pg_extern(stable)]
fn explain_routing(
    conversion_id: i64,
) -> TableIterator<'static, (name!(endpoint_id, i64), name!(filtered_out_by, Option<String>))> {
    let out = Spi::connect(|client| {
        let rows = client.select(&rows::conversion_with_click(), Some(1), &[conversion_id.into()])?;
        let Some(row) = rows.into_iter().next() else { return Ok::<_, pgrx::spi::Error>(Vec::new()) };
        let c = ConversionRow::read(&row)?;
        let (endpoints, router) = load_endpoints(client, &rows::own_tables(), rows::Which::All)?;
        let subject = c.subject();
        Ok(endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, router.filters(i).why_not(&subject).map(|m| m.to_string())))
            .collect())
    })
    .unwrap_or_else(|e| pgrx::error!("reading a conversion's routing: {e}"));
    TableIterator::new(out)
}
