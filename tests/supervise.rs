//! The device build's supervisor (ADR 0019): as the container's init, or with
//! `PV_BRIDGE_SUPERVISE=1`, `pv-bridge run` runs the bridge as a child, starts a
//! new one when it dies by a signal (a panic's abort in the device build),
//! passes SIGTERM on, and ends with the child's exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pv_testkit::sim::Generation;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(c) = children(self.0.id()).first() {
            let _ = Command::new("kill")
                .args(["-KILL", &c.to_string()])
                .status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

async fn child_other_than(pid: u32, old: Option<u32>, within: Duration) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Some(c) = children(pid).into_iter().find(|c| Some(*c) != old) {
            return c;
        }
        assert!(t0.elapsed() < within, "no new bridge process");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kill(sig: &str, pid: u32) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_that_dies_by_a_signal_is_started_again_and_sigterm_stops_both() {
    let d = common::start(Generation::Gen2).await;
    let dir = d.dir.path();
    let cfg = dir.join("bridge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n{}",
            d.cfg().socket.display(),
            d.storage().join("logs").display(),
            dir.join("state").display(),
            common::local("usb", "")
        ),
    )
    .unwrap();
    let log = dir.join("bridge.log");
    let parent = Killed(
        common::bridge_command(&cfg, &log)
            .env("PV_BRIDGE_SUPERVISE", "1")
            .spawn()
            .unwrap(),
    );
    let pid = parent.0.id();
    let first = child_other_than(pid, None, Duration::from_secs(10)).await;
    // A panic in the device build aborts: SIGABRT, as here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill("-ABRT", first);
    let second = child_other_than(pid, Some(first), Duration::from_secs(10)).await;
    assert_ne!(first, second);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the bridge aborted (a panic; its message is above); restarting in 1 s"),
        "{text}"
    );
    // The restarted bridge runs: it logs its start a second time.
    let t0 = Instant::now();
    while std::fs::read_to_string(&log)
        .unwrap()
        .matches("pv-ctrl reachable")
        .count()
        < 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the second bridge never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGTERM to the supervisor reaches the bridge, which stops cleanly; the
    // supervisor ends with its code and starts nothing more.
    let mut parent = parent;
    kill("-TERM", pid);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = parent.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the supervisor did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        !std::path::Path::new(&format!("/proc/{second}")).exists()
            || std::fs::read_to_string(format!("/proc/{second}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the bridge outlived its supervisor"
    );
}

#[tokio::test]
async fn a_bridge_that_exits_with_a_code_ends_the_supervisor_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[bridge\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("PV_BRIDGE_SUPERVISE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("restarting"), "{err}");
}
