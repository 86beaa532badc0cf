//! The D-Bus API against a real `dbus-daemon` (Debian package `dbus-daemon`), with
//! `dbus-send`, `dbus-monitor` and `busctl` as the clients.

#![cfg(feature = "dbus")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pv_testkit::sim::Generation;
use serde_json::{Value, json};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private session bus on the socket `sock`; returns it and its address.
fn bus(sock: &Path) -> (Kill, String) {
    let sock = sock.to_owned();
    let addr = format!("unix:path={}", sock.display());
    let child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--nopidfile", "--address"])
        .arg(&addr)
        .stdout(Stdio::null())
        .spawn()
        .expect("dbus-daemon is needed: apt-get install -y dbus-daemon dbus-bin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "dbus-daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Kill(child), addr)
}

fn dbus_send(addr: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("dbus-send")
        .arg(format!("--bus={addr}"))
        .args([
            "--print-reply",
            "--dest=org.pantavisor.Bridge1",
            "/org/pantavisor/Bridge1",
        ])
        .args(args)
        .output()
        .expect("dbus-send");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn property(addr: &str, name: &str) -> (bool, String) {
    dbus_send(
        addr,
        &[
            "org.freedesktop.DBus.Properties.Get",
            "string:org.pantavisor.Bridge1",
            &format!("string:{name}"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_on_a_real_bus_and_signals_an_update() {
    let d = common::start(Generation::Gen2).await;
    let (_daemon, addr) = bus(&d.dir.path().join("bus"));
    let usb = d.dir.path().join("usb");
    std::fs::create_dir_all(&usb).unwrap();
    let cfg = d.dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[dbus]\nbus = \"{addr}\"\n[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"{}\"\nscan_interval_secs = 0.2\n",
            d.cfg().socket.display(),
            d.storage().join("logs").display(),
            d.dir.path().join("state").display(),
            usb.display()
        ),
    )
    .unwrap();
    let log = d.dir.path().join("bridge.log");
    let _bridge = Kill(
        Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let version = common::eventually(
        Duration::from_secs(20),
        "the service on the bus",
        || async {
            let (ok, out) = property(&addr, "Version");
            ok.then_some(out)
        },
    )
    .await;
    assert!(
        version.contains(&format!("string \"{}\"", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let rev = common::eventually(Duration::from_secs(10), "Revision", || async {
        let (ok, out) = property(&addr, "Revision");
        (ok && out.contains("string \"0\"")).then_some(out)
    })
    .await;
    assert!(rev.contains("variant"), "{rev}");
    let backends = common::eventually(Duration::from_secs(10), "Backends", || async {
        let (ok, out) = property(&addr, "Backends");
        (ok && out.contains("string \"usb\"") && out.contains("boolean true")).then_some(out)
    })
    .await;
    assert!(backends.contains("struct"), "{backends}");

    // Methods: nothing to cancel yet; Resync works.
    let (ok, out) = dbus_send(&addr, &["org.pantavisor.Bridge1.CancelUpdate"]);
    assert!(!ok && out.contains("no update to cancel"), "{out}");
    let (ok, out) = dbus_send(&addr, &["org.pantavisor.Bridge1.Resync"]);
    assert!(ok, "{out}");

    // Signals while an update runs.
    let monitor_out = d.dir.path().join("monitor.txt");
    let _monitor = Kill(
        Command::new("dbus-monitor")
            .arg("--address")
            .arg(&addr)
            .arg("type='signal',interface='org.pantavisor.Bridge1'")
            .stdout(std::fs::File::create(&monitor_out).unwrap())
            .spawn()
            .expect("dbus-monitor"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let root = pv_testkit::sim::factory::blob("dbus-root", 64 * 1024);
    let sha = common::sha256_hex(&root);
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha);
    let staging = d.dir.path().join("staging");
    std::fs::create_dir_all(staging.join("objects")).unwrap();
    std::fs::write(staging.join("json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::write(staging.join("objects").join(&sha), &root).unwrap();
    std::fs::rename(&staging, usb.join("via-dbus")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let t = std::fs::read_to_string(&monitor_out).unwrap_or_default();
        if t.contains("string \"UPDATED\"") {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no UpdateProgress UPDATED; monitor:\n{t}\nbridge:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(text.contains("member=UpdateProgress"), "{text}");
    assert!(text.contains("string \"via-dbus\""), "{text}");
    assert!(text.contains("string \"locals/via-dbus\""), "{text}");
    assert!(
        text.contains("member=PropertiesChanged") || text.contains("UpdateProgress"),
        "{text}"
    );

    // Status as JSON, read with busctl.
    let out = Command::new("busctl")
        .arg(format!("--address={addr}"))
        .args([
            "call",
            "org.pantavisor.Bridge1",
            "/org/pantavisor/Bridge1",
            "org.pantavisor.Bridge1",
            "Status",
            "--json=short",
        ])
        .output()
        .expect("busctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    let status: Value = serde_json::from_str(reply["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(status["revision"], "locals/via-dbus");
    assert_eq!(status["update"]["status"], "UPDATED");
    assert_eq!(status["update"]["backend"], "usb");
    assert_eq!(status["backends"][0]["name"], "usb");
    let (_, out) = property(&addr, "UpdateStatus");
    assert!(out.contains("string \"UPDATED\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bus_is_retried_and_the_bridge_keeps_working() {
    let d = common::start(Generation::Gen2).await;
    let cfg = d.dir.path().join("bridge.toml");
    let gone = d.dir.path().join("no-bus");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[dbus]\nbus = \"unix:path={}\"\n",
            d.cfg().socket.display(),
            d.dir.path().join("state").display(),
            gone.display()
        ),
    )
    .unwrap();
    let log = d.dir.path().join("bridge.log");
    let mut bridge = Kill(
        Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    common::eventually(
        Duration::from_secs(20),
        "the warning and pv-ctrl",
        || async {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            (t.contains("cannot serve the D-Bus API") && t.contains("pv-ctrl reachable"))
                .then_some(())
        },
    )
    .await;
    assert!(
        bridge.0.try_wait().unwrap().is_none(),
        "the bridge is still running"
    );
    // The bus appears: the API comes up without a restart.
    let (_daemon, addr) = bus(&gone);
    common::eventually(
        Duration::from_secs(90),
        "the API on the late bus",
        || async { property(&addr, "Version").0.then_some(()) },
    )
    .await;
}

#[path = "common/mosquitto.rs"]
mod mosquitto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_health_changes_are_signalled() {
    let d = common::start(Generation::Gen2).await;
    let (_daemon, addr) = bus(&d.dir.path().join("bus"));
    let mut broker = mosquitto::Broker::start(d.dir.path(), "");
    let cfg = d.dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[dbus]\nbus = \"{addr}\"\n[[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"dev-1\"\nbroker = \"mqtt://127.0.0.1:{}\"\nkeep_alive_secs = 5\n",
            d.cfg().socket.display(),
            d.dir.path().join("state").display(),
            broker.port
        ),
    )
    .unwrap();
    let _bridge = Kill(
        Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::eventually(
        Duration::from_secs(20),
        "plant connected on D-Bus",
        || async {
            let (ok, out) = property(&addr, "Backends");
            (ok && out.contains("string \"plant\"") && out.contains("boolean true")).then_some(())
        },
    )
    .await;
    let monitor_out = d.dir.path().join("monitor.txt");
    let _monitor = Kill(
        Command::new("dbus-monitor")
            .arg("--address")
            .arg(&addr)
            .arg("type='signal',interface='org.pantavisor.Bridge1'")
            .stdout(std::fs::File::create(&monitor_out).unwrap())
            .spawn()
            .expect("dbus-monitor"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.stop();
    let text = common::eventually(Duration::from_secs(30), "BackendHealthChanged", || async {
        let t = std::fs::read_to_string(&monitor_out).unwrap_or_default();
        (t.contains("member=BackendHealthChanged") && t.contains("boolean false")).then_some(t)
    })
    .await;
    assert!(text.contains("string \"plant\""), "{text}");
    let (_, out) = property(&addr, "Backends");
    assert!(out.contains("boolean false"), "{out}");
}

/// The Pantacor Hub claim challenge is for the person installing the device: it
/// shows on D-Bus (`Notices`) while the device is unclaimed and goes away once it
/// is claimed. It never reaches device-meta, which every backend publishes.
#[cfg(feature = "pantahub")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_challenge_is_a_local_notice_until_claimed() {
    use pv_testkit::hub::{FakeHub, HubConfig};
    let d = common::start(Generation::Gen2).await;
    let (_daemon, addr) = bus(&d.dir.path().join("bus"));
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let cfg = d.dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[dbus]\nbus = \"{addr}\"\n[[backend]]\ntype = \"pantahub\"\nname = \"hub\"\nurl = \"{}\"\ninsecure = true\npoll_interval_secs = 0.3\n",
            d.cfg().socket.display(),
            d.dir.path().join("state").display(),
            hub.url()
        ),
    )
    .unwrap();
    let _bridge = Kill(
        Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let id = common::eventually(Duration::from_secs(20), "registration", || async {
        hub.device_ids().first().cloned()
    })
    .await;
    let challenge = hub.device(&id).unwrap()["challenge"]
        .as_str()
        .unwrap()
        .to_owned();
    let notices = common::eventually(Duration::from_secs(20), "the notice", || async {
        let (ok, out) = property(&addr, "Notices");
        (ok && out.contains(&challenge)).then_some(out)
    })
    .await;
    assert!(notices.contains("string \"hub\""), "{notices}");
    assert!(notices.contains(&id), "{notices}");
    let dm = d.pv.meta(pv_bridge::pvctrl::Meta::Device).await.unwrap();
    assert!(
        !serde_json::to_string(&dm).unwrap().contains(&challenge),
        "{dm:?}"
    );
    assert_eq!(hub.claim(&id), 200);
    common::eventually(Duration::from_secs(20), "the notice gone", || async {
        let (ok, out) = property(&addr, "Notices");
        (ok && !out.contains(&challenge)).then_some(())
    })
    .await;
}
