//! The simulator's own reading of a state JSON: what Pantavisor's parser needs to
//! verify a step, start containers and choose a transition. Written independently of
//! pv-bridge's state model so that each checks the other.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

pub const SPEC: &str = "pantavisor-service-system@1";

/// A container as the simulated runtime sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plat {
    pub name: String,
    pub group: String,
    pub goal: String,
    pub system: bool,
    pub mgmt: bool,
    pub drivers: Vec<(String, &'static str)>,
    pub auto_recovery: bool,
}

/// What a revision asks the simulator to do when it runs (`_sim/behaviour.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Normal,
    /// A container (named, or the first restarted) fails to start: ERROR and
    /// rollback.
    Error(Option<String>),
    /// Refused when run: WONTGO.
    Wontgo(String),
    /// Goals never reached: ERROR "Status goal not reached" after the goals timeout.
    GoalTimeout,
    /// Runs well without a reboot (UPDATED), but a container fails when the
    /// revision is tried again at the next boot: ERROR and rollback then.
    ErrorAfterReboot,
}

/// A parsed revision.
#[derive(Debug, Clone)]
pub struct Rev {
    pub doc: Map<String, Value>,
}

fn is_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Keys the runtime parses itself and never compares.
fn special(key: &str) -> bool {
    matches!(
        key,
        "#spec"
            | "bsp/run.json"
            | "bsp/drivers.json"
            | "disks.json"
            | "disks_v3.json"
            | "groups.json"
            | "device.json"
    )
}

fn ignored(key: &str) -> bool {
    key.ends_with("/src.json") || key.ends_with("/build.json") || key.starts_with("_sigs/")
}

