//! The engine against what real devices do to it: partial objects left by broken
//! uploads, commands that would destroy staged work, trails that are not ours, slow
//! sources and full disks, and readiness that costs nothing while idle. Each test
//! failed before its fix (LOCAL_RUN's own faults: `engine_local_run.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::faults::*;
use common::{Backend, engine, eventually, local, sha256_hex};
use pv_adapter_api::{
    BackendEvent, CommandKind, CommandResult, CommandStatus, ObjectRef, ObjectSource, Offer,
    UpdateStatus,
};
use pv_testkit::objects::{Fault, ObjectServer};
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

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

/// M2: `PUT /steps` overwrites any trail. Ids are unique per backend only, and the
/// journal's dedupe can be lost, so the device's own trails decide: another
/// backend's revision is never overwritten, and an offer that already ran is
/// reported, not run again, even after the journal is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_on_the_device_is_never_overwritten() {
    let d = common::start(Generation::Gen2).await;
    let backends = format!("{}{}", local("a", ""), local("b", ""));
    let (b, stop, task) = engine(&d, &backends, &["a", "b"]);
    b[0].send(BackendEvent::Offer(inline_offer(&d, "same").await))
        .await;
    assert_eq!(final_of(&b[0], "same").await.status, UpdateStatus::Updated);
    let running = d.pv.step("locals/same").await.unwrap();
    // Backend b uses the same id for another state.
    let mut other = inline_offer(&d, "same").await;
    other.state = {
        let mut v: Value = serde_json::from_slice(&other.state).unwrap();
        v["app/extra.json"] = json!({"offer": "from b"});
        serde_json::to_vec(&v).unwrap()
    };
    b[1].send(BackendEvent::Offer(other)).await;
    let p = final_of(&b[1], "same").await;
    assert_eq!(p.status, UpdateStatus::Wontgo, "{p:?}");
    assert!(
        p.status_msg.starts_with(
            "revision locals/same already exists on the device, staged by backend a, and it ran (UPDATED)"
        ),
        "{}",
        p.status_msg
    );
    assert_eq!(
        d.pv.step("locals/same").await.unwrap(),
        running,
        "untouched"
    );
    stop.send(()).unwrap();
    task.await.unwrap();

    // The journal is lost; backend a offers the same update again.
    std::fs::remove_dir_all(d.dir.path().join("state/journal")).unwrap();
    let (b, stop, task) = engine(&d, &backends, &["a", "b"]);
    b[0].send(BackendEvent::Offer(inline_offer(&d, "same").await))
        .await;
    let p = final_of(&b[0], "same").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = all_pantavisor_logs(&d)
        .matches("processing command LOCAL_RUN \"locals/same\"")
        .count();
    assert_eq!(runs, 1, "not run again");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// An adapter source that stalls once, half way, for `stall` (a broker chunk that
/// is slow to come).
struct StallingFetcher {
    data: Vec<u8>,
    stall: Duration,
}

impl pv_adapter_api::ObjectFetcher for StallingFetcher {
    fn open(
        &self,
        _key: &str,
    ) -> pv_adapter_api::BoxFuture<
        '_,
        Result<(pv_adapter_api::ObjectReader, u64), pv_adapter_api::AdapterError>,
    > {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let data = self.data.clone();
        let stall = self.stall;
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let half = data.len() / 2;
            let _ = tx.write_all(&data[..half]).await;
            tokio::time::sleep(stall).await;
            let _ = tx.write_all(&data[half..]).await;
        });
        let len = self.data.len() as u64;
        Box::pin(async move { Ok((Box::new(rx) as pv_adapter_api::ObjectReader, len)) })
    }
}

