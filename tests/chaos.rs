//! The chaos suite (docs/reliability.md): the `pv-bridge` and `pv-sim` binaries as
//! separate processes, a real mosquitto, objects from a metered HTTP server. Each
//! round offers a reboot update (a new kernel) and, at a chosen fault point, kills
//! the bridge with SIGKILL (family "crash") or cuts the device's power — SIGKILL of
//! pv-sim *and* the bridge, then both boot again (family "power").
//!
//! Invariants checked after every round:
//! - every offer gets exactly one final status, and it is the true one (what
//!   pv-sim's progress file says);
//! - no revision with a missing or partial object is ever run (pv-sim's
//!   `sim/bad-runs.log` stays empty);
//! - no wedge: every round's offer reaches a final status, and a last fault-free
//!   offer installs;
//! - verified bytes are not downloaded twice (bytes the HTTP server sent).
//!
//! `PV_CHAOS_ROUNDS` (default 4) sets the rounds per fault point: 6 points × 4 = 24
//! faults per family in CI; the long run in docs/reliability.md uses more.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::sha256_hex;
use mosquitto::{Broker, Recorder, publish};
use pv_testkit::objects::ObjectServer;
use serde_json::{Value, json};

/// Where a fault lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Point {
    /// Bytes of the object are in the bridge's cache, not all yet.
    Downloading,
    /// The state is on the device (`PUT /steps` done), LOCAL_RUN maybe not.
    Staged,
    /// The bridge's journal says LOCAL_RUN was accepted.
    AfterLocalRun,
    /// pv-ctrl's socket is gone: the device reboots into the try revision.
    Rebooting,
    /// The try revision is TESTING (a power cut now rolls it back: ERROR
    /// "Unexpected rollback").
    Testing,
    /// Pantavisor's progress is final; the bridge may not have reported it yet.
    Final,
}

const POINTS: [Point; 6] = [
    Point::Downloading,
    Point::Staged,
    Point::AfterLocalRun,
    Point::Rebooting,
    Point::Testing,
    Point::Final,
];

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of the bridge alone.
    Crash,
    /// SIGKILL of the device (pv-sim) and the bridge: a power cut.
    Power,
}

/// The path of a workspace binary built beside this test's own (`cargo test
/// --workspace` builds pv-sim for the test kit's suites); built here otherwise.
fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let bin = dir.join(name);
    if !bin.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "pv-testkit", "--bin", name])
            .status()
            .expect("cargo");
        assert!(ok.success(), "cannot build {name}");
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

