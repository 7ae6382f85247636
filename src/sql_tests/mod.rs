//! SQL-level tests run by `cargo pgrx test`, each inside a transaction that is
//! rolled back; one file per topic, each a `tests` schema (where pgrx looks
//! for them), sharing `helpers`.

mod catalog;
mod constraints;
mod fanout;
mod helpers;
mod metrics;
mod templates;
