//! Metadata sync through the engine against pv-sim: user-meta desired maps applied
//! with ownership (only keys the bridge set are deleted) and priority, device-meta
//! sent to backends and coalesced, the bridge's own device-meta keys, and the
//! per-backend switches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{engine, eventually, local};
use pv_adapter_api::{BackendEvent, Offer};
use pv_bridge::pvctrl::Meta;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

async fn user_meta(d: &common::Device) -> BTreeMap<String, Value> {
    d.pv.meta(Meta::User).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_user_meta_is_applied_and_only_owned_keys_are_deleted() {
    let d = common::start(Generation::Gen2).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].user_meta(1, json!({"a": "1", "b": {"x": 1}, "n": 7}))
        .await;
    eventually(Duration::from_secs(5), "user-meta applied", || async {
        let m = user_meta(&d).await;
        (m.get("a") == Some(&json!("1"))
            && m.get("b") == Some(&json!({"x": 1}))
            && m.get("n") == Some(&json!("7")))
        .then_some(())
    })
    .await;
    // An operator sets a key by hand; the bridge must never delete it.
    d.pv.put_meta(Meta::User, "c", b"manual").await.unwrap();
    b[0].user_meta(2, json!({"b": {"x": 2}})).await;
    eventually(
        Duration::from_secs(5),
        "a and n deleted, b updated",
        || async {
            let m = user_meta(&d).await;
            (!m.contains_key("a") && !m.contains_key("n") && m.get("b") == Some(&json!({"x": 2})))
                .then_some(())
        },
    )
    .await;
    assert_eq!(user_meta(&d).await["c"], json!("manual"));
    // Drift is repaired: someone deletes an owned key; it comes back.
    d.pv.delete_meta(Meta::User, "b").await.unwrap();
    eventually(Duration::from_secs(5), "b restored", || async {
        (user_meta(&d).await.get("b") == Some(&json!({"x": 2}))).then_some(())
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap();

    // Ownership survives a restart of the bridge.
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    b[0].user_meta(3, json!({})).await;
    eventually(
        Duration::from_secs(5),
        "b deleted after restart",
        || async { (!user_meta(&d).await.contains_key("b")).then_some(()) },
    )
    .await;
    assert_eq!(
        user_meta(&d).await["c"],
        json!("manual"),
        "never owned, never deleted"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_higher_priority_backend_wins_a_key() {
    let d = common::start(Generation::Gen2).await;
    let toml = local("cloud", "") + &local("usb", "priority = 10");
    let (b, stop, task) = engine(&d, &toml, &["cloud", "usb"]);
    b[0].user_meta(1, json!({"k": "from cloud", "only-cloud": "c"}))
        .await;
    b[1].user_meta(1, json!({"k": "from usb"})).await;
    eventually(Duration::from_secs(5), "usb wins k", || async {
        let m = user_meta(&d).await;
        (m.get("k") == Some(&json!("from usb")) && m.get("only-cloud") == Some(&json!("c")))
            .then_some(())
    })
    .await;
    b[1].user_meta(2, json!({})).await;
    eventually(
        Duration::from_secs(5),
        "cloud's value once usb lets go",
        || async { (user_meta(&d).await.get("k") == Some(&json!("from cloud"))).then_some(()) },
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_meta_reaches_backends_coalesced_with_the_bridges_own_keys() {
    let d = common::start(Generation::Gen2).await;
    let toml = local("cloud", "") + &local("quiet", "device_meta = false");
    let (b, stop, task) = engine(&d, &toml, &["cloud", "quiet"]);
    let mut view = b[0].view().await;
    let dm = eventually(
        Duration::from_secs(5),
        "device-meta in the view",
        || async {
            let dm = view.borrow().device_meta.clone();
            // Health is published at the next sync after the backend connected.
            (dm.get("pv-bridge.backends")
                .and_then(|b| b.get("cloud"))
                .and_then(|c| c.get("connected"))
                == Some(&json!(true)))
            .then_some(dm)
        },
    )
    .await;
    assert_eq!(dm["pantavisor.revision"], json!("0"));
    assert_eq!(dm["pv-bridge.version"], json!(pv_bridge::VERSION));
    let backends = &dm["pv-bridge.backends"];
    assert_eq!(backends["cloud"]["connected"], json!(true), "{backends}");
    // Twenty quick changes arrive as a few updates, ending with the last value.
    view.borrow_and_update();
    let counter = tokio::spawn(async move {
        let mut seen = 0;
        let mut last = None;
        while view.changed().await.is_ok() {
            let v = view.borrow_and_update().device_meta.get("burst").cloned();
            if v != last {
                seen += 1;
                last = v.clone();
            }
            if last == Some(json!("19")) {
                break;
            }
        }
        seen
    });
    for i in 0..20 {
        d.pv.put_meta(Meta::Device, "burst", i.to_string().as_bytes())
            .await
            .unwrap();
    }
    let updates = tokio::time::timeout(Duration::from_secs(5), counter)
        .await
        .unwrap()
        .unwrap();
    assert!(
        updates < 20,
        "20 changes reached the backend as {updates} updates"
    );
    // A backend with device_meta = false gets none.
    let quiet = b[1].view().await;
    assert!(quiet.borrow().device_meta.is_empty());
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// Pantavisor's `sysinfo` and `time` change on every read: forwarding each change
/// would bill a cloud message every read interval, forever. Volatile-only changes
/// wait their interval; a change that matters goes within the minimum interval,
/// carrying the current volatile values with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_device_meta_waits_and_changes_that_matter_go_soon() {
    let d = common::start(Generation::Gen2).await;
    let toml = local(
        "cloud",
        "device_meta_min_interval_secs = 2\ndevice_meta_volatile_interval_secs = 3600",
    );
    let (b, stop, task) = engine(&d, &toml, &["cloud"]);
    let mut view = b[0].view().await;
    eventually(
        Duration::from_secs(5),
        "device-meta in the view",
        || async { (!view.borrow().device_meta.is_empty()).then_some(()) },
    )
    .await;
    // Let the bridge's own keys (health after connecting) settle.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let first = view.borrow_and_update().device_meta.clone();
    let updates = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = updates.clone();
    let mut watch = view.clone();
    let counter = tokio::spawn(async move {
        let mut last = watch.borrow_and_update().device_meta.clone();
        while watch.changed().await.is_ok() {
            let now = watch.borrow_and_update().device_meta.clone();
            if now != last {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                last = now;
            }
        }
    });
    // 4 s of reads every 300 ms: `time` moved on each, nothing else did.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = updates.load(std::sync::atomic::Ordering::SeqCst);
    let sim_time = d.pv.meta(Meta::Device).await.unwrap()["time"].clone();
    assert_ne!(sim_time, first["time"], "pv-sim's time moves on every read");
    assert_eq!(
        idle, 0,
        "volatile-only changes reached the backend {idle} times in 4 s"
    );
    // A key that matters arrives within the minimum interval, with fresh volatile values.
    let t = std::time::Instant::now();
    d.pv.put_meta(Meta::Device, "app.mode", b"maintenance")
        .await
        .unwrap();
    let dm = eventually(Duration::from_secs(5), "the changed key", || async {
        let dm = view.borrow().device_meta.clone();
        (dm.get("app.mode") == Some(&json!("maintenance"))).then_some(dm)
    })
    .await;
    assert!(
        t.elapsed() < Duration::from_millis(2800),
        "took {:?}",
        t.elapsed()
    );
    assert_ne!(dm["time"], first["time"], "volatile values travel with it");
    counter.abort();
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_from_a_backend_with_updates_off_are_refused() {
    let d = common::start(Generation::Gen2).await;
    let (b, stop, task) = engine(&d, &local("ro", "updates = false"), &["ro"]);
    let state = d.pv.step("current").await.unwrap();
    b[0].tx
        .send(BackendEvent::Offer(Offer {
            id: "nope".into(),
            state,
            state_url: None,
            objects: BTreeMap::new(),
            fetcher: None,
        }))
        .await
        .unwrap();
    let view = b[0].view().await;
    let p = eventually(Duration::from_secs(5), "refusal", || async {
        view.borrow().update.clone()
    })
    .await;
    assert_eq!(p.status, pv_adapter_api::UpdateStatus::Wontgo);
    assert_eq!(
        p.status_msg,
        "updates from backend \"ro\" are switched off (updates = false)"
    );
    assert!(d.pv.step("locals/nope").await.unwrap_err().is_not_found());
    stop.send(()).unwrap();
    task.await.unwrap();
}
