//! The Pantavisor container (#7): `container/build.sh` builds the static x86_64
//! image; its state fragment passes our own state validator; the binary inside the
//! image runs (`--version`, `check-config` of the baked configuration); and the
//! fragment installed into pv-sim through the local adapter replaces the running
//! bridge with the one from the image, as a non-reboot transition.

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
    let status = Command::new("bash")
        .arg(repo().join("container/build.sh"))
        .arg("x86_64")
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
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Bridge(
        Command::new(bin)
            .args(["run", "--config"])
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
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie"),
        "{kind}"
    );
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
    let status_file = usb.join("self-update.status.json");
    let status = common::eventually(Duration::from_secs(60), "a final status", || async {
        let s: Value = serde_json::from_slice(&std::fs::read(&status_file).ok()?).ok()?;
        ["UPDATED", "DONE", "WONTGO", "ERROR"]
            .contains(&s["status"].as_str()?)
            .then_some(s)
    })
    .await;
    assert_eq!(
        status["status"],
        "UPDATED",
        "{status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/self-update");
    let p = d.pv.progress("locals/self-update").await.unwrap();
    assert_eq!(p.status.to_string(), "UPDATED");
    drop(bridge);
}
