//! Device twin rules and the bridge's mapping onto them. Pure functions.
//!
//! Twin keys may not hold `.`, `$`, space or control characters, and Pantavisor's
//! keys often do (`pantavisor.revision`). Keys are escaped reversibly: those
//! characters and `%` itself become `%XX` (`pantavisor%2Erevision`).

use std::collections::BTreeMap;

use pv_adapter_api::{is_sha256_hex, valid_offer_id};
use serde_json::{Map, Value};

/// Largest string value the hub stores.
pub const MAX_STRING: usize = 4 * 1024;
/// Largest desired or reported section.
pub const MAX_SECTION: usize = 32 * 1024;
/// Deepest nesting of objects in a section.
pub const MAX_DEPTH: usize = 10;
/// Largest key.
pub const MAX_KEY: usize = 1024;
/// Integers the hub stores exactly.
pub const MAX_INT: i64 = 4_503_599_627_370_495;

/// Escapes a key for the twin.
pub fn escape_key(k: &str) -> String {
    let mut out = String::with_capacity(k.len());
    for c in k.chars() {
        if matches!(c, '.' | '$' | ' ' | '%') || c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Undoes [`escape_key`]; keys without escapes come back as they are.
pub fn unescape_key(k: &str) -> String {
    if !k.contains('%') {
        return k.to_owned();
    }
    let b = k.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| k.to_owned())
}

/// Why a key is not a legal twin key, if it is not.
pub fn key_problem(k: &str) -> Option<String> {
    if k.is_empty() {
        return Some("an empty key".into());
    }
    if k.len() > MAX_KEY {
        return Some(format!("a key of {} bytes (limit {MAX_KEY})", k.len()));
    }
    if let Some(c) = k
        .chars()
        .find(|c| matches!(c, '.' | '$' | ' ') || c.is_control())
    {
        return Some(format!("key {k:?} holds {c:?}, which twins forbid"));
    }
    None
}

/// The hub's size of a value: keys and strings by their UTF-8 length, numbers 8
/// bytes, booleans 4.
pub fn size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(size).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !k.starts_with('$'))
            .map(|(k, v)| k.len() + size(v))
            .sum(),
    }
}

/// Checks a section (or a patch to one) against the twin's rules.
pub fn validate(v: &Value) -> Result<(), String> {
    fn walk(v: &Value, depth: usize, path: &str) -> Result<(), String> {
        match v {
            Value::Object(o) => {
                if depth > MAX_DEPTH {
                    return Err(format!("{path} nests deeper than {MAX_DEPTH} levels"));
                }
                for (k, v) in o {
                    if depth == 1 && (k == "$version" || k == "$metadata") {
                        continue;
                    }
                    if let Some(p) = key_problem(k) {
                        return Err(format!("{path}: {p}"));
                    }
                    walk(v, depth + 1, &format!("{path}/{k}"))?;
                }
                Ok(())
            }
            Value::Array(a) => a.iter().try_for_each(|v| walk(v, depth + 1, path)),
            Value::String(s) if s.len() > MAX_STRING => Err(format!(
                "{path}: a string of {} bytes (limit {MAX_STRING})",
                s.len()
            )),
            Value::Number(n) if n.as_i64().is_some_and(|i| i.abs() > MAX_INT) => {
                Err(format!("{path}: {n} is outside ±{MAX_INT}"))
            }
            _ => Ok(()),
        }
    }
    walk(v, 1, "")?;
    let n = size(v);
    if n > MAX_SECTION {
        return Err(format!("{n} bytes (limit {MAX_SECTION})"));
    }
    Ok(())
}

/// Applies a JSON merge patch (RFC 7396): `null` deletes, objects merge, anything
/// else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The merge patch that turns `old` into `new`, or `None` when they are equal.
pub fn diff(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = Map::new();
            for (k, ov) in o {
                match n.get(k) {
                    None => {
                        patch.insert(k.clone(), Value::Null);
                    }
                    Some(nv) => {
                        if let Some(d) = diff(ov, nv) {
                            patch.insert(k.clone(), d);
                        }
                    }
                }
            }
            for (k, nv) in n {
                if !o.contains_key(k) && !nv.is_null() {
                    patch.insert(k.clone(), nv.clone());
                }
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        (o, n) if o == n => None,
        // A value that becomes an object must be replaced whole: merge would keep
        // nothing of the old one anyway, but an empty object must still appear.
        (_, n) => Some(n.clone()),
    }
}

