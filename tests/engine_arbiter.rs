//! One update at a time: supersede, busy refusal, priority and cancel, through the
//! engine against pv-sim.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, engine, eventually, local, sha256_hex};
use pv_adapter_api::{
    AdapterError, BackendEvent, BoxFuture, CommandKind, CommandStatus, ObjectFetcher, ObjectReader,
    ObjectRef, ObjectSource, Offer, Progress, UpdateStatus,
};
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

/// Serves objects from memory.
struct Mem(BTreeMap<String, Vec<u8>>);

impl ObjectFetcher for Mem {
    fn open(&self, key: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>> {
        let data = self.0.get(key).cloned();
        let key = key.to_owned();
        Box::pin(async move {
            let data = data.ok_or(AdapterError::Object {
                key,
                reason: "unknown".into(),
            })?;
            let len = data.len() as u64;
            Ok((Box::new(std::io::Cursor::new(data)) as ObjectReader, len))
        })
    }
}

/// An offer of the running state with `app/root.squashfs` replaced by `blob`.
async fn offer(d: &common::Device, id: &str, blob: Vec<u8>) -> Offer {
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let sha = sha256_hex(&blob);
    state["app/root.squashfs"] = json!(sha);
    let objects = BTreeMap::from([(
        sha.clone(),
        ObjectRef {
            sha256: sha.clone(),
            size: Some(blob.len() as u64),
            source: ObjectSource::Adapter { key: sha.clone() },
        },
    )]);
    Offer {
        id: id.into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects,
        fetcher: Some(Arc::new(Mem(BTreeMap::from([(sha, blob)])))),
    }
}

/// A blob that takes a few seconds under the 1 MiB/s cap.
fn slow_blob(tag: u8) -> Vec<u8> {
    (0..4 * 1024 * 1024u32).map(|i| (i as u8) ^ tag).collect()
}

async fn progress_of(b: &Backend, id: &str, want: impl Fn(&Progress) -> bool) -> Progress {
    let view = b.view().await;
    eventually(
        Duration::from_secs(30),
        &format!("progress of {id}"),
        || async {
            view.borrow()
                .update
                .clone()
                .filter(|p| p.id == id && want(p))
        },
    )
    .await
}

fn is(status: UpdateStatus) -> impl Fn(&Progress) -> bool {
    move |p| p.status == status
}

const SLOW: &str = "[updates]\nbandwidth_limit = 1048576\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_offer_from_the_owner_supersedes_and_others_are_refused() {
    let d = common::start(Generation::Gen2).await;
    let toml = format!("{SLOW}{}{}", local("a", ""), local("b", ""));
    let (b, stop, task) = engine(&d, &toml, &["a", "b"]);
    b[0].send(BackendEvent::Offer(offer(&d, "r1", slow_blob(1)).await))
        .await;
    progress_of(&b[0], "r1", is(UpdateStatus::Downloading)).await;
    // Another backend of equal priority: busy.
    b[1].send(BackendEvent::Offer(offer(&d, "x1", slow_blob(2)).await))
        .await;
    let p = progress_of(&b[1], "x1", is(UpdateStatus::Wontgo)).await;
    assert_eq!(
        p.status_msg,
        "busy: update r1 from backend a is in progress"
    );
    // The owner's newer offer supersedes r1, which ends CANCELLED.
    b[0].send(BackendEvent::Offer(
        offer(&d, "r2", b"small".to_vec()).await,
    ))
    .await;
    let view = b[0].view().await;
    let p = progress_of(&b[0], "r2", is(UpdateStatus::Updated)).await;
    assert_eq!(p.rev, "locals/r2");
    drop(view);
    assert!(
        d.pv.step("locals/r1").await.unwrap_err().is_not_found(),
        "r1 never staged"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
    // The journal recorded r1 as CANCELLED with the reason.
    let journal = std::fs::read_to_string(d.dir.path().join("state/journal/updates.json")).unwrap();
    assert!(
        journal.contains("\"CANCELLED\"")
            && journal.contains("superseded by update r2 from backend a"),
        "{journal}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_backend_preempts_before_inprogress() {
    let d = common::start(Generation::Gen2).await;
    let toml = format!(
        "{SLOW}{}{}",
        local("low", ""),
        local("high", "priority = 10")
    );
    let (b, stop, task) = engine(&d, &toml, &["low", "high"]);
    b[0].send(BackendEvent::Offer(offer(&d, "slow", slow_blob(3)).await))
        .await;
    progress_of(&b[0], "slow", is(UpdateStatus::Downloading)).await;
    b[1].send(BackendEvent::Offer(
        offer(&d, "urgent", b"urgent fix".to_vec()).await,
    ))
    .await;
    let p = progress_of(&b[0], "slow", is(UpdateStatus::Cancelled)).await;
    assert_eq!(
        p.status_msg,
        "superseded by update urgent from backend high"
    );
    progress_of(&b[1], "urgent", is(UpdateStatus::Updated)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_honoured_before_the_point_of_no_return_only() {
    let d = common::start_with(Generation::Gen2, |c| {
        c.commit_delay = Duration::from_secs(3)
    })
    .await;
    let (b, stop, task) = engine(&d, &format!("{SLOW}{}", local("a", "")), &["a"]);
    b[0].send(BackendEvent::Offer(offer(&d, "c1", slow_blob(4)).await))
        .await;
    progress_of(&b[0], "c1", is(UpdateStatus::Downloading)).await;
    b[0].send(BackendEvent::Cancel { id: "c1".into() }).await;
    let p = progress_of(&b[0], "c1", is(UpdateStatus::Cancelled)).await;
    assert_eq!(p.status_msg, "cancelled by backend a");
    assert!(d.pv.step("locals/c1").await.unwrap_err().is_not_found());
    // Once Pantavisor owns an update, a cancel command is refused with the reason.
    b[0].send(BackendEvent::Offer(
        offer(&d, "c2", b"quick".to_vec()).await,
    ))
    .await;
    progress_of(&b[0], "c2", is(UpdateStatus::Testing)).await;
    b[0].send(BackendEvent::Command {
        id: "k1".into(),
        kind: CommandKind::Cancel,
        expires_at: None,
    })
    .await;
    let view = b[0].view().await;
    let r = eventually(Duration::from_secs(10), "cancel refused", || async {
        view.borrow()
            .commands
            .get("k1")
            .filter(|r| r.status == CommandStatus::Failed)
            .cloned()
    })
    .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("update c2 is already being installed by Pantavisor")
    );
    progress_of(&b[0], "c2", is(UpdateStatus::Updated)).await;
    stop.send(()).unwrap();
    task.await.unwrap();
}
