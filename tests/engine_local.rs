//! End to end with real processes: the `pv-bridge` binary running the `local`
//! adapter against pv-sim. Updates are `pvr export` folders dropped in a directory;
//! what a user sees is the `<name>.status.json` beside each and the device's
//! running revision.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Device, eventually, sha256_hex, start};
use pv_bridge::pvctrl::Meta;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

const LIFE: Duration = Duration::from_secs(40);

struct Bridge {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Bridge {
    fn start(d: &Device, updates: &Path) -> Bridge {
        Self::start_with(d, updates, "")
    }

    /// With extra configuration lines (e.g. an `[updates]` section).
    fn start_with(d: &Device, updates: &Path, extra: &str) -> Bridge {
        let config = d.dir.path().join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                "[pantavisor]\nsocket = \"{}\"\n\n[bridge]\nstate_dir = \"{}\"\n{extra}\n[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"{}\"\nscan_interval_secs = 0.2\n",
                d.dir.path().join("pv-ctrl").display(),
                d.dir.path().join("bridge-state").display(),
                updates.display()
            ),
        )
        .unwrap();
        let log = d.dir.path().join("bridge.log");
        let child = spawn(&config, &log);
        Bridge { child, config, log }
    }

    /// SIGKILL and start again with the same configuration and state.
    fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn(&self.config, &self.log);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("PV_BRIDGE_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Writes an export of the device's running state, edited, with `blobs` as its
/// objects, and moves it into `dir` whole.
async fn export(
    d: &Device,
    dir: &Path,
    name: &str,
    blobs: &[&[u8]],
    edit: impl FnOnce(&mut Value),
) {
    let mut state: Value = serde_json::from_slice(&d.pv.step("current").await.unwrap()).unwrap();
    edit(&mut state);
    write_export(
        dir,
        name,
        &serde_json::to_vec(&state).unwrap(),
        blobs.iter().map(|b| (sha256_hex(b), b.to_vec())),
    );
}

fn write_export(
    dir: &Path,
    name: &str,
    json: &[u8],
    objects: impl IntoIterator<Item = (String, Vec<u8>)>,
) {
    let staging = dir.parent().unwrap().join(format!(".staging-{name}"));
    std::fs::create_dir_all(staging.join("objects")).unwrap();
    std::fs::write(staging.join("json"), json).unwrap();
    for (sha, data) in objects {
        std::fs::write(staging.join("objects").join(sha), data).unwrap();
    }
    std::fs::rename(&staging, dir.join(name)).unwrap();
}

fn status(dir: &Path, name: &str) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.status.json"))).ok()?).ok()
}

const FINAL: [&str; 5] = ["DONE", "UPDATED", "WONTGO", "ERROR", "CANCELLED"];

