//! MQTT protocol v1 (architecture.md §6) as plain functions: topics, strict parsing
//! of every inbound payload, and the payloads the bridge publishes. No I/O, so every
//! rule is tested without a broker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use pv_adapter_api::{
    BackendEvent, CommandKind, ObjectFetcher, ObjectRef, ObjectSource, Offer, StateUrl,
    is_sha256_hex, valid_offer_id,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// Largest log batch published (bytes of JSON).
pub const MAX_LOG_BATCH: usize = 64 * 1024;

/// Why an inbound message was refused; published on `events` as
/// `{"kind": "rejected", "topic": …, "reason": …}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{topic}: {reason}")]
pub struct Rejected {
    pub topic: String,
    pub reason: String,
}

/// The topics of one device, under its root (default `pv/<device_id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Topics {
    /// Expands a root template (`<device_id>` is replaced) and checks it: no MQTT
    /// wildcards, no empty levels, not starting with `$`.
    pub fn new(template: &str, device_id: &str) -> Result<Topics, String> {
        if device_id.is_empty()
            || device_id.contains(['/', '+', '#'])
            || device_id.chars().any(char::is_control)
        {
            return Err(format!(
                "device_id {device_id:?} must be non-empty and contain no '/', '+', '#'"
            ));
        }
        let root = template.replace("<device_id>", device_id);
        if root.is_empty() || root.contains(['+', '#']) || root.starts_with('$') {
            return Err(format!(
                "topic root {root:?} must not be empty, start with '$' or contain wildcards"
            ));
        }
        if root.split('/').any(str::is_empty) {
            return Err(format!("topic root {root:?} has an empty level"));
        }
        Ok(Topics { root })
    }

    fn t(&self, rest: &str) -> String {
        format!("{}/{rest}", self.root)
    }

    pub fn root(&self) -> &str {
        &self.root
    }
    pub fn status(&self) -> String {
        self.t("status")
    }
    pub fn meta_device(&self) -> String {
        self.t("meta/device")
    }
    pub fn meta_user(&self) -> String {
        self.t("meta/user")
    }
    pub fn meta_user_set(&self) -> String {
        self.t("meta/user/set")
    }
    pub fn revision_set(&self) -> String {
        self.t("revision/set")
    }
    pub fn revision_progress(&self) -> String {
        self.t("revision/progress")
    }
    pub fn capabilities(&self) -> String {
        format!("{}/capabilities", self.root)
    }
    pub fn revision_current(&self) -> String {
        self.t("revision/current")
    }
    pub fn events(&self) -> String {
        self.t("events")
    }
    pub fn logs(&self, platform: &str) -> String {
        self.t(&format!("logs/{}", platform.replace(['/', '+', '#'], "_")))
    }
    /// The subscription for commands.
    pub fn cmd_filter(&self) -> String {
        self.t("cmd/+")
    }
    /// The default response topic (MQTT 3.1.1, or v5 without a Response Topic).
    pub fn cmd_response(&self, name: &str, id: &str) -> String {
        self.t(&format!("cmd/{name}/res/{id}"))
    }

    /// The subscription for object chunks (device-driven pulls).
    pub fn blob_filter(&self) -> String {
        self.t("blob/+/+")
    }
    /// Where the bridge asks for a chunk.
    pub fn blob_get(&self) -> String {
        self.t("blob/get")
    }
    /// Where the answer to a chunk request arrives.
    pub fn blob_chunk(&self, sha: &str, offset: u64) -> String {
        self.t(&format!("blob/{sha}/{offset}"))
    }

    /// Which inbound topic this is.
    pub fn classify<'a>(&self, topic: &'a str) -> Inbound<'a> {
        let Some(rest) = topic
            .strip_prefix(&self.root)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Inbound::Other;
        };
        match rest {
            "revision/set" => Inbound::RevisionSet,
            "meta/user/set" => Inbound::UserMetaSet,
            _ => {
                if let Some(name) = rest.strip_prefix("cmd/") {
                    if !name.is_empty() && !name.contains('/') {
                        return Inbound::Command(name);
                    }
                }
                if let Some((sha, off)) = rest.strip_prefix("blob/").and_then(|r| r.split_once('/'))
                {
                    if let (true, Ok(offset)) = (is_sha256_hex(sha), off.parse::<u64>()) {
                        return Inbound::Chunk { sha, offset };
                    }
                }
                Inbound::Other
            }
        }
    }
}

