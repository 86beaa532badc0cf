//! The Pantacor Hub adapter as the real hub and a real fleet see it: requests
//! counted, logins failed on purpose, path-token URLs, restarts mid-update. Each
//! test names the defect it guards against (issue #14).

#![cfg(feature = "pantahub")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/pantahub.rs"]
mod hubkit;

use std::time::Duration;

use hubkit::{Bridge, claimed, final_on_hub, hub_status, next_state, wait};
use pv_testkit::hub::{Action, FakeHub, Fault, HubConfig, Seen};
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

/// Device-meta read often, so that the engine's view changes all the time (as
/// Pantavisor's `time` and `sysinfo` make it do).
const BUSY_VIEW: &str = "[metadata]\ndevice_meta_interval_ms = 200\ndevice_meta_min_interval_secs = 0\ndevice_meta_volatile_interval_secs = 0\n";

fn progress_puts(seen: &[Seen], id: &str, rev: i64) -> usize {
    let path = format!("/trails/{id}/steps/{rev}/progress");
    seen.iter()
        .filter(|s| s.method == "PUT" && s.path == path)
        .count()
}

/// A final status used to be PUT again on every view change, forever: one hub
/// request per device every few seconds, and a `hub.json` rewrite each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_status_is_sent_until_the_hub_has_it_then_never_again() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, BUSY_VIEW, "").await;
    let state = next_state(&d, &hub, b"new root", json!({})).await;
    assert_eq!(hub.post_step(&id, &state, "one").0, 200);
    assert!(["DONE", "UPDATED"].contains(&final_on_hub(&b, &hub, &id, 1).await.as_str()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_final = progress_puts(&hub.seen(), &id, 1);
    let hub_json = b.state.join("adapters/hub/hub.json");
    let written = std::fs::metadata(&hub_json).unwrap().modified().unwrap();
    // Five seconds of a view changing every 200 ms.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        progress_puts(&hub.seen(), &id, 1) - after_final,
        0,
        "the final status was sent again after the hub had it"
    );
    assert_eq!(
        std::fs::metadata(&hub_json).unwrap().modified().unwrap(),
        written,
        "hub.json rewritten while nothing changed"
    );
    let memory: Value = serde_json::from_slice(&std::fs::read(&hub_json).unwrap()).unwrap();
    assert_eq!(memory["finals"], json!({}), "{memory}");
    // Pantavisor's `retries` is in every progress body.
    let history = hub.progress_history(&id, 1);
    assert!(
        history.iter().all(|p| p["retries"].as_u64() == Some(1)),
        "{history:?}"
    );
}

/// A final PUT the hub keeps refusing used to hold back every later step, and
/// was retried every poll without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_the_hub_refuses_does_not_block_later_steps_and_backs_off() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let one = next_state(&d, &hub, b"root one", json!({})).await;
    assert_eq!(hub.post_step(&id, &one, "one").0, 200);
    // Every progress PUT of rev 1 fails from now on: the hub keeps listing it.
    hub.fault(Fault::new(
        Some("PUT"),
        &format!("/trails/{id}/steps/1/progress"),
        Action::Status(400),
        10_000,
    ));
    wait(&b, "rev 1 running", Duration::from_secs(60), || {
        (d.sim.as_ref().unwrap().running() == "locals/hub-1").then_some(())
    })
    .await;
    let hub_json = b.state.join("adapters/hub/hub.json");
    wait(
        &b,
        "the final of rev 1 remembered",
        Duration::from_secs(60),
        || {
            let m: Value = serde_json::from_slice(&std::fs::read(&hub_json).ok()?).ok()?;
            m["finals"]["1"]["status"]
                .as_str()
                .is_some_and(|s| s == "DONE" || s == "UPDATED")
                .then_some(())
        },
    )
    .await;
    let two = next_state(&d, &hub, b"root two", json!({})).await;
    assert_eq!(hub.post_step(&id, &two, "two").0, 200);
    assert!(["DONE", "UPDATED"].contains(&final_on_hub(&b, &hub, &id, 2).await.as_str()));
    // Sent again with a growing wait: at 0.3 s polls, 10 s are 33 polls.
    let before = progress_puts(&hub.seen(), &id, 1);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let again = progress_puts(&hub.seen(), &id, 1) - before;
    assert!(
        again <= 4,
        "the refused final was sent {again} times in 10 s"
    );
    assert!(!hub_status(&hub, &id, 1).is_empty());
}

