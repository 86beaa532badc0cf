//! Metadata sync (architecture.md §4): device-meta up, user-meta down.
//!
//! - device-meta is read every `device_meta_interval`; a change is sent to every
//!   backend that wants it (polling coalesces bursts of changes into one update);
//! - each backend's user-meta is a *desired map*; the maps are merged by backend
//!   priority and the difference applied with `PUT`/`DELETE`. The bridge deletes
//!   only keys it set itself: ownership is journaled before every `PUT`;
//! - the bridge keeps its own device-meta keys: `pv-bridge.version` and
//!   `pv-bridge.backends` (health of every backend).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use pv_adapter_api::AppliedUserMeta;

use super::Views;
use crate::pvctrl::{Meta, PvCtrl};

/// Settings of the metadata sync.
#[derive(Debug, Clone)]
pub struct MetaOptions {
    pub device_meta_interval: Duration,
    pub user_meta_interval: Duration,
}

impl Default for MetaOptions {
    fn default() -> Self {
        Self {
            device_meta_interval: Duration::from_secs(10),
            user_meta_interval: Duration::from_secs(30),
        }
    }
}

/// What the engine allows each backend.
#[derive(Debug, Clone)]
pub struct Policy {
    pub priority: i64,
    pub updates: bool,
    pub user_meta: bool,
    pub device_meta: bool,
    pub logs: bool,
    /// How often device-meta may go to this backend.
    pub device_meta_rate: super::devmeta::Policy,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            priority: 0,
            updates: true,
            user_meta: true,
            device_meta: true,
            logs: true,
            device_meta_rate: super::devmeta::Policy::default(),
        }
    }
}

/// Policies by backend name; unnamed backends get the default.
pub type Policies = BTreeMap<String, Policy>;

/// A backend's desired user-meta.
#[derive(Debug)]
pub struct Desired {
    pub backend: String,
    pub version: u64,
    pub data: BTreeMap<String, Value>,
}

/// The text Pantavisor stores for a value: strings raw, everything else as JSON.
pub fn encode(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether what Pantavisor reports (`current`) already holds `text`.
fn same(current: Option<&Value>, text: &str) -> bool {
    match current {
        None => false,
        Some(Value::String(s)) => s == text,
        Some(other) => serde_json::from_str::<Value>(text).ok().as_ref() == Some(other),
    }
}

/// Merges the backends' desired maps: for each key the backend with the highest
/// priority wins, then the first by name.
pub fn merge(
    desired: &BTreeMap<String, BTreeMap<String, Value>>,
    policies: &Policies,
) -> BTreeMap<String, (String, Value)> {
    let prio = |b: &str| policies.get(b).map_or(0, |p| p.priority);
    let mut out: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for (backend, map) in desired {
        for (k, v) in map {
            let replace = match out.get(k) {
                None => true,
                Some((other, _)) => prio(backend) > prio(other),
            };
            if replace {
                out.insert(k.clone(), (backend.clone(), v.clone()));
            }
        }
    }
    out
}

/// What to change on the device.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// key, owning backend, text
    pub puts: Vec<(String, String, String)>,
    pub deletes: Vec<String>,
    /// Owned keys already gone from the device: forget them.
    pub forget: Vec<String>,
}

