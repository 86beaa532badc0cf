//! What an idle device costs on IoT Hub, metered by the fake hub as IoT Hub bills
//! (every twin read, reported patch, D2C message, method and C2D in 4 KB units;
//! connections and keep-alives free). Goal (issue #14): at most 300 units per
//! device per idle day with the default settings (`docs/azure.md`, "Cost").
//!
//! A day is too long for a test, so time is scaled 60:1: one minute stands for an
//! hour, with every interval of the defaults divided by 60 (SAS lifetime 3600 s →
//! 60 s, device-meta volatile interval 1800 s → 30 s, device-meta read 10 s →
//! 166 ms, log interval 600 s → 10 s).

#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/azure.rs"]
mod azurekit;

use std::time::Duration;

use azurekit::{Bridge, env_with};

const SCALE: u64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_day_costs_at_most_300_billed_units() {
    // Idle: no update, no container writing logs (Pantavisor's own lines only).
    let e = env_with(|c| c.log_rate = 0.0).await;
    let backend = format!(
        "connection_string_file = \"{}\"\nsas_lifetime_secs = {}\nlog_interval_secs = {}\n",
        e.conn_file.display(),
        3600 / SCALE,
        600 / SCALE,
    );
    let engine = format!(
        "[metadata]\ndevice_meta_interval_ms = {}\ndevice_meta_min_interval_secs = 0\ndevice_meta_volatile_interval_secs = {}\n",
        10_000 / SCALE,
        1800 / SCALE,
    );
    let b = Bridge::start(&e.d, &e.hub, &e.pki, &backend, &engine);
    e.connected(&b).await;
    // The first connection's full report and the boot's log lines are a start-up
    // cost, not an idle one.
    tokio::time::sleep(Duration::from_secs(10)).await;
    e.hub.reset_meter("dev-1");
    let connects = e.hub.connects("dev-1");
    // One scaled hour.
    tokio::time::sleep(Duration::from_secs(3600 / SCALE)).await;
    let m = e.hub.meter("dev-1");
    let per_day = m.units * 24;
    eprintln!(
        "idle hour: {} operations, {} units ({:?}); {} reconnects; per day ≈ {per_day} units",
        m.messages,
        m.units,
        m.by_kind,
        e.hub.connects("dev-1") - connects
    );
    assert!(
        e.hub.connects("dev-1") > connects,
        "the SAS token was renewed in the hour"
    );
    assert!(
        per_day <= 300,
        "an idle day would cost {per_day} units: {:?}",
        m.by_kind
    );
    drop(b);
}
