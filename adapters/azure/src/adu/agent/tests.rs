//! The agent's decisions as the twin sees them: ACKs, what is (and is not)
//! reported, and what survives a restart. No network: the deployments here
//! fail at the signature check, before any download.

use std::time::Duration;

use pv_adapter_api::{DeviceView, EngineLink, Envelope};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    events: mpsc::Receiver<Envelope>,
    _view: watch::Sender<DeviceView>,
    link: EngineLink,
}

fn fixture() -> Fixture {
    let (tx, events) = mpsc::channel(16);
    let (view, rx) = watch::channel(DeviceView::default());
    Fixture {
        dir: tempfile::tempdir().unwrap(),
        events,
        _view: view,
        link: EngineLink::new("azure", tx, rx),
    }
}

impl Fixture {
    fn agent(&self) -> Arc<Agent> {
        let cfg = DeviceUpdateConfig {
            manufacturer: "pantacor".into(),
            model: "pv-sim".into(),
            test_root_keys_file: None,
        };
        let http = pv_http::Client::builder().build().unwrap();
        Agent::new(
            "azure",
            cfg,
            self.dir.path().to_path_buf(),
            http,
            self.link.clone(),
            None,
        )
        .unwrap()
    }
}

fn deploy(id: &str, retry: Option<&str>) -> Value {
    json!({"workflow": {"action": 3, "id": id, "retryTimestamp": retry},
           "updateManifest": "{\"manifestVersion\":\"5\"}",
           "updateManifestSignature": "not.a.jws",
           "fileUrls": {"f1": "http://127.0.0.1:9/never"}})
}

fn agent_of(doc: &Value) -> &Value {
    &doc[wire::COMPONENT]["agent"]
}

/// Every `agent` published until one is final for `retry` or `within` passes.
async fn states_until_final(
    rx: &mut watch::Receiver<Value>,
    retry: Option<&str>,
    within: Duration,
) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = agent_of(&rx.borrow_and_update()).clone();
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        let this = s["workflow"]["retryTimestamp"].as_str() == retry;
        if this && (s["state"] == 255 || s["state"] == 0) {
            return seen;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return seen;
        }
    }
}

#[tokio::test]
async fn the_startup_report_names_the_device_class_and_nothing_else() {
    let f = fixture();
    let a = f.agent();
    let doc = a.subscribe().borrow().clone();
    let du = &doc[wire::COMPONENT];
    assert_eq!(du["__t"], "c");
    assert_eq!(du["agent"]["deviceProperties"]["manufacturer"], "pantacor");
    assert_eq!(du["agent"]["deviceProperties"]["model"], "pv-sim");
    assert_eq!(du["agent"]["compatPropertyNames"], "manufacturer,model");
    assert!(du["agent"].get("state").is_none(), "{doc}");
    assert!(du.get("service").is_none(), "no ACK before a service value");
    assert!(doc.get(diagnostics::COMPONENT).is_none());
}

#[tokio::test]
async fn an_unreadable_service_value_is_acked_406_and_changes_nothing() {
    let f = fixture();
    let a = f.agent();
    a.service(7, &json!({"workflow": "not an object"}));
    let doc = a.subscribe().borrow().clone();
    assert_eq!(doc[wire::COMPONENT]["service"]["ac"], 406, "{doc}");
    assert_eq!(doc[wire::COMPONENT]["service"]["av"], 7, "{doc}");
    assert!(agent_of(&doc).get("state").is_none(), "{doc}");
    assert!(!f.dir.path().join("adu").join(RECORD).exists());
}

#[tokio::test]
async fn a_cancel_with_nothing_running_is_acked_and_not_reported() {
    let mut f = fixture();
    let a = f.agent();
    a.service(
        3,
        &json!({"workflow": {"action": 255, "id": "nodeployment"},
                "updateManifest": null, "updateManifestSignature": null, "fileUrls": null}),
    );
    let doc = a.subscribe().borrow().clone();
    assert_eq!(doc[wire::COMPONENT]["service"]["ac"], 200, "{doc}");
    assert!(agent_of(&doc).get("workflow").is_none(), "{doc}");
    assert!(f.events.try_recv().is_err(), "nothing reached the engine");
}

#[tokio::test]
async fn a_refused_manifest_is_reported_once_without_in_progress_and_survives_a_restart() {
    let mut f = fixture();
    let a = f.agent();
    let mut rx = a.subscribe();
    a.service(4, &deploy("wf-1", None));
    let seen = states_until_final(&mut rx, None, Duration::from_secs(10)).await;
    let last = seen.last().unwrap().clone();
    assert_eq!(last["state"], 255, "{seen:?}");
    assert_eq!(last["workflow"]["id"], "wf-1");
    // ADU's "signature not a JWS" code, with the reason.
    assert_eq!(last["lastInstallResult"]["extendedResultCodes"], "A0200002");
    assert!(
        last["lastInstallResult"]["resultDetails"]
            .as_str()
            .is_some_and(|d| d.contains("not a valid JWS")),
        "{last}"
    );
    assert!(
        !seen.iter().any(|s| s["state"] == 6),
        "a refused manifest is never In progress: {seen:?}"
    );
    assert!(f.events.try_recv().is_err(), "nothing was offered");

    // The same value again (a reconnect's twin GET): nothing new.
    a.service(4, &deploy("wf-1", None));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agent_of(&rx.borrow()).clone(), last);

    // A restart publishes the decided report from the record, and the
    // redelivered workflow is still not run again.
    drop(a);
    let b = f.agent();
    assert_eq!(agent_of(&b.subscribe().borrow()).clone(), last);
    b.service(4, &deploy("wf-1", None));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agent_of(&b.subscribe().borrow()).clone(), last);

    // A retry (new timestamp) is decided afresh.
    let mut rx = b.subscribe();
    b.service(5, &deploy("wf-1", Some("2026-11-30T12:00:00Z")));
    let seen = states_until_final(
        &mut rx,
        Some("2026-11-30T12:00:00Z"),
        Duration::from_secs(10),
    )
    .await;
    let retried = seen.last().unwrap();
    assert_eq!(retried["state"], 255, "{seen:?}");
    assert_eq!(
        retried["workflow"]["retryTimestamp"], "2026-11-30T12:00:00Z",
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_damaged_record_starts_afresh() {
    let f = fixture();
    std::fs::create_dir_all(f.dir.path().join("adu")).unwrap();
    std::fs::write(f.dir.path().join("adu").join(RECORD), b"{torn").unwrap();
    let a = f.agent();
    let doc = a.subscribe().borrow().clone();
    assert!(agent_of(&doc).get("workflow").is_none(), "{doc}");
    assert_eq!(agent_of(&doc)["deviceProperties"]["model"], "pv-sim");
}
