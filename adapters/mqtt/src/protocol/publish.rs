//! What the bridge publishes (protocol v1.1): every payload has a schema in
//! `docs/schemas/`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use pv_adapter_api::{CommandResult, LogRecord, Progress};
use serde_json::{Value, json};

use super::{MAX_LOG_BATCH, Rejected, rfc3339};

/// `status` (retained). `session` is the connection's start in milliseconds since
/// the epoch: it grows with every connection, and the last will carries the same
/// number, so a will the broker publishes after a session takeover (older
/// session) is told apart from the newer connection's `ready`.
pub fn status(
    online: bool,
    state: &str,
    revision: Option<&str>,
    version: &str,
    now: SystemTime,
    session: u64,
) -> Value {
    json!({"v": 1, "online": online, "state": state, "revision": revision,
           "bridge": {"version": version}, "session": session, "ts": rfc3339(now)})
}

/// The last will of the connection `session`: the broker publishes it if the
/// bridge vanishes.
pub fn last_will(session: u64) -> Value {
    json!({"v": 1, "online": false, "state": "lost", "session": session})
}

/// What this device's bridge supports and accepts (`capabilities`, retained).
#[derive(Debug, Clone)]
pub struct Capabilities<'a> {
    pub version: &'a str,
    pub max_payload_bytes: usize,
    pub max_read_bytes: usize,
    pub chunk_bytes: u64,
    pub response_topic_prefix: &'a str,
}

/// The protocol version this bridge speaks (payloads keep `"v": 1`: v1.1 only
/// adds fields and topics).
pub const PROTOCOL: &str = "1.1";

/// `capabilities` (retained, at every connection).
pub fn capabilities(c: &Capabilities<'_>, now: SystemTime) -> Value {
    json!({"v": 1, "protocol": PROTOCOL, "bridge": {"version": c.version},
        "commands": ["reboot", "poweroff", "gc", "ssh", "resync", "cancel", "ping"],
        "offer": {"state": ["inline", "url"], "objects": ["url", "template", "chunk"]},
        "limits": {"max_payload_bytes": c.max_payload_bytes, "max_read_bytes": c.max_read_bytes,
                   "chunk_bytes": c.chunk_bytes},
        "response_topic_prefix": c.response_topic_prefix,
        "ts": rfc3339(now)})
}

/// `revision/progress` (retained) for an offer refused before the engine saw it:
/// WONTGO with the reason, under the offer's id when it could be read. Operators
/// who were not watching `events` find it where they look.
pub fn offer_refused(id: Option<&str>, reason: &str, now: SystemTime) -> Value {
    json!({"v": 1, "id": id.unwrap_or(""), "rev": id.map(|i| format!("locals/{i}")).unwrap_or_default(),
        "status": "WONTGO", "status_msg": reason, "progress": 100, "bytes_done": 0,
        "bytes_total": 0, "objects_done": 0, "objects_total": 0, "ts": rfc3339(now)})
}

/// `revision/progress` (retained).
pub fn progress(p: &Progress, now: SystemTime) -> Value {
    let mut v = json!({"v": 1, "id": p.id, "rev": p.rev, "status": p.status.as_str(),
        "status_msg": p.status_msg, "progress": p.progress, "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total, "objects_done": p.objects_done,
        "objects_total": p.objects_total, "ts": rfc3339(now)});
    if let Some(logs) = &p.logs {
        v["logs"] = Value::String(logs.clone());
    }
    v
}

/// `revision/current` (retained).
pub fn current(rev: &str, status: &str, now: SystemTime) -> Value {
    json!({"v": 1, "rev": rev, "status": status, "ts": rfc3339(now)})
}

/// `meta/device` (retained).
pub fn device_meta(data: &BTreeMap<String, Value>) -> Value {
    json!({"v": 1, "data": data})
}

/// `meta/user` (retained): user-meta as applied.
pub fn user_meta(version: u64, data: &BTreeMap<String, Value>) -> Value {
    json!({"v": 1, "version": version, "data": data})
}

/// `events`: an inbound message refused.
pub fn rejected(r: &Rejected, now: SystemTime) -> Value {
    json!({"v": 1, "kind": "rejected", "topic": r.topic, "reason": r.reason, "ts": rfc3339(now)})
}

/// `cmd/<name>/res/<id>`.
pub fn command_response(r: &CommandResult) -> Value {
    let status = match r.status {
        pv_adapter_api::CommandStatus::Accepted => "accepted",
        pv_adapter_api::CommandStatus::Successful => "successful",
        pv_adapter_api::CommandStatus::Failed => "failed",
        pv_adapter_api::CommandStatus::Rejected => "rejected",
    };
    let mut v = json!({"v": 1, "id": r.id, "status": status});
    if let Some(reason) = &r.reason {
        v["reason"] = Value::String(reason.clone());
    }
    v
}

/// The `id` of a command payload that failed validation, when it has a usable
/// one: the caller then gets a `rejected` answer, not only an `events` message.
pub fn command_id(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    match v.get("id") {
        Some(Value::String(s)) if valid_command_id(s) => Some(s.clone()),
        _ => None,
    }
}

pub(crate) fn valid_command_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && !s.contains(['/', '+', '#']) && !s.contains(char::is_control)
}

/// `cmd/<name>/res/<id>` for a command refused before the engine saw it.
pub fn command_rejected(id: &str, reason: &str) -> Value {
    json!({"v": 1, "id": id, "status": "rejected", "reason": reason})
}

fn record(r: &LogRecord) -> Value {
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(r.tsec.max(0) as u64, r.tnano);
    // `seq`: the line's position in the device's log spool, increasing across
    // bridge runs (a gap is a lost line); `rev`: the revision it was logged under.
    json!({"ts": rfc3339(t), "lvl": r.lvl, "plat": r.plat, "src": r.src, "msg": r.msg,
           "seq": r.seq, "rev": r.rev})
}

/// Splits records into `logs/<platform>` batches of at most [`MAX_LOG_BATCH`]
/// bytes each: `(platform, payload)`. `seq` numbers batches per platform from
/// `next_seq` (updated) within the bridge run `run` (its start, ms since the
/// epoch); `dropped` rides on the first batch.
pub fn log_batches(
    records: &[LogRecord],
    dropped: u64,
    next_seq: &mut BTreeMap<String, u64>,
    run: u64,
) -> Vec<(String, Vec<u8>)> {
    let mut by_plat: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for r in records {
        by_plat.entry(r.plat.as_str()).or_default().push(record(r));
    }
    let mut out = Vec::new();
    let mut dropped = dropped;
    for (plat, recs) in by_plat {
        let mut batch: Vec<Value> = Vec::new();
        let mut size = 0usize;
        let mut flush = |batch: &mut Vec<Value>, dropped: &mut u64| {
            if batch.is_empty() {
                return;
            }
            let seq = next_seq.entry(plat.to_owned()).or_insert(0);
            let payload =
                json!({"v": 1, "run": run, "seq": *seq, "dropped": *dropped, "records": batch});
            *seq += 1;
            *dropped = 0;
            out.push((
                plat.to_owned(),
                serde_json::to_vec(&payload).unwrap_or_default(),
            ));
            batch.clear();
        };
        for r in recs {
            let len = r.to_string().len() + 1;
            if size + len > MAX_LOG_BATCH - 128 && !batch.is_empty() {
                flush(&mut batch, &mut dropped);
                size = 0;
            }
            size += len;
            batch.push(r);
        }
        flush(&mut batch, &mut dropped);
    }
    out
}
