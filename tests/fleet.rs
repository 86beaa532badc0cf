//! `pv-fleet` (the operator tool) against a real mosquitto, a pv-bridge process
//! with the MQTT backend, and pv-sim: deploy (HTTP objects and MQTT chunk pulls),
//! status, meta, cmd and logs, with their exit codes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::sha256_hex;
use mosquitto::{Bridge, Broker, fleet, retained, wait_for};
use pv_bridge::pvctrl::Meta;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A `pvr export` folder: the running state edited, plus objects.
async fn export(
    d: &common::Device,
    name: &str,
    blob: &[u8],
    edit: impl FnOnce(&mut Value),
) -> PathBuf {
    let dir = d.dir.path().join(name);
    std::fs::create_dir_all(dir.join("objects")).unwrap();
    let mut state: Value = serde_json::from_slice(&d.pv.step("current").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha256_hex(blob));
    edit(&mut state);
    std::fs::write(dir.join("json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::write(dir.join("objects").join(sha256_hex(blob)), blob).unwrap();
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deploys_watches_configures_and_commands_a_device() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 20.0).await;
    let broker = Broker::start(d.dir.path(), "");
    let p = broker.port;
    let _bridge = Bridge::start(
        &d,
        d.dir.path(),
        p,
        "[logs]\npoll_interval_ms = 100\n",
        "chunk_timeout_secs = 2",
    );
    wait_for("online", Duration::from_secs(15), || {
        retained(p, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;

    // Deploy over HTTP served by pv-fleet: exit 0, the device runs it.
    let good = export(&d, "app-v2", &b"app v2".repeat(30_000), |_| {}).await;
    let o = tokio::task::block_in_place(|| {
        fleet(p, &["deploy", path(&good), "-d", "dev-1", "--id", "v2"])
    });
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("UPDATED"), "{}", text(&o));
    assert!(text(&o).contains("1 succeeded, 0 failed"), "{}", text(&o));
    let cur = retained(p, "pv/dev-1/revision/current").unwrap();
    assert_eq!(cur["rev"], "locals/v2");

    // The same kind of deploy from a .tgz archive (as `pvr export` writes it);
    // the offer id defaults to the archive's name.
    let v2b = export(&d, "app-v2b", &b"app v2b".repeat(30_000), |_| {}).await;
    let tgz = d.dir.path().join("app-v2b.tgz");
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&v2b)
        .args(["json", "objects"])
        .status()
        .expect("tar is required");
    assert!(ok.success());
    let o = tokio::task::block_in_place(|| fleet(p, &["deploy", path(&tgz), "-d", "dev-1"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cur = retained(p, "pv/dev-1/revision/current").unwrap();
    assert_eq!(cur["rev"], "locals/app-v2b");

    // A failing revision pulled in chunks over MQTT: ERROR, rollback, exit 1.
    let bad = export(&d, "app-v3", &b"app v3".repeat(30_000), |s| {
        s["_sim/behaviour.json"] = json!({"outcome": "error", "container": "app"})
    })
    .await;
    let o = tokio::task::block_in_place(|| {
        fleet(
            p,
            &[
                "deploy",
                path(&bad),
                "-d",
                "dev-1",
                "--serve",
                "mqtt",
                "--timeout",
                "60",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("ERROR"), "{}", text(&o));
    assert!(
        d.pv.objects()
            .await
            .unwrap()
            .iter()
            .any(|x| x.sha256 == sha256_hex(&b"app v3".repeat(30_000)))
    );

    // The fleet table.
    let o = tokio::task::block_in_place(|| fleet(p, &["status"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("dev-1"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("true") && row.contains("ready"), "{row}");
    assert!(row.contains("app-v3 ERROR"), "{row}");

    // User-meta: set waits for the device to apply it; unset removes it.
    let o = tokio::task::block_in_place(|| {
        fleet(p, &["meta", "set", "dev-1", "app.mode=eco", "app.n=3"])
    });
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let m = d.pv.meta(Meta::User).await.unwrap();
    assert_eq!(
        (m.get("app.mode"), m.get("app.n")),
        (Some(&json!("eco")), Some(&json!("3")))
    );
    let o = tokio::task::block_in_place(|| fleet(p, &["meta", "unset", "dev-1", "app.mode"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let m = d.pv.meta(Meta::User).await.unwrap();
    assert_eq!(
        (m.get("app.mode"), m.get("app.n")),
        (None, Some(&json!("3")))
    );

    // Commands, over MQTT 3.1.1 and 5; a refused one exits 1.
    let o = tokio::task::block_in_place(|| fleet(p, &["cmd", "dev-1", "ping"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("successful"));
    let o = tokio::task::block_in_place(|| fleet(p, &["--protocol", "v5", "cmd", "dev-1", "ping"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = tokio::task::block_in_place(|| fleet(p, &["cmd", "dev-1", "fly"]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("unknown command"), "{}", text(&o));

    // Logs: a few lines of the device's forwarded logs.
    let o = tokio::task::block_in_place(|| fleet(p, &["logs", "dev-1", "-n", "3"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        3,
        "{}",
        text(&o)
    );

    // Usage and connection errors exit 2.
    let o = tokio::task::block_in_place(|| fleet(mosquitto::free_port(), &["status"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("cannot connect"), "{}", text(&o));
    let o = tokio::task::block_in_place(|| fleet(p, &["deploy", "/nonexistent", "-d", "dev-1"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// Fleets outgrow one broker through the brokers' own clustering (#17): the
/// device on one mosquitto, the operator on another, the two bridged with
/// `topic pv/# both`. Protocol v1 works across the boundary: retained status,
/// a deploy whose objects are pulled in chunks over MQTT, and the final status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_v1_works_across_bridged_brokers() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let devices = Broker::start(d.dir.path(), "");
    let ops = Broker::start(
        d.dir.path(),
        &format!(
            "connection to-devices\naddress 127.0.0.1:{}\ntopic pv/# both 1\n\
             bridge_protocol_version mqttv311\ncleansession true\nnotifications false\n",
            devices.port
        ),
    );
    let _bridge = Bridge::start(&d, d.dir.path(), devices.port, "", "chunk_timeout_secs = 5");
    // The device's retained status reaches the operator's broker.
    wait_for("online across the bridge", Duration::from_secs(20), || {
        retained(ops.port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;
    let o = tokio::task::block_in_place(|| fleet(ops.port, &["status"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("dev-1"), "{}", text(&o));
    // A deploy from the operator's side, objects pulled over MQTT through the
    // bridge both ways.
    let v2 = export(&d, "bridged-v2", &b"bridged v2".repeat(20_000), |_| {}).await;
    let o = tokio::task::block_in_place(|| {
        fleet(
            ops.port,
            &[
                "deploy",
                path(&v2),
                "-d",
                "dev-1",
                "--serve",
                "mqtt",
                "--timeout",
                "90",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("1 succeeded, 0 failed"), "{}", text(&o));
    assert_eq!(
        retained(ops.port, "pv/dev-1/revision/current").unwrap()["rev"],
        "locals/bridged-v2"
    );
    assert_eq!(
        retained(devices.port, "pv/dev-1/revision/current").unwrap()["rev"],
        "locals/bridged-v2"
    );
}

/// `pv-fleet deploy` to more devices than its MQTT client queues requests
/// (64): every device's progress must still be heard. The fleet harness found
/// it waiting forever for the 65th. Devices 2 to 70 answer with a retained
/// final progress of the same offer (as a device that finished it would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_to_seventy_devices_hears_all_of_them() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let broker = Broker::start(d.dir.path(), "");
    let p = broker.port;
    let _bridge = Bridge::start(&d, d.dir.path(), p, "", "");
    wait_for("online", Duration::from_secs(15), || {
        retained(p, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;
    let many: Vec<String> = (1..=70).map(|i| format!("dev-{i}")).collect();
    for dev in &many[1..] {
        mosquitto::publish(
            p,
            &format!("pv/{dev}/revision/progress"),
            &json!({"v": 1, "id": "many", "rev": "locals/many", "status": "UPDATED",
                    "status_msg": "done elsewhere", "progress": 100, "bytes_done": 0,
                    "bytes_total": 0, "objects_done": 0, "objects_total": 0,
                    "ts": "2026-11-30T00:00:00Z"})
            .to_string(),
            true,
        );
    }
    let v = export(&d, "many", &b"many".repeat(1000), |_| {}).await;
    let o = tokio::task::block_in_place(|| {
        fleet(
            p,
            &[
                "deploy",
                path(&v),
                "-d",
                &many.join(","),
                "--id",
                "many",
                "--timeout",
                "60",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("70 succeeded, 0 failed"), "{}", text(&o));
}
