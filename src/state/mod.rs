//! The Pantavisor state JSON: one JSON object acting as a virtual file tree.
//!
//! [`State::parse`] validates a document and classifies every key the way
//! Pantavisor's parser does (`parser/parser_system1.c: system1_parse_objects`):
//! specially parsed files, container manifests, build metadata the runtime ignores,
//! inline JSON files, and object references (sha256 of a blob in `/storage/objects`).
//! [`transition`] decides, as `state.c: pv_state_stop_platforms` does, whether moving
//! from one state to another needs a reboot.

mod revision;
mod transition;

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

pub use revision::{LOCAL_NAME_MAX, LOCAL_PREFIX, Revision, RevisionError};
pub use transition::{Transition, transition};

/// The state format pv-bridge stages and runs.
pub const SPEC_SYSTEM1: &str = "pantavisor-service-system@1";
/// The legacy format: parsed and inspected, never staged.
pub const SPEC_MULTI_PLATFORM: &str = "pantavisor-multi-platform@1";
/// Default bound on a state document. Real states are tens of KiB.
pub const DEFAULT_MAX_STATE_BYTES: usize = 4 * 1024 * 1024;
/// Longest key accepted (Linux `PATH_MAX`).
const MAX_PATH_LEN: usize = 4096;
/// Problems listed in one error before the rest are only counted.
const MAX_PROBLEMS: usize = 20;

/// The `#spec` of a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    ServiceSystem1,
    MultiPlatform1,
}

impl Spec {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceSystem1 => SPEC_SYSTEM1,
            Self::MultiPlatform1 => SPEC_MULTI_PLATFORM,
        }
    }
}

/// How Pantavisor treats one key of the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// `bsp/run.json`, `bsp/drivers.json`, `device.json`, `groups.json`, `disks.json`,
    /// `disks_v3.json`: parsed specially, not compared when choosing a transition.
    Special,
    /// `<container>/run.json`: declares a container.
    ContainerManifest,
    /// `<container>/services.json`: xconnect exports.
    Services,
    /// `*/src.json`, `*/build.json` and `_sigs/*`: image-build metadata the runtime
    /// ignores.
    BuildMetadata,
    /// Any other `*.json` key whose value is not a sha256: stored as a JSON file.
    InlineJson,
    /// Every other key: the value is the sha256 of a blob.
    Object { sha256: String },
}

/// A validated state JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    spec: Spec,
    doc: Map<String, Value>,
    kinds: BTreeMap<String, EntryKind>,
}

/// One thing wrong with a state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key concerned, if any.
    pub key: Option<String>,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "key {k:?}: {}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

