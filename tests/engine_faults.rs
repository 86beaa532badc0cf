//! The engine against what real devices do to it (issue "truth under faults"):
//! partial objects left by broken uploads, commands that would destroy staged work,
//! LOCAL_RUNs the device lost, and answers that only look like failures. Each test
//! failed before its fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use common::{Backend, engine, eventually, local, sha256_hex};
use pv_adapter_api::{
    BackendEvent, CommandKind, CommandResult, CommandStatus, ObjectRef, ObjectSource, Offer,
    Progress, UpdateStatus,
};
use pv_testkit::objects::{Fault, ObjectServer};
use pv_testkit::sim::{Generation, Store};
use serde_json::{Value, json};

fn blob(n: usize, tag: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ tag).collect()
}

/// A PUT of `data` that breaks after `sent` bytes, as a bridge killed mid-upload
/// leaves it: gen-2 keeps the partial file under the object's final name.
fn broken_upload(d: &common::Device, data: &[u8], sent: usize) {
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
async fn offer(
    d: &common::Device,
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

async fn final_of(b: &Backend, id: &str) -> Progress {
    let view = b.view().await;
    eventually(Duration::from_secs(40), &format!("{id} final"), || async {
        view.borrow()
            .update
            .clone()
            .filter(|p| p.id == id && p.status.is_final())
    })
    .await
}

fn bad_runs(d: &common::Device) -> Vec<String> {
    Store::new(&d.storage()).bad_runs()
}

async fn listed_size(d: &common::Device, data: &[u8]) -> Option<u64> {
    let sha = sha256_hex(data);
    d.pv.objects()
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.sha256 == sha)
        .map(|o| o.size)
}

/// C1: a partial object left by a broken upload is listed by `GET /objects`; an
/// offer that gives no size must not take it for the whole object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_object_on_the_device_is_sent_again_not_run() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let data = blob(512 * 1024, 1);
    broken_upload(&d, &data, 100_000);
    assert_eq!(listed_size(&d, &data).await, Some(100_000));
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].send(BackendEvent::Offer(
        offer(&d, &srv, "p1", "/root", &data, None).await,
    ))
    .await;
    let p = final_of(&b[0], "p1").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    assert_eq!(
        bad_runs(&d),
        Vec::<String>::new(),
        "nothing partial was run"
    );
    assert_eq!(listed_size(&d, &data).await, Some(data.len() as u64));
    assert_eq!(srv.seen().len(), 1, "downloaded once");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// C1, the other way: a whole object of unknown size is hashed on the device and
/// not downloaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_object_on_the_device_is_checked_not_downloaded() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let data = blob(300 * 1024, 2);
    let sha = sha256_hex(&data);
    d.pv.put_object(&sha, &data[..], data.len() as u64)
        .await
        .unwrap();
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].send(BackendEvent::Offer(
        offer(&d, &srv, "w1", "/root", &data, None).await,
    ))
    .await;
    let p = final_of(&b[0], "w1").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    assert!(srv.seen().is_empty(), "{:?}", srv.seen());
    stop.send(()).unwrap();
    task.await.unwrap();
}

async fn command_result(b: &Backend, id: &str) -> CommandResult {
    let view = b.view().await;
    eventually(
        Duration::from_secs(15),
        &format!("command {id}"),
        || async {
            view.borrow()
                .commands
                .get(id)
                .filter(|r| r.status != CommandStatus::Accepted)
                .cloned()
        },
    )
    .await
}

/// C2: GC, reboot and power-off while an update is staging would delete its
/// freshly uploaded objects and trail or cut its uploads short: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_reboot_and_poweroff_are_refused_while_an_update_stages() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let data = blob(400 * 1024, 3);
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    // About 2 s of download.
    srv.fault(Fault::Slow(200 * 1024));
    b[0].send(BackendEvent::Offer(
        offer(&d, &srv, "s1", "/root", &data, Some(data.len() as u64)).await,
    ))
    .await;
    let view = b[0].view().await;
    eventually(Duration::from_secs(10), "DOWNLOADING", || async {
        view.borrow()
            .update
            .as_ref()
            .is_some_and(|p| p.status == UpdateStatus::Downloading)
            .then_some(())
    })
    .await;
    for (id, kind) in [
        ("c-gc", CommandKind::Gc),
        ("c-reboot", CommandKind::Reboot),
        ("c-off", CommandKind::Poweroff),
    ] {
        b[0].send(BackendEvent::Command {
            id: id.into(),
            kind,
            expires_at: None,
        })
        .await;
        let r = command_result(&b[0], id).await;
        assert_eq!(r.status, CommandStatus::Rejected, "{r:?}");
        let why = r.reason.unwrap();
        assert!(
            why.starts_with("refused while update s1 from backend cloud is being staged"),
            "{why}"
        );
    }
    let p = final_of(&b[0], "s1").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    assert_eq!(bad_runs(&d), Vec::<String>::new());
    // Once it ended, GC runs.
    b[0].send(BackendEvent::Command {
        id: "c-gc2".into(),
        kind: CommandKind::Gc,
        expires_at: None,
    })
    .await;
    assert_eq!(
        command_result(&b[0], "c-gc2").await.status,
        CommandStatus::Successful
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}