/// One 401/403/404 on an object's metadata used to end the update WONTGO for
/// good; Pantavisor tries again and counts the takes (`retries`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_metadata_refusals_are_retried_and_counted_then_wontgo() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "revision_retries = 4\n").await;
    let state = next_state(&d, &hub, b"flaky root", json!({})).await;
    let sha = state["app/root.squashfs"].as_str().unwrap().to_owned();
    hub.fault(Fault::new(
        Some("GET"),
        &format!("/objects/{sha}"),
        Action::Status(403),
        2,
    ));
    assert_eq!(hub.post_step(&id, &state, "flaky").0, 200);
    assert!(["DONE", "UPDATED"].contains(&final_on_hub(&b, &hub, &id, 1).await.as_str()));
    let history = hub.progress_history(&id, 1);
    assert_eq!(
        history.last().unwrap()["retries"],
        json!(3),
        "two refused takes, then the third: {history:?}"
    );
    // An object the hub never gives: WONTGO once the takes run out, with why.
    let state = next_state(&d, &hub, b"gone root", json!({})).await;
    let sha = state["app/root.squashfs"].as_str().unwrap().to_owned();
    hub.fault(Fault::new(
        Some("GET"),
        &format!("/objects/{sha}"),
        Action::Status(403),
        1000,
    ));
    assert_eq!(hub.post_step(&id, &state, "gone").0, 200);
    assert_eq!(final_on_hub(&b, &hub, &id, 2).await, "WONTGO");
    let last = hub.progress_history(&id, 2).last().cloned().unwrap();
    let msg = last["status-msg"].as_str().unwrap();
    assert!(
        msg.starts_with("Max update processing retries reached") && msg.contains(&sha),
        "{msg}"
    );
}

/// Any 401/403/404 at start used to delete a self-registered device's
/// credentials and register a new, unclaimed device: a WAF or a maintenance page
/// was enough to lose a claimed device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_device_keeps_its_identity_when_the_hub_refuses_it_at_start() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let creds = b.state.join("adapters/hub/pantahub.creds");
    let before = std::fs::read(&creds).unwrap();
    drop(b);
    let dir = d.dir.path().join("second");
    std::fs::create_dir_all(&dir).unwrap();
    // The same state directory: start the bridge again from the same config.
    let path = format!("/devices/{id}");
    hub.fault(Fault::new(Some("GET"), &path, Action::Status(403), 2));
    hub.fault(Fault::new(Some("GET"), &path, Action::Status(404), 1));
    hub.fault(Fault::new(Some("GET"), &path, Action::Status(401), 1));
    let registrations = |hub: &FakeHub| {
        hub.seen()
            .iter()
            .filter(|s| s.method == "POST" && s.path == "/devices/")
            .count()
    };
    let before_regs = registrations(&hub);
    let seen_before = hub.seen().len();
    let b = Bridge::start(&d, d.dir.path(), &hub, "", "");
    wait(
        &b,
        "a poll for steps after the refusals",
        Duration::from_secs(60),
        || {
            hub.seen()[seen_before..]
                .iter()
                .any(|s| s.path.starts_with(&format!("/trails/{id}/steps")))
                .then_some(())
        },
    )
    .await;
    assert_eq!(registrations(&hub), before_regs, "registered again");
    assert_eq!(hub.device_ids(), vec![id.clone()]);
    assert_eq!(
        std::fs::read(&creds).unwrap(),
        before,
        "credentials changed"
    );
    assert!(b.state.join("adapters/hub/claimed").exists());
    assert!(
        b.log_text().contains("keeping its identity"),
        "{}",
        b.log_text()
    );
}

