//! What an attempt's result means and when to try again (pure).

use std::time::Duration;

use regex::Regex;

/// Longest wait a receiver's Retry-After can impose.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// How an attempt ended, as seen by the HTTP layer.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    Response {
        status: u16,
        body: String,
        retry_after: Option<String>,
        location: Option<String>,
    },
    /// a transport failure worth retrying (timeout, refused, reset, DNS)
    Transient(String),
    /// a failure retrying cannot fix (refused by the address policy, bad URL)
    Permanent(String),
}

/// What an attempt's record says happened (`attempts.outcome`; the delivery
/// becomes pending again on `Retry`, else takes the outcome as its state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Retry,
    Dead,
}

impl Outcome {
    /// Every outcome, in the order of the `attempt_outcome_must_be_…` CHECK constraint.
    #[cfg(any(test, feature = "pg_test"))]
    pub const ALL: [Outcome; 3] = [Outcome::Succeeded, Outcome::Retry, Outcome::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retry => "retry",
            Outcome::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Succeeded,
    Retry { error: String, retry_after: Option<Duration> },
    Dead { error: String },
}

/// Which status codes count as success and which are retried, per endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRules {
    pub success: Vec<(u16, u16)>,
    pub retry: Vec<(u16, u16)>,
}

impl Default for StatusRules {
    fn default() -> StatusRules {
        StatusRules { success: vec![(200, 299)], retry: vec![(408, 408), (425, 425), (429, 429), (500, 599)] }
    }
}

fn within(ranges: &[(u16, u16)], status: u16) -> bool {
    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
}

/// Parses a list of status codes and ranges, e.g. `["200-302"]` or `["408", "500-599"]`.
pub fn parse_statuses(items: &[String], what: &str) -> Result<Vec<(u16, u16)>, String> {
    if items.is_empty() {
        return Err(format!("{what}: the list is empty (use NULL for the default)"));
    }
    items
        .iter()
        .map(|item| {
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let code = |t: &str| t.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c));
            match (code(lo), code(hi)) {
                (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
                _ => Err(format!("{what}: \"{item}\" is not a status code (100-599) or a range such as 200-302")),
            }
        })
        .collect()
}

/// Longest error stored for an attempt (attempts.error, deliveries.last_error,
/// endpoint_state): a partner's long answer never grows the rows operators read.
pub const MAX_ERROR_BYTES: usize = 2000;

/// An error cut to [`MAX_ERROR_BYTES`] on a character boundary, marked when cut.
pub fn cap_error(error: String) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error;
    }
    format!("{}… ({} bytes, cut)", crate::rules::text::truncate_utf8(&error, MAX_ERROR_BYTES), error.len())
}

/// Longest success_body_pattern, once filled with a delivery's values.
pub const MAX_SUCCESS_PATTERN_BYTES: usize = 8192;
/// Compiled-size limit of a success_body_pattern (the regex crate's own bound).
const SUCCESS_PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A filled success_body_pattern within [`MAX_SUCCESS_PATTERN_BYTES`], or why not.
pub fn check_success_pattern_size(pattern: &str) -> Result<(), String> {
    if pattern.len() > MAX_SUCCESS_PATTERN_BYTES {
        return Err(format!(
            "success_body_pattern filled with this delivery's values is {} bytes; the limit is {MAX_SUCCESS_PATTERN_BYTES}",
            pattern.len()
        ));
    }
    Ok(())
}

/// Compiles a success_body_pattern, bounded in size. An error names the
/// problem: the delivery fails with it (a rule that cannot be built is never
/// dropped, which would let any 2xx count as success).
pub fn compile_success_pattern(pattern: &str) -> Result<Regex, String> {
    check_success_pattern_size(pattern)?;
    regex::RegexBuilder::new(pattern).size_limit(SUCCESS_PATTERN_SIZE_LIMIT).build().map_err(|e| {
        format!("success_body_pattern cannot be used: {}", crate::rules::text::truncate_utf8(&e.to_string(), 300))
    })
}

/// What a success_body_pattern said of a response body (computed on the
/// sending thread, where compiling and matching cost what the values weigh).
#[derive(Debug, Clone, PartialEq)]
pub enum BodyCheck {
    Matched,
    NotMatched {
        pattern: String,
    },
    /// the pattern cannot be built: the delivery fails with this reason
    Unusable(String),
}

impl BodyCheck {
    pub fn of(pattern: &str, body: &str) -> BodyCheck {
        match compile_success_pattern(pattern) {
            Ok(re) if re.is_match(body) => BodyCheck::Matched,
            Ok(_) => BodyCheck::NotMatched { pattern: pattern.to_string() },
            Err(e) => BodyCheck::Unusable(e),
        }
    }
}

