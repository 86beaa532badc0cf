//! What goes over the wire to the hub: steps in, progress out, and how hub
//! revisions are named on the device.

use pv_adapter_api::{Progress, UpdateStatus, is_sha256_hex};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// Pantavisor's pending-steps query, byte for byte (`$`, `:` and `,` unescaped):
/// `{"$in":["NEW","DOWNLOADING","INPROGRESS","TESTING","QUEUED"]}`.
pub const PENDING_QUERY: &str = "?progress.status=%7B%22$in%22:%5B%22NEW%22,%22DOWNLOADING%22,%22INPROGRESS%22,%22TESTING%22,%22QUEUED%22%5D%7D";

/// The part of a step the device reads.
#[derive(Debug, Deserialize)]
pub struct Step {
    pub rev: i64,
    /// The state JSON exactly as the hub sent it.
    pub state: Box<RawValue>,
    #[serde(default)]
    pub progress: Value,
    #[serde(default, rename = "commit-msg")]
    pub commit_msg: String,
}

impl Step {
    /// The hub-side status (`NEW`, `CANCEL`, …).
    pub fn status(&self) -> &str {
        self.progress
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// The objects a state names: `(key, sha256)` for every top-level key other than
/// `#spec` and `*.json`. A value that is not a sha256 is an error naming the key.
pub fn state_objects(state: &Value) -> Result<Vec<(String, String)>, String> {
    let m = state.as_object().ok_or("the state is not a JSON object")?;
    let mut out = Vec::new();
    for (k, v) in m {
        if k == "#spec" || k.ends_with(".json") {
            continue;
        }
        match v.as_str() {
            Some(s) if is_sha256_hex(s) => out.push((k.clone(), s.to_owned())),
            _ => return Err(format!("state key {k:?} does not name an object by sha256")),
        }
    }
    Ok(out)
}

/// The offer id (and `locals/<id>` revision) of hub revision `rev`:
/// `<prefix>-<rev>`.
pub fn offer_id(prefix: &str, rev: i64) -> String {
    format!("{prefix}-{rev}")
}

/// The prefix of offer ids: the backend name, limited to `[A-Za-z0-9._-]` and
/// 40 characters so that `<prefix>-<rev>` stays a valid offer id.
pub fn id_prefix(backend: &str) -> String {
    let p: String = backend
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if p.is_empty() || p.starts_with('.') {
        format!("hub{p}")
    } else {
        p
    }
}

/// The hub revision of offer id `id`, if it is one of this backend's.
pub fn rev_of_id(prefix: &str, id: &str) -> Option<i64> {
    id.strip_prefix(prefix)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|r| *r >= 0)
}

/// The hub revision the device runs, from Pantavisor's revision name:
/// `locals/<prefix>-N` (installed by this adapter) is N; the revision synced as
/// the factory state is 0; a plain number is a revision Pantavisor's built-in
/// client installed under the hub's own numbering.
pub fn hub_rev_of_running(prefix: &str, factory: Option<&str>, running: &str) -> Option<i64> {
    if factory == Some(running) {
        return Some(0);
    }
    if let Some(id) = running.strip_prefix("locals/") {
        return rev_of_id(prefix, id);
    }
    running.parse().ok().filter(|r: &i64| *r >= 0)
}

/// Pantavisor's wire name and fixed progress number for a status.
pub fn hub_status(st: UpdateStatus) -> (&'static str, u8) {
    match st {
        UpdateStatus::Queued => ("QUEUED", 5),
        UpdateStatus::Downloading => ("DOWNLOADING", 25),
        UpdateStatus::Inprogress => ("INPROGRESS", 50),
        UpdateStatus::Testing => ("TESTING", 75),
        UpdateStatus::Updated => ("UPDATED", 100),
        UpdateStatus::Done => ("DONE", 100),
        UpdateStatus::Wontgo => ("WONTGO", 100),
        UpdateStatus::Error => ("ERROR", 100),
        UpdateStatus::Cancelled => ("CANCEL", 100),
    }
}

/// Largest update log sent with a progress report (Pantavisor's limit).
const MAX_LOG: usize = 4096;

/// The body of `PUT …/steps/<rev>/progress` for a progress report, as Pantavisor
/// writes it: status, status-msg, the fixed progress number, the download totals
/// while DOWNLOADING (`started` and `now` in Unix seconds), and the update log of
/// a failure, with the revision's `retries` count.
pub fn progress_body(
    p: &Progress,
    owner_cancel: bool,
    started: u64,
    now: u64,
    retries: u32,
) -> Value {
    let (status, pct) = hub_status(p.status);
    let msg = if p.status == UpdateStatus::Cancelled && owner_cancel {
        "Cancelled as requested by owner".to_owned()
    } else {
        p.status_msg.clone()
    };
    let mut body =
        json!({"status": status, "status-msg": msg, "progress": pct, "retries": retries});
    if p.status == UpdateStatus::Downloading {
        body["downloads"] = json!({"total": {
            "object_name": "total", "object_id": "none",
            "total_size": p.bytes_total, "total_downloaded": p.bytes_done,
            "start_time": started, "current_time": now,
        }});
    }
    if let Some(logs) = p.logs.as_deref().filter(|l| !l.is_empty()) {
        let mut end = logs.len().min(MAX_LOG);
        while !logs.is_char_boundary(end) {
            end -= 1;
        }
        body["logs"] = json!(&logs[..end]);
    }
    body
}

/// A final status the adapter decides itself (before the engine has the update).
pub fn final_body(status: &str, msg: &str, retries: u32) -> Value {
    json!({"status": status, "status-msg": msg, "progress": 100, "retries": retries})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(status: UpdateStatus) -> Progress {
        Progress {
            id: "hub-3".into(),
            rev: "locals/hub-3".into(),
            status,
            status_msg: "msg".into(),
            progress: 40,
            bytes_done: 10,
            bytes_total: 100,
            objects_done: 0,
            objects_total: 2,
            logs: None,
        }
    }

    #[test]
    fn progress_uses_pantavisor_numbers_and_totals_only_while_downloading() {
        let d = progress_body(&progress(UpdateStatus::Downloading), false, 5, 9, 1);
        assert_eq!(d["status"], "DOWNLOADING");
        assert_eq!(d["progress"], 25);
        assert_eq!(d["downloads"]["total"]["total_downloaded"], 10);
        assert_eq!(d["downloads"]["total"]["total_size"], 100);
        assert_eq!(d["downloads"]["total"]["object_name"], "total");
        assert_eq!(d["downloads"]["total"]["current_time"], 9);
        let t = progress_body(&progress(UpdateStatus::Testing), false, 5, 9, 2);
        assert_eq!(
            (t["status"].as_str(), t["progress"].as_u64()),
            (Some("TESTING"), Some(75))
        );
        assert!(t.get("downloads").is_none());
        assert_eq!(
            (d["retries"].as_u64(), t["retries"].as_u64()),
            (Some(1), Some(2))
        );
        let c = progress_body(&progress(UpdateStatus::Cancelled), true, 0, 0, 1);
        assert_eq!(c["status"], "CANCEL");
        assert_eq!(c["status-msg"], "Cancelled as requested by owner");
        let mut e = progress(UpdateStatus::Error);
        e.logs = Some("é".repeat(3000));
        let e = progress_body(&e, false, 0, 0, 1);
        assert!(e["logs"].as_str().unwrap().len() <= 4096);
    }

    #[test]
    fn revision_names_map_both_ways() {
        let p = id_prefix("hub");
        assert_eq!(offer_id(&p, 7), "hub-7");
        assert_eq!(rev_of_id(&p, "hub-7"), Some(7));
        assert_eq!(rev_of_id(&p, "hubx-7"), None);
        assert_eq!(rev_of_id(&p, "hub--7"), None);
        assert_eq!(hub_rev_of_running(&p, Some("0"), "locals/hub-12"), Some(12));
        assert_eq!(
            hub_rev_of_running(&p, Some("locals/usb-1"), "locals/usb-1"),
            Some(0)
        );
        assert_eq!(hub_rev_of_running(&p, None, "5"), Some(5));
        assert_eq!(hub_rev_of_running(&p, None, "locals/other-5"), None);
        assert_eq!(id_prefix("my hub/1"), "my-hub-1");
        assert_eq!(id_prefix(""), "hub");
    }

    #[test]
    fn state_objects_skip_spec_and_json_and_name_bad_keys() {
        let sha = "a".repeat(64);
        let s = json!({"#spec": "pantavisor-service-system@1", "bsp/run.json": {}, "bsp/kernel.img": sha});
        assert_eq!(
            state_objects(&s).unwrap(),
            vec![("bsp/kernel.img".to_owned(), sha)]
        );
        let bad = json!({"#spec": "x", "app/root.squashfs": "nope"});
        assert_eq!(
            state_objects(&bad).unwrap_err(),
            "state key \"app/root.squashfs\" does not name an object by sha256"
        );
    }
}