/// Pantacor's object token is the URL path (`/local-s3/<JWT>`, a day's access):
/// it must not reach the bridge's log, a status on the hub, or the logs the
/// bridge forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_url_tokens_never_reach_logs_or_statuses() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let state = next_state(&d, &hub, b"never downloaded", json!({})).await;
    hub.fault(Fault::new(
        Some("GET"),
        "/local-s3/",
        Action::Status(404),
        10_000,
    ));
    assert_eq!(hub.post_step(&id, &state, "unreachable").0, 200);
    let status = final_on_hub(&b, &hub, &id, 1).await;
    assert!(["WONTGO", "ERROR"].contains(&status.as_str()), "{status}");
    let tokens = hub.signed_tokens();
    assert!(!tokens.is_empty());
    let log = b.log_text();
    let history = Value::Array(hub.progress_history(&id, 1)).to_string();
    let logs = Value::Array(hub.logs()).to_string();
    for t in &tokens {
        // The signature part is what grants access; check the whole token too.
        let sig = t.rsplit('.').next().unwrap();
        for (what, text) in [("log", &log), ("progress", &history), ("hub logs", &logs)] {
            assert!(!text.contains(sig), "a signed URL token reached the {what}");
        }
    }
    assert!(
        log.contains("/…"),
        "downloads are still named (redacted): {log}"
    );
}

/// A step taken before a restart used to be offered again with QUEUED, moving
/// the hub's INPROGRESS or TESTING backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_update_never_moves_the_hub_backwards() {
    let d = common::start_with(Generation::Gen2, |c| {
        c.commit_delay = Duration::from_secs(6)
    })
    .await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let state = next_state(&d, &hub, b"restart root", json!({})).await;
    assert_eq!(hub.post_step(&id, &state, "restart").0, 200);
    wait(&b, "TESTING on the hub", Duration::from_secs(60), || {
        (hub_status(&hub, &id, 1) == "TESTING").then_some(())
    })
    .await;
    drop(b);
    let b = Bridge::start(&d, d.dir.path(), &hub, "", "");
    assert!(["DONE", "UPDATED"].contains(&final_on_hub(&b, &hub, &id, 1).await.as_str()));
    let statuses: Vec<String> = hub
        .progress_history(&id, 1)
        .iter()
        .map(|p| p["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    let testing = statuses.iter().position(|s| s == "TESTING").unwrap();
    assert!(
        statuses[testing..]
            .iter()
            .all(|s| ["TESTING", "DONE", "UPDATED"].contains(&s.as_str())),
        "{statuses:?}"
    );
}

/// The factory sync used to upload each object whole before the hub checked its
/// hash (a writable object whose bytes changed is refused), and again on every
/// retry of the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_sync_hashes_first_and_uploads_each_object_once() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    // Two failed passes after the uploads.
    hub.fault(Fault::new(Some("POST"), "/trails/", Action::Status(500), 2));
    let (b, id) = claimed(&d, &hub, "", "").await;
    let running: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let objects: std::collections::BTreeSet<&str> = running
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_str)
        .filter(|s| s.len() == 64)
        .collect();
    let puts = hub
        .seen()
        .iter()
        .filter(|s| s.method == "PUT" && s.path.starts_with("/local-s3/"))
        .count();
    assert_eq!(
        puts,
        objects.len(),
        "each object uploaded once over 3 passes"
    );
    assert!(hub.factory_state(&id).is_some());
    drop(b);
}

/// A writable object whose bytes changed since install is skipped without being
/// sent (Pantavisor hashes it first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_object_is_not_uploaded() {
    let d = common::start(Generation::Gen2).await;
    let running: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let (name, sha) = running
        .as_object()
        .unwrap()
        .iter()
        .find_map(|(k, v)| {
            v.as_str()
                .filter(|s| s.len() == 64)
                .map(|s| (k.clone(), s.to_owned()))
        })
        .unwrap();
    let path = d.storage().join("objects").join(&sha);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let b = Bridge::start(&d, d.dir.path(), &hub, "", "");
    let id = wait(&b, "registration", Duration::from_secs(20), || {
        hub.device_ids().first().cloned()
    })
    .await;
    assert_eq!(hub.claim(&id), 200);
    wait(&b, "the skip in the log", Duration::from_secs(30), || {
        b.log_text()
            .contains("no longer match its name")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!hub.has_blob(&sha), "{name} was uploaded");
    let objects_posts = hub
        .seen()
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/objects/")
        .count();
    let distinct = running
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_str)
        .filter(|s| s.len() == 64)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(
        objects_posts < distinct,
        "{objects_posts} POST /objects/ for {distinct} objects, one of them changed"
    );
}
