//! The hawkBit adapter against goosebit, a DDI server we did not write
//! (reference §8): registration through configData, a rollout installed to
//! DONE with the feedback on the server, a failing revision and its forced
//! retry, a server restart mid-download, and a wrong token.

#![cfg(feature = "hawkbit")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/goosebit.rs"]
mod goosebit;
#[path = "common/hawkbit.rs"]
mod hawkbit;

use std::path::PathBuf;
use std::time::Duration;

use goosebit::Goosebit;
use hawkbit::Bridge;
use serde_json::{Value, json};

async fn wait<T>(
    b: &Bridge,
    g: &Goosebit,
    what: &str,
    within: Duration,
    f: impl FnMut() -> Option<T>,
) -> T {
    hawkbit::wait(b, what, within, || tail(&g.log()), f).await
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn bridge(d: &common::Device, url: &str, more: &str) -> Bridge {
    Bridge::start(d, url, more)
}

/// A `.swu` of the running state with `app/root.squashfs` replaced by `root`
/// (and `extra` keys), written beside the device; returns its path.
async fn release(d: &common::Device, version: &str, root: &[u8], extra: Value) -> PathBuf {
    let tgz = hawkbit::export(d, version, root, extra).await;
    let path = d.dir.path().join(format!("pv-sim-{version}.swu"));
    std::fs::write(&path, goosebit::swu(version, "pv-sim", "1.0", &tgz)).unwrap();
    path
}

async fn registered(b: &Bridge, g: &Goosebit) {
    wait(
        b,
        g,
        "the device's registration",
        Duration::from_secs(30),
        || {
            let dev = g.device("dev-1");
            (dev["hardware"]["model"] == "pv-sim" && dev["hardware"]["revision"] == "1.0")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_installed_and_reported_on_the_server() {
    let d = common::start(pv_testkit::sim::Generation::Gen2).await;
    let g = Goosebit::start(d.dir.path(), &[]);
    let b = bridge(&d, &g.url(), "");
    registered(&b, &g).await;
    assert_eq!(
        g.device("dev-1")["sw_version"],
        "0",
        "the running revision until an update"
    );
    let swu = release(&d, "1.2.3", b"app from goosebit", json!({})).await;
    let id = g.upload(&swu);
    g.rollout("r1", id);
    let dev = wait(
        &b,
        &g,
        "the rollout to finish",
        Duration::from_secs(90),
        || {
            let dev = g.device("dev-1");
            (dev["last_state"] == "Finished" || dev["last_state"] == "Error").then_some(dev)
        },
    )
    .await;
    assert_eq!(dev["last_state"], "Finished", "{dev}\n{}", b.log_text());
    assert_eq!(dev["sw_version"], "1.2.3");
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/1.2.3");
    let log = g.device_log("dev-1");
    for want in [
        "pv-bridge accepted action",
        "sha1 verified",
        "installing revision locals/1.2.3",
        "Pantavisor: ",
    ] {
        assert!(
            log.contains(want),
            "{want:?} missing from the server's log:\n{log}"
        );
    }
    // Nothing is offered again: polls go on, the revision stays.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(g.device("dev-1")["last_state"], "Finished");
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/1.2.3");
    assert_eq!(
        b.log_text().matches("final feedback").count(),
        1,
        "{}",
        b.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_revision_is_reported_and_a_forced_retry_installs_it() {
    let d = common::start(pv_testkit::sim::Generation::Gen2).await;
    let g = Goosebit::start(d.dir.path(), &[]);
    let b = bridge(&d, &g.url(), "");
    registered(&b, &g).await;
    let swu = release(
        &d,
        "1.2.4",
        b"app that needs the network",
        json!({"_sim/behaviour.json": {"outcome": "error", "container": "app", "unless": "network-up"}}),
    )
    .await;
    g.rollout("r1", g.upload(&swu));
    wait(
        &b,
        &g,
        "the failure on the server",
        Duration::from_secs(90),
        || (g.device("dev-1")["last_state"] == "Error").then_some(()),
    )
    .await;
    assert_eq!(d.sim.as_ref().unwrap().running(), "0", "rolled back");
    let log = g.device_log("dev-1");
    assert!(log.contains("Pantavisor: ERROR"), "{log}");
    assert_eq!(g.device("dev-1")["sw_version"], "0");

    // The cause went away; the operator forces the update again. goosebit
    // offers the same action id: it runs again under a new revision name.
    std::fs::write(d.storage().join("network-up"), b"").unwrap();
    g.force_update("dev-1");
    wait(
        &b,
        &g,
        "the retry's success",
        Duration::from_secs(90),
        || (g.device("dev-1")["last_state"] == "Finished").then_some(()),
    )
    .await;
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/1.2.4-retry2");
    assert_eq!(g.device("dev-1")["sw_version"], "1.2.4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_and_a_cut_download_do_not_stop_the_update() {
    let d = common::start(pv_testkit::sim::Generation::Gen2).await;
    let mut g = Goosebit::start(d.dir.path(), &[]);
    let token = d.dir.path().join("hawkbit.token");
    std::fs::write(&token, "a-device-token-0123456789\n").unwrap();
    let b = bridge(
        &d,
        &g.url(),
        &format!("target_token_file = \"{}\"\n", token.display()),
    );
    registered(&b, &g).await;
    // The software lives on another server (goosebit registers it by URL):
    // a slow one, which also cuts the first download.
    let big = common::noise(1_500_000, 5);
    let swu = release(&d, "2.0.0", &big, json!({})).await;
    let files = pv_testkit::objects::ObjectServer::start().await.unwrap();
    files.put("/sw/pv-sim-2.0.0.swu", std::fs::read(&swu).unwrap());
    let id = g.register_url(&files.url("/sw/pv-sim-2.0.0.swu"));
    let fetched_by_goosebit = files.seen().len();
    files.fault(pv_testkit::objects::Fault::CutAfter(400_000));
    files.set_rate(Some(400_000));
    g.rollout("r1", id);
    wait(
        &b,
        &g,
        "the device's download",
        Duration::from_secs(30),
        || (files.seen().len() > fetched_by_goosebit).then_some(()),
    )
    .await;
    // The server goes away for a while in the middle of it.
    g.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    g.restart();
    let dev = wait(
        &b,
        &g,
        "the rollout to finish",
        Duration::from_secs(120),
        || {
            let dev = g.device("dev-1");
            (dev["last_state"] == "Finished" || dev["last_state"] == "Error").then_some(dev)
        },
    )
    .await;
    assert_eq!(dev["last_state"], "Finished", "{dev}\n{}", b.log_text());
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/2.0.0");
    let seen = files.seen();
    let device: Vec<_> = seen[fetched_by_goosebit..].to_vec();
    assert!(
        device.iter().any(|s| s.range_start.is_some_and(|r| r > 0)),
        "the cut download was resumed: {device:?}"
    );
    assert!(
        device.iter().all(|s| !s.authorization),
        "the device's token went to another host: {device:?}"
    );
    assert!(!b.log_text().contains("a-device-token-0123456789"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_clear_error_with_backoff_and_a_fixed_one_works() {
    let d = common::start(pv_testkit::sim::Generation::Gen2).await;
    let g = Goosebit::start(
        d.dir.path(),
        &[
            ("GOOSEBIT_DEVICE_AUTH__ENABLE", "true"),
            ("GOOSEBIT_DEVICE_AUTH__MODE", "strict"),
        ],
    );
    g.create_device("dev-1", "right-token-0123456789");
    let token = d.dir.path().join("hawkbit.token");
    std::fs::write(&token, "wrong-token-0123456789\n").unwrap();
    let b = bridge(
        &d,
        &g.url(),
        &format!(
            "target_token_file = \"{}\"\npoll_interval_secs = 8\n",
            token.display()
        ),
    );
    wait(
        &b,
        &g,
        "the credentials error",
        Duration::from_secs(20),
        || {
            b.log_text()
                .contains("HTTP 401: the server refused the device's credentials")
                .then_some(())
        },
    )
    .await;
    // Backoff: 5 s, then 8 s (the poll interval caps it), not one poll a second.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let refused = g.log().matches("controller/v1/dev-1, status=401").count();
    assert!(
        (2..=4).contains(&refused),
        "{refused} refused polls in about 12 s\n{}",
        g.log()
    );
    assert_eq!(
        b.log_text().matches("hawkBit poll failed").count(),
        1,
        "said once"
    );
    assert!(!b.log_text().contains("wrong-token-0123456789"));
    // The token is read on every request: fixing the file is enough.
    std::fs::write(&token, "right-token-0123456789\n").unwrap();
    registered(&b, &g).await;
}
