//! Pantavisor's `pvtx` overlay (reference §10.5, `pvtx/src/pvtx_state.c`): what
//! `pvtx add <export>` does to the running state, reproduced so that a pvr2adu
//! package installs natively, without running its script.
//!
//! For every key K of the added state S, the patterns P(K) are K itself plus, when
//! a running `_sigs/<X>` has X starting with K (after cutting a leading `_sigs/` or
//! `_config/`), that signature's `include` and `exclude` entries cut at their
//! first `*`. A running key is removed when n ≥ 1 patterns of P(K) prefix it and no
//! more than n of all the running signatures' patterns do. Then S is merged in.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

const SIGS: &str = "_sigs/";
const CONFIG: &str = "_config/";

/// The include and exclude patterns of a `_sigs/*.json` value (`pvs@2`: in its
/// base64url `protected` header), each cut at its first `*`.
pub fn sig_patterns(sig: &Value) -> Result<Vec<String>, String> {
    let protected = sig
        .get("protected")
        .and_then(Value::as_str)
        .ok_or("no protected header")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(protected.trim_end_matches('='))
        .map_err(|e| format!("protected is not base64url: {e}"))?;
    let header: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("protected is not JSON: {e}"))?;
    let mut out = Vec::new();
    collect(&header, &mut out);
    Ok(out)
}

/// Every string of an array under a key starting `include` or `exclude`, as pvtx
/// finds them anywhere in the header.
fn collect(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k.starts_with("include") || k.starts_with("exclude") {
                    if let Value::Array(a) = v {
                        for p in a.iter().filter_map(Value::as_str) {
                            out.push(p.split('*').next().unwrap_or_default().to_owned());
                        }
                        continue;
                    }
                }
                collect(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
        _ => {}
    }
}

fn prefixes(patterns: &[String], key: &str) -> usize {
    patterns
        .iter()
        .filter(|p| key.starts_with(p.as_str()))
        .count()
}

/// The patterns of added key `k` against the running state.
fn patterns_of(running: &BTreeMap<String, Value>, k: &str) -> Vec<String> {
    let mut p = vec![k.to_owned()];
    let part = k
        .strip_prefix(CONFIG)
        .or_else(|| k.strip_prefix(SIGS))
        .unwrap_or(k);
    let sig = running
        .iter()
        .filter_map(|(rk, v)| rk.strip_prefix(SIGS).map(|x| (x, v)))
        .find(|(x, _)| !x.is_empty() && x.starts_with(part));
    if let Some((_, v)) = sig {
        // An undecodable signature adds nothing here (pvtx ignores it too).
        p.extend(sig_patterns(v).unwrap_or_default());
    }
    p
}

/// The running state with `added` laid over it, as `pvtx begin; pvtx add;` leaves
/// it. Keys both kept and added (a running key claimed by more patterns than the
/// added key's) take the added value; they are returned for a warning.
pub fn overlay(
    running: &BTreeMap<String, Value>,
    added: &BTreeMap<String, Value>,
) -> Result<(BTreeMap<String, Value>, Vec<String>), String> {
    let mut all = Vec::new();
    for (k, v) in running {
        if k.starts_with(SIGS) {
            all.extend(sig_patterns(v).map_err(|e| format!("running {k}: {e}"))?);
        }
    }
    let mut removed = std::collections::BTreeSet::new();
    for k in added.keys() {
        let p = patterns_of(running, k);
        for rk in running.keys() {
            let n = prefixes(&p, rk);
            if n >= 1 && prefixes(&all, rk) <= n {
                removed.insert(rk.clone());
            }
        }
    }
    let mut out: BTreeMap<String, Value> = running
        .iter()
        .filter(|(k, _)| !removed.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut both = Vec::new();
    for (k, v) in added {
        if out.insert(k.clone(), v.clone()).is_some() {
            both.push(k.clone());
        }
    }
    Ok((out, both))
}

#[cfg(test)]
mod tests;