/// Device-meta as it goes into the reported twin: keys escaped, values within
/// the twin's limits, at most `budget` bytes. Returns the map and the keys left
/// out (with why).
pub fn device_meta(
    meta: &BTreeMap<String, Value>,
    prefixes: &[String],
    budget: usize,
) -> (Map<String, Value>, Vec<String>) {
    let mut out = Map::new();
    let mut left = Vec::new();
    let mut used = 0;
    for (k, v) in meta {
        if !prefixes.is_empty() && !prefixes.iter().any(|p| k.starts_with(p.as_str())) {
            continue;
        }
        let ek = escape_key(k);
        if ek.len() > MAX_KEY {
            left.push(format!("{k} (key too long)"));
            continue;
        }
        // Deep values (the twin allows 10 levels; this map sits at level 3) and
        // numbers the twin cannot hold go in as their JSON text.
        let v = fit(v, 4);
        if let Value::String(s) = &v {
            if s.len() > MAX_STRING {
                left.push(format!("{k} (value over {MAX_STRING} bytes)"));
                continue;
            }
        }
        let n = ek.len() + size(&v);
        if used + n > budget {
            left.push(format!("{k} (over the {budget}-byte budget)"));
            continue;
        }
        used += n;
        out.insert(ek, v);
    }
    (out, left)
}

/// A value reshaped for the twin at `depth`: keys escaped, too-deep parts and
/// out-of-range numbers turned into JSON text.
fn fit(v: &Value, depth: usize) -> Value {
    match v {
        Value::Object(o) if depth > MAX_DEPTH => {
            Value::String(Value::Object(o.clone()).to_string())
        }
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (escape_key(k), fit(v, depth + 1)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| fit(v, depth + 1)).collect()),
        Value::Number(n)
            if n.as_i64().is_some_and(|i| i.abs() > MAX_INT)
                || n.is_u64() && n.as_i64().is_none() =>
        {
            Value::String(n.to_string())
        }
        other => other.clone(),
    }
}

/// The desired revision: where the state and its objects come from. The state
/// itself never goes into the twin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredRevision {
    pub id: String,
    pub state_url: String,
    pub state_sha256: String,
    /// Object URLs, and sizes when given, by sha256.
    pub objects: BTreeMap<String, (String, Option<u64>)>,
    /// `…{sha256}…` for objects not listed.
    pub object_url_template: Option<String>,
}

fn is_http_url(s: &str) -> bool {
    (s.starts_with("https://") || s.starts_with("http://"))
        && s.len() > 8
        && !s.contains(char::is_whitespace)
}

impl DesiredRevision {
    /// Parses the desired `revision` (also the payload of the `update` method).
    pub fn parse(v: &Value) -> Result<Self, String> {
        let Value::Object(o) = v else {
            return Err(format!("revision must be an object, not {}", kind(v)));
        };
        for k in o.keys() {
            if !matches!(
                k.as_str(),
                "id" | "stateUrl" | "stateSha256" | "objects" | "objectUrlTemplate"
            ) && !k.starts_with('$')
            {
                return Err(format!("revision: unknown field {k:?}"));
            }
        }
        let text = |k: &str| -> Result<String, String> {
            match o.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!(
                    "revision.{k} must be a string, not {}",
                    kind(other)
                )),
                None => Err(format!("revision.{k} is missing")),
            }
        };
        let id = text("id")?;
        if !valid_offer_id(&id) {
            return Err(format!(
                "revision.id {id:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"
            ));
        }
        let state_url = text("stateUrl")?;
        if !is_http_url(&state_url) {
            return Err("revision.stateUrl must be an http(s) URL".into());
        }
        let state_sha256 = text("stateSha256")?.to_ascii_lowercase();
        if !is_sha256_hex(&state_sha256) {
            return Err("revision.stateSha256 must be 64 hex digits".into());
        }
        let mut objects = BTreeMap::new();
        match o.get("objects") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (sha, url) in m {
                    if !is_sha256_hex(sha) {
                        return Err(format!(
                            "revision.objects: key {sha:?} is not a sha256 (64 lower-case hex digits)"
                        ));
                    }
                    // `sha: "url"`, or `sha: {"url": …, "size": N}` as in MQTT
                    // offers: with sizes the engine checks free space first and
                    // tells a partial object from a whole one.
                    let (u, size) = match url {
                        Value::String(u) => (u, None),
                        Value::Object(m) => {
                            for k in m.keys() {
                                if k != "url" && k != "size" {
                                    return Err(format!(
                                        "revision.objects.{sha}: unknown field {k:?} (url, size)"
                                    ));
                                }
                            }
                            let size = match m.get("size") {
                                None | Some(Value::Null) => None,
                                Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
                                Some(other) => {
                                    return Err(format!(
                                        "revision.objects.{sha}.size must be a byte count, got {other}"
                                    ));
                                }
                            };
                            match m.get("url") {
                                Some(Value::String(u)) => (u, size),
                                _ => {
                                    return Err(format!(
                                        "revision.objects.{sha}.url must be an http(s) URL"
                                    ));
                                }
                            }
                        }
                        _ => {
                            return Err(format!(
                                "revision.objects.{sha}: must be an http(s) URL or {{\"url\", \"size\"}}"
                            ));
                        }
                    };
                    if !is_http_url(u) {
                        return Err(format!("revision.objects.{sha}: must be an http(s) URL"));
                    }
                    objects.insert(sha.clone(), (u.clone(), size));
                }
            }
            Some(other) => {
                return Err(format!(
                    "revision.objects must be an object of sha256 → URL or {{url, size}}, not {}",
                    kind(other)
                ));
            }
        }
        let object_url_template = match o.get("objectUrlTemplate") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if is_http_url(t) && t.contains("{sha256}") => Some(t.clone()),
            Some(_) => {
                return Err(
                    "revision.objectUrlTemplate must be an http(s) URL containing {sha256}".into(),
                );
            }
        };
        Ok(Self {
            id,
            state_url,
            state_sha256,
            objects,
            object_url_template,
        })
    }
}