/// Why a state document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state JSON is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("state JSON does not parse: {0}")]
    Syntax(String),
    #[error("state JSON must be an object, got {0}")]
    NotAnObject(&'static str),
    #[error("state JSON has no \"#spec\" key")]
    MissingSpec,
    #[error("state JSON \"#spec\" is {0}; expected \"{SPEC_SYSTEM1}\"")]
    UnknownSpec(String),
    #[error("state JSON uses \"{SPEC_MULTI_PLATFORM}\", which pv-bridge reads but never stages")]
    ReadOnlySpec,
    #[error("state JSON is invalid: {}{}", join(.problems), more(*.omitted))]
    Invalid {
        problems: Vec<Problem>,
        omitted: usize,
    },
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn more(omitted: usize) -> String {
    if omitted == 0 {
        String::new()
    } else {
        format!("; and {omitted} more")
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// True for exactly 64 lower-case hex digits: how Pantavisor names objects.
pub use pv_adapter_api::is_sha256_hex;

/// Checks that a state key is a safe relative path: no `..` or `.` segments, not
/// absolute, no empty segments, no control characters or backslashes.
pub fn check_path(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty path".into());
    }
    if key.len() > MAX_PATH_LEN {
        return Err(format!(
            "path is {} bytes; the limit is {MAX_PATH_LEN}",
            key.len()
        ));
    }
    if key.starts_with('/') {
        return Err("absolute path; keys are relative to the revision root".into());
    }
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(format!("control character {c:?} in path"));
    }
    if key.contains('\\') {
        return Err("backslash in path".into());
    }
    for seg in key.split('/') {
        match seg {
            "" => return Err("empty path segment".into()),
            "." | ".." => return Err(format!("{seg:?} segment escapes or aliases a directory")),
            _ => {}
        }
    }
    Ok(())
}

/// The container (or other top directory) a key belongs to: its first segment, or
/// the second for `_config/<container>/...` (`system1_link_object_json_platforms`).
pub fn owner_of(key: &str) -> &str {
    let mut segs = key.split('/');
    let first = segs.next().unwrap_or_default();
    if first == "_config" {
        segs.next().unwrap_or_default()
    } else {
        first
    }
}

fn classify(key: &str, value: &Value) -> EntryKind {
    const SPECIAL: [&str; 6] = [
        "bsp/run.json",
        "bsp/drivers.json",
        "disks.json",
        "disks_v3.json",
        "groups.json",
        "device.json",
    ];
    if SPECIAL.contains(&key) {
        return EntryKind::Special;
    }
    let base = key.rsplit_once('/').map(|(_, b)| b);
    match base {
        Some("run.json") => return EntryKind::ContainerManifest,
        Some("services.json") => return EntryKind::Services,
        Some("src.json" | "build.json") => return EntryKind::BuildMetadata,
        _ => {}
    }
    if key.starts_with("_sigs/") {
        return EntryKind::BuildMetadata;
    }
    let sha = value.as_str().filter(|s| is_sha256_hex(s));
    if key.ends_with(".json") && sha.is_none() {
        return EntryKind::InlineJson;
    }
    EntryKind::Object {
        sha256: value.as_str().unwrap_or_default().to_owned(),
    }
}

struct Problems {
    list: Vec<Problem>,
    omitted: usize,
}

impl Problems {
    fn push(&mut self, key: Option<&str>, what: impl Into<String>) {
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(Problem {
                key: key.map(str::to_owned),
                what: what.into(),
            });
        } else {
            self.omitted += 1;
        }
    }
}

fn check_entry(key: &str, value: &Value, kind: &EntryKind, p: &mut Problems) {
    match kind {
        EntryKind::Object { .. } => match value {
            Value::String(s) if is_sha256_hex(s) => {}
            Value::String(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                p.push(Some(key), "object reference must be lower-case hex")
            }
            Value::String(s) => p.push(
                Some(key),
                format!("object reference {s:?} is not a sha256 (64 lower-case hex digits)"),
            ),
            other => p.push(
                Some(key),
                format!(
                    "expected an object reference (sha256 string), got {}",
                    json_type(other)
                ),
            ),
        },
        EntryKind::ContainerManifest => check_manifest(key, value, p),
        EntryKind::Special if !(value.is_object() || key == "groups.json" && value.is_array()) => p
            .push(
                Some(key),
                format!("expected a JSON object, got {}", json_type(value)),
            ),
        _ => {}
    }
}

fn check_manifest(key: &str, value: &Value, p: &mut Problems) {
    let Some(m) = value.as_object() else {
        p.push(
            Some(key),
            format!(
                "container manifest must be a JSON object, got {}",
                json_type(value)
            ),
        );
        return;
    };
    for field in ["name", "type", "config"] {
        match m.get(field) {
            Some(Value::String(_)) => {}
            Some(other) => p.push(
                Some(key),
                format!("\"{field}\" must be a string, got {}", json_type(other)),
            ),
            None if field == "name" => p.push(Some(key), "missing \"name\""),
            None => {}
        }
    }
    if let Some(goal) = m.get("status_goal") {
        if !matches!(goal.as_str(), Some("MOUNTED" | "STARTED" | "READY")) {
            p.push(
                Some(key),
                format!("\"status_goal\" must be MOUNTED, STARTED or READY, got {goal}"),
            );
        }
    }
    if let Some(policy) = m.get("restart_policy") {
        if !matches!(policy.as_str(), Some("system" | "container")) {
            p.push(
                Some(key),
                format!("\"restart_policy\" must be system or container, got {policy}"),
            );
        }
    }
}

/// What changed between two states, key by key (`#spec` included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// A container declared by a state, with the group defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub name: String,
    pub group: String,
    pub status_goal: String,
    pub restart_policy: RestartPolicy,
    /// Pantavisor grants mgmt when `roles` is absent.
    pub mgmt: bool,
}

/// How Pantavisor reacts when a container's artifacts change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Any change reboots the device.
    System,
    /// Changes restart only this container.
    Container,
}

