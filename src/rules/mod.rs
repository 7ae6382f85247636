//! The rules (pure): no Postgres bindings, no SQL, no I/O but the clock. The SQL layer
//! (`api`, `gucs`), the HTTP client (`http`) and the worker call
//! them; they import nothing outside this module (`grep -rn "crate::" src/rules`
//! names only `crate::rules::…`).

pub mod conversion_rules;
pub mod health;
pub mod histogram;
pub mod outgoing;
pub mod prepared;
pub mod refusal;
pub mod request;
pub mod retry;
pub mod routing;
pub mod scheduler;
pub mod signing;
pub mod target_policy;
pub mod template;
pub mod text;
pub mod url_hash;
pub mod url_policy;
pub mod validate;
pub mod workers;
