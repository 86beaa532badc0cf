//! Benchmark harness (not a test): `cargo bench --bench pipeline`.
//!
//! (a) Staging objects from a local HTTP server into pv-sim through the engine,
//!     against a baseline measured in the same run: for each object `curl`
//!     download, `sha256sum`, and `curl --unix-socket -T` upload. Prints the
//!     throughput of each, their ratio, and peak RSS.
//! (b) Log lines per second through tail → spool → a null adapter that acks every
//!     batch, against copying the same files with `cat`.
//! (c) Peak RSS of the `pv-bridge` process itself (local adapter, as on a device)
//!     staging a 1 MiB export and then a large one: the difference is what object
//!     size costs in memory.
//!
//! (e) Footprint: time to pv-ctrl's first answer and idle RSS per backend
//!     (`PV_BENCH_ONLY=footprint`, `PV_BENCH_BRIDGE=<binary>` for a static build).
//!
//! Sizes: `PV_BENCH_MIB` (default 256) split into 8 objects; `PV_BENCH_LINES`
//! (default 500000) log lines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink, ObjectRef,
    ObjectSource, Offer, UpdateStatus,
};
use pv_bridge::config::Config;
use pv_bridge::engine::{AdapterFactory, UpdateOptions, run_with};
use pv_bridge::pvctrl::{PvCtrl, hex};
use pv_testkit::objects::ObjectServer;
use pv_testkit::sim::{Sim, SimConfig};
use sha2::{Digest, Sha256};

/// Peak resident set of this process so far, in KiB.
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets the peak to the current RSS (Linux: writing 5 to clear_refs).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1048576.0 / d.as_secs_f64()
}

/// Runs a command under GNU time when it exists; returns its peak RSS in KiB.
fn run_measured(args: &[&str]) -> Option<u64> {
    let time = Path::new("/usr/bin/time").exists();
    let out = if time {
        Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%M")
            .args(args)
            .output()
            .unwrap()
    } else {
        Command::new(args[0]).args(&args[1..]).output().unwrap()
    };
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !time {
        return None;
    }
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

struct Offerer {
    offer: Arc<Mutex<Option<Offer>>>,
    done: Arc<Mutex<Option<(UpdateStatus, Instant)>>>,
}

impl Adapter for Offerer {
    fn name(&self) -> &str {
        "bench"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            link.send(BackendEvent::Connected).await?;
            let mut view = link.view();
            let offer = self.offer.lock().unwrap().take();
            if let Some(o) = offer {
                link.send(BackendEvent::Offer(o)).await?;
            }
            // Logs, if any, are consumed and acked (the null adapter).
            let l2 = link.clone();
            tokio::spawn(async move {
                while let Some(b) = l2.next_logs(10_000, 4 * 1024 * 1024).await {
                    l2.ack_logs(b.next);
                }
            });
            while view.changed().await.is_ok() {
                let p = view.borrow_and_update().update.clone();
                if let Some(p) = p.filter(|p| p.status.is_final()) {
                    *self.done.lock().unwrap() = Some((p.status, Instant::now()));
                }
            }
            Ok(())
        })
    }
}

fn config(dir: &Path, socket: &Path, logs: &Path, extra: &str) -> Config {
    let text = format!(
        "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[logs]\npoll_interval_ms = 50\nrate_per_sec = 1e12\nburst = 1e12\nspool_max_bytes = 1073741824\n{extra}[[backend]]\ntype = \"local\"\nname = \"bench\"\ndir = \"/nonexistent\"\n",
        socket.display(),
        logs.display(),
        dir.join("state").display()
    );
    Config::parse(Path::new("bench.toml"), &text).unwrap()
}

