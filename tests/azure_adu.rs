//! Device Update for IoT Hub end to end: the real pv-bridge binary and pv-sim
//! against the fake IoT Hub's Device Update service side (import, signed
//! manifests under a test root key, deployments, cancel, retry, log requests,
//! Blob storage), as `docs/azure.md` tells users to run it.

#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/azure.rs"]
mod azurekit;

use std::path::Path;
use std::time::Duration;

use azurekit::{Bridge, Env, KEY, env_with, wait};
use base64::Engine;
use pv_testkit::iothub::adu::{AduService, Update};
use serde_json::{Value, json};
use sha2::Digest;

const SCRIPT: &[u8] = b"#!/bin/sh\necho 'pv-bridge must never run this'\nexit 1\n";

struct Adu {
    e: Env,
    svc: AduService,
    keys: std::path::PathBuf,
}

async fn setup() -> Adu {
    let e = env_with(|_| {}).await;
    let svc = AduService::start().await.unwrap();
    let keys = e.d.dir.path().join("adu-test-root-keys.json");
    std::fs::write(&keys, svc.root_keys_json()).unwrap();
    Adu { e, svc, keys }
}

impl Adu {
    fn bridge(&self) -> Bridge {
        self.e.bridge(&format!(
            "device_update = {{ manufacturer = \"pantacor\", model = \"pv-sim\", test_root_keys_file = \"{}\" }}\n",
            self.keys.display()
        ))
    }

    fn agent(&self) -> Value {
        self.e.reported()["deviceUpdate"]["agent"].clone()
    }

    /// Waits for the final report of `workflow` (state 0 or 255).
    async fn final_report(&self, b: &Bridge, workflow: &str, within: Duration) -> Value {
        wait(
            b,
            &format!("the final report of {workflow}"),
            within,
            || {
                let a = self.agent();
                (a["workflow"]["id"] == workflow && (a["state"] == 0 || a["state"] == 255))
                    .then_some(a)
            },
        )
        .await
    }

    /// How many reported patches made the agent report `state` for `workflow`
    /// (the patches replayed onto the twin, as the portal sees them).
    fn reports(&self, workflow: &str, state: i64) -> usize {
        let mut twin = serde_json::Map::new();
        let mut n = 0;
        for p in self.e.hub.reported_patches("dev-1") {
            let Value::Object(p) = p else { continue };
            pv_testkit::iothub::merge(&mut twin, &p);
            let touched = p
                .get("deviceUpdate")
                .and_then(|d| d.get("agent"))
                .is_some_and(|a| a.get("state").is_some() || a.get("workflow").is_some());
            let a = &twin["deviceUpdate"]["agent"];
            if touched && a["state"] == state && a["workflow"]["id"] == workflow {
                n += 1;
            }
        }
        n
    }

    /// Files the update's file server was asked for.
    fn downloads(&self) -> usize {
        self.svc.files.seen().len()
    }
}

/// A `pvr export` archive, packed with `tar` as pvr2adu does.
fn export(dir: &Path, name: &str, state: &Value, objects: &[&[u8]]) -> Vec<u8> {
    common::pack_export(dir, name, state, objects)
}