/// An inbound topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    RevisionSet,
    UserMetaSet,
    Command(&'a str),
    /// `blob/<sha256>/<offset>`: raw bytes of an object, answering `blob/get`.
    Chunk {
        sha: &'a str,
        offset: u64,
    },
    Other,
}

/// Time as MQTT protocol v1 writes it: RFC 3339 UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn reject(topic: &str, reason: impl Into<String>) -> Rejected {
    Rejected {
        topic: topic.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a JSON object payload and checks `"v": 1`.
fn object(topic: &str, payload: &[u8], cap: usize) -> Result<Map<String, Value>, Rejected> {
    if payload.len() > cap {
        return Err(reject(
            topic,
            format!("payload is {} bytes; the limit is {cap}", payload.len()),
        ));
    }
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| reject(topic, format!("not JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(reject(topic, "payload must be a JSON object"));
    };
    match m.get("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(m),
        Some(other) => Err(reject(
            topic,
            format!("unsupported protocol version \"v\": {other}; this bridge speaks 1"),
        )),
        None => Err(reject(topic, "missing \"v\": 1")),
    }
}

/// What a refused URL starts with, for the reason: never the rest, which may
/// carry credentials.
fn scheme_of(u: &str) -> String {
    let end = u.find("://").map_or(0, |i| i + 3).min(16);
    u.chars()
        .take(end.max(u.find(':').map_or(0, |i| i + 1).min(16)))
        .collect()
}

fn http_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// The `id` of an offer payload that failed validation, when it has a usable one.
pub fn offer_id_of(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    match v.get("id") {
        Some(Value::String(s)) if valid_offer_id(s) => Some(s.clone()),
        _ => None,
    }
}

/// What `revision/set` carried.
#[derive(Debug)]
pub enum RevisionSet {
    /// An empty retained message: the offer is withdrawn.
    Withdrawn,
    Offer(Offer),
}

#[derive(Deserialize)]
struct RawOffer<'a> {
    #[serde(borrow)]
    state: Option<&'a RawValue>,
}

/// Parses a `revision/set` payload. Objects come from `objects` or, for any
/// other object the state references, from `object_url_template`; `fetcher` serves
/// adapter-pulled objects (`blob/get`) when the offer lists them without a URL.
pub fn parse_revision_set(
    topic: &str,
    payload: &[u8],
    cap: usize,
    fetcher: Option<Arc<dyn ObjectFetcher>>,
) -> Result<RevisionSet, Rejected> {
    if payload.is_empty() {
        return Ok(RevisionSet::Withdrawn);
    }
    let m = object(topic, payload, cap)?;
    let id = match m.get("id") {
        Some(Value::String(s)) if valid_offer_id(s) => s.clone(),
        Some(Value::String(s)) => {
            return Err(reject(
                topic,
                format!("\"id\" {s:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"),
            ));
        }
        Some(_) => return Err(reject(topic, "\"id\" must be a string")),
        None => return Err(reject(topic, "missing \"id\"")),
    };
    // The state: inline, byte for byte as sent (signatures cover it), or by URL.
    let (state_bytes, state_url, state) = match (m.get("state"), m.get("state_url")) {
        (Some(_), Some(_)) => {
            return Err(reject(
                topic,
                "give either \"state\" or \"state_url\" with \"state_sha256\", not both",
            ));
        }
        (None, None) => return Err(reject(topic, "missing \"state\" (or \"state_url\")")),
        (Some(Value::Object(state)), None) => {
            let raw: RawOffer = serde_json::from_slice(payload)
                .map_err(|e| reject(topic, format!("not JSON: {e}")))?;
            let bytes = raw
                .state
                .map(|r| r.get().as_bytes().to_vec())
                .unwrap_or_default();
            match m.get("state_sha256") {
                None => {}
                Some(Value::String(want)) if is_sha256_hex(want) => {
                    use sha2::Digest;
                    let got = pv_adapter_api::hex(&sha2::Sha256::digest(&bytes));
                    if &got != want {
                        return Err(reject(
                            topic,
                            format!(
                                "the inline state hashes to {got}, not \"state_sha256\" {want}"
                            ),
                        ));
                    }
                }
                Some(_) => {
                    return Err(reject(
                        topic,
                        "\"state_sha256\" must be a sha256 (64 lower-case hex digits)",
                    ));
                }
            }
            (bytes, None, Some(state))
        }
        (Some(_), None) => return Err(reject(topic, "\"state\" must be a JSON object")),
        (None, Some(Value::String(url))) if http_url(url) => {
            let sha = match m.get("state_sha256") {
                Some(Value::String(s)) if is_sha256_hex(s) => s.clone(),
                Some(_) => {
                    return Err(reject(
                        topic,
                        "\"state_sha256\" must be a sha256 (64 lower-case hex digits)",
                    ));
                }
                None => return Err(reject(topic, "\"state_url\" needs \"state_sha256\"")),
            };
            if m.contains_key("object_url_template") {
                return Err(reject(
                    topic,
                    "\"object_url_template\" needs the state inline; with \"state_url\" list the objects in \"objects\"",
                ));
            }
            let url = StateUrl {
                url: url.clone(),
                sha256: sha,
            };
            (Vec::new(), Some(url), None)
        }
        (None, Some(Value::String(u))) => {
            return Err(reject(
                topic,
                format!(
                    "\"state_url\" is not an http or https URL (it starts {:?})",
                    scheme_of(u)
                ),
            ));
        }
        (None, Some(_)) => return Err(reject(topic, "\"state_url\" must be a string")),
    };
    let mut objects = BTreeMap::new();
    match m.get("objects") {
        None => {}
        Some(Value::Object(list)) => {
            for (sha, o) in list {
                if !is_sha256_hex(sha) {
                    return Err(reject(
                        topic,
                        format!("objects: key {sha:?} is not a sha256 (64 lower-case hex digits)"),
                    ));
                }
                let Value::Object(o) = o else {
                    return Err(reject(topic, format!("objects.{sha} must be an object")));
                };
                let size = match o.get("size") {
                    None => None,
                    Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
                    Some(other) => {
                        return Err(reject(
                            topic,
                            format!("objects.{sha}.size must be a byte count, got {other}"),
                        ));
                    }
                };
                let source = match o.get("url") {
                    Some(Value::String(u)) if http_url(u) => ObjectSource::Url { url: u.clone() },
                    Some(Value::String(u)) => {
                        return Err(reject(
                            topic,
                            format!(
                                "objects.{sha}.url is not an http or https URL (it starts {:?})",
                                scheme_of(u)
                            ),
                        ));
                    }
                    Some(_) => {
                        return Err(reject(topic, format!("objects.{sha}.url must be a string")));
                    }
                    // Pulled in chunks over MQTT: the size says where the object ends.
                    None if fetcher.is_some() => match size {
                        Some(n) => ObjectSource::Adapter {
                            key: format!("{sha}:{n}"),
                        },
                        None => {
                            return Err(reject(
                                topic,
                                format!(
                                    "objects.{sha} has neither a url nor a size (pulling it over MQTT needs the size)"
                                ),
                            ));
                        }
                    },
                    None => return Err(reject(topic, format!("objects.{sha} has no url"))),
                };
                objects.insert(
                    sha.clone(),
                    ObjectRef {
                        sha256: sha.clone(),
                        size,
                        source,
                    },
                );
            }
        }
        Some(_) => {
            return Err(reject(
                topic,
                "\"objects\" must be an object keyed by sha256",
            ));
        }
    }
    match m.get("object_url_template") {
        None => {}
        Some(Value::String(t)) if http_url(t) && t.contains("{sha256}") => {
            if let Some(st) = &state {
                pv_adapter_api::objects_from_template(st, t, &mut objects);
            }
        }
        Some(_) => {
            return Err(reject(
                topic,
                "\"object_url_template\" must be an http(s) URL containing {sha256}",
            ));
        }
    }
    Ok(RevisionSet::Offer(Offer {
        id,
        state: state_bytes,
        state_url,
        objects,
        fetcher,
    }))
}

/// `blob/get`: the bridge asks for `length` bytes of an object from `offset`.
pub fn blob_get(sha: &str, offset: u64, length: u64) -> Value {
    json!({"v": 1, "sha256": sha, "offset": offset, "length": length})
}

/// Parses `meta/user/set` into the backend's desired user-meta. An empty retained
/// message withdraws everything this backend set.
pub fn parse_user_meta_set(
    topic: &str,
    payload: &[u8],
    cap: usize,
) -> Result<BackendEvent, Rejected> {
    if payload.is_empty() {
        return Ok(BackendEvent::UserMeta {
            version: 0,
            data: BTreeMap::new(),
        });
    }
    let m = object(topic, payload, cap)?;
    let version = match m.get("version") {
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or(0),
        Some(other) => {
            return Err(reject(
                topic,
                format!("\"version\" must be a non-negative integer, got {other}"),
            ));
        }
        None => return Err(reject(topic, "missing \"version\"")),
    };
    let data = match m.get("data") {
        Some(Value::Object(d)) => d.clone().into_iter().collect(),
        Some(_) => return Err(reject(topic, "\"data\" must be an object")),
        None => return Err(reject(topic, "missing \"data\"")),
    };
    Ok(BackendEvent::UserMeta { version, data })
}

/// Parses `cmd/<name>`.
pub fn parse_command(
    topic: &str,
    name: &str,
    payload: &[u8],
    cap: usize,
) -> Result<BackendEvent, Rejected> {
    let m = object(topic, payload, cap)?;
    let id = match m.get("id") {
        Some(Value::String(s)) if valid_command_id(s) => s.clone(),
        Some(_) => {
            return Err(reject(
                topic,
                "\"id\" must be a string of 1 to 64 characters without '/', '+', '#' or control characters",
            ));
        }
        None => return Err(reject(topic, "missing \"id\"")),
    };
    let expires_at = match m.get("expires_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            humantime::parse_rfc3339_weak(s)
                .map_err(|e| {
                    reject(
                        topic,
                        format!("\"expires_at\" {s:?} is not an RFC 3339 time: {e}"),
                    )
                })?
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(other) => {
            return Err(reject(
                topic,
                format!("\"expires_at\" must be an RFC 3339 time, got {other}"),
            ));
        }
    };
    let arg = |k: &str| m.get("args").and_then(|a| a.get(k));
    let kind = match name {
        "reboot" => CommandKind::Reboot,
        "poweroff" => CommandKind::Poweroff,
        "gc" => CommandKind::Gc,
        "resync" => CommandKind::Resync,
        "cancel" => CommandKind::Cancel,
        "ping" => CommandKind::Ping,
        "ssh" => match arg("enable") {
            Some(Value::Bool(true)) => CommandKind::SshOn,
            Some(Value::Bool(false)) => CommandKind::SshOff,
            _ => {
                return Err(reject(
                    topic,
                    "ssh needs \"args\": {\"enable\": true|false}",
                ));
            }
        },
        other => return Err(reject(topic, format!("unknown command {other:?}"))),
    };
    Ok(BackendEvent::Command {
        id,
        kind,
        expires_at,
    })
}

mod publish;
pub use publish::*;

#[cfg(test)]
mod tests;
