//! `pv-bridge demo`: a zero-setup tour. It starts a simulated Pantavisor device
//! (pv-sim) in a temporary directory and drives it through pv-ctrl exactly as the
//! bridge does: stage and run a container update, a reboot update, a failing update
//! with its rollback, metadata, and the log tree. No network, no external services.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::pvctrl::{Command, Meta, PvCtrl, hex};
use crate::state::{Revision, State, transition};
use pv_testkit::sim::{Sim, SimConfig};

fn say(step: &str) {
    println!("\n==> {step}");
}

fn detail(text: &str) {
    println!("    {text}");
}

/// Uploads the blobs, then stages the running state edited by `edit`.
async fn stage(
    pv: &PvCtrl,
    name: &str,
    blobs: &[Vec<u8>],
    edit: impl FnOnce(&mut Value),
) -> Result<Revision> {
    let have: BTreeSet<String> = pv.objects().await?.into_iter().map(|o| o.sha256).collect();
    for b in blobs {
        let sha = hex(&Sha256::digest(b));
        if !have.contains(&sha) {
            pv.put_object(&sha, &b[..], b.len() as u64).await?;
            detail(&format!(
                "uploaded object {}… ({} bytes)",
                &sha[..12],
                b.len()
            ));
        }
    }
    let running = pv.step("current").await?;
    let mut state: Value = serde_json::from_slice(&running)?;
    edit(&mut state);
    let bytes = serde_json::to_vec(&state)?;
    let rev: Revision = format!("locals/{name}").parse()?;
    // `_sim/` keys are pv-sim directives that the simulator leaves out of its
    // reboot decision; leave them out of the prediction too.
    let mut predicted = state.clone();
    if let Some(m) = predicted.as_object_mut() {
        m.retain(|k, _| !k.starts_with("_sim/"));
    }
    let t = transition(&State::parse(&running)?, &State::from_value(predicted)?);
    detail(&match &t {
        crate::state::Transition::Reboot { reason } => {
            format!("our state model predicts a reboot: {reason}")
        }
        crate::state::Transition::NonReboot { restarted } => {
            format!("our state model predicts no reboot; restarting {restarted:?}")
        }
    });
    pv.put_step(&rev, &bytes).await?;
    detail(&format!("staged {rev}"));
    Ok(rev)
}

