//! `pv-fleet deploy` as a rollout (#17) against mosquitto, real pv-bridge
//! processes and simulated devices: selection by glob and `--where`, waves, a
//! failure threshold that halts the rollout, a per-device timeout, stopping
//! with Ctrl-C and resuming from the record, and the `--json` summary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/fleet_harness.rs"]
mod harness;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mosquitto::{fleet, publish, retained};
use serde_json::{Value, json};

/// The `--json` summary of a run.
fn summary(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).expect("a JSON summary on stdout")
}

/// Each device's (status, wave, timed_out) in a summary.
fn devices(s: &Value) -> Vec<(String, String, u64, bool)> {
    s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_owned(),
                d["status"].as_str().unwrap_or("-").to_owned(),
                d["wave"].as_u64().unwrap(),
                d["timed_out"] == true,
            )
        })
        .collect()
}

fn status_of(s: &Value, dev: &str) -> String {
    devices(s)
        .into_iter()
        .find(|d| d.0 == dev)
        .map(|d| d.1)
        .unwrap()
}

fn current(port: u16, dev: &str) -> String {
    retained(port, &format!("pv/{dev}/revision/current"))
        .and_then(|c| c["rev"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Devices named in `healthy` get the file that cures the export's fault.
fn cure(setup: &harness::Setup, healthy: &[&str]) {
    for (i, id) in setup.ids.iter().enumerate() {
        if healthy.contains(&id.as_str()) {
            std::fs::write(setup.sims[i].storage().join("healthy"), b"").unwrap();
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Twelve devices, three of them with a revision that fails. Waves: a canary of
/// two, then waves of three. `--max-failures 1` halts in the third wave; the
/// later waves are never offered and what had not started is withdrawn. The
/// operator raises the threshold and resumes from the record: the rest is
/// offered and the rollout ends, failed but complete, with no device offered
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_halts_on_failures_and_resumes_from_its_record() {
    let (_keep, dir) = harness::scratch();
    let setup = harness::Setup::start(&dir, 12, Duration::from_secs(120)).await;
    let port = setup.broker.port;
    // Sorted: dev-1 dev-10 | dev-11 dev-12 dev-2 | dev-3 dev-4 dev-5 | dev-6 dev-7 dev-8 | dev-9
    let sick = ["dev-3", "dev-5", "dev-7"];
    let healthy: Vec<&str> = setup
        .ids
        .iter()
        .map(String::as_str)
        .filter(|d| !sick.contains(d))
        .collect();
    cure(&setup, &healthy);
    let export = setup.export(
        &dir.join("export"),
        json!({"_sim/behaviour.json": {"outcome": "error", "unless": "healthy"}}),
    );
    let record = dir.join("rollout.json");
    let o = tokio::task::block_in_place(|| {
        fleet(
            port,
            &[
                "deploy",
                s(&export),
                "-d",
                "dev-*",
                "--id",
                "r2",
                "--canary",
                "2",
                "--wave-size",
                "3",
                "--max-failures",
                "1",
                "--record",
                s(&record),
                "--json",
                "--timeout",
                "300",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(1));
    let sum = summary(&o);
    assert_eq!(sum["outcome"], "halted", "{sum}");
    assert_eq!(sum["waves"], 5);
    assert_eq!(sum["failures_tolerated"], 1);
    for d in ["dev-1", "dev-10", "dev-11", "dev-12", "dev-2"] {
        assert_eq!(status_of(&sum, d), "UPDATED", "{d}: {sum}");
        assert_eq!(current(port, d), "locals/r2", "{d}");
    }
    assert_eq!(status_of(&sum, "dev-3"), "ERROR");
    assert_eq!(status_of(&sum, "dev-5"), "ERROR");
    // dev-4 ran beside them: DONE if it got there before the halt, CANCELLED
    // if the withdrawal reached it first.
    assert!(
        ["UPDATED", "CANCELLED"].contains(&status_of(&sum, "dev-4").as_str()),
        "{sum}"
    );
    for d in ["dev-6", "dev-7", "dev-8", "dev-9"] {
        assert_eq!(status_of(&sum, d), "-", "{d} was offered: {sum}");
        assert!(
            retained(port, &format!("pv/{d}/revision/set")).is_none(),
            "{d} has an offer"
        );
        assert_ne!(current(port, d), "locals/r2", "{d}");
    }
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("halted: 2 failures"), "{text}");
    assert!(text.contains("--resume"), "{text}");
    let rec: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["state"], "halted");

    // A new rollout never overwrites a record.
    let o = tokio::task::block_in_place(|| {
        fleet(
            port,
            &["deploy", s(&export), "-d", "dev-1", "--record", s(&record)],
        )
    });
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the file exists"));

    // Resuming with the same threshold changes nothing and says why.
    let o = tokio::task::block_in_place(|| fleet(port, &["deploy", "--resume", s(&record)]));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("halted"));
    assert!(retained(port, "pv/dev-6/revision/set").is_none());

    // A higher threshold lets it go on to the end.
    let o = tokio::task::block_in_place(|| {
        fleet(
            port,
            &[
                "deploy",
                "--resume",
                s(&record),
                "--max-failures",
                "3",
                "--json",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(1), "a device failed");
    let sum = summary(&o);
    assert_eq!(sum["outcome"], "failed", "{sum}");
    assert_eq!(status_of(&sum, "dev-7"), "ERROR");
    for d in ["dev-6", "dev-8", "dev-9"] {
        assert_eq!(status_of(&sum, d), "UPDATED", "{d}: {sum}");
        assert_eq!(current(port, d), "locals/r2", "{d}");
    }
    assert_eq!(sum["counts"]["failed"], 3);
    assert_eq!(sum["counts"]["not_offered"], 0);
    // The failed devices rolled back; none ran the revision twice.
    for d in sick {
        assert_ne!(current(port, d), "locals/r2", "{d}");
    }
    let rec: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["state"], "finished");
    setup.stop().await;
}

/// Selection by `--where` on user-meta, a silent device timed out and its offer
/// withdrawn, and a rollout stopped with Ctrl-C and resumed to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_selects_a_silent_device_times_out_and_ctrl_c_stops_a_resumable_rollout() {
    let (_keep, dir) = harness::scratch();
    let mut setup = harness::Setup::start(&dir, 6, Duration::from_secs(120)).await;
    let port = setup.broker.port;
    // The beta channel: dev-2, dev-3, dev-5.
    for d in ["dev-2", "dev-3", "dev-5"] {
        publish(
            port,
            &format!("pv/{d}/meta/user/set"),
            r#"{"v":1,"version":1,"data":{"app.channel":"beta"}}"#,
            true,
        );
    }
    for d in ["dev-2", "dev-3", "dev-5"] {
        let t0 = Instant::now();
        while retained(port, &format!("pv/{d}/meta/user"))
            .is_none_or(|m| m["data"]["app.channel"] != "beta")
        {
            assert!(t0.elapsed() < Duration::from_secs(30), "{d} never applied");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let export = setup.export(&dir.join("export"), json!({}));
    // dev-3 goes silent: its bridge is gone.
    setup.kill_bridge(2);
    let o = tokio::task::block_in_place(|| {
        fleet(
            port,
            &[
                "deploy",
                s(&export),
                "--where",
                "app.channel=beta",
                "--id",
                "beta1",
                "--device-timeout",
                "6s",
                "--json",
            ],
        )
    });
    assert_eq!(o.status.code(), Some(1));
    let sum = summary(&o);
    let got: Vec<_> = devices(&sum).into_iter().map(|d| (d.0, d.1, d.3)).collect();
    assert_eq!(
        got,
        [
            ("dev-2".into(), "UPDATED".into(), false),
            ("dev-3".into(), "-".into(), true),
            ("dev-5".into(), "UPDATED".into(), false),
        ]
    );
    assert_eq!(sum["counts"]["timed_out"], 1);
    // The timed-out offer was withdrawn; devices outside the selection got none.
    for d in ["dev-3", "dev-1", "dev-4", "dev-6"] {
        assert!(
            retained(port, &format!("pv/{d}/revision/set")).is_none(),
            "{d}"
        );
    }

    // A rollout in waves of one, stopped by Ctrl-C while it runs.
    let record = dir.join("stopped.json");
    let mut child = Guard(Some(
        Command::new(env!("CARGO_BIN_EXE_pv-fleet"))
            .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
            .args([
                "deploy",
                s(&export),
                "-d",
                "dev-1,dev-4,dev-6",
                "--id",
                "w1",
            ])
            .args(["--canary", "1", "--wave-size", "1", "--record", s(&record)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let t0 = Instant::now();
    loop {
        let rec: Option<Value> = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let offered = rec.as_ref().map_or(0, |r| {
            r["devices"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| !d["offered_at"].is_null())
                .count()
        });
        if offered >= 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "nothing offered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let child = child.0.take().unwrap();
    kill_int(child.id());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("stopped by the operator"), "{err}");
    let rec: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["state"], "running");
    assert!(
        rec["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["offered_at"].is_null()),
        "the stop came after the last wave: {rec}"
    );
    let o =
        tokio::task::block_in_place(|| fleet(port, &["deploy", "--resume", s(&record), "--json"]));
    assert_eq!(o.status.code(), Some(0));
    let sum = summary(&o);
    assert_eq!(sum["counts"]["succeeded"], 3, "{sum}");
    for d in ["dev-1", "dev-4", "dev-6"] {
        assert_eq!(current(port, d), "locals/w1", "{d}");
    }

    // The status view: counts, the beta channel by --where, and --watch
    // redrawing when a device appears.
    let o = tokio::task::block_in_place(|| fleet(port, &["status", "--where", "app.channel=beta"]));
    assert_eq!(o.status.code(), Some(0));
    let view = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(view.starts_with("3 devices\n"), "{view}");
    assert!(view.contains("beta1 UPDATED 2"), "{view}");
    let mut watch = Guard(Some(
        Command::new(env!("CARGO_BIN_EXE_pv-fleet"))
            .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
            .args(["status", "--all", "--watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    publish(
        port,
        "pv/dev-99/status",
        r#"{"v":1,"online":true,"state":"ready","revision":"locals/x"}"#,
        true,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let watch = watch.0.take().unwrap();
    kill_int(watch.id());
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let first = text.find("6 devices\n").unwrap_or_else(|| panic!("{text}"));
    let later = text.find("7 devices\n").unwrap_or_else(|| panic!("{text}"));
    assert!(first < later, "{text}");
    setup.stop().await;
}

/// Kills the child if the test fails before it is done with it.
struct Guard(Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn kill_int(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}
