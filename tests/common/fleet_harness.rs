//! The fleet harness (#17): N simulated devices (pv-sim, factory objects
//! shared by hard link), N pv-bridge processes with the MQTT backend, one
//! mosquitto, and one `pv-fleet deploy` to all of them. Measures the time
//! until every device reported its final status, what the broker received
//! from the devices, and the bridges' memory. Used by `benches/fleet.rs` and,
//! with a small N, by `tests/fleet_harness.rs`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pv_testkit::sim::{Generation, Sim, SimConfig};
use serde_json::{Value, json};

use crate::common::sha256_hex;
use crate::mosquitto::{Broker, retained};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub devices: usize,
    /// From the start of `pv-fleet deploy` to its exit (every final status in).
    pub deploy: Duration,
    pub succeeded: usize,
    /// Messages and payload bytes the broker received on devices' topics
    /// during the deploy, per device.
    pub messages_per_device: f64,
    pub bytes_per_device: f64,
    /// Resident memory of the bridges (kB), largest and mean.
    pub rss_max_kb: u64,
    pub rss_mean_kb: u64,
    /// pv-fleet deploy's exit code and peak memory (kB).
    pub fleet_exit: Option<i32>,
    pub fleet_peak_kb: u64,
    /// Peak memory (kB) of `pv-fleet status --all` over every device's
    /// retained state.
    pub status_peak_kb: u64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Stops a `mosquitto_sub -F %l` and returns the payload length of each
/// message it printed.
fn payload_lengths(mut sub: Child) -> Vec<u64> {
    use std::io::BufRead;
    let _ = sub.kill();
    let stdout = sub.stdout.take().expect("piped");
    let lens = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let _ = sub.wait();
    lens
}

/// Runs a command to its end; returns its exit code and its peak resident
/// memory (VmHWM, kB, read every few milliseconds until it exits).
fn peak(cmd: &mut Command) -> (Option<i32>, u64) {
    let mut child = cmd.spawn().expect("spawn");
    let mut peak = 0;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code(), peak);
        }
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            if let Some(kb) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pv-bridge the devices run: this build's, or the one `PV_FLEET_BRIDGE`
/// names (e.g. the static device build, to measure its memory).
pub fn bridge_bin() -> PathBuf {
    std::env::var_os("PV_FLEET_BRIDGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pv-bridge")))
}

