//! Benchmark harness (not a test): `cargo bench --bench fleet`.
//!
//! One `pv-fleet deploy` to N devices (#17): N simulated devices sharing their
//! factory objects, N pv-bridge processes with the MQTT backend, one mosquitto,
//! side by side in one run for each N of `PV_FLEET_SIZES` (default `1,10,100`).
//! Prints the time until every device reported its final status (the goal:
//! N = 100 within 1.5x of N = 1), what each device sent the broker during the
//! deploy, and the bridges' resident memory.
//!
//! Then each N again, idle for an hour scaled down `PV_BENCH_SCALE` times
//! (default 60; every device-meta timer divided alike): the messages and bytes
//! per device and idle hour (the goal: ≤ 12). `PV_FLEET_IDLE=0` skips it.
//!
//! `PV_FLEET_BRIDGE=<path>` runs another pv-bridge binary on the devices, e.g.
//! the static device build (`target/x86_64-unknown-linux-musl/device/pv-bridge`
//! after `.ci/footprint`) to measure its memory.
//!
//! Needs mosquitto and mosquitto-clients (Debian packages).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/fleet_harness.rs"]
mod harness;
#[path = "../tests/common/mosquitto.rs"]
mod mosquitto;

use std::time::Duration;

fn main() {
    let sizes: Vec<usize> = std::env::var("PV_FLEET_SIZES")
        .unwrap_or_else(|_| "1,10,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .filter(|n| (1..=2000).contains(n))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores, {}; devices run {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::consts::ARCH,
        harness::bridge_bin().display()
    );
    println!(
        "devices  deploy(s)  vs N=1  succeeded  msgs/device  bytes/device  bridge RSS max/mean (kB)  pv-fleet deploy/status peak (kB)"
    );
    let mut first: Option<f64> = None;
    for n in sizes {
        let (_keep, dir) = harness::scratch();
        let r = rt.block_on(harness::run(&dir, n, Duration::from_secs(600)));
        let secs = r.deploy.as_secs_f64();
        let base = *first.get_or_insert(secs);
        println!(
            "{:>7}  {:>9.2}  {:>5.2}x  {:>9}  {:>11.1}  {:>12.0}  {:>12}/{:<12}  {}/{}",
            r.devices,
            secs,
            secs / base,
            r.succeeded,
            r.messages_per_device,
            r.bytes_per_device,
            r.rss_max_kb,
            r.rss_mean_kb,
            r.fleet_peak_kb,
            r.status_peak_kb
        );
    }
    // The idle hour (scaled down PV_BENCH_SCALE times, default 60), per N.
    let scale: u64 = std::env::var("PV_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(60);
    if std::env::var("PV_FLEET_IDLE").is_ok_and(|v| v == "0") {
        return;
    }
    println!("\nidle hour (scaled {scale}x): devices  msgs/device/hour  bytes/device/hour");
    for n in std::env::var("PV_FLEET_SIZES")
        .unwrap_or_else(|_| "1,10,100".into())
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
        .filter(|n| (1..=2000).contains(n))
    {
        let (_keep, dir) = harness::scratch();
        let (m, b) = rt.block_on(harness::idle(&dir, n, scale));
        println!("{:>35}  {:>16.1}  {:>17.0}", n, m, b);
    }
}