/// Plans the changes that bring user-meta to `merged`, deleting only owned keys.
pub fn plan(
    current: &BTreeMap<String, Value>,
    merged: &BTreeMap<String, (String, Value)>,
    owned: &BTreeMap<String, String>,
) -> Plan {
    let mut p = Plan::default();
    for (k, (backend, v)) in merged {
        let text = encode(v);
        if !same(current.get(k), &text) || owned.get(k) != Some(backend) {
            p.puts.push((k.clone(), backend.clone(), text));
        }
    }
    for k in owned.keys() {
        if merged.contains_key(k) {
            continue;
        }
        if current.contains_key(k) {
            p.deletes.push(k.clone());
        } else {
            p.forget.push(k.clone());
        }
    }
    p
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ownership {
    /// key → backend that set it
    owned: BTreeMap<String, String>,
}

/// The metadata task.
pub struct MetaSync {
    pv: PvCtrl,
    views: Views,
    policies: Policies,
    opts: MetaOptions,
    path: PathBuf,
    ownership: Ownership,
    desired: BTreeMap<String, BTreeMap<String, Value>>,
    /// The version of each backend's desired map.
    versions: BTreeMap<String, u64>,
    last_device: Option<BTreeMap<String, Value>>,
    /// What each backend was last given of device-meta, and when.
    forwarders: BTreeMap<String, super::devmeta::Forwarder>,
}

impl MetaSync {
    pub fn new(
        pv: PvCtrl,
        views: Views,
        policies: Policies,
        opts: MetaOptions,
        state_dir: &Path,
    ) -> Self {
        let path = state_dir.join("journal/user-meta.json");
        let ownership = super::journal::load_json(&path);
        Self {
            pv,
            views,
            policies,
            opts,
            path,
            ownership,
            desired: BTreeMap::new(),
            versions: BTreeMap::new(),
            last_device: None,
            forwarders: BTreeMap::new(),
        }
    }

    fn save(&self) {
        super::journal::save_json(&self.path, &self.ownership, "user-meta ownership journal");
    }

    /// Serves desired maps and resync requests (a resync sends device-meta to every
    /// backend again and re-applies user-meta).
    pub async fn run(
        mut self,
        mut desired: mpsc::Receiver<Desired>,
        mut resync: mpsc::Receiver<()>,
    ) {
        let mut device = tokio::time::interval(self.opts.device_meta_interval);
        let mut user = tokio::time::interval(self.opts.user_meta_interval);
        device.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        user.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                d = desired.recv() => {
                    let Some(d) = d else { return };
                    if !self.policies.get(&d.backend).is_none_or(|p| p.user_meta) {
                        debug!(backend = %d.backend, "user-meta from this backend is switched off");
                        continue;
                    }
                    info!(backend = %d.backend, version = d.version, keys = d.data.len(), "desired user-meta");
                    self.versions.insert(d.backend.clone(), d.version);
                    self.desired.insert(d.backend, d.data);
                    self.apply_user_meta().await;
                }
                _ = user.tick() => {
                    if !self.desired.is_empty() || !self.ownership.owned.is_empty() {
                        self.apply_user_meta().await;
                    }
                }
                _ = device.tick() => self.sync_device_meta().await,
                r = resync.recv() => {
                    if r.is_some() {
                        info!("resync: sending device-meta again and re-applying user-meta");
                        self.last_device = None;
                        self.forwarders.clear();
                        self.sync_device_meta().await;
                        self.apply_user_meta().await;
                    }
                }
            }
        }
    }

    /// Applies the merged desired user-meta.
    async fn apply_user_meta(&mut self) {
        let current = match self.pv.meta(Meta::User).await {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "cannot read user-meta; will retry");
                return;
            }
        };
        let merged = merge(&self.desired, &self.policies);
        let p = plan(&current, &merged, &self.ownership.owned);
        if p == Plan::default() {
            self.report_applied(current);
            return;
        }
        // Ownership first: a key the bridge may have set is one it may delete.
        for (k, backend, _) in &p.puts {
            self.ownership.owned.insert(k.clone(), backend.clone());
        }
        for k in &p.forget {
            self.ownership.owned.remove(k);
        }
        self.save();
        let mut failed = false;
        for (k, backend, text) in &p.puts {
            match self.pv.put_meta(Meta::User, k, text.as_bytes()).await {
                Ok(()) => info!(key = %k, backend = %backend, "user-meta set"),
                Err(e) => {
                    warn!(key = %k, backend = %backend, error = %e, "cannot set user-meta");
                    failed = true;
                }
            }
        }
        let mut changed = false;
        for k in &p.deletes {
            match self.pv.delete_meta(Meta::User, k).await {
                Ok(()) => {
                    info!(key = %k, "user-meta deleted (no backend wants it any more)");
                    self.ownership.owned.remove(k);
                    changed = true;
                }
                Err(e) if e.is_not_found() => {
                    self.ownership.owned.remove(k);
                    changed = true;
                }
                Err(e) => {
                    warn!(key = %k, error = %e, "cannot delete user-meta");
                    failed = true;
                }
            }
        }
        if changed {
            self.save();
        }
        if !failed {
            if let Ok(now) = self.pv.meta(Meta::User).await {
                self.report_applied(now);
            }
        }
    }

    /// Tells each backend whose desired map is in effect what the device now has.
    fn report_applied(&self, data: BTreeMap<String, Value>) {
        for (backend, version) in &self.versions {
            if let Some(view) = self.views.get(backend) {
                let applied = AppliedUserMeta {
                    version: *version,
                    data: data.clone(),
                };
                view.send_if_modified(|v| {
                    let changed = v.user_meta.as_ref() != Some(&applied);
                    v.user_meta = Some(applied);
                    changed
                });
            }
        }
    }

    /// Reads device-meta, keeps the bridge's own keys current, and sends changes
    /// to the backends that want them.
    async fn sync_device_meta(&mut self) {
        let Ok(mut dm) = self.pv.meta(Meta::Device).await else {
            return;
        };
        let health = self
            .views
            .values()
            .next()
            .map(|v| v.borrow().health.clone())
            .unwrap_or_default();
        let own = [
            (
                "pv-bridge.version",
                Value::String(crate::VERSION.to_owned()),
            ),
            (
                "pv-bridge.backends",
                // Not `last_success`: it moves on every reconnect (a token renewal),
                // and each change would cost a message on every backend.
                Value::Object(
                    health
                        .iter()
                        .map(|(name, h)| {
                            (
                                name.clone(),
                                serde_json::json!({"connected": h.connected, "last_error": h.last_error}),
                            )
                        })
                        .collect(),
                ),
            ),
        ];
        for (k, v) in own {
            let text = encode(&v);
            if !same(dm.get(k), &text) {
                match self.pv.put_meta(Meta::Device, k, text.as_bytes()).await {
                    Ok(()) => {
                        dm.insert(k.to_owned(), v);
                    }
                    Err(e) => warn!(key = k, error = %e, "cannot set device-meta"),
                }
            }
        }
        if self.last_device.as_ref() != Some(&dm) {
            // Device-meta says which revision runs; every backend's view follows it.
            if let Some(rev) = dm.get("pantavisor.revision").and_then(Value::as_str) {
                for view in self.views.values() {
                    view.send_if_modified(|v| {
                        let changed = v.running.as_deref() != Some(rev);
                        v.running = Some(rev.to_owned());
                        changed
                    });
                }
            }
        }
        // Each backend gets device-meta at its own rate (devmeta.rs): a change held
        // back now is looked at again on the next read.
        let now = std::time::Instant::now();
        let default = Policy::default();
        for (backend, view) in self.views.iter() {
            let policy = self.policies.get(backend).unwrap_or(&default);
            if !policy.device_meta {
                continue;
            }
            let f = self.forwarders.entry(backend.clone()).or_default();
            if f.offer(&policy.device_meta_rate, &dm, now) {
                view.send_modify(|v| v.device_meta = dm.clone());
            }
        }
        self.last_device = Some(dm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn values_encode_as_pantavisor_stores_them() {
        assert_eq!(encode(&json!("plain")), "plain");
        assert_eq!(encode(&json!(5)), "5");
        assert_eq!(encode(&json!({"a": 1})), r#"{"a":1}"#);
        assert!(same(Some(&json!("5")), "5"));
        assert!(same(Some(&json!({"a": 1})), r#"{ "a" : 1 }"#));
        assert!(!same(None, "x"));
    }

    #[test]
    fn priority_decides_conflicts() {
        let desired = BTreeMap::from([
            (
                "cloud".to_string(),
                map(&[("k", json!("from cloud")), ("c", json!(1))]),
            ),
            (
                "usb".to_string(),
                map(&[("k", json!("from usb")), ("u", json!(2))]),
            ),
        ]);
        let mut pol = Policies::new();
        pol.insert(
            "usb".into(),
            Policy {
                priority: 10,
                ..Policy::default()
            },
        );
        let m = merge(&desired, &pol);
        assert_eq!(m["k"], ("usb".to_string(), json!("from usb")));
        assert_eq!(m["c"].0, "cloud");
        // Equal priority: the first backend by name wins.
        let m = merge(&desired, &Policies::new());
        assert_eq!(m["k"].0, "cloud");
    }

    #[test]
    fn only_owned_keys_are_deleted() {
        let current = map(&[
            ("mine", json!("old")),
            ("theirs", json!("x")),
            ("same", json!("v")),
        ]);
        let merged = BTreeMap::from([("same".to_string(), ("b".to_string(), json!("v")))]);
        let owned = BTreeMap::from([
            ("mine".to_string(), "b".to_string()),
            ("same".to_string(), "b".to_string()),
            ("gone".to_string(), "b".to_string()),
        ]);
        let p = plan(&current, &merged, &owned);
        assert_eq!(p.puts, vec![]);
        assert_eq!(p.deletes, vec!["mine".to_string()]);
        assert_eq!(p.forget, vec!["gone".to_string()]);
        // A key set by someone else with the desired value becomes ours.
        let p = plan(
            &current,
            &BTreeMap::from([("theirs".to_string(), ("b".to_string(), json!("x")))]),
            &BTreeMap::new(),
        );
        assert_eq!(
            p.puts,
            vec![("theirs".to_string(), "b".to_string(), "x".to_string())]
        );
    }
}
