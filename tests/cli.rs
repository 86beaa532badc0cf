//! The `pv-bridge` binary: version, check-config, run and demo.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pv_testkit::sim::Generation;

fn bridge() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pv-bridge"));
    c.env_remove("RUST_LOG")
        .env_remove("PV_BRIDGE_CONFIG")
        .env_remove("PV_BRIDGE_LOG_FORMAT");
    c
}

#[test]
fn version_is_printed() {
    let out = bridge().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pv-bridge {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_accepts_a_good_file_and_locates_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[pantavisor]\nsocket = \"/pantavisor/pv-ctrl\"\n\n[bridge]\nstate_dir = \"/storage/pv-bridge\"\n\n[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"/media/updates\"\n",
    )
    .unwrap();
    let out = bridge().arg("check-config").arg(&good).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(": OK") && text.contains("  - usb (local)"),
        "{text}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[bridge]\nstate_dir = \"/x\"\n\n[[backend]]\ntype = \"http\"\nname = \"a\"\n",
    )
    .unwrap();
    let out = bridge().arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "{}:5: backend type must be one of mqtt, pantahub, azure, hawkbit, local, got \"http\"",
            bad.display()
        )
    );
    // The path may also come from PV_BRIDGE_CONFIG.
    let out = bridge()
        .arg("check-config")
        .env("PV_BRIDGE_CONFIG", &good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = bridge()
        .arg("check-config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml: cannot read:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reaches_pv_ctrl_logs_json_and_stops_on_sigterm() {
    let d = common::start(Generation::Gen2).await;
    // Configuration overrides from user-meta: one allowed, one refused.
    use pv_bridge::pvctrl::Meta;
    d.pv.put_meta(Meta::User, "pv-bridge.config.logs.rate_per_sec", b"25")
        .await
        .unwrap();
    d.pv.put_meta(Meta::User, "pv-bridge.config.bridge.state_dir", b"/tmp")
        .await
        .unwrap();
    let cfg = d.dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!("[pantavisor]\nsocket = \"{}\"\n", d.cfg().socket.display()),
    )
    .unwrap();
    let mut child = bridge()
        .args(["run", "--config"])
        .arg(&cfg)
        .env("PV_BRIDGE_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let reachable = line.contains("pv-ctrl reachable");
            seen.push(line);
            if reachable {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.is_finished() {
        assert!(
            Instant::now() < deadline,
            "pv-bridge run never reported pv-ctrl"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = lines.join().unwrap();
    for l in &seen {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string(), "{l}");
    }
    let last: serde_json::Value = serde_json::from_str(seen.last().unwrap()).unwrap();
    assert_eq!(last["generation"], "Gen2");
    let text = seen.join("\n");
    assert!(
        text.contains("configuration override from user-meta applied")
            && text.contains("logs.rate_per_sec = 25"),
        "{text}"
    );
    assert!(
        text.contains("configuration override from user-meta refused")
            && text.contains("bridge.state_dir: not a setting user-meta may change"),
        "{text}"
    );
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn run_with_a_broken_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[pantavisor]\nsockt = \"/x\"\n").unwrap();
    let out = bridge()
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("c.toml:2: unknown field `sockt`"));
}

#[test]
fn demo_runs_end_to_end_without_external_services() {
    let started = Instant::now();
    let out = bridge().arg("demo").output().unwrap();
    // pv-fleet's summaries go to stderr, as they do for the real tool.
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "listening on mqtt://127.0.0.1:",
        "\"online\":true",
        "UPDATED      0.2/0.2 MiB  1/1 objects  Update finished, revision not set as rollback point",
        "app-v2: 1 succeeded, 0 failed\n",
        "objects via mqtt",
        "ERROR        0.1/0.1 MiB  1/1 objects  A container could not be started",
        "app-v3: 0 succeeded, 1 failed\n  failed: demo-1  ERROR A container could not be started",
        "rolled back to its rollback point (the last DONE revision): 0",
        "applied version 1: {\"app.greeting\":\"hello\"}",
        "on the device (pv-ctrl user-meta): app.greeting = \"hello\"",
        "successful: pong",
        "app-v3 ERROR",
        "With a real broker and device:",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Four forwarded log lines after the logs step.
    let logs = text
        .split("pv-fleet logs demo-1 -n 4")
        .nth(1)
        .unwrap_or_default();
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("synthetic log line"))
            .count(),
        4,
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo must finish in under a minute"
    );
}