/// Waits for a final status file, signalling ready like a freshly booted bridge
/// would not need to (the bridge itself does it).
async fn final_status(b: &Bridge, dir: &Path, name: &str) -> Value {
    let got = tokio::time::timeout(LIFE, async {
        loop {
            if let Some(s) = status(dir, name) {
                if FINAL.contains(&s["status"].as_str().unwrap_or_default()) {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    got.unwrap_or_else(|_| {
        panic!(
            "{name}: no final status; status file {:?}\nbridge log:\n{}",
            status(dir, name),
            b.log()
        )
    })
}

async fn running(d: &Device) -> String {
    eventually(LIFE, "device-meta", || async {
        d.pv.meta(Meta::Device).await.ok()
    })
    .await["pantavisor.revision"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn updates_dir(d: &Device) -> PathBuf {
    let p = d.dir.path().join("usb");
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_update_ends_done_and_the_bridge_signals_ready() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let b = Bridge::start(&d, &dir);
    let kernel = b"kernel from the usb stick".repeat(3000);
    export(&d, &dir, "kernel-2", &[&kernel], |s| {
        s["bsp/kernel.img"] = json!(sha256_hex(&kernel))
    })
    .await;
    let s = final_status(&b, &dir, "kernel-2").await;
    assert_eq!(s["status"], "DONE", "{s}");
    assert_eq!(
        s["status_msg"],
        "Update finished, revision set as rollback point"
    );
    assert_eq!(s["rev"], "locals/kernel-2");
    assert_eq!(running(&d).await, "locals/kernel-2");
    // DONE needs the bridge's ready signal after the reboot: it sent it.
    assert!(b.log().contains("signalled READY"), "{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_reboot_update_ends_updated() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let b = Bridge::start(&d, &dir);
    let root = b"app v2 rootfs".repeat(5000);
    export(&d, &dir, "app v2", &[&root], |s| {
        s["app/root.squashfs"] = json!(sha256_hex(&root))
    })
    .await;
    let s = final_status(&b, &dir, "app v2").await;
    assert_eq!(s["status"], "UPDATED", "{s}");
    assert_eq!(s["rev"], "locals/app-v2", "the folder name is sanitised");
    assert_eq!(
        s["bytes_total"].as_u64(),
        Some(root.len() as u64),
        "final reports keep the download totals: {s}"
    );
    assert_eq!(running(&d).await, "locals/app-v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_refusals_reach_the_status_file() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let b = Bridge::start(&d, &dir);
    // A revision whose container fails: ERROR, and the device rolls back.
    export(&d, &dir, "broken", &[], |s| {
        s["_sim/behaviour.json"] = json!({"outcome": "error"})
    })
    .await;
    let s = final_status(&b, &dir, "broken").await;
    assert_eq!(
        (s["status"].as_str(), s["status_msg"].as_str()),
        (Some("ERROR"), Some("A container could not be started"))
    );
    // Pantavisor's own account of the failure travels with it.
    let logs = s["logs"].as_str().expect("failure logs in the status file");
    assert!(logs.contains("is not running"), "{logs}");
    assert_eq!(running(&d).await, "0");
    // Refused by Pantavisor before it starts.
    export(&d, &dir, "refused", &[], |s| {
        s["_sim/behaviour.json"] = json!({"outcome": "wontgo"})
    })
    .await;
    let s = final_status(&b, &dir, "refused").await;
    assert_eq!(
        (s["status"].as_str(), s["status_msg"].as_str()),
        (Some("WONTGO"), Some("Update aborted"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_exports_are_refused_before_anything_runs() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let b = Bridge::start(&d, &dir);
    let good = b"the real bytes".repeat(100);
    let sha = sha256_hex(&good);
    let mut state: Value = serde_json::from_slice(&d.pv.step("current").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha);
    let json = serde_json::to_vec(&state).unwrap();

    // An object whose bytes do not match its name.
    write_export(
        &dir,
        "tampered",
        &json,
        [(sha.clone(), b"not the real bytes".to_vec())],
    );
    let s = final_status(&b, &dir, "tampered").await;
    assert_eq!(s["status"], "WONTGO", "{s}");
    let msg = s["status_msg"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!("object {sha}: its bytes hash to ")),
        "{msg}"
    );
    // A missing object.
    write_export(&dir, "incomplete", &json, []);
    let s = final_status(&b, &dir, "incomplete").await;
    assert_eq!(
        s["status_msg"],
        format!(
            "object {sha} (app/root.squashfs) is not on the device and the offer gives no source for it"
        )
    );
    // A key that escapes the revision root.
    let mut escaping = state.clone();
    escaping["../../etc/shadow"] = json!(sha);
    write_export(
        &dir,
        "escape",
        &serde_json::to_vec(&escaping).unwrap(),
        [(sha.clone(), good.clone())],
    );
    let s = final_status(&b, &dir, "escape").await;
    assert_eq!(
        s["status_msg"],
        "state JSON is invalid: key \"../../etc/shadow\": \"..\" segment escapes or aliases a directory"
    );
    // Garbage and truncated state files.
    write_export(&dir, "garbage", b"\x00\x01 not json", []);
    let s = final_status(&b, &dir, "garbage").await;
    assert!(
        s["status_msg"]
            .as_str()
            .unwrap()
            .starts_with("state JSON does not parse"),
        "{s}"
    );
    write_export(&dir, "truncated", &json[..json.len() / 2], []);
    let s = final_status(&b, &dir, "truncated").await;
    assert!(
        s["status_msg"]
            .as_str()
            .unwrap()
            .starts_with("state JSON does not parse"),
        "{s}"
    );

    // None of them was staged or run.
    for name in ["tampered", "incomplete", "escape", "garbage", "truncated"] {
        let e = d.pv.step(&format!("locals/{name}")).await.unwrap_err();
        assert!(e.is_not_found(), "{name}: {e}");
    }
    assert_eq!(running(&d).await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_reboot_still_reports_the_true_outcome_once() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let mut b = Bridge::start(&d, &dir);
    let kernel = b"kernel v9".repeat(2000);
    export(&d, &dir, "k9", &[&kernel], |s| {
        s["bsp/kernel.img"] = json!(sha256_hex(&kernel))
    })
    .await;
    // Wait until Pantavisor owns the update, then kill the bridge as the device
    // reboots under it.
    eventually(LIFE, "INPROGRESS", || async {
        let s = status(&dir, "k9")?;
        (s["status"] == "INPROGRESS").then_some(())
    })
    .await;
    b.kill9_and_restart();
    let s = final_status(&b, &dir, "k9").await;
    assert_eq!(s["status"], "DONE", "{s}\n{}", b.log());
    assert_eq!(running(&d).await, "locals/k9");
    // Restarting again does not run it again.
    b.kill9_and_restart();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status(&dir, "k9").unwrap()["status"], "DONE");
    let runs =
        std::fs::read_to_string(d.storage().join("logs/locals/k9/pantavisor/pantavisor.log"))
            .unwrap_or_default()
            + &std::fs::read_to_string(d.storage().join("logs/0/pantavisor/pantavisor.log"))
                .unwrap_or_default();
    assert_eq!(
        runs.matches("processing command LOCAL_RUN \"locals/k9\"")
            .count(),
        1,
        "{runs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_waits_for_pv_ctrl_at_start() {
    let mut d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let cfg = d.cfg();
    d.sim.take().unwrap().stop().await;
    let b = Bridge::start(&d, &dir);
    let root = b"late app".repeat(100);
    // The export is there before the device is.
    let state: Value = {
        let store = pv_testkit::sim::Store::new(&cfg.storage);
        serde_json::from_slice(&std::fs::read(store.trail("0").join(".pvr/json")).unwrap()).unwrap()
    };
    let mut state = state;
    state["app/root.squashfs"] = json!(sha256_hex(&root));
    write_export(
        &dir,
        "late",
        &serde_json::to_vec(&state).unwrap(),
        [(sha256_hex(&root), root.clone())],
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.sim = Some(pv_testkit::sim::Sim::start(cfg).await.unwrap());
    let s = final_status(&b, &dir, "late").await;
    assert_eq!(s["status"], "UPDATED", "{s}\n{}", b.log());
}

/// Every "object <sha> stored" line pv-sim logged, across revisions.
fn stored_count(d: &Device, sha: &str) -> usize {
    let mut n = 0;
    for entry in walk(&d.storage().join("logs")) {
        if entry.ends_with("pantavisor/pantavisor.log") {
            n += std::fs::read_to_string(&entry)
                .unwrap_or_default()
                .matches(&format!("object {sha} stored"))
                .count();
        }
    }
    n
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_downloading_resumes_without_refetching_verified_objects() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    // One object at a time at 2 MiB/s: the small ones land first, the big one takes
    // a few seconds.
    let mut b = Bridge::start_with(
        &d,
        &dir,
        "[updates]\nconcurrency = 1\nbandwidth_limit = 2097152\n",
    );
    let smalls: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 16 * 1024]).collect();
    let big: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut blobs: Vec<&[u8]> = smalls.iter().map(Vec::as_slice).collect();
    blobs.push(&big);
    export(&d, &dir, "resume", &blobs, |s| {
        for (i, b) in smalls.iter().enumerate() {
            s[format!("app/extra-{i}")] = json!(sha256_hex(b));
        }
        s["app/root.squashfs"] = json!(sha256_hex(&big));
    })
    .await;
    eventually(LIFE, "the big object half way", || async {
        let s = status(&dir, "resume")?;
        (s["status"] == "DOWNLOADING" && s["bytes_done"].as_u64()? > 48 * 1024 + 1024 * 1024)
            .then_some(())
    })
    .await;
    b.kill9_and_restart();
    let s = final_status(&b, &dir, "resume").await;
    assert_eq!(s["status"], "UPDATED", "{s}\n{}", b.log());
    for small in &smalls {
        assert_eq!(
            stored_count(&d, &sha256_hex(small)),
            1,
            "a verified object was uploaded again"
        );
    }
    assert_eq!(
        stored_count(&d, &sha256_hex(&big)),
        1,
        "the interrupted object completed once"
    );
    assert_eq!(running(&d).await, "locals/resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_local_run_reports_the_true_outcome() {
    let d = common::start_with(Generation::Gen2, |c| {
        c.commit_delay = Duration::from_secs(2)
    })
    .await;
    let dir = updates_dir(&d);
    let mut b = Bridge::start(&d, &dir);
    let root = b"app after LOCAL_RUN".repeat(100);
    export(&d, &dir, "lr", &[&root], |s| {
        s["app/root.squashfs"] = json!(sha256_hex(&root))
    })
    .await;
    eventually(LIFE, "the run handed to Pantavisor", || async {
        let s = status(&dir, "lr")?;
        matches!(s["status"].as_str()?, "QUEUED" | "INPROGRESS" | "TESTING")
            .then_some(())
            .filter(|_| {
                s["status_msg"] != "Offered to the bridge"
                    && s["status_msg"] != "Validating the state"
            })
    })
    .await;
    b.kill9_and_restart();
    let s = final_status(&b, &dir, "lr").await;
    assert_eq!(s["status"], "UPDATED", "{s}\n{}", b.log());
    let log = walk(&d.storage().join("logs"))
        .into_iter()
        .filter(|p| p.ends_with("pantavisor/pantavisor.log"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<String>();
    assert_eq!(
        log.matches("processing command LOCAL_RUN \"locals/lr\"")
            .count(),
        1,
        "{log}"
    );
}

/// Packs an export with the system `tar`, as `pvr export` users do.
async fn export_archive(
    d: &Device,
    dir: &Path,
    file: &str,
    blobs: &[&[u8]],
    edit: impl FnOnce(&mut Value),
) {
    let staging = d.dir.path().join(format!(".pack-{file}"));
    std::fs::create_dir_all(staging.join("objects")).unwrap();
    let mut state: Value = serde_json::from_slice(&d.pv.step("current").await.unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(staging.join("json"), serde_json::to_vec(&state).unwrap()).unwrap();
    for b in blobs {
        std::fs::write(staging.join("objects").join(sha256_hex(b)), b).unwrap();
    }
    let packed = d.dir.path().join(file);
    let flags = if file.ends_with(".tar") {
        "-cf"
    } else {
        "-czf"
    };
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&staging)
        .arg(flags)
        .arg(&packed)
        .args(["json", "objects"])
        .status()
        .expect("tar is needed to build archives for this test");
    assert!(ok.success());
    std::fs::rename(&packed, dir.join(file)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgz_and_tar_archives_install_and_bad_ones_are_refused() {
    let d = start(Generation::Gen2).await;
    let dir = updates_dir(&d);
    let b = Bridge::start(&d, &dir);
    let root = b"app from a tgz".repeat(2000);
    export_archive(&d, &dir, "release-8.tgz", &[&root], |s| {
        s["app/root.squashfs"] = json!(sha256_hex(&root))
    })
    .await;
    let s = final_status(&b, &dir, "release-8.tgz").await;
    assert_eq!(
        (s["status"].as_str(), s["rev"].as_str()),
        (Some("UPDATED"), Some("locals/release-8")),
        "{s}"
    );
    assert_eq!(running(&d).await, "locals/release-8");
    let unpacked = d.dir.path().join("bridge-state/adapters/usb/release-8");
    eventually(LIFE, "the unpacked copy removed", || async {
        (!unpacked.exists()).then_some(())
    })
    .await;

    let kernel = b"kernel from a tar".repeat(500);
    export_archive(&d, &dir, "release-9.tar", &[&kernel], |s| {
        s["bsp/kernel.img"] = json!(sha256_hex(&kernel))
    })
    .await;
    let s = final_status(&b, &dir, "release-9.tar").await;
    assert_eq!(s["status"], "DONE", "{s}");

    std::fs::write(dir.join("garbage.tgz"), b"definitely not an archive").unwrap();
    let s = final_status(&b, &dir, "garbage.tgz").await;
    assert_eq!(s["status"], "WONTGO");
    assert!(
        s["status_msg"]
            .as_str()
            .unwrap()
            .starts_with("unusable export: "),
        "{s}"
    );
    // A truncated archive: the first half of a real one.
    export_archive(&d, &dir, "whole.tar", &[&vec![9u8; 200_000]], |s| {
        s["app/extra"] = json!(sha256_hex(&[9u8; 200_000]))
    })
    .await;
    let whole = std::fs::read(dir.join("whole.tar")).unwrap();
    std::fs::write(dir.join("half.tar"), &whole[..whole.len() / 2]).unwrap();
    let s = final_status(&b, &dir, "half.tar").await;
    assert_eq!(s["status"], "WONTGO", "{s}");
    assert!(
        s["status_msg"].as_str().unwrap().contains("truncated")
            || s["status_msg"].as_str().unwrap().contains("corrupt"),
        "{s}"
    );
}