async fn staging(total_mib: usize) {
    const OBJECTS: usize = 8;
    let per = total_mib * 1024 * 1024 / OBJECTS;
    let dir = tempfile::tempdir().unwrap();
    let srv = ObjectServer::start().await.unwrap();
    let mut blobs = Vec::new();
    for i in 0..OBJECTS {
        let data: Vec<u8> = (0..per)
            .map(|j| (j as u32).wrapping_mul(2654435761).rotate_left(i as u32) as u8)
            .collect();
        let sha = hex(&Sha256::digest(&data));
        srv.put(&format!("/o/{sha}"), data);
        blobs.push(sha);
    }
    let total = (per * OBJECTS) as u64;

    // Baseline: curl, sha256sum, curl --unix-socket -T, one object after another.
    let base_sock = dir.path().join("base.sock");
    let base_sim = Sim::start(SimConfig {
        capacity: 1 << 40,
        ..SimConfig::new(dir.path().join("base"), &base_sock)
    })
    .await
    .unwrap();
    let file = dir.path().join("obj");
    let start = Instant::now();
    let mut base_peak = None;
    for sha in &blobs {
        let f = file.to_str().unwrap();
        let url = srv.url(&format!("/o/{sha}"));
        let p1 = run_measured(&["curl", "-sS", "-o", f, &url]);
        let p2 = run_measured(&["sha256sum", f]);
        let put = format!("http://localhost/objects/{sha}");
        let p3 = run_measured(&[
            "curl",
            "-sS",
            "--unix-socket",
            base_sock.to_str().unwrap(),
            "-T",
            f,
            &put,
        ]);
        base_peak = [base_peak, p1, p2, p3].into_iter().flatten().max();
    }
    let base = start.elapsed();
    base_sim.stop().await;

    // pv-bridge: the same objects, offered by URL.
    let sock = dir.path().join("pv-ctrl");
    let sim = Sim::start(SimConfig {
        capacity: 1 << 40,
        log_rate: 0.0,
        commit_delay: Duration::from_millis(100),
        tick: Duration::from_millis(50),
        ..SimConfig::new(dir.path().join("dev"), &sock)
    })
    .await
    .unwrap();
    let pv = PvCtrl::new(&sock);
    let mut state: serde_json::Value =
        serde_json::from_slice(&pv.step("0").await.unwrap()).unwrap();
    let mut objects = BTreeMap::new();
    for (i, sha) in blobs.iter().enumerate() {
        state[format!("app/data-{i}")] = serde_json::json!(sha);
        objects.insert(
            sha.clone(),
            ObjectRef {
                sha256: sha.clone(),
                size: Some(per as u64),
                source: ObjectSource::Url {
                    url: srv.url(&format!("/o/{sha}")),
                },
            },
        );
    }
    let offer = Offer {
        id: "bench".into(),
        state: serde_json::to_vec(&state).unwrap(),
        state_url: None,
        objects,
        fetcher: None,
    };
    let cfg = config(dir.path(), &sock, &dir.path().join("no-logs"), "");
    let slot = Arc::new(Mutex::new(Some(offer)));
    let done = Arc::new(Mutex::new(None));
    let (s2, d2) = (slot.clone(), done.clone());
    let factory: AdapterFactory = Arc::new(move || {
        Box::new(Offerer {
            offer: s2.clone(),
            done: d2.clone(),
        }) as Box<dyn Adapter>
    });
    reset_peak();
    let before = peak_kib();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let engine = tokio::spawn(run_with(
        cfg,
        vec![("bench".into(), factory)],
        UpdateOptions::default(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let (status, at) = loop {
        if let Some(d) = *done.lock().unwrap() {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = at.duration_since(start);
    let peak = peak_kib().saturating_sub(before);
    let _ = stop_tx.send(());
    let _ = engine.await;
    sim.stop().await;
    assert!(status.is_success(), "bench update ended {status}");
    let bridge = elapsed;
    println!(
        "== (a) staging {} MiB in {OBJECTS} objects from HTTP into pv-sim",
        total >> 20
    );
    println!(
        "baseline  curl + sha256sum + curl --unix-socket -T: {:6.1} s  {:7.1} MiB/s  peak RSS {}",
        base.as_secs_f64(),
        mib_s(total, base),
        base_peak.map_or("n/a (install `time`)".to_owned(), |k| format!(
            "{} KiB (largest tool)",
            k
        ))
    );
    println!(
        "pv-bridge engine (download, verify, upload, verify): {:6.1} s  {:7.1} MiB/s  peak RSS growth {} KiB",
        bridge.as_secs_f64(),
        mib_s(total, bridge),
        peak
    );
    println!(
        "ratio pv-bridge / baseline throughput: {:.2}",
        base.as_secs_f64() / bridge.as_secs_f64()
    );
    println!("(the bridge's time runs from the offer to UPDATED; pv-sim's commit delay is 0.1 s)");
}

async fn logs(lines: usize) {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(logs.join("0/app/lxc")).unwrap();
    std::os::unix::fs::symlink("0", logs.join("current")).unwrap();
    let mut text = String::with_capacity(lines * 80);
    for i in 0..lines {
        text.push_str(&format!(
            "app: synthetic benchmark log line {i:08} with some payload text\n"
        ));
    }
    let src = logs.join("0/app/lxc/console.log");
    std::fs::write(&src, &text).unwrap();
    let bytes = text.len() as u64;

    let start = Instant::now();
    let copy = dir.path().join("copy");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cat {} > {}", src.display(), copy.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let base = start.elapsed();

    let sock = dir.path().join("pv-ctrl");
    let sim = Sim::start(SimConfig {
        log_rate: 0.0,
        ..SimConfig::new(dir.path().join("dev"), &sock)
    })
    .await
    .unwrap();
    let cfg = config(dir.path(), &sock, &logs, "");
    let done = Arc::new(Mutex::new(None));
    let factory: AdapterFactory = {
        let d2 = done.clone();
        Arc::new(move || {
            Box::new(Offerer {
                offer: Arc::new(Mutex::new(None)),
                done: d2.clone(),
            }) as Box<dyn Adapter>
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let engine = tokio::spawn(run_with(
        cfg,
        vec![("bench".into(), factory)],
        UpdateOptions::default(),
        async {
            let _ = stop_rx.await;
        },
    ));
    // Done when the ledger acknowledges every line.
    let ledger = dir.path().join("state/spool/ledger.json");
    loop {
        let acked = std::fs::read(&ledger)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["acks"]["bench"].as_u64())
            .unwrap_or(0);
        if acked >= lines as u64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "log bench stalled at {acked}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    let _ = stop_tx.send(());
    let _ = engine.await;
    sim.stop().await;
    println!("== (b) {lines} log lines ({} MiB)", bytes >> 20);
    println!(
        "baseline  cat to a file: {:8.3} s  {:10.0} lines/s",
        base.as_secs_f64(),
        lines as f64 / base.as_secs_f64()
    );
    println!(
        "pv-bridge tail → parse → spool (fsync) → null adapter → ack: {:8.3} s  {:10.0} lines/s",
        took.as_secs_f64(),
        lines as f64 / took.as_secs_f64()
    );
}

/// Stages one export of `mib` MiB through a `pv-bridge` process; returns its peak
/// RSS in KiB.
async fn bridge_process(mib: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pv-ctrl");
    let sim = Sim::start(SimConfig {
        capacity: 1 << 40,
        log_rate: 0.0,
        commit_delay: Duration::from_millis(100),
        tick: Duration::from_millis(50),
        ..SimConfig::new(dir.path().join("dev"), &sock)
    })
    .await
    .unwrap();
    let pv = PvCtrl::new(&sock);
    let usb = dir.path().join("usb");
    let staging = dir.path().join(".export");
    std::fs::create_dir_all(staging.join("objects")).unwrap();
    let mut state: serde_json::Value =
        serde_json::from_slice(&pv.step("0").await.unwrap()).unwrap();
    let per = mib * 1024 * 1024 / 4;
    for i in 0..4 {
        let data: Vec<u8> = (0..per)
            .map(|j| (j as u32).wrapping_mul(2654435761).rotate_left(i) as u8)
            .collect();
        let sha = hex(&Sha256::digest(&data));
        std::fs::write(staging.join("objects").join(&sha), &data).unwrap();
        state[format!("app/data-{i}")] = serde_json::json!(sha);
    }
    std::fs::write(staging.join("json"), serde_json::to_vec(&state).unwrap()).unwrap();
    std::fs::create_dir_all(&usb).unwrap();
    std::fs::rename(&staging, usb.join("big")).unwrap();
    let cfg = dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"{}\"\nscan_interval_secs = 0.1\n",
            sock.display(),
            dir.path().join("dev/logs").display(),
            dir.path().join("state").display(),
            usb.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status_file = usb.join("big.status.json");
    let start = Instant::now();
    let mut peak = 0;
    loop {
        peak = peak.max(rss_kib(child.id(), "VmHWM:"));
        let done = std::fs::read_to_string(&status_file).unwrap_or_default();
        if done.contains("\"UPDATED\"") || done.contains("\"WONTGO\"") || done.contains("\"ERROR\"")
        {
            assert!(done.contains("UPDATED"), "{done}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "bridge did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    sim.stop().await;
    peak
}

/// A mosquitto for the MQTT bench (Debian package; fails loudly when missing).
fn mosquitto(dir: &Path) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nmax_queued_messages 0\n"
        ),
    )
    .unwrap();
    let exe = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto is required: apt-get install -y mosquitto mosquitto-clients");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// Counts what a subscriber receives (messages, or log records when `records`)
/// until `want` arrived or nothing came for 3 s: (count, time of the last one).
fn subscriber(
    port: u16,
    topic: &str,
    want: u64,
    records: bool,
) -> std::thread::JoinHandle<(u64, Instant)> {
    use std::io::BufRead;
    let mut child = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is required: apt-get install -y mosquitto-clients");
    std::thread::sleep(Duration::from_millis(300));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let n = if records {
                serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["records"].as_array().map(|a| a.len() as u64))
                    .unwrap_or(0)
            } else {
                1
            };
            if tx.send(n).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        let (mut got, mut last) = (0u64, Instant::now());
        while got < want {
            match rx.recv_timeout(Duration::from_secs(3)) {
                Ok(n) => {
                    got += n;
                    last = Instant::now();
                }
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        (got, last)
    })
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (d) Log forwarding to a real mosquitto against `mosquitto_pub -l` fed the
/// same lines, and the bridge's idle RSS with the MQTT backend connected.
async fn mqtt(lines: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, port) = mosquitto(dir.path());
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(logs.join("0/app/lxc")).unwrap();
    std::os::unix::fs::symlink("0", logs.join("current")).unwrap();
    let mut text = String::with_capacity(lines * 80);
    for i in 0..lines {
        text.push_str(&format!(
            "app: synthetic benchmark log line {i:08} with some payload text\n"
        ));
    }
    let src = logs.join("0/app/lxc/console.log");
    std::fs::write(&src, &text).unwrap();

    // Baseline: mosquitto_pub -l, one message per line, QoS 1.
    let sub = subscriber(port, "bench/base", lines as u64, false);
    let start = Instant::now();
    let ok = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            "bench/base",
            "-l",
        ])
        .stdin(std::fs::File::open(&src).unwrap())
        .status()
        .unwrap();
    assert!(ok.success());
    let (base_got, last) = sub.join().unwrap();
    let base = last - start;

    // pv-bridge: tail → parse → spool → batches on pv/bench/logs/app.
    let sock = dir.path().join("pv-ctrl");
    let sim = Sim::start(SimConfig {
        log_rate: 0.0,
        ..SimConfig::new(dir.path().join("dev"), &sock)
    })
    .await
    .unwrap();
    let cfg = dir.path().join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[logs]\npoll_interval_ms = 100\nrate_per_sec = 100000000\nburst = 100000000\nspool_max_bytes = 1073741824\n[[backend]]\ntype = \"mqtt\"\nname = \"bench\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ndevice_id = \"bench\"\n",
            sock.display(),
            logs.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    // Idle first: a bridge connected to the broker with nothing to forward.
    let idle_cfg = dir.path().join("idle.toml");
    std::fs::create_dir_all(dir.path().join("empty-logs")).unwrap();
    std::fs::write(
        &idle_cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[[backend]]\ntype = \"mqtt\"\nname = \"idle\"\nbroker = \"mqtt://127.0.0.1:{port}\"\ndevice_id = \"idle\"\n",
            sock.display(),
            dir.path().join("empty-logs").display(),
            dir.path().join("idle-state").display()
        ),
    )
    .unwrap();
    let mut idler = Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .args(["run", "--config"])
        .arg(&idle_cfg)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let online = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "pv/idle/status",
        ])
        .args(["-C", "1", "-W", "15"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&online.stdout).contains("\"online\":true"),
        "the idle bridge did not connect"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_connected = rss_kib(idler.id(), "VmRSS:");
    let idle_peak = rss_kib(idler.id(), "VmHWM:");
    let _ = idler.kill();
    let _ = idler.wait();

    let sub = subscriber(port, "pv/bench/logs/#", lines as u64, true);
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (got, last) = sub.join().unwrap();
    let took = last - start;
    let peak = rss_kib(child.id(), "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    sim.stop().await;
    let _ = broker.kill();
    let _ = broker.wait();
    println!("== (d) {lines} log lines to a real mosquitto (QoS 1)");
    println!(
        "baseline  mosquitto_pub -l (a message per line): {:8.3} s  {:10.0} lines/s  ({base_got} of {lines} delivered)",
        base.as_secs_f64(),
        base_got as f64 / base.as_secs_f64()
    );
    println!(
        "pv-bridge log tree → MQTT batches (start included):  {:8.3} s  {:10.0} lines/s  ({got} of {lines} delivered)",
        took.as_secs_f64(),
        got as f64 / took.as_secs_f64()
    );
    println!(
        "pv-bridge RSS: idle and connected {idle_connected} KiB (peak {idle_peak} KiB); peak while forwarding {peak} KiB"
    );
}

/// (e) Footprint of a bridge binary (`PV_BENCH_BRIDGE`, default the one cargo
/// built): time from start to pv-ctrl's first answer, and idle RSS with each
/// backend connected to a local peer (mosquitto, the fake Pantacor Hub, a
/// directory) and with all three. Baseline: an idle `mosquitto_sub`, a C MQTT
/// client, in the same run.
async fn footprint() {
    let bin = std::env::var("PV_BENCH_BRIDGE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_pv-bridge").to_owned());
    println!("== (e) footprint of {bin}");
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, port) = mosquitto(dir.path());
    let hub = pv_testkit::hub::FakeHub::start(pv_testkit::hub::HubConfig::default())
        .await
        .unwrap();
    let mut base = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "bench/idle/#",
            "-q",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base_rss = rss_kib(base.id(), "VmRSS:");
    let _ = base.kill();
    let _ = base.wait();
    let tok = hub.user_token();
    let (_, t) = hub.call(
        "POST",
        "/devices/tokens",
        Some(&tok),
        Some(serde_json::json!({"default-user-meta": {}})),
    );
    let autotok = dir.path().join("autotok");
    std::fs::write(&autotok, t["token"].as_str().unwrap()).unwrap();
    let usb = dir.path().join("usb");
    std::fs::create_dir_all(&usb).unwrap();
    let local = format!(
        "[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"{}\"\n",
        usb.display()
    );
    let mqtt = format!(
        "[[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"bench\"\nbroker = \"mqtt://127.0.0.1:{port}\"\n"
    );
    let pantahub = format!(
        "[[backend]]\ntype = \"pantahub\"\nname = \"hub\"\nurl = \"{}\"\ninsecure = true\nautotok_file = \"{}\"\n",
        hub.url(),
        autotok.display()
    );
    // Azure: the test kit's fake IoT Hub over TLS with a throw-away CA.
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let run = |args: &str| {
        let ok = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(&pki)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success(), "openssl {args}");
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    run(&format!(
        "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-CA"
    ));
    run(&format!(
        "req {ec} -keyout srv.key -out srv.csr -subj /CN=bench-hub"
    ));
    std::fs::write(
        pki.join("srv.cnf"),
        "subjectAltName=DNS:bench-hub.azure-devices.net\n",
    )
    .unwrap();
    run(
        "x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile srv.cnf",
    );
    let iothub = pv_testkit::iothub::FakeIotHub::local(
        "bench-hub.azure-devices.net",
        &pki.join("srv.pem"),
        &pki.join("srv.key"),
        None,
    )
    .await
    .unwrap();
    let conn = pki.join("azure.conn");
    std::fs::write(
        &conn,
        iothub.add_device("bench", "YmVuY2gtZGV2aWNlLWtleQ=="),
    )
    .unwrap();
    let azure = format!(
        "[[backend]]\ntype = \"azure\"\nname = \"azure\"\nconnection_string_file = \"{}\"\nca_file = \"{}\"\nconnect_address = \"{}\"\n",
        conn.display(),
        pki.join("ca.pem").display(),
        iothub.mqtt_addr()
    );
    let cases = [
        ("local", local.clone(), 8192u64),
        ("mqtt", mqtt.clone(), 8192),
        ("pantahub", pantahub.clone(), 8192),
        ("azure", azure.clone(), 8192),
        ("all four", format!("{local}{mqtt}{pantahub}{azure}"), 12288),
    ];
    println!(
        "{:<10} {:>16} {:>14} {:>14} {:>10}",
        "backends", "first pv-ctrl ms", "idle RSS KiB", "peak RSS KiB", "target KiB"
    );
    for (i, (name, backends, target)) in cases.iter().enumerate() {
        let case = dir.path().join(format!("case{i}"));
        let sock = case.join("pv-ctrl");
        let sim = Sim::start(SimConfig {
            log_rate: 0.0,
            ..SimConfig::fast(case.join("dev"), &sock)
        })
        .await
        .unwrap();
        let cfg = case.join("bridge.toml");
        std::fs::write(
            &cfg,
            format!(
                "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n{backends}",
                sock.display(),
                case.join("dev/logs").display(),
                case.join("state").display()
            ),
        )
        .unwrap();
        let log = case.join("bridge.log");
        let devices_before = hub.device_ids().len();
        let azure_before = iothub.connects("bench");
        let patches_before = iothub.reported_patches("bench").len();
        let start = Instant::now();
        let mut child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if first.is_none() && text.contains("pv-ctrl reachable") {
                first = Some(start.elapsed());
            }
            let mqtt_ok = text.contains(" connected backend=plant");
            let hub_ok = hub.device_ids().len() > devices_before
                && hub
                    .device_ids()
                    .last()
                    .and_then(|id| hub.factory_state(id))
                    .is_some();
            // Connected, and its first report (the twin keeps the last case's, so
            // count reported patches).
            let azure_ok = iothub.connects("bench") > azure_before
                && iothub.reported_patches("bench").len() > patches_before;
            let connected = match *name {
                "local" => true,
                "mqtt" => mqtt_ok,
                "pantahub" => hub_ok,
                "azure" => azure_ok,
                _ => mqtt_ok && hub_ok && azure_ok,
            };
            if first.is_some() && connected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: not connected; log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = rss_kib(child.id(), "VmRSS:");
        let peak = rss_kib(child.id(), "VmHWM:");
        let _ = child.kill();
        let _ = child.wait();
        sim.stop().await;
        println!(
            "{name:<10} {:>16.1} {idle:>14} {peak:>14} {target:>10}",
            first.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
        );
    }
    println!("baseline: an idle mosquitto_sub (C, libmosquitto) {base_rss} KiB");
    let _ = broker.kill();
    let _ = broker.wait();
}

fn main() {
    let mib: usize = std::env::var("PV_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let lines: usize = std::env::var("PV_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::consts::ARCH
    );
    let only = std::env::var("PV_BENCH_ONLY").unwrap_or_default();
    if only == "mqtt" {
        rt.block_on(mqtt(lines));
        return;
    }
    if only == "footprint" {
        rt.block_on(footprint());
        return;
    }
    rt.block_on(staging(mib));
    rt.block_on(logs(lines));
    rt.block_on(mqtt(lines));
    rt.block_on(footprint());
    let small = rt.block_on(bridge_process(1));
    let large = rt.block_on(bridge_process(mib));
    println!(
        "== (c) peak RSS of the pv-bridge process (local adapter, glibc, current-thread runtime)"
    );
    println!(
        "staging a 1 MiB export: {small} KiB; a {mib} MiB export: {large} KiB; growth {} KiB",
        large.saturating_sub(small)
    );
}
