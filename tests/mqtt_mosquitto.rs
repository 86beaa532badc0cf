//! The MQTT adapter against a real mosquitto (Debian package `mosquitto`, started
//! here on a random loopback port), with operator actions done by `mosquitto_pub`
//! and `mosquitto_sub`. A missing mosquitto fails these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::sha256_hex;
use pv_testkit::objects::ObjectServer;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

struct Broker {
    child: Child,
    port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker(dir: &Path) -> Broker {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    // Debian puts the broker in /usr/sbin, often outside a user's PATH.
    let exe = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "mosquitto is required for these tests: apt-get install -y mosquitto mosquitto-clients",
        );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker { child, port }
}

/// The retained message on `topic`, if any (waits up to 2 s).
fn retained(port: u16, topic: &str) -> Option<Value> {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "2",
        ])
        .output()
        .expect("mosquitto_sub is required: apt-get install -y mosquitto-clients");
    serde_json::from_slice(&out.stdout).ok()
}

fn publish(port: u16, topic: &str, payload: &str, retain: bool) {
    let mut args = vec![
        "-h".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-q".into(),
        "1".into(),
        "-t".into(),
        topic.into(),
        "-m".into(),
        payload.into(),
    ];
    if retain {
        args.push("-r".into());
    }
    let ok = Command::new("mosquitto_pub").args(&args).status().unwrap();
    assert!(ok.success());
}

fn bridge(dir: &Path, socket: &Path, port: u16) -> Child {
    let cfg: PathBuf = dir.join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[[backend]]\ntype = \"mqtt\"\nname = \"plant\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ndevice_id = \"dev-1\"\n",
            socket.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(dir.join("bridge.log")).unwrap())
        .spawn()
        .unwrap()
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = tokio::task::block_in_place(&mut f) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_over_mosquitto_installs_and_the_last_will_reports_lost() {
    let d = common::start(Generation::Gen2).await;
    let broker = start_broker(d.dir.path());
    let srv = ObjectServer::start().await.unwrap();
    let mut bridge = bridge(d.dir.path(), &d.cfg().socket, broker.port);
    let log = || std::fs::read_to_string(d.dir.path().join("bridge.log")).unwrap_or_default();

    let status = wait_for("status online", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;
    assert_eq!(
        (status["v"].as_u64(), status["state"].as_str()),
        (Some(1), Some("ready")),
        "{status}"
    );

    // A malformed offer is rejected on `events`; the bridge keeps working.
    let events = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "pv/dev-1/events",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(
        broker.port,
        "pv/dev-1/revision/set",
        r#"{"v":1,"id":"bad/id"}"#,
        false,
    );
    let out = tokio::task::block_in_place(|| events.wait_with_output()).unwrap();
    let ev: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", out.stdout, log()));
    assert_eq!(ev["kind"], "rejected");
    assert_eq!(ev["topic"], "pv/dev-1/revision/set");
    assert!(
        ev["reason"].as_str().unwrap().contains("must be 1 to 64"),
        "{ev}"
    );

    // A retained offer with a URL object installs.
    let root = b"app over mqtt".repeat(4000);
    let sha = sha256_hex(&root);
    srv.put("/o/root", root.clone());
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha);
    let offer = json!({"v": 1, "id": "m1", "state": state,
        "objects": {sha.clone(): {"url": srv.url("/o/root"), "size": root.len()}}});
    publish(
        broker.port,
        "pv/dev-1/revision/set",
        &offer.to_string(),
        true,
    );
    let p = wait_for("UPDATED", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "UPDATED")
    })
    .await;
    assert_eq!(
        (p["id"].as_str(), p["rev"].as_str()),
        (Some("m1"), Some("locals/m1")),
        "{p}"
    );
    let cur = retained(broker.port, "pv/dev-1/revision/current").unwrap();
    assert_eq!(cur["rev"], "locals/m1");

    // kill -9: the broker publishes the last will.
    bridge.kill().unwrap();
    bridge.wait().unwrap();
    let lost = wait_for("LWT", Duration::from_secs(10), || {
        retained(broker.port, "pv/dev-1/status").filter(|s| s["state"] == "lost")
    })
    .await;
    assert_eq!(lost, json!({"v": 1, "online": false, "state": "lost"}));

    // Restarted, the retained offer of a finished update does not run again.
    let mut bridge = self::bridge(d.dir.path(), &d.cfg().socket, broker.port);
    wait_for(
        "online again, naming the running revision",
        Duration::from_secs(15),
        || {
            retained(broker.port, "pv/dev-1/status")
                .filter(|s| s["online"] == true && s["revision"] == "locals/m1")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs =
        std::fs::read_to_string(d.storage().join("logs/locals/m1/pantavisor/pantavisor.log"))
            .unwrap_or_default()
            + &std::fs::read_to_string(d.storage().join("logs/0/pantavisor/pantavisor.log"))
                .unwrap_or_default();
    assert_eq!(
        runs.matches("processing command LOCAL_RUN \"locals/m1\"")
            .count(),
        1,
        "{}",
        log()
    );

    // A graceful stop says `offline`, not the last will's `lost`.
    let term = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {}", bridge.id()))
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::block_in_place(|| bridge.wait()).unwrap();
    assert_eq!(status.code(), Some(0), "{}", log());
    let bye = retained(broker.port, "pv/dev-1/status").unwrap();
    assert_eq!(
        (bye["online"].as_bool(), bye["state"].as_str()),
        (Some(false), Some("offline")),
        "{bye}"
    );
}
