//! pg_postback: conversion postbacks and signed webhooks delivered from inside PostgreSQL.
//!
//! `rules` holds the logic, pure, with plain unit tests; `http` sends one
//! request; `api`, `enqueue` and `gucs` are the SQL-facing layer and `worker`
//! the background worker. No module is public: the compiler sees dead code.

use pgrx::prelude::*;

mod http;
mod rules;

mod api;
mod gucs;
mod worker;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/views.sql", name = "views", requires = ["schema", worker_stats]);
pgrx::extension_sql_file!(
    "../sql/enqueue.sql",
    name = "enqueue",
    requires = [
        "schema",
        render_request,
        preview_request,
        sign_request,
        check_json_nesting,
        conversions_validate,
        enqueue_conversions,
        validate_headers,
        validate_partners,
        validate_conditions,
        validate_statuses
    ]
);
pgrx::extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = [
        "enqueue",
        "views",
        test_request,
        wake_worker,
        rerender,
        needs_secret,
        explain_routing,
        curl_command,
        sign_request
    ]
);
pgrx::extension_sql_file!("../sql/watch.sql", name = "watch", requires = ["enqueue", "operations"]);
pgrx::extension_sql_file!("../sql/citus.sql", name = "citus", requires = ["schema"]);
pgrx::extension_sql_file!(
    "../sql/privileges.sql",
    name = "privileges",
    requires = [
        "enqueue",
        "views",
        "operations",
        "watch",
        "citus",
        render_request,
        preview_request,
        enqueue_conversions,
        sign_request,
        take_proposed_conversions,
        wake_worker,
        worker_stats
    ]
);
pgrx::extension_sql_file!("../sql/comments.sql", name = "comments", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        worker::shared::init();
        worker::shared::wake_on_commit_prepared();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod sql_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