impl Rev {
    /// What `pv_storage_verify_state_json` accepts: a JSON object with the system
    /// spec whose container manifests are objects naming the container.
    pub fn parse(bytes: &[u8]) -> Result<Rev, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let Value::Object(doc) = v else {
            return Err("not an object".into());
        };
        if doc.get("#spec").and_then(Value::as_str) != Some(SPEC) {
            return Err("bad #spec".into());
        }
        for (k, v) in &doc {
            if k.ends_with("/run.json") && k != "bsp/run.json" {
                let name = v.get("name").and_then(Value::as_str);
                if name.is_none() {
                    return Err(format!("{k}: no name"));
                }
            }
            if k.split('/').any(|s| s == ".." || s.is_empty()) || k.starts_with('/') {
                return Err(format!("{k}: bad path"));
            }
        }
        Ok(Rev { doc })
    }

    /// Object references: every key that is not parsed, ignored or an inline JSON.
    pub fn objects(&self) -> Vec<(&str, &str)> {
        self.doc
            .iter()
            .filter(|(k, _)| !special(k) && !ignored(k))
            .filter_map(|(k, v)| {
                let s = v.as_str()?;
                if k.ends_with(".json") && !is_sha(s) {
                    return None;
                }
                Some((k.as_str(), s))
            })
            .collect()
    }

    /// Inline JSON files (manifests included).
    pub fn jsons(&self) -> Vec<(&str, &Value)> {
        self.doc
            .iter()
            .filter(|(k, v)| {
                !special(k)
                    && !ignored(k)
                    && k.ends_with(".json")
                    && !v.as_str().is_some_and(is_sha)
            })
            .map(|(k, v)| (k.as_str(), v))
            .collect()
    }

    /// The revision's fate on a device whose storage is `storage`: a
    /// behaviour with `"unless": "<path>"` does not apply once
    /// `<storage>/<path>` exists (a transient fault that went away).
    pub fn outcome(&self, storage: &std::path::Path) -> Outcome {
        let Some(b) = self.doc.get("_sim/behaviour.json") else {
            return Outcome::Normal;
        };
        let cured = b
            .get("unless")
            .and_then(Value::as_str)
            .filter(|p| !p.starts_with('/') && !p.split('/').any(|c| c == ".."))
            .is_some_and(|p| storage.join(p).exists());
        if cured {
            return Outcome::Normal;
        }
        let msg = b.get("message").and_then(Value::as_str);
        match b.get("outcome").and_then(Value::as_str) {
            Some("error") => Outcome::Error(
                b.get("container")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            ),
            Some("wontgo") => Outcome::Wontgo(msg.unwrap_or("Update aborted").to_owned()),
            Some("goal-timeout") => Outcome::GoalTimeout,
            Some("error-after-reboot") => Outcome::ErrorAfterReboot,
            _ => Outcome::Normal,
        }
    }

    fn groups(&self) -> Vec<(String, String, bool)> {
        let defined: Vec<_> = self
            .doc
            .get("device.json")
            .and_then(|d| d.get("groups"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|g| {
                        Some((
                            g.get("name")?.as_str()?.to_owned(),
                            g.get("status_goal")
                                .and_then(Value::as_str)
                                .unwrap_or("STARTED")
                                .to_owned(),
                            g.get("restart_policy").and_then(Value::as_str) == Some("system"),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !defined.is_empty() {
            return defined;
        }
        vec![
            ("data".into(), "MOUNTED".into(), true),
            ("root".into(), "STARTED".into(), true),
            ("platform".into(), "STARTED".into(), true),
            ("app".into(), "STARTED".into(), false),
        ]
    }

    /// Containers, with group defaults for goal and restart policy; a container
    /// without a (known) group joins the last group.
    pub fn platforms(&self) -> BTreeMap<String, Plat> {
        let groups = self.groups();
        let mut out = BTreeMap::new();
        for (k, m) in &self.doc {
            if !k.ends_with("/run.json") || k == "bsp/run.json" {
                continue;
            }
            let Some(name) = m.get("name").and_then(Value::as_str) else {
                continue;
            };
            let group = m
                .get("group")
                .and_then(Value::as_str)
                .and_then(|g| groups.iter().find(|x| x.0 == g))
                .or(groups.last())
                .cloned()
                .unwrap_or_else(|| ("platform".into(), "STARTED".into(), true));
            let system = match m.get("restart_policy").and_then(Value::as_str) {
                Some("system") => true,
                Some("container") => false,
                _ => group.2,
            };
            let mgmt = match m.get("roles") {
                None => true,
                Some(Value::Array(a)) => a.iter().any(|r| r == "mgmt"),
                Some(_) => false,
            };
            let mut drivers = Vec::new();
            if let Some(d) = m.get("drivers") {
                for (field, kind) in [
                    ("required", "REQUIRED"),
                    ("optional", "OPTIONAL"),
                    ("manual", "MANUAL"),
                ] {
                    for n in d.get(field).and_then(Value::as_array).into_iter().flatten() {
                        if let Some(n) = n.as_str() {
                            drivers.push((n.to_owned(), kind));
                        }
                    }
                }
            }
            out.insert(
                name.to_owned(),
                Plat {
                    name: name.to_owned(),
                    goal: m
                        .get("status_goal")
                        .and_then(Value::as_str)
                        .unwrap_or(&group.1)
                        .to_owned(),
                    auto_recovery: m.get("auto_recovery").is_some() || !group.2,
                    group: group.0,
                    system,
                    mgmt,
                    drivers,
                },
            );
        }
        out
    }
}

/// The container a key belongs to: its first segment, or the second under `_config/`.
pub fn owner(key: &str) -> &str {
    let mut it = key.split('/');
    match it.next() {
        Some("_config") => it.next().unwrap_or(""),
        Some(first) => first,
        None => "",
    }
}

/// `Err(reason)` when moving from `cur` to `new` needs a reboot, else the
/// containers to restart. Keys under `_sim/` are simulator directives and are left
/// out, so a behaviour file can ride on either kind of update.
pub fn transition(cur: &Rev, new: &Rev) -> Result<BTreeSet<String>, String> {
    let (cp, np) = (cur.platforms(), new.platforms());
    let mut restart = BTreeSet::new();
    let sim = |k: &&str| !k.starts_with("_sim/");
    let cur_j: BTreeMap<&str, String> = cur
        .jsons()
        .into_iter()
        .filter(|(k, _)| sim(k))
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    let new_j: BTreeMap<&str, String> = new
        .jsons()
        .into_iter()
        .filter(|(k, _)| sim(k))
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    let cur_o: BTreeMap<&str, String> = cur
        .objects()
        .into_iter()
        .filter(|(k, _)| sim(k))
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
    let new_o: BTreeMap<&str, String> = new
        .objects()
        .into_iter()
        .filter(|(k, _)| sim(k))
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
    for (c, n) in [(&cur_j, &new_j), (&cur_o, &new_o)] {
        for (k, v) in c {
            if n.get(k) == Some(v) {
                continue;
            }
            match cp.get(owner(k)) {
                None => return Err(format!("{k} belongs to the bsp")),
                Some(p) if p.system => {
                    return Err(format!("{k} belongs to system container {}", p.name));
                }
                Some(p) => {
                    if n.contains_key(k) && np.get(owner(k)).is_none_or(|q| q.system) {
                        return Err(format!("{k} moves to a system container"));
                    }
                    restart.insert(p.name.clone());
                }
            }
        }
        for k in n.keys().filter(|k| !c.contains_key(*k)) {
            match np.get(owner(k)) {
                None => return Err(format!("{k} is new in the bsp")),
                Some(p) if p.system => {
                    return Err(format!("{k} is new in system container {}", p.name));
                }
                Some(p) => {
                    restart.insert(p.name.clone());
                }
            }
        }
    }
    Ok(restart)
}