/// The desired user-meta: keys unescaped, `null` members already gone.
pub fn user_meta(v: &Value) -> Result<BTreeMap<String, Value>, String> {
    let Value::Object(o) = v else {
        return Err(format!("userMeta must be an object, not {}", kind(v)));
    };
    let mut out = BTreeMap::new();
    for (k, v) in o {
        if k.starts_with('$') || v.is_null() {
            continue;
        }
        let key = unescape_key(k);
        if key.contains('/') || key.is_empty() {
            return Err(format!(
                "userMeta: key {key:?} cannot be a Pantavisor user-meta key"
            ));
        }
        out.insert(key, v.clone());
    }
    Ok(out)
}

/// A JSON value's type, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_escape_reversibly_and_legally() {
        for k in [
            "pantavisor.revision",
            "a b$c%d",
            "tab\there",
            "plain",
            "ünï.code",
        ] {
            let e = escape_key(k);
            assert_eq!(key_problem(&e), None, "{k} → {e}");
            assert_eq!(unescape_key(&e), k);
        }
        assert_eq!(escape_key("pantavisor.revision"), "pantavisor%2Erevision");
        assert_eq!(unescape_key("100%"), "100%");
        assert!(key_problem("a.b").unwrap().contains("'.'"));
        assert!(key_problem("").is_some());
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1, 2], "e": "x"});
        merge_patch(
            &mut t,
            &json!({"a": {"b": null, "z": 3}, "d": [3], "e": null, "f": {"g": 1}}),
        );
        assert_eq!(t, json!({"a": {"c": 2, "z": 3}, "d": [3], "f": {"g": 1}}));
    }

    #[test]
    fn diff_is_the_inverse_of_merge() {
        let old = json!({"a": {"b": 1, "c": 2}, "k": "v", "n": 1, "o": {"p": 1}});
        let new = json!({"a": {"b": 1, "c": 3}, "n": {"x": 1}, "o": {}, "q": [1]});
        let p = diff(&old, &new).unwrap();
        assert_eq!(
            p,
            json!({"a": {"c": 3}, "k": null, "n": {"x": 1}, "o": {"p": null}, "q": [1]})
        );
        let mut t = old.clone();
        merge_patch(&mut t, &p);
        assert_eq!(t, new);
        assert_eq!(diff(&new, &new), None);
    }

    #[test]
    fn limits_are_enforced_with_the_reason() {
        assert!(validate(&json!({"a": "x".repeat(4096)})).is_ok());
        let e = validate(&json!({"a": "x".repeat(4097)})).unwrap_err();
        assert!(e.contains("4097 bytes"), "{e}");
        let e = validate(&json!({"a.b": 1})).unwrap_err();
        assert!(e.contains("forbid"), "{e}");
        let mut deep = json!(1);
        for _ in 0..10 {
            deep = json!({ "k": deep });
        }
        assert!(validate(&deep).is_ok());
        let e = validate(&json!({ "k": deep })).unwrap_err();
        assert!(e.contains("deeper than 10"), "{e}");
        let big: Map<String, Value> = (0..40)
            .map(|i| (format!("k{i}"), json!("x".repeat(1000))))
            .collect();
        let e = validate(&Value::Object(big)).unwrap_err();
        assert!(e.contains("limit 32768"), "{e}");
        assert!(validate(&json!({"$version": 4, "a": 1})).is_ok());
        assert!(validate(&json!({"n": 4_503_599_627_370_496_i64})).is_err());
    }

    #[test]
    fn device_meta_is_escaped_and_budgeted() {
        let mut m = BTreeMap::new();
        m.insert("pantavisor.revision".to_owned(), json!("3"));
        m.insert("big".to_owned(), json!("y".repeat(5000)));
        m.insert("net.if".to_owned(), json!({"eth0.ipv4": ["10.0.0.2"]}));
        m.insert("huge".to_owned(), json!(u64::MAX));
        let (out, left) = device_meta(&m, &[], 16 * 1024);
        assert_eq!(out["pantavisor%2Erevision"], json!("3"));
        assert_eq!(out["net%2Eif"], json!({"eth0%2Eipv4": ["10.0.0.2"]}));
        assert_eq!(out["huge"], json!(u64::MAX.to_string()));
        assert_eq!(left, vec!["big (value over 4096 bytes)".to_owned()]);
        assert!(validate(&json!({ "p": { "deviceMeta": out } })).is_ok());
        let (out, left) = device_meta(&m, &["pantavisor.".to_owned()], 16 * 1024);
        assert_eq!(out.len(), 1);
        assert!(left.is_empty());
        let (out, left) = device_meta(&m, &[], 30);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left[1].ends_with("(over the 30-byte budget)"), "{left:?}");
    }

    #[test]
    fn desired_revisions_are_checked_field_by_field() {
        let sha = "a".repeat(64);
        let ok = json!({"id": "r1", "stateUrl": "https://s/state.json", "stateSha256": sha.to_uppercase(),
            "objects": {sha.clone(): "https://s/o"}, "$version": 3});
        let r = DesiredRevision::parse(&ok).unwrap();
        assert_eq!(r.state_sha256, sha);
        assert_eq!(r.objects[&sha], ("https://s/o".to_owned(), None));
        // The MQTT offer's shape, with a size.
        let sized = json!({"id": "r1", "stateUrl": "https://s/state.json", "stateSha256": sha,
            "objects": {sha.clone(): {"url": "https://s/o", "size": 1234}}});
        let r = DesiredRevision::parse(&sized).unwrap();
        assert_eq!(r.objects[&sha], ("https://s/o".to_owned(), Some(1234)));
        let obj = |o: Value| json!({"id": "r", "stateUrl": "https://s", "stateSha256": sha, "objects": {sha.clone(): o}});
        for (bad, want) in [
            (
                obj(json!({"url": "https://o", "size": -1})),
                "size must be a byte count, got -1",
            ),
            (
                obj(json!({"url": "https://o", "size": "12"})),
                "size must be a byte count, got \"12\"",
            ),
            (obj(json!({"size": 12})), ".url must be an http(s) URL"),
            (
                obj(json!({"url": "https://o", "sha": 1})),
                "unknown field \"sha\"",
            ),
            (
                obj(json!(7)),
                "must be an http(s) URL or {\"url\", \"size\"}",
            ),
        ] {
            let e = DesiredRevision::parse(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        for (bad, want) in [
            (json!("r1"), "must be an object, not a string"),
            (
                json!({"stateUrl": "https://s", "stateSha256": sha}),
                "revision.id is missing",
            ),
            (
                json!({"id": "a/b", "stateUrl": "https://s", "stateSha256": sha}),
                "revision.id \"a/b\"",
            ),
            (
                json!({"id": "r", "stateUrl": "ftp://s", "stateSha256": sha}),
                "stateUrl must be an http(s) URL",
            ),
            (
                json!({"id": "r", "stateUrl": "https://s", "stateSha256": "abc"}),
                "stateSha256 must be 64 hex",
            ),
            (
                json!({"id": "r", "stateUrl": "https://s", "stateSha256": sha, "objects": []}),
                "not an array",
            ),
            (
                json!({"id": "r", "stateUrl": "https://s", "stateSha256": sha, "objects": {"x": "https://o"}}),
                "key \"x\" is not a sha256",
            ),
            (
                json!({"id": "r", "stateUrl": "https://s", "stateSha256": sha, "objectUrlTemplate": "https://o/"}),
                "containing {sha256}",
            ),
            (
                json!({"id": "r", "stateUrl": "https://s", "stateSha256": sha, "state": {}}),
                "unknown field \"state\"",
            ),
            (
                json!({"id": 5, "stateUrl": "https://s", "stateSha256": sha}),
                "revision.id must be a string, not a number",
            ),
        ] {
            let e = DesiredRevision::parse(&bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn user_meta_unescapes_and_drops_nulls() {
        let m =
            user_meta(&json!({"a%2Eb": "1", "gone": null, "$version": 2, "j": {"x": 1}})).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["a.b", "j"]);
        assert!(user_meta(&json!([1])).unwrap_err().contains("not an array"));
        assert!(
            user_meta(&json!({"a%2Fb": "1"}))
                .unwrap_err()
                .contains("\"a/b\"")
        );
    }
}
