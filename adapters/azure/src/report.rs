//! The reported side of the twin: what the bridge tells IoT Hub, built whole from
//! the device view and sent as the difference from what the hub already has.
//!
//! ```json
//! {"pantavisor": {"bridge": {...}, "revision": "locals/r2", "update": {...},
//!                 "deviceMeta": {...}, "commands": {...}, "logs": {...}},
//!  "userMeta": {"value": {}, "ac": 200, "av": 7, "ad": "applied"},
//!  "revision": {"value": {"id": "r2"}, "ac": 202, "av": 7, "ad": "DOWNLOADING 40%"}}
//! ```
//! `userMeta` and `revision` are IoT Plug and Play writable-property
//! acknowledgements of the desired properties of the same name.

use pv_adapter_api::{DeviceView, UpdateStatus};
use serde_json::{Map, Value, json};

use crate::twin;

/// Bytes of the reported section given to device-meta.
pub const DEVICE_META_BUDGET: usize = 16 * 1024;
/// Commands kept in the reported section.
pub const COMMANDS_KEPT: usize = 8;

/// Where the desired `userMeta` stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserMetaAck {
    /// Handed to the engine at desired `$version` `av`.
    Sent {
        av: u64,
    },
    Rejected {
        av: u64,
        reason: String,
    },
}

/// Where the desired `revision` stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevisionAck {
    /// Offered to the engine as `id`.
    Offered { av: u64, id: String },
    Rejected {
        av: u64,
        id: Option<String>,
        reason: String,
    },
}

/// What the adapter adds to the view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra {
    pub user_meta: Option<UserMetaAck>,
    pub revision: Option<RevisionAck>,
    /// Log messages delivered, records dropped (budget, refusals), KiB used today.
    pub logs: (u64, u64, u64),
}

