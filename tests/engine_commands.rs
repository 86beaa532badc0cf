//! Commands from backends through the engine against pv-sim: dedupe by id, expiry,
//! `accepted` before anything destructive, and the final status of a reboot from
//! the journal after the bridge restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, engine, eventually, local, sha256_hex};
use pv_adapter_api::{BackendEvent, CommandKind, CommandResult, CommandStatus};
use pv_bridge::pvctrl::Command;
use pv_testkit::sim::{Generation, PowerState};
use serde_json::json;

async fn command(b: &Backend, id: &str, kind: CommandKind, expires_at: Option<u64>) {
    b.send(BackendEvent::Command {
        id: id.into(),
        kind,
        expires_at,
    })
    .await;
}

/// Waits until command `id` reaches `status`.
async fn result(b: &Backend, id: &str, status: CommandStatus) -> CommandResult {
    let view = b.view().await;
    eventually(
        Duration::from_secs(15),
        &format!("command {id} {status:?}"),
        || async {
            view.borrow()
                .commands
                .get(id)
                .filter(|r| r.status == status)
                .cloned()
        },
    )
    .await
}

fn pantavisor_log(d: &common::Device) -> String {
    std::fs::read_to_string(d.storage().join("logs/current/pantavisor/pantavisor.log"))
        .unwrap_or_default()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_deduplicated_expire_and_report_their_outcome() {
    let d = common::start(Generation::Gen2).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let cloud = &b[0];

    command(cloud, "p1", CommandKind::Ping, None).await;
    assert_eq!(
        result(cloud, "p1", CommandStatus::Successful)
            .await
            .reason
            .as_deref(),
        Some("pong")
    );

    command(cloud, "ssh-1", CommandKind::SshOn, Some(now() + 60)).await;
    result(cloud, "ssh-1", CommandStatus::Successful).await;
    // The same id again is answered from the journal and not carried out twice.
    command(cloud, "ssh-1", CommandKind::SshOn, Some(now() + 60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pantavisor_log(&d)
            .matches("processing command ENABLE_SSH")
            .count(),
        1
    );

    command(cloud, "late", CommandKind::Reboot, Some(now() - 1)).await;
    let r = result(cloud, "late", CommandStatus::Rejected).await;
    assert!(r.reason.unwrap().starts_with("expired at "));

    // GC reports what it reclaimed; a staged but never run revision is collected.
    let blob = b"orphaned".repeat(1000);
    d.pv.put_object(&sha256_hex(&blob), &blob[..], blob.len() as u64)
        .await
        .unwrap();
    command(cloud, "gc-1", CommandKind::Gc, None).await;
    let r = result(cloud, "gc-1", CommandStatus::Successful).await;
    assert_eq!(r.reason, Some(format!("reclaimed {} bytes", blob.len())));

    command(cloud, "c1", CommandKind::Cancel, None).await;
    result(cloud, "c1", CommandStatus::Failed).await;

    // Resync sends device-meta again even though it did not change.
    let mut view = cloud.view().await;
    eventually(Duration::from_secs(5), "device-meta", || async {
        (!view.borrow().device_meta.is_empty()).then_some(())
    })
    .await;
    view.borrow_and_update();
    command(cloud, "rs", CommandKind::Resync, None).await;
    result(cloud, "rs", CommandStatus::Successful).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            view.changed().await.unwrap();
            if !view.borrow_and_update().device_meta.is_empty() {
                break;
            }
        }
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_is_accepted_first_and_successful_after_the_restart() {
    let d = common::start(Generation::Gen2).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    command(&b[0], "rb-1", CommandKind::Reboot, None).await;
    result(&b[0], "rb-1", CommandStatus::Accepted).await;
    // The device reboots; on a real device the bridge goes down with it.
    d.sim
        .as_ref()
        .unwrap()
        .wait_power(PowerState::Rebooting)
        .await;
    stop.send(()).unwrap();
    task.await.unwrap();
    d.sim.as_ref().unwrap().wait_power(PowerState::On).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let r = result(&b[0], "rb-1", CommandStatus::Successful).await;
    assert_eq!(r.reason.as_deref(), Some("the device restarted"));
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A reboot answered 200 that never happened (a debug shell holds it in
/// BLOCK_REBOOT) is not reported successful because the bridge restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_that_did_not_happen_is_not_reported_successful() {
    let d = common::start(Generation::Gen2).await;
    std::fs::create_dir_all(d.storage().join("sim")).unwrap();
    std::fs::write(d.storage().join("sim/debug-shell"), b"").unwrap();
    // Up for more than a second before the command, as any real device.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    command(&b[0], "rb-held", CommandKind::Reboot, None).await;
    result(&b[0], "rb-held", CommandStatus::Accepted).await;
    eventually(Duration::from_secs(5), "the reboot held", || async {
        pantavisor_log(&d)
            .contains("holding on reboot because shell is opened")
            .then_some(())
    })
    .await;
    // Only the bridge restarts.
    stop.send(()).unwrap();
    task.await.unwrap();
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    let r = result(&b[0], "rb-held", CommandStatus::Failed).await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .starts_with("the device did not restart (up since "),
        "{r:?}"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_during_an_update_fails_with_the_reason() {
    let d = common::start_with(Generation::Gen2, |c| {
        c.commit_delay = Duration::from_secs(30)
    })
    .await;
    // An update in TESTING keeps Pantavisor's update lock.
    let mut state: serde_json::Value =
        serde_json::from_slice(&d.pv.step("current").await.unwrap()).unwrap();
    let root = b"busy app".repeat(10);
    d.pv.put_object(&sha256_hex(&root), &root[..], root.len() as u64)
        .await
        .unwrap();
    state["app/root.squashfs"] = json!(sha256_hex(&root));
    let rev: pv_bridge::state::Revision = "locals/busy".parse().unwrap();
    d.pv.put_step(&rev, state.to_string().as_bytes())
        .await
        .unwrap();
    d.pv.command(Command::LocalRun(rev)).await.unwrap();
    eventually(Duration::from_secs(10), "TESTING", || async {
        d.pv.progress("locals/busy")
            .await
            .ok()
            .filter(|p| p.status.as_str() == "TESTING")
    })
    .await;
    let (b, stop, task) = engine(&d, &local("cloud", ""), &["cloud"]);
    command(&b[0], "rb-2", CommandKind::Reboot, None).await;
    let r = result(&b[0], "rb-2", CommandStatus::Failed).await;
    assert_eq!(r.reason.as_deref(), Some("an update is in progress"));
    stop.send(()).unwrap();
    task.await.unwrap();
}
