//! Validation of conversion rows, with messages that name the column and the
//! row's transaction_id (pure; the CHECK constraints stay as a backstop).

use crate::rules::refusal::{Kind, Refusal};

pub const STATUSES: &[&str] = &["pending", "approved", "rejected", "reversed", "refunded", "chargeback"];

#[derive(Debug, Default, Clone, Copy)]
pub struct Fields<'a> {
    pub click_id: Option<&'a str>,
    pub transaction_id: Option<&'a str>,
    pub event: Option<&'a str>,
    pub status: Option<&'a str>,
    pub currency: Option<&'a str>,
    pub partner: Option<&'a str>,
}

/// An event name: 1 to 64 of a-z, 0-9, '_', '.', '-', not starting with '.' or '-'.
pub fn event_ok(e: &str) -> bool {
    let b = e.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'))
}

/// Why a conversion's partner may not change after insert.
pub fn partner_change(transaction_id: Option<&str>, old: Option<&str>, new: Option<&str>) -> Refusal {
    let show = |p: Option<&str>| p.map_or("NULL".to_string(), |p| format!("\"{}\"", shorten(p)));
    let message = format!(
        "conversion with transaction_id \"{}\": column partner cannot change after insert (from {} to {}); \
         its deliveries went to that partner's endpoints and its later statuses must follow them",
        shorten(transaction_id.unwrap_or("")),
        show(old),
        show(new)
    );
    Refusal::new(Kind::RestrictViolation, "partner", message)
        .hint("Insert a conversion with another transaction_id for the other partner.")
}

/// `Err` names the column (a check_violation).
pub fn check(f: &Fields) -> Result<(), Refusal> {
    let row = match f.transaction_id {
        Some(t) => format!("conversion with transaction_id \"{}\"", shorten(t)),
        None => "conversion without transaction_id".to_string(),
    };
    let bad = |column: &str, what: String| {
        Err(Refusal::new(Kind::CheckViolation, column, format!("{row}: column {column} {what}")))
    };
    match f.transaction_id {
        None => return bad("transaction_id", "must not be null".into()),
        Some(t) if t.is_empty() || t.chars().count() > 256 => {
            return bad("transaction_id", format!("must be 1 to 256 characters (got {})", t.chars().count()))
        }
        _ => {}
    }
    match f.click_id {
        None => return bad("click_id", "must not be null".into()),
        Some(c) if c.is_empty() || c.chars().count() > 512 => {
            return bad("click_id", format!("must be 1 to 512 characters (got {})", c.chars().count()))
        }
        _ => {}
    }
    if let Some(e) = f.event {
        if !event_ok(e) {
            return bad("event", format!("\"{}\" must be 1 to 64 characters of a-z, 0-9, '_', '.', '-'", shorten(e)));
        }
    }
    if let Some(s) = f.status {
        if !STATUSES.contains(&s) {
            return bad("status", format!("\"{}\" must be one of {}", shorten(s), STATUSES.join(", ")));
        }
    }
    if let Some(p) = f.partner {
        if let Err(what) = crate::rules::routing::check_partner(p) {
            return bad("partner", format!("\"{}\" {what}", shorten(p)));
        }
    }
    if let Some(c) = f.currency {
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad("currency", format!("\"{}\" must be an upper-case ISO 4217 code such as EUR", shorten(c)));
        }
    }
    Ok(())
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(80).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Fields<'static> {
        Fields {
            click_id: Some("c"),
            transaction_id: Some("t-1"),
            event: Some("sale"),
            status: Some("approved"),
            currency: Some("EUR"),
            partner: Some("net-a"),
        }
    }

    #[test]
    fn valid_row_passes() {
        assert_eq!(check(&ok()), Ok(()));
        assert_eq!(check(&Fields { currency: None, ..ok() }), Ok(()));
    }

    #[test]
    fn errors_name_column_and_transaction_id() {
        let Refusal { field: col, message: msg, .. } = check(&Fields { status: Some("paid"), ..ok() }).unwrap_err();
        assert_eq!(col, "status");
        assert!(
            msg.contains("transaction_id \"t-1\"") && msg.contains("column status") && msg.contains("\"paid\""),
            "{msg}"
        );
        assert_eq!(check(&Fields { currency: Some("eur"), ..ok() }).unwrap_err().field, "currency");
        assert_eq!(check(&Fields { click_id: Some(""), ..ok() }).unwrap_err().field, "click_id");
        assert_eq!(check(&Fields { transaction_id: Some(""), ..ok() }).unwrap_err().field, "transaction_id");
        assert_eq!(check(&Fields { event: Some("Big Sale"), ..ok() }).unwrap_err().field, "event");
        assert_eq!(check(&Fields { partner: None, ..ok() }), Ok(()));
        let Refusal { field: col, message: msg, .. } = check(&Fields { partner: Some(""), ..ok() }).unwrap_err();
        assert_eq!(
            (col.as_str(), msg.as_str()),
            (
                "partner",
                "conversion with transaction_id \"t-1\": column partner \"\" must be 1 to 100 characters (got 0)"
            )
        );
        assert_eq!(check(&Fields { partner: Some("a\tb"), ..ok() }).unwrap_err().field, "partner");
        let m = partner_change(Some("t-1"), Some("net-a"), None).message;
        assert!(m.contains("column partner cannot change after insert (from \"net-a\" to NULL)"), "{m}");
        let long = "x".repeat(513);
        let Refusal { field: col, message: msg, .. } = check(&Fields { click_id: Some(&long), ..ok() }).unwrap_err();
        assert_eq!(col, "click_id");
        assert!(msg.contains("got 513"), "{msg}");
    }
}

/// Deepest nesting of arrays and objects a stored attributes value may have:
/// every reader (routing, templates, the worker) handles this depth without
/// hitting a parser's recursion limit.
pub const MAX_JSON_NESTING: usize = 32;

/// How deeply arrays and objects nest in a JSON text (0 for a scalar);
/// brackets inside strings do not count. Linear, no recursion.
pub fn json_nesting(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `Err` names the column and the limit when a value nests too deeply.
pub fn check_nesting(text: &str, column: &str) -> Result<(), String> {
    let depth = json_nesting(text);
    if depth > MAX_JSON_NESTING {
        return Err(format!(
            "column {column} nests {depth} levels of arrays and objects; the limit is {MAX_JSON_NESTING}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod nesting_tests {
    use super::*;

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        assert_eq!(json_nesting("1"), 0);
        assert_eq!(json_nesting(r#"{"a": [1, {"b": "[[[{"}]}"#), 3);
        assert_eq!(json_nesting(r#"{"a": "\"[[["}"#), 1);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(json_nesting(&deep), 200);
        let e = check_nesting(&format!("{{\"a\":{deep}}}"), "clicks.attributes").unwrap_err();
        assert!(e.contains("clicks.attributes") && e.contains("201") && e.contains("32"), "{e}");
        assert!(check_nesting(&format!("{}{}", "[".repeat(32), "]".repeat(32)), "x").is_ok());
    }
}