fn update_json(p: &pv_adapter_api::Progress) -> Value {
    json!({
        "id": p.id,
        "rev": p.rev,
        "status": p.status.as_str(),
        "statusMsg": truncate(&p.status_msg, 512),
        "progress": p.progress,
        "bytesDone": p.bytes_done,
        "bytesTotal": p.bytes_total,
        "objectsDone": p.objects_done,
        "objectsTotal": p.objects_total,
    })
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `ac` and `ad` of a revision offered as `id`, from the engine's progress.
fn revision_ack(view: &DeviceView, id: &str) -> (u16, String) {
    match view.update.as_ref().filter(|p| p.id == id) {
        None => (202, "accepted".into()),
        Some(p) => {
            let msg = if p.status_msg.is_empty() {
                p.status.as_str().to_owned()
            } else {
                format!("{}: {}", p.status, truncate(&p.status_msg, 400))
            };
            match p.status {
                UpdateStatus::Updated | UpdateStatus::Done => (200, msg),
                UpdateStatus::Wontgo | UpdateStatus::Cancelled => (400, msg),
                UpdateStatus::Error => (500, msg),
                UpdateStatus::Downloading => (202, format!("DOWNLOADING {}%", p.progress)),
                _ => (202, msg),
            }
        }
    }
}

/// The whole reported section the bridge wants the hub to hold.
pub fn reported(backend: &str, view: &DeviceView, extra: &Extra, meta_keys: &[String]) -> Value {
    let mut pv = Map::new();
    let backends: Map<String, Value> = view
        .health
        .iter()
        .map(|(name, h)| {
            (
                twin::escape_key(name),
                // No `lastSuccess`: it moves on every token renewal, and each
                // reported patch is billed.
                json!({
                    "connected": h.connected,
                    "lastError": h.last_error.as_deref().map(|e| truncate(e, 512)),
                }),
            )
        })
        .collect();
    pv.insert(
        "bridge".into(),
        json!({"version": env!("CARGO_PKG_VERSION"), "backend": backend, "backends": backends}),
    );
    if let Some(r) = &view.running {
        pv.insert("revision".into(), json!(r));
    }
    if let Some(p) = &view.update {
        pv.insert("update".into(), update_json(p));
    }
    if !view.device_meta.is_empty() {
        let (meta, left) = twin::device_meta(&view.device_meta, meta_keys, DEVICE_META_BUDGET);
        pv.insert("deviceMeta".into(), Value::Object(meta));
        if !left.is_empty() {
            pv.insert(
                "deviceMetaOmitted".into(),
                json!(truncate(&left.join(", "), 2048)),
            );
        }
    }
    let skip = view.commands.len().saturating_sub(COMMANDS_KEPT);
    let commands: Map<String, Value> = view
        .commands
        .iter()
        .skip(skip)
        .map(|(id, c)| {
            (
                twin::escape_key(id),
                json!({
                    "command": c.kind.name(),
                    "status": c.status,
                    "reason": c.reason.as_deref().map(|r| truncate(r, 400)),
                }),
            )
        })
        .collect();
    if !commands.is_empty() {
        pv.insert("commands".into(), Value::Object(commands));
    }
    let (sent, dropped, kib) = extra.logs;
    pv.insert(
        "logs".into(),
        json!({"messages": sent, "droppedRecords": dropped, "usedKiBToday": kib}),
    );
    let mut out = Map::new();
    out.insert("pantavisor".into(), Value::Object(pv));
    match &extra.user_meta {
        Some(UserMetaAck::Sent { av }) => {
            let applied = view.user_meta.as_ref().is_some_and(|u| u.version >= *av);
            let (ac, ad) = if applied {
                (200, "applied")
            } else {
                (202, "applying")
            };
            out.insert(
                "userMeta".into(),
                json!({"value": {}, "ac": ac, "av": av, "ad": ad}),
            );
        }
        Some(UserMetaAck::Rejected { av, reason }) => {
            out.insert(
                "userMeta".into(),
                json!({"value": {}, "ac": 400, "av": av, "ad": truncate(reason, 1024)}),
            );
        }
        None => {}
    }
    match &extra.revision {
        Some(RevisionAck::Offered { av, id }) => {
            let (ac, ad) = revision_ack(view, id);
            out.insert(
                "revision".into(),
                json!({"value": {"id": id}, "ac": ac, "av": av, "ad": ad}),
            );
        }
        Some(RevisionAck::Rejected { av, id, reason }) => {
            let value = match id {
                Some(id) => json!({"id": id}),
                None => json!({}),
            };
            out.insert(
                "revision".into(),
                json!({"value": value, "ac": 400, "av": av, "ad": truncate(reason, 1024)}),
            );
        }
        None => {}
    }
    Value::Object(out)
}

/// What makes a report urgent: anything but byte counts and device-meta.
pub fn urgency(doc: &Value) -> Value {
    let mut d = doc.clone();
    if let Some(u) = d
        .pointer_mut("/pantavisor/update")
        .and_then(Value::as_object_mut)
    {
        for k in ["progress", "bytesDone", "objectsDone", "statusMsg"] {
            u.remove(k);
        }
    }
    if let Some(pv) = d.pointer_mut("/pantavisor").and_then(Value::as_object_mut) {
        pv.remove("deviceMeta");
        pv.remove("deviceMetaOmitted");
        pv.remove("logs");
        if let Some(b) = pv.get_mut("bridge").and_then(Value::as_object_mut) {
            if let Some(Value::Object(all)) = b.get_mut("backends") {
                for h in all.values_mut() {
                    if let Some(h) = h.as_object_mut() {
                        h.remove("lastSuccess");
                    }
                }
            }
        }
    }
    if let Some(r) = d.pointer_mut("/revision").and_then(Value::as_object_mut) {
        if r.get("ac") == Some(&json!(202)) {
            r.remove("ad");
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use pv_adapter_api::{AppliedUserMeta, Progress};

    fn progress(id: &str, status: UpdateStatus, pct: u8) -> Progress {
        Progress {
            id: id.into(),
            rev: format!("locals/{id}"),
            status,
            status_msg: String::new(),
            progress: pct,
            bytes_done: 10,
            bytes_total: 100,
            objects_done: 0,
            objects_total: 1,
            logs: None,
        }
    }

    #[test]
    fn revision_acks_follow_the_update() {
        let mut view = DeviceView::default();
        let extra = Extra {
            revision: Some(RevisionAck::Offered {
                av: 4,
                id: "r1".into(),
            }),
            ..Extra::default()
        };
        let d = reported("azure", &view, &extra, &[]);
        assert_eq!(
            d["revision"],
            json!({"value": {"id": "r1"}, "ac": 202, "av": 4, "ad": "accepted"})
        );
        view.update = Some(progress("r1", UpdateStatus::Downloading, 40));
        let d = reported("azure", &view, &extra, &[]);
        assert_eq!(d["revision"]["ad"], "DOWNLOADING 40%");
        assert_eq!(d["pantavisor"]["update"]["bytesTotal"], 100);
        view.update = Some(progress("r1", UpdateStatus::Done, 100));
        assert_eq!(reported("azure", &view, &extra, &[])["revision"]["ac"], 200);
        let mut p = progress("r1", UpdateStatus::Error, 100);
        p.status_msg = "rolled back".into();
        view.update = Some(p);
        let d = reported("azure", &view, &extra, &[]);
        assert_eq!(d["revision"]["ac"], 500);
        assert_eq!(d["revision"]["ad"], "ERROR: rolled back");
        // Progress of another id is not this ack's.
        view.update = Some(progress("r0", UpdateStatus::Done, 100));
        assert_eq!(reported("azure", &view, &extra, &[])["revision"]["ac"], 202);
        assert!(twin::validate(&reported("azure", &view, &extra, &[])).is_ok());
    }

    #[test]
    fn user_meta_ack_waits_for_the_engine() {
        let mut view = DeviceView::default();
        let extra = Extra {
            user_meta: Some(UserMetaAck::Sent { av: 3 }),
            ..Extra::default()
        };
        assert_eq!(reported("a", &view, &extra, &[])["userMeta"]["ac"], 202);
        view.user_meta = Some(AppliedUserMeta {
            version: 3,
            data: Default::default(),
        });
        assert_eq!(
            reported("a", &view, &extra, &[])["userMeta"],
            json!({"value": {}, "ac": 200, "av": 3, "ad": "applied"})
        );
    }

    #[test]
    fn byte_progress_is_not_urgent_but_status_is() {
        let mut view = DeviceView {
            update: Some(progress("r1", UpdateStatus::Downloading, 10)),
            ..DeviceView::default()
        };
        let a = urgency(&reported("a", &view, &Extra::default(), &[]));
        view.update = Some(progress("r1", UpdateStatus::Downloading, 60));
        let b = urgency(&reported("a", &view, &Extra::default(), &[]));
        assert_eq!(a, b);
        view.update = Some(progress("r1", UpdateStatus::Inprogress, 60));
        assert_ne!(a, urgency(&reported("a", &view, &Extra::default(), &[])));
    }
}