/// Runs a staged revision and narrates its progress until it is final.
async fn run_and_follow(pv: &PvCtrl, rev: &Revision) -> Result<String> {
    pv.command(Command::LocalRun(rev.clone())).await?;
    detail("LOCAL_RUN queued; following progress:");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let mut offline = false;
    loop {
        match pv.progress(&rev.to_string()).await {
            Ok(p) => {
                if offline {
                    detail("  (device is back)");
                    offline = false;
                }
                let line = format!("{} {}", p.status, p.status_msg);
                if line != last {
                    detail(&format!("  {line}"));
                    last = line;
                }
                if p.status.as_str() == "INPROGRESS" {
                    // What the bridge does once its backend is connected again.
                    let _ = pv.signal_ready().await;
                }
                if p.status.is_final() {
                    return Ok(p.status.to_string());
                }
            }
            Err(e) if e.is_unreachable() => {
                if !offline {
                    detail("  (pv-ctrl socket gone: the device is rebooting)");
                    offline = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            bail!("{rev} did not finish within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn running(pv: &PvCtrl) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(m) = pv.meta(Meta::Device).await {
            return Ok(m
                .get("pantavisor.revision")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned());
        }
        if Instant::now() > deadline {
            bail!("device did not come back");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo; returns an error if any step does not end as expected.
pub async fn run() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::tempdir().context("create a temporary directory")?;
    let socket = dir.path().join("pv-ctrl");
    let mut cfg = SimConfig::new(dir.path().join("storage"), &socket);
    cfg.commit_delay = Duration::from_secs(1);
    cfg.reboot = Duration::from_millis(800);
    cfg.tick = Duration::from_millis(200);
    cfg.log_rate = 5.0;
    say("Starting a simulated Pantavisor device (pv-sim)");
    let sim = Sim::start(cfg).await.context("start pv-sim")?;
    detail(&format!("pv-ctrl socket: {}", socket.display()));
    let pv = PvCtrl::new(&socket);
    let info = pv.probe().await?;
    detail(&format!(
        "server: {:?}, Pantavisor {}",
        info.generation,
        info.version.unwrap_or_default()
    ));
    for c in pv.containers().await? {
        detail(&format!(
            "container {:<10} {:<8} goal {:<7} policy {}",
            c.name, c.status, c.status_goal, c.restart_policy
        ));
    }
    detail(&format!("running revision: {}", running(&pv).await?));
    pv.signal_ready().await?;
    detail("the bridge container signalled READY (its status goal)");

    say("Update 1: a new `app` container image (no reboot needed)");
    let app = b"app v2: a new root filesystem\n".repeat(2048);
    let r1 = stage(&pv, "app-v2", std::slice::from_ref(&app), |s| {
        s["app/root.squashfs"] = json!(hex(&Sha256::digest(&app)));
    })
    .await?;
    let end = run_and_follow(&pv, &r1).await?;
    if end != "UPDATED" {
        bail!("expected UPDATED, got {end}");
    }
    detail(&format!("running revision: {}", running(&pv).await?));

    say("Update 2: a new kernel (the device reboots, then commits)");
    let kernel = b"kernel 6.6.99-demo\n".repeat(4096);
    let r2 = stage(&pv, "kernel-v2", std::slice::from_ref(&kernel), |s| {
        s["bsp/kernel.img"] = json!(hex(&Sha256::digest(&kernel)));
    })
    .await?;
    let end = run_and_follow(&pv, &r2).await?;
    if end != "DONE" {
        bail!("expected DONE, got {end}");
    }
    detail(&format!(
        "running revision: {} (now the rollback point)",
        running(&pv).await?
    ));

    say("Update 3: a revision whose container fails to start");
    let r3 = stage(&pv, "broken", &[], |s| {
        s["app/run.json"]["exec"] = json!("/bin/does-not-exist");
        s["_sim/behaviour.json"] = json!({"outcome": "error"});
    })
    .await?;
    let end = run_and_follow(&pv, &r3).await?;
    if end != "ERROR" {
        bail!("expected ERROR, got {end}");
    }
    let p = pv.progress(&r3.to_string()).await?;
    if let Some(logs) = p.logs {
        for l in logs.lines().take(2) {
            detail(&format!("  failure log: {l}"));
        }
    }
    let now = running(&pv).await?;
    detail(&format!(
        "Pantavisor rolled back: running revision is {now} again"
    ));

    say("Metadata: user-meta down, device-meta up");
    pv.put_meta(Meta::User, "app.greeting", b"hello from the cloud")
        .await?;
    let um = pv.meta(Meta::User).await?;
    detail(&format!("user-meta app.greeting = {}", um["app.greeting"]));
    let dm = pv.meta(Meta::Device).await?;
    for k in ["pantavisor.revision", "pantavisor.mode", "storage"] {
        detail(&format!(
            "device-meta {k} = {}",
            dm.get(k).cloned().unwrap_or(Value::Null)
        ));
    }

    say("Logs: Pantavisor's log tree, as the bridge will forward it");
    let log = std::fs::read_to_string(sim.storage().join("logs/current/pantavisor/pantavisor.log"))
        .unwrap_or_default();
    for l in log
        .lines()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        detail(l);
    }

    sim.stop().await;
    say(&format!("Done in {:.1} s", started.elapsed().as_secs_f64()));
    detail(
        "Try it by hand: cargo run -p pv-testkit --bin pv-sim -- --storage /tmp/dev --socket /tmp/pv-ctrl",
    );
    detail("then: curl --unix-socket /tmp/pv-ctrl http://localhost/containers");
    detail(
        "On a real device pv-bridge talks to /pantavisor/pv-ctrl: pv-bridge run --config /etc/pv-bridge/config.toml",
    );
    Ok(())
}