/// Decides success, retry or dead for one attempt, before limits are applied,
/// with the default status rules (the tests' shorthand for `judge`).
#[cfg(test)]
pub fn classify(result: &AttemptResult, success_body: Option<&Regex>) -> Verdict {
    classify_with(result, success_body, &StatusRules::default())
}

/// Decides success, retry or dead for one attempt with an endpoint's rules:
/// a success status (whose body must match the pattern, if any) succeeds,
/// another 3xx is a redirect not followed, a retry status is retried, the
/// rest is dead at once. The tests' shorthand for `judge` with a compiled pattern.
#[cfg(test)]
pub fn classify_with(result: &AttemptResult, success_body: Option<&Regex>, rules: &StatusRules) -> Verdict {
    let check = match (success_body, result) {
        (Some(re), AttemptResult::Response { body, .. }) if re.is_match(body) => Some(BodyCheck::Matched),
        (Some(re), _) => Some(BodyCheck::NotMatched { pattern: re.as_str().to_string() }),
        (None, _) => None,
    };
    judge(result, check.as_ref(), rules)
}

/// Whether a response's status line carries a real HTTP status (100-599).
pub fn is_http_status(status: u16) -> bool {
    (100..=599).contains(&status)
}

/// Decides success, retry or dead with the body check done where the request was sent.
pub fn judge(result: &AttemptResult, body_check: Option<&BodyCheck>, rules: &StatusRules) -> Verdict {
    match result {
        AttemptResult::Transient(e) => Verdict::Retry { error: e.clone(), retry_after: None },
        AttemptResult::Permanent(e) => Verdict::Dead { error: e.clone() },
        AttemptResult::Response { status, .. } if !is_http_status(*status) => Verdict::Retry {
            error: format!("the response's status line has {status}, which is not an HTTP status (100-599)"),
            retry_after: None,
        },
        AttemptResult::Response { status, body: _, retry_after, location } => {
            let status = *status;
            if within(&rules.success, status) {
                return match body_check {
                    Some(BodyCheck::NotMatched { pattern }) => Verdict::Retry {
                        error: format!(
                            "HTTP {status} but the body does not match success_body_pattern /{}/",
                            crate::rules::text::truncate_utf8(pattern, 200)
                        ),
                        retry_after: None,
                    },
                    Some(BodyCheck::Unusable(e)) => Verdict::Dead { error: e.clone() },
                    _ => Verdict::Succeeded,
                };
            }
            if within(&rules.retry, status) {
                return Verdict::Retry {
                    error: format!("HTTP {status}"),
                    retry_after: retry_after.as_deref().and_then(parse_retry_after),
                };
            }
            if (300..=399).contains(&status) {
                // the Location of an http→https redirect echoes the whole signed
                // URL: its query string never reaches a stored row or an alert
                return Verdict::Dead {
                    error: format!(
                        "HTTP {status} redirect not followed (Location: {})",
                        location.as_deref().map(crate::rules::text::without_query).as_deref().unwrap_or("none")
                    ),
                };
            }
            Verdict::Dead { error: format!("HTTP {status}") }
        }
    }
}

/// What an attempt says of its endpoint, for the circuit breaker: a timeout,
/// a refused or reset connection and HTTP 408, 429 and 5xx say it is
/// unavailable; a success that it works; anything else (a 4xx for one
/// delivery, a policy refusal, a body that did not match) says nothing.
pub fn endpoint_health(result: &AttemptResult, verdict: &Verdict) -> crate::rules::scheduler::Health {
    use crate::rules::scheduler::Health;
    match (result, verdict) {
        (_, Verdict::Succeeded) => Health::Success,
        (AttemptResult::Transient(_), _) => Health::Failure,
        (AttemptResult::Response { status, .. }, _) if !is_http_status(*status) => Health::Failure,
        (AttemptResult::Response { status: 408 | 429 | 500..=599, .. }, _) => Health::Failure,
        _ => Health::Neutral,
    }
}

/// `Retry-After` as delay-seconds or as an HTTP date (RFC 9110: IMF-fixdate,
/// and the obsolete RFC 850 and asctime forms), capped at one hour; a date in
/// the past means no extra wait.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, std::time::SystemTime::now())
}

/// `parse_retry_after` with the current time given.
pub fn parse_retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(RETRY_AFTER_CAP));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(RETRY_AFTER_CAP))
}

/// The schedule step for the retry after attempt `attempt_no` (1-based): the
/// first retry uses step 0; the last step repeats.
pub fn scheduled_delay(schedule: &[Duration], attempt_no: i32) -> Duration {
    if schedule.is_empty() {
        return Duration::from_secs(60);
    }
    let idx = (attempt_no.max(1) as usize - 1).min(schedule.len() - 1);
    schedule[idx]
}