fn bridge(dir: &Path, id: &str, socket: &Path, logs: &Path, port: u16, extra: &str) -> Killed {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n\
             [[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"{id}\"\n\
             broker = \"mqtt://127.0.0.1:{port}\"\n{extra}",
            socket.display(),
            logs.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("bridge.log")).unwrap();
    Killed(
        Command::new(bridge_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// N simulated devices, each with its pv-bridge, and one mosquitto.
pub struct Setup {
    pub broker: Broker,
    pub sims: Vec<Sim>,
    bridges: Vec<Option<Killed>>,
    pub ids: Vec<String>,
}

impl Setup {
    /// Starts `n` devices `dev-1` … `dev-n` and waits until each is online.
    pub async fn start(dir: &Path, n: usize, deadline: Duration) -> Setup {
        Setup::start_with(dir, n, deadline, "").await
    }

    /// The same, with `extra` appended to every bridge's configuration (after
    /// its `[[backend]]` table, so it starts with a table header).
    pub async fn start_with(dir: &Path, n: usize, deadline: Duration, extra: &str) -> Setup {
        let broker = Broker::start(dir, "max_queued_messages 10000\n");
        let pool = dir.join("factory-objects");
        let mut sims = Vec::with_capacity(n);
        let mut bridges = Vec::with_capacity(n);
        for i in 1..=n {
            let id = format!("dev-{i}");
            let ddir = dir.join(&id);
            let mut cfg = SimConfig::fast(ddir.join("storage"), ddir.join("pv-ctrl"));
            cfg.generation = Generation::Gen2;
            cfg.log_rate = 0.0;
            cfg.object_pool = Some(pool.clone());
            let sim = Sim::start(cfg.clone()).await.expect("pv-sim");
            bridges.push(Some(bridge(
                &ddir.join("bridge"),
                &id,
                &cfg.socket,
                &cfg.storage.join("logs"),
                broker.port,
                extra,
            )));
            sims.push(sim);
        }
        let ids: Vec<String> = (1..=n).map(|i| format!("dev-{i}")).collect();
        let start = Instant::now();
        for id in &ids {
            loop {
                let online = retained(broker.port, &format!("pv/{id}/status"))
                    .is_some_and(|s| s["online"] == true);
                if online {
                    break;
                }
                assert!(start.elapsed() < deadline, "{id} did not come online");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Setup {
            broker,
            sims,
            bridges,
            ids,
        }
    }

    /// An export at `dir`: the factory state with a new app image, and
    /// `extra` keys merged into the state (e.g. a `_sim/behaviour.json`).
    pub fn export(&self, dir: &Path, extra: Value) -> PathBuf {
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        let mut state: Value = serde_json::from_slice(
            &std::fs::read(self.sims[0].storage().join("trails/0/.pvr/json")).unwrap(),
        )
        .unwrap();
        let app = b"the fleet's new app".repeat(10_000);
        state["app/root.squashfs"] = json!(sha256_hex(&app));
        if let (Some(s), Some(e)) = (state.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        std::fs::write(dir.join("json"), serde_json::to_vec(&state).unwrap()).unwrap();
        std::fs::write(dir.join("objects").join(sha256_hex(&app)), &app).unwrap();
        dir.to_owned()
    }

    /// Kills one device's bridge (the device goes silent).
    pub fn kill_bridge(&mut self, i: usize) {
        self.bridges[i] = None;
    }

    /// The bridges' resident memory (kB).
    pub fn rss(&self) -> Vec<u64> {
        self.bridges
            .iter()
            .flatten()
            .map(|b| rss_kb(b.0.id()))
            .collect()
    }

    pub async fn stop(mut self) {
        self.bridges.clear();
        for s in self.sims.drain(..) {
            s.stop().await;
        }
    }
}

/// Runs one deploy to `n` devices; `dir` holds everything.
pub async fn run(dir: &Path, n: usize, deadline: Duration) -> Report {
    let setup = Setup::start(dir, n, deadline).await;
    let broker = &setup.broker;
    let ids = setup.ids.clone();
    let export = setup.export(&dir.join("export"), json!({}));
    // What the broker gets from the devices during the deploy.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args([
            "-t",
            "pv/+/status",
            "-t",
            "pv/+/revision/progress",
            "-t",
            "pv/+/revision/current",
        ])
        .args([
            "-t",
            "pv/+/meta/device",
            "-t",
            "pv/+/events",
            "-t",
            "pv/+/blob/get",
        ])
        .args(["-R", "-F", "%l"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (code, fleet_peak_kb) = peak(
        Command::new(env!("CARGO_BIN_EXE_pv-fleet"))
            .args(["--broker", &format!("mqtt://127.0.0.1:{}", broker.port)])
            .arg("deploy")
            .arg(&export)
            .args(["-d", &ids.join(","), "--id", "fleet-v2", "--timeout"])
            .arg(deadline.as_secs().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deploy = t0.elapsed();
    let rss = setup.rss();
    // The operator's view of the whole fleet from its retained state.
    let (_, status_peak_kb) = peak(
        Command::new(env!("CARGO_BIN_EXE_pv-fleet"))
            .args(["--broker", &format!("mqtt://127.0.0.1:{}", broker.port)])
            .args(["status", "--all", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lens = payload_lengths(sub);
    let succeeded = ids
        .iter()
        .filter(|id| {
            retained(broker.port, &format!("pv/{id}/revision/current"))
                .is_some_and(|c| c["rev"] == "locals/fleet-v2")
        })
        .count();
    setup.stop().await;
    Report {
        devices: n,
        deploy,
        succeeded,
        messages_per_device: lens.len() as f64 / n as f64,
        bytes_per_device: lens.iter().sum::<u64>() as f64 / n as f64,
        rss_max_kb: rss.iter().copied().max().unwrap_or(0),
        rss_mean_kb: rss.iter().sum::<u64>() / rss.len().max(1) as u64,
        fleet_exit: code,
        fleet_peak_kb,
        status_peak_kb,
    }
}

/// Where a run's files go.
pub fn scratch() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

/// What an idle fleet sends: messages and payload bytes per device in one hour,
/// scaled down `scale` times (every timer of the engine's device-meta policy
/// divided alike, as `benches/idle_cost.rs` does for one device).
pub async fn idle(dir: &Path, n: usize, scale: u64) -> (f64, f64) {
    let extra = format!(
        "[metadata]\ndevice_meta_interval_ms = {}\ndevice_meta_min_interval_secs = 0\ndevice_meta_volatile_interval_secs = {}\n",
        (10_000 / scale).max(100),
        (600 / scale).max(1)
    );
    let setup = Setup::start_with(dir, n, Duration::from_secs(600), &extra).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &setup.broker.port.to_string()])
        .args(["-t", "pv/#", "-R", "-F", "%l"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    tokio::time::sleep(Duration::from_secs(3600 / scale)).await;
    let lens = payload_lengths(sub);
    setup.stop().await;
    (
        lens.len() as f64 / n as f64,
        lens.iter().sum::<u64>() as f64 / n as f64,
    )
}
