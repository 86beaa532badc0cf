//! The shapes of the reference (§2.3, §3.3, §4), with the golden desired value.

use super::*;
use crate::adu::manifest::UpdateId;

fn golden() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adu/service-desired.valid.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn wf(retry: Option<&str>) -> Workflow {
    Workflow {
        action: 3,
        id: "test-workflow-id".into(),
        retry_timestamp: retry.map(str::to_owned),
    }
}

#[test]
fn the_golden_desired_value_is_a_deployment() {
    let Service::Deploy {
        workflow,
        manifest,
        signature,
        file_urls,
        root_key_package_url,
    } = Service::parse(&golden()).unwrap()
    else {
        panic!("not a deployment");
    };
    assert_eq!(workflow, wf(None));
    assert_eq!(manifest.len(), 782);
    assert!(signature.starts_with("eyJhbGciOiJSUzI1NiIsInNqd2siOi"));
    assert_eq!(file_urls.len(), 4);
    assert_eq!(root_key_package_url, None);
}

#[test]
fn cancel_no_deployment_nulls_and_unknown_actions_are_tolerated() {
    let cancel = json!({"workflow": {"action": 255, "id": "nodeployment"},
        "updateManifest": null, "updateManifestSignature": null, "fileUrls": null, "__t": "c"});
    assert_eq!(
        Service::parse(&cancel).unwrap(),
        Service::Cancel {
            workflow: Workflow {
                action: 255,
                id: "nodeployment".into(),
                retry_timestamp: None
            }
        }
    );
    let nulls = json!({"workflow": {"action": 3, "id": "w", "retryTimestamp": "2022-01-26T11:33:29.9680598Z"},
        "updateManifest": null, "fileUrls": {"a": null, "b": "http://x/b"}});
    let Service::Deploy {
        workflow,
        file_urls,
        ..
    } = Service::parse(&nulls).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        workflow.retry_timestamp.as_deref(),
        Some("2022-01-26T11:33:29.9680598Z")
    );
    assert_eq!(file_urls.len(), 1);
    assert_eq!(
        Service::parse(&json!({"workflow": {"action": -1, "id": "x"}})).unwrap(),
        Service::Ignored { action: -1 }
    );
    for bad in [
        json!(7),
        json!({}),
        json!({"workflow": {"action": "3", "id": "x"}}),
    ] {
        assert!(Service::parse(&bad).is_err(), "{bad}");
    }
}

#[test]
fn reported_shapes_are_adus() {
    assert_eq!(erc_string(&[0x8030_0001]), "80300001");
    assert_eq!(erc_string(&[0xA020_0004, 0x8050_0003]), "A0200004,80500003");
    assert_eq!(erc_string(&[]), "00000000");
    let a = startup("pantacor", "pv-arm64", "0.1.0");
    assert_eq!(a["deviceProperties"]["contractModelId"], CONTRACT_MODEL_ID);
    assert_eq!(a["deviceProperties"]["aduVer"], "DU;agent/0.1.0");
    assert!(a["deviceProperties"]["interfaceId"].is_null());
    assert_eq!(a["compatPropertyNames"], "manufacturer,model");
    let b = in_progress(&wf(Some("t1")));
    assert_eq!(b["state"], 6);
    assert_eq!(b["workflow"]["retryTimestamp"], "t1");
    assert_eq!(b["lastInstallResult"]["resultCode"], 400);
    assert!(b["lastInstallResult"]["stepResults"].is_null());
    assert!(b.get("installedUpdateId").is_none());
    let id = UpdateId {
        provider: "Contoso".into(),
        name: "Virtual-Vacuum".into(),
        version: "20.0".into(),
    };
    let ok = StepResult {
        result_code: 700,
        ercs: vec![],
        details: String::new(),
    };
    let c = succeeded(&wf(None), &id.to_json_string(), &[ok]);
    assert_eq!(
        c["installedUpdateId"],
        r#"{"provider":"Contoso","name":"Virtual-Vacuum","version":"20.0"}"#
    );
    assert_eq!(
        c["lastInstallResult"]["stepResults"]["step_0"]["resultCode"],
        700
    );
    assert!(c["workflow"].get("retryTimestamp").is_none());
    let d = failed(&wf(None), &[0x8030_0001], "manifest hash mismatch", &[]);
    assert_eq!(
        (
            d["state"].as_u64(),
            d["lastInstallResult"]["resultCode"].as_i64()
        ),
        (Some(255), Some(0))
    );
    assert_eq!(d["lastInstallResult"]["extendedResultCodes"], "80300001");
    assert!(d.get("installedUpdateId").is_none());
    assert_eq!(
        cancelled(&wf(None), "cancelled")["lastInstallResult"]["resultCode"],
        -1
    );
    assert_eq!(idle(&wf(None))["lastInstallResult"]["resultCode"], 200);
    assert_eq!(reported(json!({"state": 0}))["deviceUpdate"]["__t"], "c");
}

#[test]
fn the_service_ack_is_small_and_exact() {
    assert_eq!(
        serde_json::to_string(&service_ack(1, 200)).unwrap(),
        r#"{"deviceUpdate":{"__t":"c","service":{"ac":200,"ad":"","av":1,"value":{}}}}"#
    );
}
