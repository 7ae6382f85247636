//! `{hash:ALG:part,…}` digests of URL templates (pure), kept out of band.
//!
//! A digest over values and the endpoint's secret is computed when the request
//! is sent, so the secret never reaches a stored row. What the worker needs for
//! it travels *beside* the URL, never inside it: each slot names the byte
//! offset in the rendered URL where the endpoint's own template put a hash, the
//! algorithm, and the values to hash (`None` stands for the secret). Nothing
//! found in the URL text is ever interpreted, so a value that looks like a
//! marker is sent as the percent-encoded text it is.

use serde_json::Value;

/// One digest to insert into a rendered URL at send time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashSlot {
    /// byte offset in the rendered URL where the hex digest goes
    pub at: usize,
    /// md5, sha1 or sha256
    pub algorithm: String,
    /// the hashed text, in order: values and literals, `None` for the secret
    pub parts: Vec<Option<String>>,
}

pub const ALGORITHMS: &[&str] = &["md5", "sha1", "sha256"];

/// Hex digest of `input` with one of [`ALGORITHMS`].
pub fn hex_digest(algorithm: &str, input: &[u8]) -> Result<String, String> {
    use sha2::Digest;
    let digest: Vec<u8> = match algorithm {
        "md5" => md5::Md5::digest(input).to_vec(),
        "sha1" => sha1::Sha1::digest(input).to_vec(),
        "sha256" => sha2::Sha256::digest(input).to_vec(),
        other => {
            return Err(format!(
                "hash algorithm \"{}\" is not one of {}",
                other.escape_default(),
                ALGORITHMS.join(", ")
            ))
        }
    };
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// The slots as stored in `postback.deliveries.url_hashes` (NULL when none):
/// `[{"at": 31, "alg": "md5", "parts": ["tx-1", ":", null]}]`.
pub fn to_json(slots: &[HashSlot]) -> Option<String> {
    to_value(slots).map(|v| v.to_string())
}

/// The stored form as a JSON value (NULL when there are no slots).
pub fn to_value(slots: &[HashSlot]) -> Option<Value> {
    if slots.is_empty() {
        return None;
    }
    let list: Vec<Value> = slots
        .iter()
        .map(|s| {
            serde_json::json!({
                "at": s.at,
                "alg": s.algorithm,
                "parts": s.parts.iter().map(|p| p.clone().map_or(Value::Null, Value::String)).collect::<Vec<_>>(),
            })
        })
        .collect();
    Some(Value::Array(list))
}

/// Reads stored slots; anything that does not parse is an error (the delivery
/// fails with it, it is never sent without its digest).
pub fn from_json(text: Option<&str>) -> Result<Vec<HashSlot>, String> {
    let Some(text) = text else { return Ok(Vec::new()) };
    let value: Value = serde_json::from_str(text).map_err(|e| format!("url_hashes does not parse: {e}"))?;
    from_value(&value)
}

/// Reads slots from their stored JSON value (see `from_json`).
pub fn from_value(value: &Value) -> Result<Vec<HashSlot>, String> {
    let bad = |why: &str| format!("url_hashes does not parse: {why}");
    let Value::Array(items) = value else { return Err(bad("not a JSON array")) };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let at = item.get("at").and_then(Value::as_u64).ok_or_else(|| bad("\"at\" is not a byte offset"))? as usize;
        let algorithm = item.get("alg").and_then(Value::as_str).ok_or_else(|| bad("\"alg\" is missing"))?;
        if !ALGORITHMS.contains(&algorithm) {
            return Err(bad(&format!("\"alg\" is not one of {}", ALGORITHMS.join(", "))));
        }
        let Some(Value::Array(parts)) = item.get("parts") else { return Err(bad("\"parts\" is not an array")) };
        let parts = parts
            .iter()
            .map(|p| match p {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(bad("a part is neither text nor null (the secret)")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(HashSlot { at, algorithm: algorithm.to_string(), parts });
    }
    Ok(out)
}

/// A URL rendered without an endpoint (`postback.render`) cannot hold its
/// digests: every {hash:…} is over the secret, computed when the request is
/// sent. An error instead of a URL with the digest left out.
pub fn expand_without_secret(url: &str, slots: &[HashSlot]) -> Result<String, String> {
    if !slots.is_empty() {
        return Err("{hash:…} over the secret is computed when the request is sent, with the endpoint's \
                    secret; postback.preview(endpoint, conversion_id) shows it"
            .into());
    }
    Ok(url.to_string())
}

/// Inserts each slot's digest, computed with `secret`, at its offset. The URL
/// text is never searched: only the given positions are filled.
pub fn expand(url: &str, slots: &[HashSlot], secret: Option<&str>) -> Result<String, String> {
    if slots.is_empty() {
        return Ok(url.to_string());
    }
    let secret = secret.ok_or(
        "the URL template hashes with the secret but the endpoint has no live secret in postback.endpoint_secrets",
    )?;
    let mut out = String::with_capacity(url.len() + slots.len() * 64);
    let mut from = 0;
    for slot in slots {
        if slot.at < from || slot.at > url.len() || !url.is_char_boundary(slot.at) {
            return Err(format!("url_hashes: position {} does not fit the {}-byte URL", slot.at, url.len()));
        }
        out.push_str(&url[from..slot.at]);
        let mut input = String::new();
        for p in &slot.parts {
            input.push_str(p.as_deref().unwrap_or(secret));
        }
        out.push_str(&hex_digest(&slot.algorithm, input.as_bytes())?);
        from = slot.at;
    }
    out.push_str(&url[from..]);
    Ok(out)
}

/// 0.2.0's in-band form of the slots (`~pgpb-hash~ALG~base64url(json)~` at
/// each position). Written only into a 0.2.0 schema, between a library upgrade
/// and `ALTER EXTENSION pg_postback UPDATE`: the worker sends nothing before the
/// update, and the update turns markers back into slots only when their number
/// is the template's (so none came from a value). Never read by this library.
pub fn legacy_marked(url: &str, slots: &[HashSlot]) -> String {
    use base64::Engine;
    let mut out = String::with_capacity(url.len() + slots.len() * 64);
    let mut from = 0;
    for slot in slots {
        let at = slot.at.clamp(from, url.len());
        out.push_str(&url[from..at]);
        let parts = Value::Array(slot.parts.iter().map(|p| p.clone().map_or(Value::Null, Value::String)).collect());
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(parts.to_string());
        out.push_str(&format!("~pgpb-hash~{}~{payload}~", slot.algorithm));
        from = at;
    }
    out.push_str(&url[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(at: usize, parts: &[Option<&str>]) -> HashSlot {
        HashSlot { at, algorithm: "md5".into(), parts: parts.iter().map(|p| p.map(str::to_string)).collect() }
    }

    #[test]
    fn digests_go_where_the_slots_say_and_nowhere_else() {
        let url = "https://n.test/pb?x=~pgpb-hash~sha256~W251bGxd~&v=";
        let s = vec![slot(url.len(), &[Some("tx-1:"), None])];
        let out = expand(url, &s, Some("k2")).unwrap();
        // md5("tx-1:k2"); the marker-looking text stays as it was
        assert_eq!(out, format!("{url}{}", hex_digest("md5", b"tx-1:k2").unwrap()));
        assert!(out.contains("~pgpb-hash~sha256~W251bGxd~"));
        // without slots nothing in the text is expanded, secret or not
        assert_eq!(expand(url, &[], Some("k")).unwrap(), url);
    }

    #[test]
    fn the_legacy_form_is_the_0_2_0_marker() {
        let s = vec![slot(3, &[None])];
        assert_eq!(legacy_marked("a=&b", &s), "a=&~pgpb-hash~md5~W251bGxd~b");
    }

    #[test]
    fn slots_round_trip_and_bad_ones_fail_closed() {
        let s = vec![slot(3, &[Some("a"), None]), HashSlot { at: 5, algorithm: "sha256".into(), parts: vec![None] }];
        assert_eq!(from_json(to_json(&s).as_deref()).unwrap(), s);
        assert_eq!(to_json(&[]), None);
        assert_eq!(from_json(None).unwrap(), vec![]);
        for bad in [
            "{}",
            "[{\"at\":-1,\"alg\":\"md5\",\"parts\":[]}]",
            "[{\"at\":1,\"alg\":\"crc\",\"parts\":[]}]",
            "[{\"at\":1,\"alg\":\"md5\",\"parts\":[1]}]",
            "nope",
        ] {
            assert!(from_json(Some(bad)).is_err(), "{bad}");
        }
        assert!(expand("abc", &[slot(9, &[None])], Some("k")).unwrap_err().contains("does not fit"));
        assert!(expand("abc", &[slot(2, &[None]), slot(1, &[None])], Some("k")).is_err());
        assert!(expand("é", &[slot(1, &[None])], Some("k")).is_err());
        assert!(expand("abc", &[slot(1, &[None])], None).unwrap_err().contains("no live secret"));
    }
}
