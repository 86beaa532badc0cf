//! Benchmark harness (not a test): `cargo bench --bench idle_cost`.
//!
//! What one idle device costs each backend per hour (issue #14): MQTT messages
//! and bytes the broker receives from it, Pantacor Hub requests, and the 4 KB
//! units IoT Hub bills, hawkBit DDI requests. Idle: no update, no container
//! writing logs.
//!
//! An hour is scaled down `PV_BENCH_SCALE` times (default 60: a minute stands for
//! an hour), with every timer of the defaults divided alike, and each backend runs
//! twice side by side in the same run:
//! - **policy**: the defaults (device-meta at the engine's rate: a change that
//!   matters within 10 s, volatile keys every 10 min, 30 min for Azure);
//! - **baseline**: every device-meta change forwarded, as before issue #14
//!   (`device_meta_volatile_interval_secs = 0`).
//!
//! Needs mosquitto, mosquitto-clients and openssl (Debian packages).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/azure.rs"]
mod azurekit;
#[path = "../tests/common/hawkbit.rs"]
mod hawkbitkit;
#[path = "../tests/common/pantahub.rs"]
mod hubkit;
#[path = "../tests/common/mosquitto.rs"]
mod mosquitto;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use pv_testkit::hub::{FakeHub, HubConfig};
use pv_testkit::sim::Generation;

fn scale() -> u64 {
    std::env::var("PV_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(60)
}

/// The engine's `[metadata]` for a scaled hour; `volatile` in real seconds.
fn metadata(volatile: u64, baseline: bool) -> String {
    let s = scale();
    let volatile = if baseline { 0 } else { (volatile / s).max(1) };
    format!(
        "[metadata]\ndevice_meta_interval_ms = {}\ndevice_meta_min_interval_secs = 0\ndevice_meta_volatile_interval_secs = {volatile}\n",
        (10_000 / s).max(100)
    )
}

/// The measured hour, after start-up settled.
fn hour() -> Duration {
    Duration::from_secs(3600 / scale())
}

const SETTLE: Duration = Duration::from_secs(10);

/// MQTT: (messages, payload bytes) the broker got from the device in an hour.
async fn mqtt(baseline: bool) -> (u64, u64) {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let broker = mosquitto::Broker::start(d.dir.path(), "");
    let _bridge =
        mosquitto::Bridge::start(&d, d.dir.path(), broker.port, &metadata(600, baseline), "");
    tokio::time::sleep(SETTLE).await;
    // -R: not the retained messages the broker holds, only what arrives now.
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", "pv/dev-1/#", "-R", "-F", "%l"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    tokio::time::sleep(hour()).await;
    let _ = sub.kill();
    let out = sub.stdout.take().unwrap();
    let lens: Vec<u64> = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let _ = sub.wait();
    (lens.len() as u64, lens.iter().sum())
}

/// Pantacor Hub: requests in an hour, and how many of them were device-meta.
async fn pantahub(baseline: bool) -> (u64, u64) {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let s = scale() as f64;
    let backend = format!(
        "poll_interval_secs = {}\nuser_meta_interval_secs = {}\ndevice_meta_interval_secs = {}\nprogress_interval_secs = {}\n",
        5.0 / s,
        5.0 / s,
        10.0 / s,
        6.0 / s
    );
    let (_b, _id) = hubkit::claimed(&d, &hub, &metadata(600, baseline), &backend).await;
    tokio::time::sleep(SETTLE).await;
    let before = hub.seen();
    tokio::time::sleep(hour()).await;
    let seen = hub.seen();
    let new = &seen[before.len()..];
    let meta = new
        .iter()
        .filter(|r| r.path.ends_with("/device-meta"))
        .count();
    (new.len() as u64, meta as u64)
}

/// Azure IoT Hub: (operations, 4 KB units billed) in an hour.
async fn azure(baseline: bool) -> (u64, u64) {
    let e = azurekit::env_with(|c| c.log_rate = 0.0).await;
    let s = scale();
    let backend = format!(
        "connection_string_file = \"{}\"\nsas_lifetime_secs = {}\nlog_interval_secs = {}\n",
        e.conn_file.display(),
        (3600 / s).max(10),
        600 / s
    );
    let b = azurekit::Bridge::start(&e.d, &e.hub, &e.pki, &backend, &metadata(1800, baseline));
    e.connected(&b).await;
    tokio::time::sleep(SETTLE).await;
    e.hub.reset_meter("dev-1");
    tokio::time::sleep(hour()).await;
    let m = e.hub.meter("dev-1");
    (m.messages, m.units)
}

/// hawkBit: (requests, of them configData) in an hour, the server asking for a
/// poll every 5 minutes (hawkBit's default).
async fn hawkbit(baseline: bool) -> (u64, u64) {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 0.0).await;
    let srv = pv_testkit::ddi::FakeHawkbit::start().await.unwrap();
    srv.add_target("dev-1", None);
    srv.set_anonymous(true);
    let sleep = (300 / scale()).max(1);
    srv.set_sleep(&format!("00:{:02}:{:02}", sleep / 60, sleep % 60));
    let _b = hawkbitkit::Bridge::start(&d, &srv.url(), &metadata(600, baseline));
    tokio::time::sleep(SETTLE).await;
    let (p0, c0) = (srv.polls("dev-1"), srv.attribute_puts("dev-1"));
    tokio::time::sleep(hour()).await;
    let (p, c) = (srv.polls("dev-1") - p0, srv.attribute_puts("dev-1") - c0);
    (u64::from(p + c), u64::from(c))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = scale();
    println!(
        "machine: {} cores, {}; one hour scaled down {s}x ({} s measured)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::consts::ARCH,
        hour().as_secs()
    );
    let (m_p, m_b, h_p, h_b, a_p, a_b, k_p, k_b) = rt.block_on(async {
        tokio::join!(
            mqtt(false),
            mqtt(true),
            pantahub(false),
            pantahub(true),
            azure(false),
            azure(true),
            hawkbit(false),
            hawkbit(true)
        )
    });
    println!("== idle cost per device and hour (and per day = 24 x)");
    println!("backend    measure                 policy      baseline (every device-meta change)");
    println!(
        "mqtt       messages                {:>8}    {:>8}",
        m_p.0, m_b.0
    );
    println!(
        "mqtt       payload bytes           {:>8}    {:>8}",
        m_p.1, m_b.1
    );
    println!(
        "pantahub   requests                {:>8}    {:>8}",
        h_p.0, h_b.0
    );
    println!(
        "pantahub   of them device-meta     {:>8}    {:>8}",
        h_p.1, h_b.1
    );
    println!(
        "azure      billed operations       {:>8}    {:>8}",
        a_p.0, a_b.0
    );
    println!(
        "azure      billed 4 KB units       {:>8}    {:>8}   (goal: <= 12.5/h, 300/day)",
        a_p.1, a_b.1
    );
    println!(
        "azure      units per day           {:>8}    {:>8}",
        a_p.1 * 24,
        a_b.1 * 24
    );
    println!(
        "hawkbit    requests                {:>8}    {:>8}   (polls at the server's 5 min)",
        k_p.0, k_b.0
    );
    println!(
        "hawkbit    of them configData      {:>8}    {:>8}",
        k_p.1, k_b.1
    );
}
