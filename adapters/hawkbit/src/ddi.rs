//! hawkBit's DDI resources as JSON (reference §3–§7): the poll answer, a
//! deployment, a cancel request, and the feedback and configData bodies. Only
//! what a device needs is read; unknown members are ignored, as hawkBit's own
//! models do. Parsers take bytes from the network and never panic.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

/// What a poll of the base resource says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Poll {
    /// `config.polling.sleep`, when given and readable.
    pub sleep: Option<Duration>,
    /// `_links.deploymentBase.href`.
    pub deployment: Option<String>,
    /// `_links.cancelAction.href`.
    pub cancel: Option<String>,
    /// `_links.confirmationBase.href`: the action waits for consent.
    pub confirmation: Option<String>,
    /// `_links.configData` is present: the server asks for attributes.
    pub config_data: bool,
}

fn href(links: &Value, rel: &str) -> Option<String> {
    links
        .get(rel)
        .and_then(|l| l.get("href"))
        .and_then(Value::as_str)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
}

fn object(body: &[u8], what: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("{what} is not JSON: {e}"))?;
    if !v.is_object() {
        return Err(format!("{what} is not a JSON object"));
    }
    Ok(v)
}

/// Parses the base resource. A body without `config` or `_links` is a poll
/// with nothing to do (goosebit and hawkBit both leave parts out).
pub fn parse_poll(body: &[u8]) -> Result<Poll, String> {
    let v = object(body, "the poll answer")?;
    let links = v.get("_links").cloned().unwrap_or(Value::Null);
    Ok(Poll {
        sleep: v
            .pointer("/config/polling/sleep")
            .and_then(Value::as_str)
            .and_then(parse_sleep),
        deployment: href(&links, "deploymentBase"),
        cancel: href(&links, "cancelAction"),
        confirmation: href(&links, "confirmationBase"),
        config_data: links.get("configData").is_some(),
    })
}

/// `HH:mm:ss` (hours may exceed 23) as a duration; `None` when unreadable.
pub fn parse_sleep(s: &str) -> Option<Duration> {
    let mut parts = s.trim().split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let sec: u64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || m > 59 || sec > 59 || h > 9999 {
        return None;
    }
    Some(Duration::from_secs(h * 3600 + m * 60 + sec))
}

/// The action id at the end of a `deploymentBase/{id}` or `cancelAction/{id}`
/// link (before any query).
pub fn action_id(href: &str) -> Option<String> {
    let path = href.split(['?', '#']).next()?;
    let id = path.trim_end_matches('/').rsplit('/').next()?;
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then(|| id.to_owned())
}

/// `skip`, `attempt` or `forced` (reference §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Skip,
    Attempt,
    Forced,
}

impl Handling {
    fn parse(v: Option<&Value>, what: &str) -> Result<Handling, String> {
        match v.and_then(Value::as_str) {
            Some("skip") => Ok(Handling::Skip),
            Some("attempt") => Ok(Handling::Attempt),
            Some("forced") => Ok(Handling::Forced),
            // Absent: the server means "now" (hawkBit always sends both).
            None if v.is_none() => Ok(Handling::Forced),
            _ => Err(format!(
                "deployment.{what} must be skip, attempt or forced, got {}",
                v.map_or("nothing".into(), Value::to_string)
            )),
        }
    }
}

/// The hashes an artifact comes with (lower-case hex).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hashes {
    pub sha256: Option<String>,
    pub sha1: Option<String>,
    pub md5: Option<String>,
}

/// One artifact of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub filename: String,
    pub size: u64,
    pub hashes: Hashes,
    /// `download` (preferred) or else `download-http`.
    pub href: Option<String>,
}

/// One software module of the distribution set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub part: String,
    pub version: String,
    pub name: String,
    /// hawkBit's artifact encryption: the bytes are not a plain archive.
    pub encrypted: bool,
    pub artifacts: Vec<Artifact>,
}

/// `GET deploymentBase/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub id: String,
    pub download: Handling,
    pub update: Handling,
    /// `Some(false)` for `maintenanceWindow: unavailable`: download, do not
    /// install yet. `None` when the action has no maintenance schedule.
    pub window_open: Option<bool>,
    pub chunks: Vec<Chunk>,
}

