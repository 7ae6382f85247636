//! success_body_pattern: `{variables}` filled with a delivery's values,
//! regex-escaped.

use serde_json::Map;

use super::{check_variable, valid_name_char, Macro, Part, Vars};

/// Fills the `{variable}` macros of a success_body_pattern with the
/// delivery's values, regex-escaped (`^{transaction_id}:OK$`). Braces that do
/// not name a known variable are left alone: they are regex syntax (`\\d{3}`).
pub fn render_pattern<V: Vars + ?Sized>(pattern: &str, vars: &V) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}');
        let name = close.map(|c| after[..c].trim());
        let known = name.filter(|n| {
            !n.is_empty()
                && n.chars().all(valid_name_char)
                && check_variable(&Macro {
                    name: n.to_string(),
                    raw: false,
                    filters: vec![],
                    position: 0,
                    part: Part::Path,
                    hash: None,
                })
                .is_ok()
        });
        match (known, close) {
            (Some(n), Some(c)) => {
                out.push_str(&regex::escape(&vars.text(n).unwrap_or_default()));
                rest = &after[c + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether a success_body_pattern uses the delivery's variables.
pub fn pattern_has_variables(pattern: &str) -> bool {
    render_pattern(pattern, &Map::new()) != pattern
}