struct Group {
    name: String,
    status_goal: String,
    policy: RestartPolicy,
}

fn default_groups() -> Vec<Group> {
    // Pantavisor's defaults/groups.json.
    [
        ("data", "MOUNTED", RestartPolicy::System),
        ("root", "STARTED", RestartPolicy::System),
        ("platform", "STARTED", RestartPolicy::System),
        ("app", "STARTED", RestartPolicy::Container),
    ]
    .into_iter()
    .map(|(n, g, p)| Group {
        name: n.into(),
        status_goal: g.into(),
        policy: p,
    })
    .collect()
}

fn parse_policy(v: Option<&Value>) -> Option<RestartPolicy> {
    match v?.as_str()? {
        "system" => Some(RestartPolicy::System),
        "container" => Some(RestartPolicy::Container),
        _ => None,
    }
}

impl State {
    /// Parses and validates a state document, accepting both specs.
    pub fn parse(bytes: &[u8]) -> Result<Self, StateError> {
        Self::parse_with_limit(bytes, DEFAULT_MAX_STATE_BYTES)
    }

    /// Like [`State::parse`], with an explicit size bound.
    pub fn parse_with_limit(bytes: &[u8], max: usize) -> Result<Self, StateError> {
        if bytes.len() > max {
            return Err(StateError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| StateError::Syntax(e.to_string()))?;
        Self::from_value(value)
    }

    /// Validates an already parsed document.
    pub fn from_value(value: Value) -> Result<Self, StateError> {
        let doc = match value {
            Value::Object(m) => m,
            other => return Err(StateError::NotAnObject(json_type(&other))),
        };
        let spec = match doc.get("#spec") {
            None => return Err(StateError::MissingSpec),
            Some(Value::String(s)) if s == SPEC_SYSTEM1 => Spec::ServiceSystem1,
            Some(Value::String(s)) if s == SPEC_MULTI_PLATFORM => Spec::MultiPlatform1,
            Some(other) => return Err(StateError::UnknownSpec(other.to_string())),
        };
        let mut problems = Problems {
            list: Vec::new(),
            omitted: 0,
        };
        let mut kinds = BTreeMap::new();
        for (key, value) in &doc {
            if key == "#spec" {
                continue;
            }
            if let Err(why) = check_path(key) {
                problems.push(Some(key), why);
                continue;
            }
            let kind = classify(key, value);
            check_entry(key, value, &kind, &mut problems);
            kinds.insert(key.clone(), kind);
        }
        if !problems.list.is_empty() {
            return Err(StateError::Invalid {
                problems: problems.list,
                omitted: problems.omitted,
            });
        }
        Ok(Self { spec, doc, kinds })
    }

    /// Parses a document that is about to be staged: only `pantavisor-service-system@1`.
    pub fn parse_for_staging(bytes: &[u8], max: usize) -> Result<Self, StateError> {
        let state = Self::parse_with_limit(bytes, max)?;
        if state.spec == Spec::MultiPlatform1 {
            return Err(StateError::ReadOnlySpec);
        }
        Ok(state)
    }

    pub fn spec(&self) -> Spec {
        self.spec
    }

    /// The document as parsed.
    pub fn as_json(&self) -> &Map<String, Value> {
        &self.doc
    }

    /// Every key but `#spec` with its kind, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &EntryKind)> {
        self.kinds.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn kind(&self, key: &str) -> Option<&EntryKind> {
        self.kinds.get(key)
    }

    pub fn value(&self, key: &str) -> Option<&Value> {
        self.doc.get(key)
    }

    /// Object references as `(path, sha256)`, in key order.
    pub fn objects(&self) -> impl Iterator<Item = (&str, &str)> {
        self.kinds.iter().filter_map(|(k, kind)| match kind {
            EntryKind::Object { sha256 } => Some((k.as_str(), sha256.as_str())),
            _ => None,
        })
    }

    /// The distinct objects the state needs, sorted.
    pub fn object_ids(&self) -> std::collections::BTreeSet<&str> {
        self.objects().map(|(_, sha)| sha).collect()
    }

    /// Keys added, removed and changed going from `self` to `newer`, each sorted.
    pub fn diff(&self, newer: &State) -> Diff {
        let mut d = Diff::default();
        for (k, v) in &self.doc {
            match newer.doc.get(k) {
                None => d.removed.push(k.clone()),
                Some(n) if n != v => d.changed.push(k.clone()),
                Some(_) => {}
            }
        }
        d.added = newer
            .doc
            .keys()
            .filter(|k| !self.doc.contains_key(*k))
            .cloned()
            .collect();
        for list in [&mut d.added, &mut d.removed, &mut d.changed] {
            list.sort();
        }
        d
    }

    /// Objects `newer` references that `self` does not: what an update must bring.
    pub fn new_objects<'a>(&self, newer: &'a State) -> std::collections::BTreeSet<&'a str> {
        let have = self.object_ids();
        newer
            .object_ids()
            .into_iter()
            .filter(|sha| !have.contains(sha))
            .collect()
    }

    /// The containers the state declares, keyed by name, with group defaults
    /// resolved as Pantavisor does (`state.c: pv_state_validate`).
    pub fn platforms(&self) -> BTreeMap<String, Platform> {
        let groups = self.groups();
        let mut out = BTreeMap::new();
        let mut unconfigured = Vec::new();
        let mut runlevels = false;
        for (key, kind) in &self.kinds {
            if *kind != EntryKind::ContainerManifest {
                continue;
            }
            let Some(m) = self.doc.get(key).and_then(Value::as_object) else {
                continue;
            };
            let dir = key.rsplit_once('/').map_or(key.as_str(), |(d, _)| d);
            let name = m
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(dir)
                .to_owned();
            let group = match (m.get("group"), m.get("runlevel")) {
                (Some(Value::String(g)), _) if groups.iter().any(|x| &x.name == g) => {
                    Some(g.clone())
                }
                (_, Some(Value::String(r)))
                    if ["data", "root", "app", "platform"].contains(&r.as_str()) =>
                {
                    runlevels = true;
                    Some(r.clone())
                }
                _ => None,
            };
            if group.is_none() {
                unconfigured.push(name.clone());
            }
            let mgmt = match m.get("roles") {
                None => true,
                Some(Value::Array(a)) => a.iter().any(|r| r == "mgmt"),
                Some(_) => false,
            };
            out.insert(
                name.clone(),
                (
                    group,
                    m.get("status_goal")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    parse_policy(m.get("restart_policy")),
                    mgmt,
                ),
            );
        }
        // Containers without a group: with legacy runlevels, the first goes to `root`
        // when root is empty and the rest to `platform`; otherwise all go to the last
        // group defined.
        let last = groups.last().map(|g| g.name.clone()).unwrap_or_default();
        let root_taken = out.values().any(|(g, ..)| g.as_deref() == Some("root"));
        for (i, name) in unconfigured.iter().enumerate() {
            let group = if runlevels {
                if i == 0 && !root_taken {
                    "root"
                } else {
                    "platform"
                }
                .to_owned()
            } else {
                last.clone()
            };
            if let Some(entry) = out.get_mut(name) {
                entry.0 = Some(group);
            }
        }
        out.into_iter()
            .map(|(name, (group, goal, policy, mgmt))| {
                let group = group.unwrap_or_default();
                let g = groups.iter().find(|g| g.name == group);
                let platform = Platform {
                    status_goal: goal
                        .or_else(|| g.map(|g| g.status_goal.clone()))
                        .unwrap_or_else(|| "STARTED".into()),
                    restart_policy: policy
                        .or(g.map(|g| g.policy))
                        .unwrap_or(RestartPolicy::System),
                    name: name.clone(),
                    group,
                    mgmt,
                };
                (name, platform)
            })
            .collect()
    }

    fn groups(&self) -> Vec<Group> {
        let defined = self
            .doc
            .get("device.json")
            .and_then(|d| d.get("groups"))
            .and_then(Value::as_array);
        let Some(defined) = defined.filter(|a| !a.is_empty()) else {
            return default_groups();
        };
        defined
            .iter()
            .filter_map(|g| {
                Some(Group {
                    name: g.get("name")?.as_str()?.to_owned(),
                    status_goal: g
                        .get("status_goal")
                        .and_then(Value::as_str)
                        .unwrap_or("STARTED")
                        .to_owned(),
                    // A group without restart_policy defaults to container
                    // (`parser_system1.c: parse_groups`).
                    policy: parse_policy(g.get("restart_policy"))
                        .unwrap_or(RestartPolicy::Container),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
