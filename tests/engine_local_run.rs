//! LOCAL_RUN against what real devices do to it: a command lost to a power cut or
//! dropped in BLOCK_REBOOT, an answer lost after Pantavisor took it, and an UPDATED
//! revision that the next boot commits or rolls back. Each test failed before its
//! fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::faults::*;
use common::{engine, eventually, local};
use pv_adapter_api::{BackendEvent, UpdateStatus};
use pv_testkit::sim::{Generation, LostAnswer};
use serde_json::{Value, json};

/// C3: a power cut between LOCAL_RUN's 200 and its processing loses the command
/// (the slot lives in RAM). The bridge sees the revision not starting, sends it
/// again, and the update completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_lost_to_a_power_cut_is_sent_again() {
    let mut d = common::start(Generation::Gen2).await;
    let (b, stop, task) = engine(
        &d,
        &format!("{LOST_FAST}{}", local("cloud", "")),
        &["cloud"],
    );
    d.sim.as_ref().unwrap().pause(true);
    b[0].send(BackendEvent::Offer(inline_offer(&d, "lost1").await))
        .await;
    eventually(Duration::from_secs(10), "LOCAL_RUN in the slot", || async {
        (d.sim.as_ref().unwrap().pending_command().as_deref() == Some("LOCAL_RUN")).then_some(())
    })
    .await;
    d.crash_and_restart().await;
    let p = final_of(&b[0], "lost1").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// C3: LOCAL_RUN dropped twice (BLOCK_REBOOT: a debug shell holds a reboot) ends
/// the update with a status that says the device lost the command, instead of
/// waiting forever; the bridge is not wedged: after the shell closes, a new offer
/// installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_dropped_twice_ends_the_update_and_nothing_is_wedged() {
    let d = common::start(Generation::Gen2).await;
    let shell = d.storage().join("sim/debug-shell");
    std::fs::create_dir_all(shell.parent().unwrap()).unwrap();
    std::fs::write(&shell, b"").unwrap();
    d.pv.command(pv_bridge::pvctrl::Command::Reboot("held".into()))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the reboot held", || async {
        std::fs::read_to_string(d.storage().join("logs/current/pantavisor/pantavisor.log"))
            .unwrap_or_default()
            .contains("holding on reboot")
            .then_some(())
    })
    .await;
    let (b, stop, task) = engine(
        &d,
        &format!("{LOST_FAST}{}", local("cloud", "")),
        &["cloud"],
    );
    b[0].send(BackendEvent::Offer(inline_offer(&d, "held1").await))
        .await;
    let p = final_of(&b[0], "held1").await;
    assert_eq!(p.status, UpdateStatus::Error, "{p:?}");
    assert!(
        p.status_msg
            .starts_with("the device lost the LOCAL_RUN command: locals/held1 had not started"),
        "{}",
        p.status_msg
    );
    let log = std::fs::read_to_string(d.storage().join("logs/current/pantavisor/pantavisor.log"))
        .unwrap();
    assert_eq!(
        log.matches("cmd received but ignored").count(),
        2,
        "sent twice, dropped twice: {log}"
    );
    // The shell closes; the held reboot happens; the next offer runs.
    std::fs::remove_file(&shell).unwrap();
    b[0].send(BackendEvent::Offer(inline_offer(&d, "after").await))
        .await;
    let p = final_of(&b[0], "after").await;
    assert_eq!(p.status, UpdateStatus::Updated, "{p:?}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// M1: Pantavisor took LOCAL_RUN but its answer was lost (a timeout, then the
/// retry meets 503 "update ongoing" for our own run; or the connection broke).
/// The bridge asks the revision's progress instead of reporting a false WONTGO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_whose_answer_was_lost_is_followed_not_refused() {
    for (id, how) in [
        ("silent", LostAnswer::Silence),
        ("hangup", LostAnswer::HangUp),
    ] {
        let d = common::start(Generation::Gen2).await;
        let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
        d.sim.as_ref().unwrap().lose_next_command_answer(how);
        b[0].send(BackendEvent::Offer(inline_offer(&d, id).await))
            .await;
        let p = final_of(&b[0], id).await;
        assert_eq!(p.status, UpdateStatus::Updated, "{how:?}: {p:?}");
        // Not sent again blindly: a second LOCAL_RUN would run the revision twice.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let runs = all_pantavisor_logs(&d)
            .matches(&format!("processing command LOCAL_RUN \"locals/{id}\""))
            .count();
        assert_eq!(runs, 1, "{how:?}");
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}

/// UPDATED is no rollback point: Pantavisor tries the revision again at the next
/// boot, where it is committed (DONE) or fails and rolls back (ERROR), and its own
/// hub client reports that new status. The bridge does the same after it restarts
/// with the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updated_revision_is_settled_after_the_next_boot() {
    for (id, behaviour, want) in [
        ("settles", None, UpdateStatus::Done),
        (
            "fails-later",
            Some(json!({"outcome": "error-after-reboot"})),
            UpdateStatus::Error,
        ),
    ] {
        let mut d = common::start(Generation::Gen2).await;
        let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
        let mut o = inline_offer(&d, id).await;
        if let Some(beh) = behaviour {
            let mut v: Value = serde_json::from_slice(&o.state).unwrap();
            v["_sim/behaviour.json"] = beh;
            o.state = serde_json::to_vec(&v).unwrap();
        }
        b[0].send(BackendEvent::Offer(o)).await;
        assert_eq!(final_of(&b[0], id).await.status, UpdateStatus::Updated);
        // The device loses power with the bridge; both come back.
        stop.send(()).unwrap();
        task.await.unwrap();
        d.crash_and_restart().await;
        let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
        let view = b[0].view().await;
        let p = eventually(Duration::from_secs(30), &format!("{id} {want}"), || async {
            view.borrow()
                .update
                .clone()
                .filter(|p| p.id == id && p.status == want)
        })
        .await;
        if want == UpdateStatus::Error {
            assert_eq!(p.status_msg, "A container could not be started");
            assert!(p.logs.is_some(), "Pantavisor's failure lines come along");
        }
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
