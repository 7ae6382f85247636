//! Run-time settings (GUCs). Their names are part of the public contract.

use std::ffi::{CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_guard;
use pgrx::pg_sys;

use crate::rules::target_policy;

pub static DATABASE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(1024);
pub static MAX_RESPONSE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static MAX_URL_BYTES: GucSetting<i32> = GucSetting::<i32>::new(crate::rules::request::MAX_URL_BYTES as i32);
pub static MAX_BODY_BYTES: GucSetting<i32> = GucSetting::<i32>::new(crate::rules::request::MAX_BODY_BYTES as i32);
pub static BREAKER_FAILURES: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static BREAKER_COOLDOWN_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
pub static DISABLE_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(5 * 24 * 3600);
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 3600);
pub static ALLOWED_TARGETS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static ALLOW_DISTRIBUTED_UPDATE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// One integer setting: its name, its descriptions, its bounds.
struct IntGuc {
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    /// Set by superusers only (SUSET), else in the configuration files (SIGHUP).
    superuser_only: bool,
    flags: GucFlags,
}

/// Every integer setting, registered in this order.
static INT_GUCS: [IntGuc; 11] = [
    IntGuc {
        name: c"postback.workers",
        short: c"Delivery workers per database (0: one per two CPU cores, 1 to 4).",
        long: c"The workers of a database share its queue: each owns the endpoints whose id modulo \
          this number is its index, so per-endpoint limits, the breaker and lifecycle order hold. \
          On reload the launcher stops a database's workers and starts the new number. Each worker \
          takes one of max_worker_processes.",
        setting: &WORKERS,
        min: 0,
        max: crate::rules::workers::MAX_PER_DATABASE,
        superuser_only: false,
        flags: GucFlags::empty(),
    },
    IntGuc {
        name: c"postback.poll_interval",
        short: c"Longest time the worker sleeps before looking for due deliveries.",
        long: c"Commits that enqueue deliveries wake the worker at once; this interval is only the \
          fallback, and the worker also wakes for the earliest scheduled retry.",
        setting: &POLL_INTERVAL_MS,
        min: 10,
        max: 3_600_000,
        superuser_only: false,
        flags: GucFlags::UNIT_MS,
    },
    IntGuc {
        name: c"postback.batch_size",
        short: c"Deliveries the worker claims per batch.",
        long: c"Each claim is one short transaction; results are recorded as they come back, those finishing within 2 ms in one transaction.",
        setting: &BATCH_SIZE,
        min: 1,
        max: 10_000,
        superuser_only: false,
        flags: GucFlags::empty(),
    },
    IntGuc {
        name: c"postback.concurrency",
        short: c"HTTP requests the worker keeps open at once, over all endpoints.",
        long: c"Requests run on one event loop (a socket and a few kB each, no thread per request). Each \
          endpoint also has its own cap, postback.endpoints.max_in_flight, and slow endpoints (a request out \
          for a second or more) together hold at most half of this, so partners slow at once never take the \
          capacity the others need. The worker raises its open-files limit to fit.",
        setting: &CONCURRENCY,
        min: 1,
        max: 10_000,
        superuser_only: false,
        flags: GucFlags::empty(),
    },
    IntGuc {
        name: c"postback.max_response_bytes",
        short: c"Most bytes of a response body read and stored per attempt.",
        long: c"Longer bodies are truncated in postback.attempts.response_body; the rest is not read.",
        setting: &MAX_RESPONSE_BYTES,
        min: 0,
        max: 1_048_576,
        superuser_only: false,
        flags: GucFlags::UNIT_BYTE,
    },
    IntGuc {
        name: c"postback.breaker_failures",
        short: c"Consecutive failed attempts after which an endpoint's circuit breaker opens; 0 = never.",
        long: c"Failures are timeouts, refused or reset connections and HTTP 408, 429 and 5xx. While open, the \
          endpoint's deliveries wait without spending attempts; after postback.breaker_cooldown one probe \
          request goes through, and its success closes the breaker.",
        setting: &BREAKER_FAILURES,
        min: 0,
        max: 1_000_000,
        superuser_only: false,
        flags: GucFlags::empty(),
    },
    IntGuc {
        name: c"postback.breaker_cooldown",
        short: c"How long an open circuit breaker waits before a probe request.",
        long: c"Each failed probe doubles the wait, up to 32 times this value or one hour.",
        setting: &BREAKER_COOLDOWN_MS,
        min: 100,
        max: 3_600_000,
        superuser_only: false,
        flags: GucFlags::UNIT_MS,
    },
    IntGuc {
        name: c"postback.disable_after",
        short: c"An endpoint failing for longer than this is deactivated (active = false); 0 = never.",
        long: c"Measured from the first failure after its last success. NOTIFY postback_alerts announces it.",
        setting: &DISABLE_AFTER_S,
        min: 0,
        max: i32::MAX,
        superuser_only: false,
        flags: GucFlags::UNIT_S,
    },
    IntGuc {
        name: c"postback.retention",
        short: c"How long succeeded deliveries and their attempts are kept; 0 keeps them forever.",
        long: c"Every hour the worker deletes succeeded deliveries (and their attempts) that completed longer \
          ago than this, in batches of 10,000 rows, one transaction each. Dead deliveries are kept for \
          review; delete them with postback.purge(..., include_dead => true).",
        setting: &RETENTION_S,
        min: 0,
        max: i32::MAX,
        superuser_only: false,
        flags: GucFlags::UNIT_S,
    },
    IntGuc {
        name: c"postback.max_url_bytes",
        short: c"Longest URL a delivery may have.",
        long: c"A rendered URL over this size is refused at enqueue: the delivery is recorded dead with \
          the reason and the conversion is kept. Only superusers may change it.",
        setting: &MAX_URL_BYTES,
        min: 1024,
        max: 1_048_576,
        superuser_only: true,
        flags: GucFlags::UNIT_BYTE,
    },
    IntGuc {
        name: c"postback.max_body_bytes",
        short: c"Longest webhook body a delivery may have.",
        long: c"A rendered webhook body over this size is refused at enqueue: the delivery is recorded \
          dead with the reason (never truncated) and the conversion is kept. Only superusers may change it.",
        setting: &MAX_BODY_BYTES,
        min: 1024,
        max: 67_108_864,
        superuser_only: true,
        flags: GucFlags::UNIT_BYTE,
    },
];

