//! Protocol v1.1 of the `mqtt` backend against a real mosquitto: what the broker
//! and operators see that v1.0 got wrong (issue #14). Each test names the defect.

#![cfg(feature = "mqtt")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::time::Duration;

use mosquitto::{Bridge, Broker, Recorder, publish, publish_args, retained, wait_for};
use pv_testkit::objects::ObjectServer;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

const ROOT: &str = "pv/dev-1";

async fn online(port: u16) -> Value {
    wait_for("status online", Duration::from_secs(15), || {
        retained(port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await
}

fn connections(b: &Bridge) -> usize {
    b.log_text().matches("INFO connected backend=").count()
}

/// A retained `revision/set` larger than the client's packet limit used to be a
/// connection error: the device reconnected forever (the broker sends the retained
/// message again on every subscribe) and the refusal never went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_retained_offer_is_refused_visibly_and_the_bridge_stays_connected() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    online(broker.port).await;
    // 2 MiB: over max_payload_bytes (1 MiB), under max_read_bytes (16 MiB).
    let big = d.dir.path().join("big-offer.json");
    let filler = "x".repeat(2 * 1024 * 1024);
    std::fs::write(
        &big,
        json!({"v": 1, "id": "huge", "state": {"note": filler}}).to_string(),
    )
    .unwrap();
    publish_args(
        broker.port,
        &[
            "-r",
            "-t",
            "pv/dev-1/revision/set",
            "-f",
            big.to_str().unwrap(),
        ],
    );
    let p = wait_for("the retained refusal", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "WONTGO")
    })
    .await;
    assert_eq!(p["id"], "huge", "{p}");
    assert!(
        p["status_msg"]
            .as_str()
            .unwrap()
            .contains("the limit is 1048576"),
        "{p}"
    );
    assert!(
        rec.json_on("/events")
            .iter()
            .any(|e| e["kind"] == "rejected"),
        "the events message too"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(connections(&bridge), 1, "{}", bridge.log_text());
    // And it goes on: a good offer after it installs.
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["note.json"] = json!({"after": "huge"});
    publish(
        broker.port,
        "pv/dev-1/revision/set",
        &json!({"v": 1, "id": "next", "state": state}).to_string(),
        true,
    );
    wait_for("the next offer", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress")
            .filter(|p| p["id"] == "next" && (p["status"] == "UPDATED" || p["status"] == "DONE"))
    })
    .await;
    assert_eq!(connections(&bridge), 1);
    assert!(mosquitto::check_published(ROOT, &rec.messages()) >= 5);
}

/// Above even `max_read_bytes` the client must drop the connection (it cannot
/// skip a packet); the refusal still reaches the operator after the reconnect,
/// and the reconnects back off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_beyond_max_read_bytes_is_named_after_the_reconnect() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let bridge = Bridge::start(
        &d,
        d.dir.path(),
        broker.port,
        "",
        "max_payload_bytes = 65536\nmax_read_bytes = 131072\n",
    );
    bridge
        .wait_log("connected", Duration::from_secs(15), |l| {
            l.contains("INFO connected backend=")
        })
        .await;
    let big = d.dir.path().join("bigger.json");
    std::fs::write(&big, "y".repeat(512 * 1024)).unwrap();
    publish_args(
        broker.port,
        &[
            "-r",
            "-t",
            "pv/dev-1/meta/user/set",
            "-f",
            big.to_str().unwrap(),
        ],
    );
    let p = wait_for(
        "the refusal after reconnecting",
        Duration::from_secs(20),
        || retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "WONTGO"),
    )
    .await;
    assert!(
        p["status_msg"]
            .as_str()
            .unwrap()
            .contains("larger than max_read_bytes (131072 bytes)"),
        "{p}"
    );
    // Cleared by the operator: the bridge settles (after its current backoff).
    publish_args(broker.port, &["-r", "-n", "-t", "pv/dev-1/meta/user/set"]);
    wait_for("status online again", Duration::from_secs(90), || {
        retained(broker.port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;
    let n = connections(&bridge);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        connections(&bridge) <= n + 1,
        "still reconnecting: {}",
        bridge.log_text()
    );
}

/// An empty retained `revision/set` withdraws the offer: it used to be ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_an_offer_cancels_it_before_it_starts() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let srv = ObjectServer::start().await.unwrap();
    // 2 MiB at 128 KiB/s: time to withdraw it mid-download.
    let _bridge = Bridge::start(
        &d,
        d.dir.path(),
        broker.port,
        "[updates]\nbandwidth_limit = 131072\n",
        "",
    );
    online(broker.port).await;
    let root: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 249) as u8).collect();
    let sha = common::sha256_hex(&root);
    srv.put("/o/slow", root.clone());
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha);
    let offer = json!({"v": 1, "id": "w1", "state": state,
        "objects": {sha: {"url": srv.url("/o/slow"), "size": root.len()}}});
    publish(
        broker.port,
        "pv/dev-1/revision/set",
        &offer.to_string(),
        true,
    );
    wait_for("DOWNLOADING", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "DOWNLOADING")
    })
    .await;
    publish_args(broker.port, &["-r", "-n", "-t", "pv/dev-1/revision/set"]);
    let p = wait_for("CANCELLED", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "CANCELLED")
    })
    .await;
    assert_eq!(p["id"], "w1");
    assert_eq!(d.sim.as_ref().unwrap().running(), "0");
}

/// Command answers used to be published again after every reconnect (the view
/// keeps the last commands); the broker restarts here, and `capabilities` and the
/// session number come with the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_go_once_and_each_connection_says_its_session_and_capabilities() {
    let d = common::start(Generation::Gen2).await;
    let mut broker = Broker::start(d.dir.path(), "");
    let bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    let first = online(broker.port).await;
    let caps = retained(broker.port, "pv/dev-1/capabilities").expect("capabilities");
    assert!(
        mosquitto::validator("capabilities").is_valid(&caps),
        "{caps}"
    );
    assert_eq!(caps["protocol"], "1.1");
    assert_eq!(caps["response_topic_prefix"], "pv/dev-1/replies/");
    let rec = Recorder::start(broker.port, "pv/dev-1/cmd/#", d.dir.path());
    publish(
        broker.port,
        "pv/dev-1/cmd/ping",
        r#"{"v":1,"id":"once"}"#,
        false,
    );
    wait_for("the answer", Duration::from_secs(10), || {
        rec.json_on("/cmd/ping/res/once")
            .iter()
            .any(|v| v["status"] == "successful")
            .then_some(())
    })
    .await;
    drop(rec);
    broker.restart();
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let second = wait_for("a new session", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/status")
            .filter(|s| s["online"] == true && s["session"] != first["session"])
    })
    .await;
    assert!(
        second["session"].as_u64() > first["session"].as_u64(),
        "{first} then {second}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        rec.json_on("/cmd/ping/res/once").is_empty(),
        "the answer was published again after the reconnect"
    );
    assert!(retained(broker.port, "pv/dev-1/capabilities").is_some());
    drop(bridge);
}