fn b64sha(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

/// The import manifest `pvr2adu export` writes (sizes as strings, as its jq does).
fn pvr2adu_import(version: &str, tgz: &[u8]) -> Value {
    json!({
        "updateId": {"provider": "pantacor", "name": "pv-sim-app", "version": version},
        "compatibility": [{"deviceManufacturer": "pantacor", "deviceModel": "pv-sim"}],
        "instructions": {"steps": [{
            "description": "install step",
            "handler": "microsoft/script:1",
            "files": ["pantavisor-installscript.sh", "pvadu.tgz"],
            "handlerProperties": {"scriptFileName": "pantavisor-installscript.sh",
                "arguments": "--log-level 0 --firmware-file pvadu.tgz",
                "installedCriteria": version}}]},
        "files": [
            {"filename": "pvadu.tgz", "sizeInBytes": tgz.len().to_string(), "hashes": {"sha256": b64sha(tgz)}},
            {"filename": "pantavisor-installscript.sh", "sizeInBytes": SCRIPT.len().to_string(), "hashes": {"sha256": b64sha(SCRIPT)}}],
        "createdDateTime": "2026-11-30T10:00:00Z",
        "manifestVersion": "4.0"
    })
}

/// pv-bridge's own handler: a whole `pvr export`.
fn whole_import(version: &str, tgz: &[u8]) -> Value {
    json!({
        "updateId": {"provider": "pantacor", "name": "pv-sim-full", "version": version},
        "compatibility": [{"manufacturer": "pantacor", "model": "pv-sim"}],
        "instructions": {"steps": [{
            "handler": "pantacor/pvrevision:1",
            "files": ["revision.tgz"],
            "handlerProperties": {"installedCriteria": version}}]},
        "files": [{"filename": "revision.tgz", "sizeInBytes": tgz.len(), "hashes": {"sha256": b64sha(tgz)}}],
        "createdDateTime": "2026-11-30T10:00:00Z",
        "manifestVersion": "5.0"
    })
}

/// A pvr2adu package of the `app` part with a new root filesystem.
fn app_package(a: &Adu, version: &str, root: &[u8], extra: Value) -> Update {
    let mut part = json!({
        "#spec": "pantavisor-service-system@1",
        "app/run.json": {"#spec": "service-manifest-run@1", "name": "app", "type": "lxc",
            "config": "lxc.container.conf", "root-volume": "root.squashfs", "group": "app",
            "roles": ["nobody"], "volumes": [], "storage": {"lxc-overlay": {"persistence": "boot"}}},
        "app/root.squashfs": common::sha256_hex(root),
    });
    if let Value::Object(m) = extra {
        for (k, v) in m {
            part[k] = v;
        }
    }
    let tgz = export(
        a.e.d.dir.path(),
        &format!("pvadu-{version}.tgz"),
        &part,
        &[root],
    );
    a.svc
        .import(
            &pvr2adu_import(version, &tgz),
            &[
                ("pvadu.tgz", tgz.clone()),
                ("pantavisor-installscript.sh", SCRIPT.to_vec()),
            ],
        )
        .unwrap()
}

async fn running_state(a: &Adu) -> Value {
    serde_json::from_slice(&a.e.d.pv.step("current").await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pvr2adu_package_is_overlaid_and_runs_and_is_reported_once() {
    let a = setup().await;
    let b = a.bridge();
    a.e.connected(&b).await;
    assert_eq!(
        a.e.hub.model_id("dev-1").as_deref(),
        Some("dtmi:azure:iot:deviceUpdateModel;3")
    );
    // Shape A: the device properties ADU groups by.
    let props = wait(&b, "deviceProperties", Duration::from_secs(20), || {
        let p = a.agent()["deviceProperties"].clone();
        p.is_object().then_some(p)
    })
    .await;
    assert_eq!(props["manufacturer"], "pantacor");
    assert_eq!(props["model"], "pv-sim");
    assert_eq!(
        props["contractModelId"],
        "dtmi:azure:iot:deviceUpdateContractModel;3"
    );
    assert_eq!(a.agent()["compatPropertyNames"], "manufacturer,model");
    assert_eq!(a.e.reported()["deviceUpdate"]["__t"], "c");

    let before = running_state(&a).await;
    let u = app_package(&a, "1.0.1", b"new app root", json!({}));
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-1", None)
        .unwrap();
    let r = a.final_report(&b, "wf-1", Duration::from_secs(90)).await;
    assert_eq!(r["state"], 0, "{r}");
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(r["lastInstallResult"]["extendedResultCodes"], "00000000");
    assert_eq!(
        r["installedUpdateId"],
        r#"{"provider":"pantacor","name":"pv-sim-app","version":"1.0.1"}"#
    );
    assert_eq!(
        r["lastInstallResult"]["stepResults"]["step_0"]["resultCode"],
        700
    );
    // The service's ACK: 200 at the desired version, the manifest not echoed.
    let ack = a.e.reported()["deviceUpdate"]["service"].clone();
    assert_eq!(ack["ac"], 200, "{ack}");
    assert_eq!(ack["value"], json!({}));
    // The device runs locals/<installedCriteria>: the part replaced, the rest kept.
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/1.0.1");
    let now = running_state(&a).await;
    assert_eq!(
        now["app/root.squashfs"],
        common::sha256_hex(b"new app root")
    );
    for k in [
        "bsp/kernel.img",
        "pv-bridge/root.squashfs",
        "_config/app/etc/app.conf",
    ] {
        assert_eq!(now[k], before[k], "{k} kept from the running revision");
    }
    // In progress once, success once; the script was verified, never run.
    assert_eq!(a.reports("wf-1", 6), 1);
    assert_eq!(a.reports("wf-1", 0), 1);
    assert!(!b.log_text().contains("must never run"));

    // A reconnect re-delivers the same service: nothing is reported again.
    let patches = a.e.hub.reported_patches("dev-1").len();
    a.e.hub.kick("dev-1", "test");
    wait(&b, "a second connection", Duration::from_secs(30), || {
        (a.e.hub.connects("dev-1") >= 2 && a.e.hub.connected("dev-1")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later: Vec<Value> = a.e.hub.reported_patches("dev-1")[patches..].to_vec();
    assert!(
        later.iter().all(|p| p.get("deviceUpdate").is_none()),
        "{later:?}"
    );

    // Deploying what is installed is reported installed at once, never 6.
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-2", None)
        .unwrap();
    let r = a.final_report(&b, "wf-2", Duration::from_secs(30)).await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(a.reports("wf-2", 6), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_export_with_a_new_kernel_reports_success_after_the_reboot() {
    let a = setup().await;
    let b = a.bridge();
    a.e.connected(&b).await;
    let mut state = running_state(&a).await;
    let kernel = b"a new kernel".as_slice();
    state["bsp/kernel.img"] = json!(common::sha256_hex(kernel));
    let tgz = export(a.e.d.dir.path(), "full.tgz", &state, &[kernel]);
    let u = a
        .svc
        .import(&whole_import("2.0", &tgz), &[("revision.tgz", tgz.clone())])
        .unwrap();
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-full", None)
        .unwrap();
    let r = a
        .final_report(&b, "wf-full", Duration::from_secs(120))
        .await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/2.0");
    assert_eq!(
        a.e.reported()["pantavisor"]["update"]["status"],
        "DONE",
        "a reboot update ends DONE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_revision_is_reported_failed_and_rolled_back() {
    let a = setup().await;
    let b = a.bridge();
    a.e.connected(&b).await;
    let u = app_package(
        &a,
        "1.0.2",
        b"bad app",
        json!({"_sim/behaviour.json": {"outcome": "error", "container": "app", "unless": "network-up"}}),
    );
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-bad", None)
        .unwrap();
    let r = a.final_report(&b, "wf-bad", Duration::from_secs(90)).await;
    assert_eq!(r["state"], 255, "{r}");
    assert_eq!(r["lastInstallResult"]["resultCode"], 0);
    assert_eq!(r["lastInstallResult"]["extendedResultCodes"], "3B000005");
    assert!(
        r["lastInstallResult"]["resultDetails"]
            .as_str()
            .unwrap()
            .contains("ERROR"),
        "{r}"
    );
    assert!(r.get("installedUpdateId").is_none(), "{r}");
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "0");

    // The fault was transient: a retry of the same update runs it again, under
    // a new revision name (the failed one keeps its final status on the device).
    std::fs::write(a.e.d.storage().join("network-up"), b"").unwrap();
    let retry = "2026-11-30T12:00:00.0000000Z";
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-bad", Some(retry))
        .unwrap();
    let r = wait(&b, "the retry's success", Duration::from_secs(90), || {
        let r = a.agent();
        (r["workflow"]["retryTimestamp"] == retry && r["state"] == 0).then_some(r)
    })
    .await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert!(
        r["installedUpdateId"].as_str().unwrap().contains("1.0.2"),
        "{r}"
    );
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/1.0.2-retry2");
    // A new deployment of the same update finds it installed: no download.
    let seen = a.downloads();
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-again", None)
        .unwrap();
    let r = a
        .final_report(&b, "wf-again", Duration::from_secs(30))
        .await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(
        a.downloads(),
        seen,
        "an installed update is not downloaded again"
    );
    assert_eq!(
        a.reports("wf-again", 6),
        0,
        "no In progress for an installed update"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_before_anything_is_downloaded() {
    let a = setup().await;
    // Without test_root_keys_file only Microsoft's keys are trusted.
    let b =
        a.e.bridge("device_update = { manufacturer = \"pantacor\", model = \"pv-sim\" }\n");
    a.e.connected(&b).await;
    let u = app_package(&a, "1.0.3", b"unsigned app", json!({}));
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-untrusted", None)
        .unwrap();
    let r = a
        .final_report(&b, "wf-untrusted", Duration::from_secs(30))
        .await;
    assert_eq!(r["state"], 255, "{r}");
    assert_eq!(
        r["lastInstallResult"]["extendedResultCodes"], "A0200006",
        "{r}"
    );
    // A manifest changed after signing.
    drop(b);
    let b = a.bridge();
    let mut bad = u.clone();
    bad.manifest = bad.manifest.replace("1.0.3", "1.0.4");
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &bad, "wf-changed", None)
        .unwrap();
    let r = a
        .final_report(&b, "wf-changed", Duration::from_secs(30))
        .await;
    assert_eq!(
        r["lastInstallResult"]["extendedResultCodes"], "80300001",
        "{r}"
    );
    // Another device model.
    let mut import = pvr2adu_import("1.0.5", b"x");
    import["compatibility"] = json!([{"deviceManufacturer": "pantacor", "deviceModel": "other"}]);
    let other = a
        .svc
        .import(
            &import,
            &[
                ("pvadu.tgz", b"x".to_vec()),
                ("pantavisor-installscript.sh", SCRIPT.to_vec()),
            ],
        )
        .unwrap();
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &other, "wf-other", None)
        .unwrap();
    let r = a
        .final_report(&b, "wf-other", Duration::from_secs(30))
        .await;
    assert_eq!(
        r["lastInstallResult"]["extendedResultCodes"], "3B000006",
        "{r}"
    );
    assert_eq!(
        a.downloads(),
        0,
        "nothing downloaded for a refused manifest"
    );
    assert_eq!(a.reports("wf-untrusted", 6) + a.reports("wf-changed", 6), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_retry_and_replacement() {
    let a = setup().await;
    let b = a.bridge();
    a.e.connected(&b).await;
    let big = common::noise(3 * 1024 * 1024, 7);
    let slow = app_package(&a, "1.1.0", &big, json!({}));
    a.svc.files.set_rate(Some(256 * 1024));
    // Cancel mid-download: reported cancelled (-1), nothing installed.
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &slow, "wf-c", None)
        .unwrap();
    wait(&b, "the download to start", Duration::from_secs(30), || {
        (a.downloads() >= 2).then_some(())
    })
    .await;
    a.svc.cancel(&a.e.hub, &["dev-1"]).unwrap();
    let r = a.final_report(&b, "wf-c", Duration::from_secs(30)).await;
    if r["lastInstallResult"]["resultCode"] != -1 {
        eprintln!("{}", b.log_text());
    }
    assert_eq!(r["state"], 0, "{r}");
    assert_eq!(r["lastInstallResult"]["resultCode"], -1, "{r}");
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "0");

    // Replacement mid-download: the first workflow is dropped without a report.
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &slow, "wf-a", None)
        .unwrap();
    wait(&b, "the download of wf-a", Duration::from_secs(30), || {
        (a.agent()["workflow"]["id"] == "wf-a" && a.agent()["state"] == 6).then_some(())
    })
    .await;
    a.svc.files.set_rate(None);
    let small = app_package(&a, "1.2.0", b"small app", json!({}));
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &small, "wf-b", None)
        .unwrap();
    let r = a.final_report(&b, "wf-b", Duration::from_secs(90)).await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/1.2.0");
    assert_eq!(a.reports("wf-a", 0) + a.reports("wf-a", 255), 0);

    // Retry: a download that failed, then the same workflow with a new timestamp.
    let next = app_package(&a, "1.3.0", b"retried app", json!({}));
    a.svc.files.fault(pv_testkit::objects::Fault::Status(503));
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &next, "wf-r", None)
        .unwrap();
    let r = a.final_report(&b, "wf-r", Duration::from_secs(30)).await;
    assert_eq!(r["state"], 255, "{r}");
    assert_eq!(
        r["lastInstallResult"]["extendedResultCodes"], "3B000008",
        "{r}"
    );
    a.svc
        .deploy(
            &a.e.hub,
            &["dev-1"],
            &next,
            "wf-r",
            Some("2026-11-30T11:00:00.0000000Z"),
        )
        .unwrap();
    let r = wait(&b, "the retry's success", Duration::from_secs(90), || {
        let r = a.agent();
        (r["workflow"]["retryTimestamp"] == "2026-11-30T11:00:00.0000000Z" && r["state"] == 0)
            .then_some(r)
    })
    .await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/1.3.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_mid_deployment_reports_the_outcome_once() {
    let a = setup().await;
    let mut b = a.bridge();
    a.e.connected(&b).await;
    let big = common::noise(2 * 1024 * 1024, 9);
    let u = app_package(&a, "1.4.0", &big, json!({}));
    a.svc.files.set_rate(Some(512 * 1024));
    a.svc
        .deploy(&a.e.hub, &["dev-1"], &u, "wf-k", None)
        .unwrap();
    wait(&b, "the download to start", Duration::from_secs(30), || {
        (a.agent()["state"] == 6 && a.downloads() >= 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    a.svc.files.set_rate(None);
    let b = a.bridge();
    let r = a.final_report(&b, "wf-k", Duration::from_secs(90)).await;
    assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{r}");
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/1.4.0");
    // One In progress, one success: the restart did not report again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.reports("wf-k", 6), 1);
    assert_eq!(a.reports("wf-k", 0), 1);
    // The file's first part was kept: the restart resumed it with a Range.
    assert!(
        a.svc
            .files
            .seen()
            .iter()
            .any(|s| s.range_start.is_some_and(|r| r > 0)),
        "{:?}",
        a.svc.files.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_upload_the_log_tree_once_without_the_sas() {
    let a = setup().await;
    let logs = a.e.d.storage().join("logs/0/pantavisor");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(
        logs.join("pantavisor.log"),
        b"[pantavisor] a line for the portal\n",
    )
    .unwrap();
    let b = a.bridge();
    a.e.connected(&b).await;
    a.svc.request_logs(&a.e.hub, "dev-1", "op-1").unwrap();
    let r = wait(&b, "the log upload report", Duration::from_secs(30), || {
        let r = a.e.reported()["diagnosticInformation"].clone();
        (r["agent"]["operationId"] == "op-1").then_some(r)
    })
    .await;
    assert_eq!(r["agent"]["resultCode"], 200, "{r}");
    assert_eq!(r["service"]["value"], json!({"operationId": "op-1"}));
    let blobs = a.svc.blobs();
    let log = blobs
        .iter()
        .find(|bl| bl.name == "dev-1/op-1/pantavisor/pantavisor.log")
        .unwrap_or_else(|| panic!("{:?}", blobs.iter().map(|b| &b.name).collect::<Vec<_>>()));
    assert!(
        log.body
            .starts_with(b"[pantavisor] a line for the portal\n")
    );
    assert!(
        a.svc.blob_refusals().is_empty(),
        "{:?}",
        a.svc.blob_refusals()
    );
    // A restart replays the request: nothing is uploaded again.
    let n = blobs.len();
    drop(b);
    let b = a.bridge();
    a.e.connected(&b).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.svc.blobs().len(), n);
    // The SAS never reaches the twin or the log.
    let sig = a.svc.container_sas_url();
    let sig = sig.split("sig=").nth(1).unwrap();
    assert!(!a.e.reported().to_string().contains(sig));
    assert!(!b.log_text().contains(sig));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_deployment_reaches_the_compatible_members_only() {
    let a = setup().await;
    // A second device with its own pv-sim and bridge, in the same group.
    let d2 = common::start_with(pv_testkit::sim::Generation::Gen2, |_| {}).await;
    let conn2 = a.e.hub.add_device("dev-2", KEY);
    let conn2_file = d2.dir.path().join("azure.conn");
    std::fs::write(&conn2_file, format!("{conn2}\n")).unwrap();
    let b1 = a.bridge();
    let b2 = Bridge::start(
        &d2,
        &a.e.hub,
        &a.e.pki,
        &format!(
            "report_interval_secs = 1\nlog_interval_secs = 0\nconnection_string_file = \"{}\"\n\
             device_update = {{ manufacturer = \"pantacor\", model = \"pv-sim\", test_root_keys_file = \"{}\" }}\n",
            conn2_file.display(),
            a.keys.display()
        ),
        "",
    );
    // dev-3 is in the group but another model; dev-4 is the right model
    // outside the group; dev-5 never reported an agent.
    for (id, model, group) in [
        ("dev-3", Some("other-board"), Some("field")),
        ("dev-4", Some("pv-sim"), None),
        ("dev-5", None, Some("field")),
    ] {
        a.e.hub.add_device(id, KEY);
        if let Some(model) = model {
            a.e.hub.set_reported(
                id,
                json!({"deviceUpdate": {"__t": "c", "agent": {"state": 0,
                    "compatPropertyNames": "manufacturer,model",
                    "deviceProperties": {"manufacturer": "pantacor", "model": model}}}}),
            );
        }
        if let Some(g) = group {
            a.e.hub.update_tags(id, json!({"ADUGroup": g})).unwrap();
        }
    }
    for id in ["dev-1", "dev-2"] {
        a.e.hub
            .update_tags(id, json!({"ADUGroup": "field"}))
            .unwrap();
    }
    // Both bridges announce their agent before the group is deployed to.
    wait(&b1, "both agents reported", Duration::from_secs(30), || {
        ["dev-1", "dev-2"]
            .iter()
            .all(|id| {
                a.e.hub.reported(id)["deviceUpdate"]["agent"]["deviceProperties"]["model"]
                    == "pv-sim"
            })
            .then_some(())
    })
    .await;
    let u = app_package(&a, "2.0.0", b"group app", json!({}));
    let targeted = a
        .svc
        .deploy_group(&a.e.hub, "field", &u, "wf-group", None)
        .unwrap();
    assert_eq!(targeted, ["dev-1", "dev-2"]);
    for (id, b) in [("dev-1", &b1), ("dev-2", &b2)] {
        let r = wait(
            b,
            &format!("{id}'s success"),
            Duration::from_secs(90),
            || {
                let r = a.e.hub.reported(id)["deviceUpdate"]["agent"].clone();
                (r["workflow"]["id"] == "wf-group" && r["state"] == 0).then_some(r)
            },
        )
        .await;
        assert_eq!(r["lastInstallResult"]["resultCode"], 700, "{id}: {r}");
        assert!(
            r["installedUpdateId"].as_str().unwrap().contains("2.0.0"),
            "{id}: {r}"
        );
    }
    assert_eq!(a.e.d.sim.as_ref().unwrap().running(), "locals/2.0.0");
    assert_eq!(d2.sim.as_ref().unwrap().running(), "locals/2.0.0");
    for id in ["dev-3", "dev-4", "dev-5"] {
        assert!(
            a.e.hub.twin(id)["desired"].get("deviceUpdate").is_none(),
            "{id} was not targeted"
        );
    }
    // The object of each file was fetched once per device, not more.
    let per_file = a.svc.files.seen().len();
    assert_eq!(per_file, 4, "{:?}", a.svc.files.seen());
}