fn hex_hash(v: Option<&Value>, len: usize) -> Option<String> {
    v.and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .filter(|h| h.len() == len && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_owned()
}

/// Parses a deployment. `Ok(None)` for goosebit's `null` (nothing due).
pub fn parse_deployment(body: &[u8]) -> Result<Option<Deployment>, String> {
    if serde_json::from_slice::<Value>(body).is_ok_and(|v| v.is_null()) {
        return Ok(None);
    }
    let v = object(body, "the deployment")?;
    let id = match v.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("the deployment has no id".into()),
    };
    let d = v
        .get("deployment")
        .ok_or("the deployment has no `deployment`")?;
    let window_open = match d.get("maintenanceWindow").and_then(Value::as_str) {
        None => None,
        Some("available") => Some(true),
        Some("unavailable") => Some(false),
        Some(other) => {
            return Err(format!(
                "deployment.maintenanceWindow must be available or unavailable, got {other:?}"
            ));
        }
    };
    let mut chunks = Vec::new();
    for c in d
        .get("chunks")
        .and_then(Value::as_array)
        .ok_or("deployment.chunks must be an array")?
    {
        let mut artifacts = Vec::new();
        for a in c
            .get("artifacts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let filename = text(a, "filename");
            if filename.is_empty() {
                return Err("an artifact has no filename".into());
            }
            let size = a
                .get("size")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("artifact {filename:?} has no size"))?;
            let h = a.get("hashes").cloned().unwrap_or(Value::Null);
            let links = a.get("_links").cloned().unwrap_or(Value::Null);
            artifacts.push(Artifact {
                size,
                hashes: Hashes {
                    sha256: hex_hash(h.get("sha256"), 64),
                    sha1: hex_hash(h.get("sha1"), 40),
                    md5: hex_hash(h.get("md5"), 32),
                },
                href: href(&links, "download").or_else(|| href(&links, "download-http")),
                filename,
            });
        }
        chunks.push(Chunk {
            part: text(c, "part"),
            version: text(c, "version"),
            name: text(c, "name"),
            encrypted: c.get("encrypted").and_then(Value::as_bool).unwrap_or(false),
            artifacts,
        });
    }
    Ok(Some(Deployment {
        id,
        download: Handling::parse(d.get("download"), "download")?,
        update: Handling::parse(d.get("update"), "update")?,
        window_open,
        chunks,
    }))
}

/// `GET cancelAction/{id}`: the action to stop.
pub fn parse_cancel(body: &[u8]) -> Result<String, String> {
    let v = object(body, "the cancel request")?;
    let stop = v.pointer("/cancelAction/stopId").or_else(|| v.get("id"));
    match stop {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err("the cancel request names no action (cancelAction.stopId)".into()),
    }
}

/// What a feedback says (reference §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    Proceeding,
    Download,
    Downloaded,
    Closed,
    Rejected,
}

impl Execution {
    fn as_str(self) -> &'static str {
        match self {
            Execution::Proceeding => "proceeding",
            Execution::Download => "download",
            Execution::Downloaded => "downloaded",
            Execution::Closed => "closed",
            Execution::Rejected => "rejected",
        }
    }
}

/// `finished` of a feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Success,
    Failure,
    None,
}

/// Most lines a feedback carries, and their length (hawkBit keeps 50 messages
/// per status, stored in pieces of 512 characters).
pub const MAX_DETAILS: usize = 20;
pub const MAX_DETAIL_CHARS: usize = 512;

/// A feedback body. `id` and a millisecond `timestamp` go along: hawkBit reads
/// the timestamp, goosebit and older servers ignore both. `progress` carries
/// both `cnt` and `of` (goosebit refuses one without the other).
pub fn feedback(
    action: &str,
    execution: Execution,
    finished: Finished,
    progress: Option<(u64, u64)>,
    details: &[String],
    now_ms: u64,
) -> Value {
    let mut result = json!({"finished": match finished {
        Finished::Success => "success",
        Finished::Failure => "failure",
        Finished::None => "none",
    }});
    if let Some((cnt, of)) = progress {
        result["progress"] = json!({"cnt": cnt, "of": of});
    }
    let details: Vec<String> = details
        .iter()
        .take(MAX_DETAILS)
        .map(|d| clip(d, MAX_DETAIL_CHARS))
        .collect();
    json!({"id": action, "timestamp": now_ms,
           "status": {"execution": execution.as_str(), "result": result, "details": details}})
}

/// `s` cut to `max` characters, marked when cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The `configData` body: `merge` keeps attributes set by others.
pub fn config_data(data: &BTreeMap<String, String>) -> Value {
    json!({"mode": "merge", "data": data})
}

#[cfg(test)]
mod tests;