pub fn init() {
    // SAFETY: the check hook is #[pg_guard]ed and only reads its argument.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"postback.database_name",
            c"Databases the pg_postback workers deliver for: one name or a comma-separated list.",
            c"Each listed database gets postback.workers workers delivering the queue of the \
              pg_postback extension installed there. On reload the launcher starts the workers of \
              added databases and stops those of removed ones; the others run on.",
            &DATABASE_NAME,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_database_list),
            None,
            None,
        );
    }
    // read by the event trigger postback.refuse_distributed_update (sql/citus.sql)
    GucRegistry::define_bool_guc(
        c"postback.allow_distributed_update",
        c"Lets ALTER EXTENSION pg_postback UPDATE run on an install distributed by Citus.",
        c"Off: such an update is refused before anything changes (an update script changes the \
          coordinator's tables, not the shards). Set it in the session of the update only when \
          the new release's notes say its upgrade handles distributed tables. Only superusers may set it.",
        &ALLOW_DISTRIBUTED_UPDATE,
        GucContext::Suset,
        GucFlags::default(),
    );
    for g in &INT_GUCS {
        let context = if g.superuser_only { GucContext::Suset } else { GucContext::Sighup };
        GucRegistry::define_int_guc(g.name, g.short, g.long, g.setting, g.min, g.max, context, g.flags);
    }
    // SAFETY: the check hook is #[pg_guard]ed and only reads its argument.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"postback.allowed_targets",
            c"Comma-separated CIDR blocks the worker may call despite the private-address block.",
            c"Loopback, private, link-local, CGNAT, unique-local, multicast and unspecified \
              addresses are refused unless listed here, e.g. '127.0.0.1/32, 10.20.0.0/16'.",
            &ALLOWED_TARGETS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_allowed_targets),
            None,
            None,
        );
    }
}

/// Refuses a malformed allowlist when it is set, not when the worker reads it.
#[pg_guard]
unsafe extern "C-unwind" fn check_allowed_targets(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| target_policy::parse_allowlist(v).map(|_| ())) }
}

/// Refuses a database list that does not parse (empty names, duplicates).
#[pg_guard]
unsafe extern "C-unwind" fn check_database_list(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    unsafe { check_with(newval, |v| crate::rules::workers::parse_databases(v).map(|_| ())) }
}

/// A string setting's check: the parser's message becomes the error detail.
unsafe fn check_with(newval: *mut *mut std::ffi::c_char, parse: impl FnOnce(&str) -> Result<(), String>) -> bool {
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval).to_string_lossy().into_owned()
    };
    match parse(&value) {
        Ok(()) => true,
        Err(message) => {
            let detail = CString::new(message).unwrap_or_default();
            unsafe {
                pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
            }
            false
        }
    }
}

pub fn database_name() -> String {
    DATABASE_NAME.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "postgres".to_string())
}

/// Workers per database: postback.workers, or (0) one per two CPU cores.
pub fn workers_per_database() -> u32 {
    match WORKERS.get() {
        n if n > 0 => n as u32,
        _ => crate::rules::workers::automatic_workers(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

pub fn allowed_targets() -> Vec<target_policy::Cidr> {
    let text = ALLOWED_TARGETS.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    // The check hook has already refused anything that does not parse.
    target_policy::parse_allowlist(&text).unwrap_or_default()
}

/// The size limits of rendered requests, as set now.
pub fn request_limits() -> crate::rules::request::Limits {
    crate::rules::request::Limits {
        url_bytes: MAX_URL_BYTES.get().max(1024) as usize,
        body_bytes: MAX_BODY_BYTES.get().max(1024) as usize,
    }
}