/// M4: gen-1 pv-ctrl gives up on a body that stalls for 1 s (500 "Cannot read from
/// socket"). An adapter stream that stalls longer is staged in the cache first,
/// then uploaded at disk speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_adapter_stream_is_staged_before_a_gen1_upload() {
    let d = common::start(Generation::Gen1).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let data = blob(256 * 1024, 4);
    let sha = sha256_hex(&data);
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha);
    let o = Offer {
        id: "slow1".into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects: BTreeMap::from([(
            sha.clone(),
            ObjectRef {
                sha256: sha.clone(),
                size: Some(data.len() as u64),
                source: ObjectSource::Adapter { key: "k".into() },
            },
        )]),
        fetcher: Some(std::sync::Arc::new(StallingFetcher {
            data: data.clone(),
            stall: Duration::from_millis(1500),
        })),
    };
    b[0].send(BackendEvent::Offer(o)).await;
    let p = final_of(&b[0], "slow1").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    assert_eq!(bad_runs(&d), Vec::<String>::new());
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// M3: a URL object is downloaded into the bridge's cache, on the same storage as
/// Pantavisor's objects in the usual layout. Its cached copy is deleted as soon as
/// the device has it, and the preflight counts the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_copies_go_once_on_the_device_and_are_counted_in_the_preflight() {
    let d = common::start(Generation::Gen2).await;
    let srv = ObjectServer::start().await.unwrap();
    let small = blob(64 * 1024, 5);
    let big = blob(600 * 1024, 6);
    let (b, stop, task) = engine(
        &d,
        &format!("[updates]\nconcurrency = 1\n{}", local("cloud", "")),
        &["cloud"],
    );
    let mut o = offer(&d, &srv, "m3", "/big", &big, Some(big.len() as u64)).await;
    {
        let mut state: Value = serde_json::from_slice(&o.state).unwrap();
        state["app/small.bin"] = json!(sha256_hex(&small));
        o.state = serde_json::to_vec(&state).unwrap();
        srv.put("/small", small.clone());
        o.objects.insert(
            sha256_hex(&small),
            ObjectRef {
                sha256: sha256_hex(&small),
                size: Some(small.len() as u64),
                source: ObjectSource::Url {
                    url: srv.url("/small"),
                },
            },
        );
    }
    // Smallest first: the big one downloads slowly while the small one is done.
    srv.fault(Fault::Slow(1 << 30));
    srv.fault(Fault::Slow(200 * 1024));
    b[0].send(BackendEvent::Offer(o)).await;
    let cache = d.dir.path().join("state/cache");
    let view = b[0].view().await;
    eventually(
        Duration::from_secs(20),
        "the small object uploaded",
        || async {
            view.borrow()
                .update
                .as_ref()
                .is_some_and(|p| p.objects_done == 1)
                .then_some(())
        },
    )
    .await;
    assert!(
        !cache.join(sha256_hex(&small)).exists(),
        "the device has it: the cached copy is gone"
    );
    let p = final_of(&b[0], "m3").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    stop.send(()).unwrap();
    task.await.unwrap();

    // Room for the object, not for it and its cached copy at once: refused up front.
    let d = common::start_with(Generation::Gen2, |c| c.capacity = 16 * 1024 * 1024).await;
    let storage: Value =
        d.pv.meta(pv_bridge::pvctrl::Meta::Device).await.unwrap()["storage"].clone();
    let free = storage["real_free"].as_u64().unwrap();
    let huge = blob((free * 2 / 3) as usize, 7);
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].send(BackendEvent::Offer(
        offer(&d, &srv, "m3b", "/huge", &huge, Some(huge.len() as u64)).await,
    ))
    .await;
    let p = final_of(&b[0], "m3b").await;
    assert_eq!(p.status, UpdateStatus::Wontgo, "{p:?}");
    assert!(
        p.status_msg
            .starts_with(&format!("Space required {} B, available ", 2 * huge.len())),
        "{}",
        p.status_msg
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// M3: an object of unknown size cannot fill the device: its download is bounded
/// by the free space the device reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_of_unknown_size_is_bounded_by_the_free_space() {
    let d = common::start_with(Generation::Gen2, |c| c.capacity = 16 * 1024 * 1024).await;
    let srv = ObjectServer::start().await.unwrap();
    let storage: Value =
        d.pv.meta(pv_bridge::pvctrl::Meta::Device).await.unwrap()["storage"].clone();
    let free = storage["real_free"].as_u64().unwrap();
    let endless = blob((free + 1024 * 1024) as usize, 8);
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].send(BackendEvent::Offer(
        offer(&d, &srv, "u1", "/endless", &endless, None).await,
    ))
    .await;
    let p = final_of(&b[0], "u1").await;
    assert_eq!(p.status, UpdateStatus::Wontgo, "{p:?}");
    assert!(
        p.status_msg
            .contains(&format!("byte budget of {free} bytes")),
        "{}",
        p.status_msg
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// Readiness costs pv-ctrl nothing while idle (no polling): the socket is watched
/// with `stat`; a new socket (Pantavisor restarted) is signalled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_does_not_poll_pv_ctrl_and_follows_a_restart() {
    let mut d = common::start(Generation::Gen2).await;
    let (_b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let signals = |d: &common::Device| {
        d.sim
            .as_ref()
            .unwrap()
            .requests()
            .get("POST /signal")
            .copied()
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(10), "READY signalled", || async {
        (signals(&d) >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = d.sim.as_ref().unwrap().requests();
    assert_eq!(r.get("GET /buildinfo"), None, "{r:?}");
    assert_eq!(signals(&d), 1, "{r:?}");
    d.crash_and_restart().await;
    eventually(
        Duration::from_secs(10),
        "READY signalled after the restart",
        || async { (signals(&d) >= 1).then_some(()) },
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap();
}
