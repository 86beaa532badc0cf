//! The Pantavisor container (#7): `container/build.sh` builds the static x86_64
//! image; its state fragment passes our own state validator; the binary inside the
//! image runs (`--version`, `check-config` of the baked configuration); and the
//! fragment installed into pv-sim through the local adapter replaces the running
//! bridge with the one from the image, as a non-reboot transition. The armv7
//! image (#17) builds too, and its binary runs under `qemu-arm` (Debian package
//! `qemu-user`): `--version`, `check-config`, and an update through pv-sim.

#![cfg(feature = "local")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pv_bridge::state::State;
use pv_testkit::sim::Generation;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the container into `out` (the static binary comes from cargo, so a
/// second build in the same checkout is quick).
fn build(out: &Path) {
    build_for("x86_64", out);
}

fn build_for(arch: &str, out: &Path) {
    let status = Command::new("bash")
        .arg(repo().join("container/build.sh"))
        .arg(arch)
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "0")
        .status()
        .expect("bash");
    assert!(status.success(), "container/build.sh failed");
}

fn run(bin: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Bridge(Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_bridge(bin: &Path, cfg: &Path, log: &Path) -> Bridge {
    start_bridge_with(Command::new(bin), cfg, log)
}

fn start_bridge_with(mut cmd: Command, cfg: &Path, log: &Path) -> Bridge {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Bridge(
        cmd.args(["run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_builds_validates_runs_and_updates_the_bridge_itself() {
    let d = common::start(Generation::Gen2).await;
    let out = d.dir.path().join("ctr");
    build(&out);

    // The image is reproducible: a second build gives the same bytes.
    let again = d.dir.path().join("ctr2");
    build(&again);
    assert_eq!(
        common::sha256_hex(&std::fs::read(out.join("root.squashfs")).unwrap()),
        common::sha256_hex(&std::fs::read(again.join("root.squashfs")).unwrap()),
        "root.squashfs differs between two builds"
    );

    // The fragment merged into the device's running state passes our validator,
    // and every object it names is there with the right sha256.
    let fragment: Value =
        serde_json::from_slice(&std::fs::read(out.join("fragment.json")).unwrap()).unwrap();
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    for (k, v) in fragment.as_object().unwrap() {
        state[k] = v.clone();
    }
    let parsed = State::from_value(state.clone()).expect("the merged state is valid");
    for (key, sha) in parsed.objects() {
        if key.starts_with("pv-bridge/") {
            let bytes = std::fs::read(out.join("objects").join(sha)).unwrap();
            assert_eq!(common::sha256_hex(&bytes), sha, "{key}");
        }
    }
    assert_eq!(fragment["pv-bridge/run.json"]["roles"][0], "mgmt");
    assert_eq!(fragment["pv-bridge/run.json"]["status_goal"], "READY");

    // Unpack the image and run what is inside it.
    let unpacked = d.dir.path().join("unpacked");
    let st = Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&unpacked)
        .arg(out.join("root.squashfs"))
        .status()
        .expect("unsquashfs is needed: apt-get install -y squashfs-tools");
    assert!(st.success());
    let bin = unpacked.join("usr/bin/pv-bridge");
    let (code, text) = run(&bin, &["--version"]);
    assert_eq!(
        (code, text.trim()),
        (
            0,
            format!("pv-bridge {}", env!("CARGO_PKG_VERSION")).as_str()
        )
    );
    let (code, text) = run(
        &bin,
        &[
            "check-config",
            unpacked.join("etc/pv-bridge/config.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(": OK") && text.contains("updates (local)"),
        "{text}"
    );
    let file = Command::new("file").arg(&bin).output().unwrap();
    let kind = String::from_utf8_lossy(&file.stdout);
    assert!(kind.contains("statically linked"), "{kind}");
    assert!(unpacked.join("etc/ssl/certs/ca-certificates.crt").exists());

    // The bridge from the image installs its own new revision through the local
    // adapter: only pv-bridge's objects change and its restart_policy is
    // `container`, so Pantavisor restarts just that container (non-reboot).
    let usb = d.dir.path().join("usb");
    let export = d.dir.path().join("staging");
    std::fs::create_dir_all(export.join("objects")).unwrap();
    std::fs::write(
        export.join("json"),
        serde_json::to_vec_pretty(&state).unwrap(),
    )
    .unwrap();
    for entry in std::fs::read_dir(out.join("objects")).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), export.join("objects").join(e.file_name())).unwrap();
    }
    let cfg = d.dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"{}\"\nscan_interval_secs = 0.2\n",
            d.cfg().socket.display(),
            d.storage().join("logs").display(),
            d.dir.path().join("state").display(),
            usb.display()
        ),
    )
    .unwrap();
    let log = d.dir.path().join("bridge.log");
    let mut bridge = start_bridge(&bin, &cfg, &log);
    let starts = d.sim.as_ref().unwrap().container_starts("pv-bridge");
    std::fs::create_dir_all(&usb).unwrap();
    std::fs::rename(&export, usb.join("self-update")).unwrap();
    // Pantavisor restarts the container: the old bridge process goes, the new
    // one (from the new image) starts and signals READY.
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.sim.as_ref().unwrap().container_starts("pv-bridge") == starts {
        assert!(
            Instant::now() < deadline,
            "pv-bridge was not restarted; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(bridge);
    bridge = start_bridge(&bin, &cfg, &log);
    expect_updated(
        &usb.join("self-update.status.json"),
        &log,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/self-update");
    let p = d.pv.progress("locals/self-update").await.unwrap();
    assert_eq!(p.status.to_string(), "UPDATED");
    drop(bridge);
}

/// Waits for the local backend's final status file and checks it is UPDATED.
async fn expect_updated(status_file: &Path, log: &Path, within: Duration) {
    let status = common::eventually(within, "a final status", || async {
        let s: Value = serde_json::from_slice(&std::fs::read(status_file).ok()?).ok()?;
        ["UPDATED", "DONE", "WONTGO", "ERROR"]
            .contains(&s["status"].as_str()?)
            .then_some(s)
    })
    .await;
    assert_eq!(
        status["status"],
        "UPDATED",
        "{status}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `qemu-arm BIN args…`
fn qemu(bin: &Path) -> Command {
    let mut c = Command::new("qemu-arm");
    c.arg(bin);
    c
}

fn unsquash(image: &Path, to: &Path) {
    let st = Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(to)
        .arg(image)
        .status()
        .expect("unsquashfs is needed: apt-get install -y squashfs-tools");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_armv7_container_builds_and_its_binary_runs_under_qemu() {
    let probe = Command::new("qemu-arm").arg("--version").output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "qemu-arm is needed: apt-get install -y qemu-user"
    );
    let d = common::start(Generation::Gen2).await;
    let out = d.dir.path().join("ctr");
    build_for("armv7", &out);
    let unpacked = d.dir.path().join("unpacked");
    unsquash(&out.join("root.squashfs"), &unpacked);
    let bin = unpacked.join("usr/bin/pv-bridge");
    let file = Command::new("file").arg(&bin).output().unwrap();
    let kind = String::from_utf8_lossy(&file.stdout);
    assert!(
        kind.contains("32-bit")
            && kind.contains("ARM, EABI5")
            && kind.contains("statically linked"),
        "{kind}"
    );
    let run_q = |args: &[&str]| {
        let o = qemu(&bin).args(args).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (code, text) = run_q(&["--version"]);
    assert_eq!(
        (code, text.trim()),
        (
            0,
            format!("pv-bridge {}", env!("CARGO_PKG_VERSION")).as_str()
        )
    );
    let baked = unpacked.join("etc/pv-bridge/config.toml");
    let (code, text) = run_q(&["check-config", baked.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(": OK"), "{text}");
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, "[pantavisor]\nsocket = 7\n").unwrap();
    let (code, text) = run_q(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("bad.toml:2"), "{text}");

    // The armv7 bridge drives pv-sim: an update from a local directory.
    let usb = d.dir.path().join("usb");
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let app = b"an armv7 app".repeat(5_000);
    state["app/root.squashfs"] = Value::String(common::sha256_hex(&app));
    let export = d.dir.path().join("staging");
    std::fs::create_dir_all(export.join("objects")).unwrap();
    std::fs::write(export.join("json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::write(export.join("objects").join(common::sha256_hex(&app)), &app).unwrap();
    let cfg = d.dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"{}\"\nscan_interval_secs = 0.2\n",
            d.cfg().socket.display(),
            d.storage().join("logs").display(),
            d.dir.path().join("state").display(),
            usb.display()
        ),
    )
    .unwrap();
    let log = d.dir.path().join("bridge.log");
    let bridge = start_bridge_with(qemu(&bin), &cfg, &log);
    std::fs::create_dir_all(&usb).unwrap();
    std::fs::rename(&export, usb.join("arm-v2")).unwrap();
    expect_updated(
        &usb.join("arm-v2.status.json"),
        &log,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/arm-v2");
    drop(bridge);
}
