//! The fake IoT Hub checked with Microsoft's own Python SDKs from PyPI:
//! `azure-iot-device` connects with a SAS connection string over TLS with the
//! test CA, reads the twin, patches reported properties, sends telemetry,
//! receives a desired patch and answers a method; `azure-iot-hub` updates desired
//! properties, invokes the method and reads the twin.
//!
//! The device SDK always connects to port 8883, so the fake listens on
//! 127.0.0.2:8883 (root, or CAP_NET_BIND_SERVICE, is not needed: 8883 > 1024).
//! The SDKs live in a virtualenv: `PV_AZURE_PYTHON` names its interpreter,
//! default `.venv-azure/bin/python` (`.ci/run` makes it; see the README).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use pv_testkit::iothub::{FakeIotHub, Setup};
use tokio::io::{AsyncBufReadExt, BufReader};

fn python() -> PathBuf {
    let p = std::env::var_os("PV_AZURE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-azure/bin/python")
        });
    let ok = std::process::Command::new(&p)
        .args(["-c", "import azure.iot.device, azure.iot.hub"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "Microsoft's Python SDKs are needed ({}): python3 -m venv .venv-azure && .venv-azure/bin/pip install -r tests/azure_sdk/requirements.txt",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/azure_sdk")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsofts_sdks_work_against_the_fake_hub() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let pki = common::test_pki(&dir.path().join("pki"));
    let hub = FakeIotHub::start(Setup {
        host_name: "127.0.0.2".into(),
        cert_chain: &pki.server_cert,
        key: &pki.server_key,
        client_ca: None,
        mqtt: "127.0.0.2:8883".parse().unwrap(),
        service: "127.0.0.2:0".parse().unwrap(),
    })
    .await
    .expect("the fake hub needs 127.0.0.2:8883 free");
    let conn = hub.add_device("dev-py", "cHl0aG9uLXNkay1kZXZpY2Uta2V5LTAx");

    let mut dev = tokio::process::Command::new(&py)
        .arg(script("device_check.py"))
        .arg(&conn)
        .arg(&pki.ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    let mut seen: Vec<serde_json::Value> = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            let ready = v["step"] == "READY";
            seen.push(v);
            if ready {
                return;
            }
        }
        panic!("the device SDK ended before READY: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("the device SDK was not READY in 60 s: {seen:?}"));
    let twin = seen.iter().find(|v| v["step"] == "twin").unwrap();
    assert_eq!(twin["twin"]["desired"]["$version"], 1, "{twin}");
    assert!(hub.connected("dev-py"));
    assert_eq!(hub.reported("dev-py")["sdk"], "azure-iot-device");
    let d2c = hub.d2c("dev-py");
    assert_eq!(d2c.len(), 1, "{d2c:?}");
    assert_eq!(d2c[0].property("$.ct"), Some("application/json"));
    assert_eq!(d2c[0].property("kind"), Some("greeting"));
    assert_eq!(d2c[0].body, br#"{"hello": "hub"}"#);

    let service =
        hub.service_connection_string(&format!("127.0.0.2:{}", hub.service_addr().port()));
    let out = tokio::process::Command::new(&py)
        .arg(script("service_check.py"))
        .arg(&service)
        .arg("dev-py")
        .env("REQUESTS_CA_BUNDLE", &pki.ca)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "service SDK: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["desired"],
        serde_json::json!({"colour": "blue", "level": 3})
    );
    assert_eq!(r["desired_version"], 2);
    assert_eq!(r["method_status"], 200);
    assert_eq!(r["method_payload"], serde_json::json!({"echo": {"x": 1}}));
    assert_eq!(r["reported"]["nested"], serde_json::json!({"a": 1}));
    assert_eq!(r["offline_status"], 404, "{r}");

    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        let mut rest = Vec::new();
        while let Some(l) = lines.next_line().await.unwrap() {
            rest.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
        }
        rest
    })
    .await
    .expect("the device SDK did not finish");
    let status = dev.wait().await.unwrap();
    assert!(status.success(), "device SDK exit {status}: {rest:?}");
    assert!(
        rest.iter()
            .any(|v| v["step"] == "desired" && v["patch"]["colour"] == "blue"),
        "{rest:?}"
    );
    assert!(
        rest.iter()
            .any(|v| v["step"] == "method" && v["name"] == "echo" && v["payload"]["x"] == 1),
        "{rest:?}"
    );
}
