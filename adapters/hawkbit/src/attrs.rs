//! Device attributes for `configData` (reference §7): what servers match
//! software to devices by (`hw_boardname`, `hw_revision`, and `sw_version`,
//! which goosebit compares with the software version: without it the same
//! update is offered again and again), then selected device-meta flattened
//! to strings within hawkBit's limits.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::ddi::clip;

/// hawkBit's limits: 100 attributes per target, 128 characters per key and
/// value.
pub const MAX_ATTRIBUTES: usize = 100;
pub const MAX_CHARS: usize = 128;

/// Device-meta keys sent first when there are too many.
const FIRST: [&str; 5] = [
    "pantavisor.revision",
    "pantavisor.version",
    "pantavisor.arch",
    "pantavisor.mode",
    "pantavisor.dtmodel",
];

/// Whether `key` is selected by `patterns` (names, or prefixes ending in `*`).
pub fn selected(key: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => key == p,
    })
}

/// The attributes to send.
pub fn attributes(
    hw_boardname: Option<&str>,
    hw_revision: Option<&str>,
    sw_version: Option<&str>,
    device_meta: &BTreeMap<String, Value>,
    patterns: &[String],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in [
        ("hw_boardname", hw_boardname),
        ("hw_revision", hw_revision),
        ("sw_version", sw_version),
    ] {
        if let Some(v) = v {
            out.insert(k.to_owned(), clip(v, MAX_CHARS));
        }
    }
    out.insert(
        "pv_bridge.version".to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    );
    let mut keys: Vec<&String> = device_meta
        .keys()
        .filter(|k| k.chars().count() <= MAX_CHARS && selected(k, patterns))
        .collect();
    keys.sort_by_key(|k| (FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()), *k));
    for k in keys {
        if out.len() >= MAX_ATTRIBUTES {
            break;
        }
        let text = match &device_meta[k] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.entry(k.clone())
            .or_insert_with(|| clip(&text, MAX_CHARS));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn attributes_are_flat_bounded_and_prioritised() {
        let mut meta: BTreeMap<String, Value> = BTreeMap::from([
            ("pantavisor.revision".into(), json!("locals/1.2.3")),
            ("pantavisor.uname".into(), json!({"sysname": "Linux"})),
            ("pantavisor.long".into(), json!("x".repeat(300))),
            ("sysinfo".into(), json!({"uptime": 5})),
            (format!("pantavisor.{}", "k".repeat(200)), json!("dropped")),
        ]);
        let a = attributes(
            Some("pv-board"),
            Some("1.0"),
            Some("1.2.3"),
            &meta,
            &["pantavisor.*".into()],
        );
        assert_eq!(a["hw_boardname"], "pv-board");
        assert_eq!(a["hw_revision"], "1.0");
        assert_eq!(a["sw_version"], "1.2.3");
        assert_eq!(a["pantavisor.revision"], "locals/1.2.3");
        assert_eq!(a["pantavisor.uname"], r#"{"sysname":"Linux"}"#);
        assert_eq!(a["pantavisor.long"].chars().count(), MAX_CHARS);
        assert!(!a.contains_key("sysinfo"), "not selected");
        assert!(a.keys().all(|k| k.chars().count() <= MAX_CHARS));

        for i in 0..300 {
            meta.insert(format!("pantavisor.a{i:03}"), json!(i));
        }
        let a = attributes(None, None, None, &meta, &["pantavisor.*".into()]);
        assert_eq!(a.len(), MAX_ATTRIBUTES);
        assert!(
            a.contains_key("pantavisor.revision"),
            "the first keys win a place"
        );
        assert!(!a.contains_key("hw_boardname"));
        assert!(selected("pantavisor.arch", &["pantavisor.arch".into()]));
        assert!(!selected("pantavisor.archx", &["pantavisor.arch".into()]));
    }
}
