//! Helpers for the engine's fault tests (`engine_faults.rs`, `engine_local_run.rs`):
//! offers, broken uploads, and what pv-sim recorded.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use pv_adapter_api::{ObjectRef, ObjectSource, Offer, Progress};
use pv_testkit::objects::ObjectServer;
use pv_testkit::sim::Store;
use serde_json::{Value, json};

use super::{Backend, Device, eventually, sha256_hex};

pub fn blob(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ tag).collect()
}

/// A PUT of `data` that breaks after `sent` bytes, as a bridge killed mid-upload
/// leaves it: gen-2 keeps the partial file under the object's final name.
pub fn broken_upload(d: &Device, data: &[u8], sent: usize) {
    let sha = sha256_hex(data);
    let mut s = std::os::unix::net::UnixStream::connect(d.cfg().socket).unwrap();
    write!(
        s,
        "PUT /objects/{sha} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        data.len()
    )
    .unwrap();
    s.write_all(&data[..sent]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
}

/// An offer replacing the app's rootfs with `data`, served by `srv` at `path`;
/// `size` as the backend knows it (Azure's template offers give none).
pub async fn offer(
    d: &Device,
    srv: &ObjectServer,
    id: &str,
    path: &str,
    data: &[u8],
    size: Option<u64>,
) -> Offer {
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let sha = sha256_hex(data);
    state["app/root.squashfs"] = json!(sha);
    srv.put(path, data.to_vec());
    Offer {
        id: id.into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects: BTreeMap::from([(
            sha.clone(),
            ObjectRef {
                sha256: sha,
                size,
                source: ObjectSource::Url { url: srv.url(path) },
            },
        )]),
        fetcher: None,
    }
}

pub async fn final_of(b: &Backend, id: &str) -> Progress {
    let view = b.view().await;
    eventually(Duration::from_secs(40), &format!("{id} final"), || async {
        view.borrow()
            .update
            .clone()
            .filter(|p| p.id == id && p.status.is_final())
    })
    .await
}

/// Pantavisor's own log lines of every revision.
pub fn all_pantavisor_logs(d: &Device) -> String {
    let mut text = String::new();
    let mut dirs = vec![d.storage().join("logs")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() && e.file_name() != "pantavisor" {
                dirs.push(e.path());
            } else if t.is_dir() {
                text +=
                    &std::fs::read_to_string(e.path().join("pantavisor.log")).unwrap_or_default();
            }
        }
    }
    text
}

pub fn bad_runs(d: &Device) -> Vec<String> {
    Store::new(&d.storage()).bad_runs()
}

pub async fn listed_size(d: &Device, data: &[u8]) -> Option<u64> {
    let sha = sha256_hex(data);
    d.pv.objects()
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.sha256 == sha)
        .map(|o| o.size)
}

/// An offer that changes only an inline file of the app container (no objects):
/// a non-reboot update.
pub async fn inline_offer(d: &Device, id: &str) -> Offer {
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/extra.json"] = json!({"offer": id});
    Offer {
        id: id.into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects: BTreeMap::new(),
        fetcher: None,
    }
}

pub const LOST_FAST: &str = "[updates]\nlost_command_secs = 1\n";
