//! Text helpers every rule shares (pure): cutting to a byte budget on a
//! character boundary, percent-encoding a component, keeping query strings
//! (signatures, tokens) out of messages, and the wall clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A URL without its query and fragment (which may carry a signature or a token).
pub fn without_query(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    let mut out = url[..cut].to_string();
    if cut < url.len() {
        out.push_str("?…");
    }
    out
}

/// Removes the query string of `url` from an error message, in the form the
/// caller gave and in the normalised form the HTTP client prints.
pub fn redact_url(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &without_query(url));
    if let Ok(parsed) = url::Url::parse(url) {
        out = out.replace(parsed.as_str(), &without_query(parsed.as_str()));
    }
    out
}

/// Microseconds since the Unix epoch (the wall clock).
pub fn unix_micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Appends `value` percent-encoding everything but RFC 3986 unreserved characters.
pub fn push_encoded(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    push_encoded(&mut out, value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters_within_the_cap() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }

    #[test]
    fn query_strings_stay_out_of_messages() {
        assert_eq!(without_query("https://n.test/a?sig=x#f"), "https://n.test/a?…");
        assert_eq!(
            redact_url("GET https://n.test/a?sig=x: refused", "https://n.test/a?sig=x"),
            "GET https://n.test/a?…: refused"
        );
        assert_eq!(encode_component("a b/~"), "a%20b%2F~");
    }
}