/// ±20% jitter; `unit` is a uniform random number in [0, 1).
pub fn jitter(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// An endpoint's limits on retrying one delivery.
pub struct Limits<'a> {
    pub schedule: &'a [Duration],
    pub max_attempts: i32,
    /// how long the delivery may still be retried (until created_at + max_age)
    pub remaining_age: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Succeeded,
    RetryIn(Duration, String),
    Dead(String),
}

/// The final decision once the endpoint's limits are applied to a verdict.
pub fn decide(verdict: Verdict, attempt_no: i32, limits: &Limits, unit: f64) -> Decision {
    match verdict {
        Verdict::Succeeded => Decision::Succeeded,
        Verdict::Dead { error } => Decision::Dead(error),
        Verdict::Retry { error, retry_after } => {
            if attempt_no >= limits.max_attempts {
                return Decision::Dead(format!("{error}; gave up after {attempt_no} attempts (max_attempts)"));
            }
            let delay = jitter(scheduled_delay(limits.schedule, attempt_no), unit);
            let delay = retry_after.map_or(delay, |ra| delay.max(ra));
            if delay > limits.remaining_age {
                return Decision::Dead(format!("{error}; the next attempt would come after max_age"));
            }
            Decision::RetryIn(delay, error)
        }
    }
}

/// A small xorshift generator for jitter: no need for cryptographic quality.
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    pub fn next_unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, body: &str) -> AttemptResult {
        AttemptResult::Response { status, body: body.into(), retry_after: None, location: None }
    }

    #[test]
    fn status_codes() {
        assert_eq!(classify(&resp(200, ""), None), Verdict::Succeeded);
        assert_eq!(classify(&resp(204, ""), None), Verdict::Succeeded);
        for s in [408, 425, 429, 500, 502, 503, 599] {
            assert!(matches!(classify(&resp(s, ""), None), Verdict::Retry { .. }), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 422] {
            assert!(matches!(classify(&resp(s, ""), None), Verdict::Dead { .. }), "{s}");
        }
    }

    #[test]
    fn body_pattern_decides_among_2xx() {
        let re = Regex::new("success=true").unwrap();
        assert_eq!(classify(&resp(200, "success=true;"), Some(&re)), Verdict::Succeeded);
        let v = classify(&resp(200, "success=false;"), Some(&re));
        assert!(matches!(v, Verdict::Retry { ref error, .. } if error.contains("success_body_pattern")), "{v:?}");
        assert!(matches!(classify(&resp(500, "success=true"), Some(&re)), Verdict::Retry { .. }));
    }

    #[test]
    fn a_pattern_that_cannot_be_built_fails_the_delivery_and_never_passes_a_2xx() {
        let long = format!("ok {}", "x".repeat(300_000));
        let check = BodyCheck::of(&long, "ok");
        assert!(matches!(&check, BodyCheck::Unusable(e) if e.contains("limit is 8192")), "{check:?}");
        let v = judge(&resp(200, "ok"), Some(&check), &StatusRules::default());
        assert!(matches!(&v, Verdict::Dead { error } if error.contains("success_body_pattern")), "{v:?}");
        let broken = BodyCheck::of("(unclosed", "ok");
        assert!(matches!(judge(&resp(200, "ok"), Some(&broken), &StatusRules::default()), Verdict::Dead { .. }));
        // a pattern too big for the compiled-size bound is refused, not dropped
        let huge = BodyCheck::of(&"\\w{500}".repeat(16), "ok");
        assert!(matches!(huge, BodyCheck::Unusable(_)), "{huge:?}");
        assert_eq!(BodyCheck::of("^ok$", "ok"), BodyCheck::Matched);
    }

    #[test]
    fn a_status_beyond_599_is_a_recorded_failure() {
        for s in [600, 777, 999] {
            let v = classify(&resp(s, ""), None);
            assert!(matches!(&v, Verdict::Retry { error, .. } if error.contains("not an HTTP status")), "{s}: {v:?}");
            assert_eq!(endpoint_health(&resp(s, ""), &v), crate::rules::scheduler::Health::Failure);
        }
    }

    #[test]
    fn a_redirect_never_stores_the_query_string_it_echoes() {
        let r = AttemptResult::Response {
            status: 301,
            body: String::new(),
            retry_after: None,
            location: Some("https://n.test/pb?cid=1&ts=5&sig=deadbeef".into()),
        };
        let Verdict::Dead { error } = classify(&r, None) else { panic!() };
        assert!(!error.contains("deadbeef") && !error.contains("cid=1"), "{error}");
        assert!(error.contains("https://n.test/pb?…"), "{error}");
    }

    #[test]
    fn redirects_are_dead_with_location() {
        let r = AttemptResult::Response {
            status: 302,
            body: String::new(),
            retry_after: None,
            location: Some("https://x.test/".into()),
        };
        assert_eq!(
            classify(&r, None),
            Verdict::Dead { error: "HTTP 302 redirect not followed (Location: https://x.test/)".into() }
        );
    }

    #[test]
    fn transport_failures() {
        assert!(matches!(classify(&AttemptResult::Transient("timed out".into()), None), Verdict::Retry { .. }));
        assert!(matches!(classify(&AttemptResult::Permanent("refused".into()), None), Verdict::Dead { .. }));
    }

    #[test]
    fn what_an_attempt_says_of_its_endpoint() {
        use crate::rules::scheduler::Health;
        let health = |r: AttemptResult| endpoint_health(&r, &classify(&r, None));
        assert_eq!(health(resp(200, "")), Health::Success);
        assert_eq!(health(resp(503, "")), Health::Failure);
        assert_eq!(health(resp(429, "")), Health::Failure);
        assert_eq!(health(AttemptResult::Transient("timed out".into())), Health::Failure);
        assert_eq!(health(resp(404, "")), Health::Neutral);
        assert_eq!(health(AttemptResult::Permanent("refused to connect".into())), Health::Neutral);
    }

    #[test]
    fn per_endpoint_success_and_retry_statuses() {
        let chartboost =
            StatusRules { success: parse_statuses(&["200-302".into()], "s").unwrap(), ..Default::default() };
        assert_eq!(classify_with(&resp(302, ""), None, &chartboost), Verdict::Succeeded);
        assert!(matches!(classify(&resp(302, ""), None), Verdict::Dead { .. }));
        let leanplum = StatusRules {
            retry: parse_statuses(&["409".into(), "500-599".into()], "r").unwrap(),
            ..Default::default()
        };
        assert!(matches!(classify_with(&resp(409, ""), None, &leanplum), Verdict::Retry { .. }));
        assert!(
            matches!(classify_with(&resp(429, ""), None, &leanplum), Verdict::Dead { .. }),
            "429 left out of the list"
        );
        let tapjoy = StatusRules::default();
        assert!(matches!(classify_with(&resp(403, ""), None, &tapjoy), Verdict::Dead { .. }));
        assert!(parse_statuses(&["99".into()], "x").is_err());
        assert!(parse_statuses(&["302-200".into()], "x").is_err());
        assert!(parse_statuses(&[], "x").is_err());
    }

    #[test]
    fn retry_after_as_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after_at("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after_at("Sunday, 06-Nov-94 08:51:37 GMT", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after_at("Sun Nov  6 08:49:47 1994", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after_at("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after_at("Mon, 07 Nov 1994 08:49:37 GMT", now), Some(RETRY_AFTER_CAP));
        assert_eq!(parse_retry_after_at("soon", now), None);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let r =
            AttemptResult::Response { status: 429, body: String::new(), retry_after: Some("2".into()), location: None };
        assert_eq!(
            classify(&r, None),
            Verdict::Retry { error: "HTTP 429".into(), retry_after: Some(Duration::from_secs(2)) }
        );
        assert_eq!(parse_retry_after("999999"), Some(RETRY_AFTER_CAP));
        // a date in the past: no extra wait
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        let limits = Limits {
            schedule: &[Duration::from_millis(200)],
            max_attempts: 5,
            remaining_age: Duration::from_secs(3600),
        };
        let d =
            decide(Verdict::Retry { error: "x".into(), retry_after: Some(Duration::from_secs(2)) }, 1, &limits, 0.5);
        assert_eq!(d, Decision::RetryIn(Duration::from_secs(2), "x".into()));
    }

    #[test]
    fn schedule_steps_repeat_the_last_and_limits_kill() {
        let s = [Duration::from_secs(60), Duration::from_secs(300)];
        assert_eq!(scheduled_delay(&s, 1), Duration::from_secs(60));
        assert_eq!(scheduled_delay(&s, 2), Duration::from_secs(300));
        assert_eq!(scheduled_delay(&s, 7), Duration::from_secs(300));
        let limits = Limits { schedule: &s, max_attempts: 3, remaining_age: Duration::from_secs(86400) };
        let retry = || Verdict::Retry { error: "HTTP 500".into(), retry_after: None };
        assert!(matches!(decide(retry(), 2, &limits, 0.5), Decision::RetryIn(d, _) if d == Duration::from_secs(300)));
        assert!(matches!(decide(retry(), 3, &limits, 0.5), Decision::Dead(e) if e.contains("max_attempts")));
        let old = Limits { remaining_age: Duration::from_secs(10), ..limits };
        assert!(matches!(decide(retry(), 1, &old, 0.5), Decision::Dead(e) if e.contains("max_age")));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let mut j = Jitter::new(42);
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(100), j.next_unit());
            assert!(d >= Duration::from_secs(80) && d <= Duration::from_secs(120), "{d:?}");
        }
    }
}
