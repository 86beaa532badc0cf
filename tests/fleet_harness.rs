//! The fleet harness itself (#17), with a small fleet: ten pv-bridge processes
//! on ten simulated devices and one mosquitto, one `pv-fleet deploy` to all.
//! The numbers for 1, 10 and 100 devices come from `cargo bench --bench fleet`
//! (docs/performance.md); this checks that the harness measures a real run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/fleet_harness.rs"]
mod harness;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_devices_take_one_deploy_to_the_end() {
    let (_keep, dir) = harness::scratch();
    let r = harness::run(&dir, 10, Duration::from_secs(120)).await;
    eprintln!("{r:?}");
    assert_eq!(r.succeeded, 10, "{r:?}");
    assert!(r.deploy < Duration::from_secs(120), "{r:?}");
    // Each device said something (progress, the final status, its revision),
    // and not a flood of it.
    assert!(
        r.messages_per_device >= 3.0 && r.messages_per_device <= 40.0,
        "{r:?}"
    );
    assert!(r.rss_max_kb > 0, "{r:?}");
    assert_eq!(r.fleet_exit, Some(0), "{r:?}");
    assert!(r.fleet_peak_kb > 0 && r.status_peak_kb > 0, "{r:?}");
}