struct Proc {
    exe: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(&self.exe)
                .args(&self.args)
                .env("RUST_LOG", "info")
                .env_remove("HTTP_PROXY")
                .env_remove("http_proxy")
                .env_remove("HTTPS_PROXY")
                .env_remove("https_proxy")
                .env_remove("ALL_PROXY")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Rig {
    dir: tempfile::TempDir,
    sim: Proc,
    bridge: Proc,
    broker: Broker,
    recorder: Recorder,
    srv: ObjectServer,
    /// Faults by the point they really landed on, as read at the moment.
    landed: BTreeMap<String, u32>,
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path(), "");
        let recorder = Recorder::start(broker.port, "pv/dev-1/#", dir.path());
        let srv = ObjectServer::start().await.unwrap();
        // About 1 s per object: the download is a window a fault can hit.
        srv.set_rate(Some(1024 * 1024));
        let storage = dir.path().join("storage");
        let socket = dir.path().join("pv-ctrl");
        let sim = Proc {
            exe: sibling_bin("pv-sim"),
            args: [
                "--storage",
                storage.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
                "--commit-delay",
                "1",
                "--reboot-secs",
                "1",
                "--goals-timeout",
                "20",
                "--log-rate",
                "0",
                "--tick-ms",
                "100",
            ]
            .map(str::to_owned)
            .to_vec(),
            log: dir.path().join("pv-sim.log"),
            child: None,
        };
        let config = dir.path().join("bridge.toml");
        std::fs::write(
            &config,
            format!(
                "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n\
                 [updates]\nlost_command_secs = 3\npoll_interval_ms = 100\n[logs]\nenabled = false\n\
                 [[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"dev-1\"\n\
                 broker = \"mqtt://127.0.0.1:{}\"\n",
                socket.display(),
                storage.join("logs").display(),
                dir.path().join("state").display(),
                broker.port
            ),
        )
        .unwrap();
        let bridge = Proc {
            exe: PathBuf::from(env!("CARGO_BIN_EXE_pv-bridge")),
            args: vec![
                "run".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            log: dir.path().join("bridge.log"),
            child: None,
        };
        let mut rig = Rig {
            dir,
            sim,
            bridge,
            broker,
            recorder,
            srv,
            landed: BTreeMap::new(),
        };
        rig.boot_device();
        rig.bridge.spawn();
        rig
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn boot_device(&mut self) {
        self.sim.spawn();
        let socket = self.dir.path().join("pv-ctrl");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "pv-sim did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pantavisor's stored progress of `rev` (the truth), if any.
    fn device_progress(&self, rev: &str) -> Option<Value> {
        let p = self.storage().join("trails").join(rev).join(".pv/progress");
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    fn journal_phase(&self) -> Option<String> {
        let j: Value = serde_json::from_slice(
            &std::fs::read(self.dir.path().join("state/journal/updates.json")).ok()?,
        )
        .ok()?;
        j["current"]["phase"].as_str().map(str::to_owned)
    }

    fn cache_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.path().join("state/cache"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Whether the fault point is reached now.
    fn at(&self, point: Point, rev: &str) -> bool {
        let status = self
            .device_progress(rev)
            .and_then(|p| p["status"].as_str().map(str::to_owned));
        match point {
            Point::Downloading => self.cache_bytes() > 0,
            Point::Staged => self
                .storage()
                .join("trails")
                .join(rev)
                .join(".pvr/json")
                .exists(),
            Point::AfterLocalRun => self.journal_phase().as_deref() == Some("running"),
            Point::Rebooting => {
                status.as_deref() == Some("INPROGRESS") && !self.dir.path().join("pv-ctrl").exists()
            }
            Point::Testing => status.as_deref() == Some("TESTING"),
            Point::Final => matches!(
                status.as_deref(),
                Some("DONE" | "UPDATED" | "ERROR" | "WONTGO")
            ),
        }
    }

    /// Names the point the fault really landed on, from what the device and the
    /// journal say at that moment.
    fn classify(&self, rev: &str) -> String {
        let status = self
            .device_progress(rev)
            .and_then(|p| p["status"].as_str().map(str::to_owned));
        let phase = self.journal_phase();
        match (status.as_deref(), phase.as_deref()) {
            (Some("DONE" | "UPDATED" | "ERROR" | "WONTGO"), _) => "final".into(),
            (Some("INPROGRESS"), _) if !self.dir.path().join("pv-ctrl").exists() => {
                "rebooting".into()
            }
            (Some(s), _) if s != "NEW" => format!("installing ({s})"),
            (_, Some("running")) => "after LOCAL_RUN".into(),
            (_, Some("staged")) => "staged".into(),
            (_, Some("accepted")) if self.cache_bytes() > 0 => "downloading".into(),
            (_, p) => format!("before staging ({p:?})"),
        }
    }

    fn inject(&mut self, fault: Fault, rev: &str) {
        let landed = self.classify(rev);
        *self.landed.entry(landed).or_default() += 1;
        match fault {
            Fault::Crash => {
                self.bridge.kill9();
                self.bridge.spawn();
            }
            Fault::Power => {
                self.sim.kill9();
                self.bridge.kill9();
                self.boot_device();
                self.bridge.spawn();
            }
        }
    }

    /// Every `revision/progress` the bridge published for `id`.
    fn progress_of(&self, id: &str) -> Vec<Value> {
        self.recorder
            .json_on("/revision/progress")
            .into_iter()
            .filter(|p| p["id"] == id)
            .collect()
    }

    async fn final_of(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self
                .progress_of(id)
                .into_iter()
                .rev()
                .find(|p| is_final(&p["status"]))
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: no final status (wedged?). Bridge log:\n{}",
                tail(&self.bridge.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Offers a new kernel (a reboot update) as round `id`; returns its object's
    /// path on the server and size.
    fn offer(&self, id: &str, state: &Value) -> (String, u64) {
        let kernel: Vec<u8> = (0..1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ id.len() as u8)
            .chain(id.bytes())
            .collect();
        let sha = sha256_hex(&kernel);
        let path = format!("/k/{id}");
        self.srv.put(&path, kernel.clone());
        let mut s = state.clone();
        s["bsp/kernel.img"] = json!(sha);
        let offer = json!({"v": 1, "id": id, "state": s,
            "objects": {sha: {"url": self.srv.url(&path), "size": kernel.len()}}});
        publish(
            self.broker.port,
            "pv/dev-1/revision/set",
            &offer.to_string(),
            true,
        );
        (path, kernel.len() as u64)
    }
}

fn is_final(s: &Value) -> bool {
    matches!(
        s.as_str(),
        Some("DONE" | "UPDATED" | "ERROR" | "WONTGO" | "CANCELLED")
    )
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn rounds() -> usize {
    std::env::var("PV_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// The factory state as the device has it.
fn factory_state(storage: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(storage.join("trails/0/.pvr/json")).unwrap()).unwrap()
}

async fn chaos(fault: Fault) {
    let mut rig = Rig::start().await;
    let base = factory_state(&rig.storage());
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut overhead = Vec::new();
    let started = Instant::now();
    for round in 0..rounds() {
        for point in POINTS {
            let id = format!("{fault:?}-{point:?}-{round}").to_lowercase();
            let rev = format!("locals/{id}");
            let (path, size) = rig.offer(&id, &base);
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut hit = false;
            while Instant::now() < deadline {
                if rig.at(point, &rev) {
                    rig.inject(fault, &rev);
                    hit = true;
                    break;
                }
                if rig.progress_of(&id).iter().any(|p| is_final(&p["status"])) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !hit {
                *rig.landed.entry(format!("missed {point:?}")).or_default() += 1;
            }
            let fin = rig.final_of(&id, Duration::from_secs(90)).await;
            // Exactly one final status, and the true one.
            let finals: std::collections::BTreeSet<String> = rig
                .progress_of(&id)
                .iter()
                .filter(|p| is_final(&p["status"]))
                .map(|p| p["status"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(finals.len(), 1, "{id}: final statuses {finals:?}");
            let truth = rig.device_progress(&rev);
            let truth_status = truth.as_ref().and_then(|t| t["status"].as_str());
            match fin["status"].as_str().unwrap() {
                s @ ("DONE" | "UPDATED" | "ERROR") => assert_eq!(
                    Some(s),
                    truth_status,
                    "{id}: reported {fin} but the device says {truth:?}"
                ),
                other => assert!(
                    truth_status.is_none_or(|t| t == "NEW" || t == other),
                    "{id}: reported {fin} but the device says {truth:?}"
                ),
            }
            *counts
                .entry(fin["status"].as_str().unwrap().to_owned())
                .or_default() += 1;
            // Nothing partial ran.
            let bad =
                std::fs::read_to_string(rig.storage().join("sim/bad-runs.log")).unwrap_or_default();
            assert!(bad.is_empty(), "{id}: ran with partial objects: {bad}");
            // Verified bytes are not downloaded twice: at most what was in flight
            // when the bridge died (socket buffers) comes again.
            let served = rig.srv.bytes_served(&path);
            overhead.push(served.saturating_sub(size));
            assert!(
                served <= size + size / 2,
                "{id}: {served} bytes served for a {size}-byte object"
            );
        }
    }
    // No wedge: a last offer, without faults, installs.
    rig.offer("last", &base);
    let fin = rig.final_of("last", Duration::from_secs(60)).await;
    assert_eq!(fin["status"], "DONE", "{fin}");
    eprintln!(
        "chaos {fault:?}: {} faults in {:.0} s; landed {:?}; finals {counts:?}; re-sent bytes per object max {} mean {}",
        rounds() * POINTS.len(),
        started.elapsed().as_secs_f64(),
        rig.landed,
        overhead.iter().max().unwrap_or(&0),
        overhead.iter().sum::<u64>() / overhead.len().max(1) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_bridge_at_every_phase() {
    chaos(Fault::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_at_every_phase() {
    chaos(Fault::Power).await;
}
