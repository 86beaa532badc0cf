//! The pv-bridge binary with one `azure` backend against the fake IoT Hub, and
//! helpers the Azure tests share.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use pv_testkit::iothub::FakeIotHub;
use pv_testkit::objects::ObjectServer;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

use crate::common;

pub const HOST: &str = "fake-hub.azure-devices.net";
pub const KEY: &str = "ZGV2aWNlLWtleS1mb3ItcHYtYnJpZGdlLXRlc3Rz";

/// pv-bridge with one `azure` backend.
pub struct Bridge {
    pub child: Child,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bridge {
    /// `backend` is the rest of the `[[backend]]` table (credentials included).
    pub fn start(
        d: &common::Device,
        hub: &FakeIotHub,
        pki: &common::Pki,
        backend: &str,
        more: &str,
    ) -> Bridge {
        let dir = d.dir.path();
        let cfg = dir.join("bridge.toml");
        let state = dir.join("state");
        std::fs::write(
            &cfg,
            format!(
                "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[logs]\npoll_interval_ms = 100\n\n[[backend]]\ntype = \"azure\"\nname = \"azure\"\nca_file = \"{}\"\nconnect_address = \"{}\"\n{backend}\n{more}",
                d.cfg().socket.display(),
                d.storage().join("logs").display(),
                state.display(),
                pki.ca.display(),
                hub.mqtt_addr(),
            ),
        )
        .unwrap();
        let log = dir.join("bridge.log");
        let child = common::bridge_command(&cfg, &log).spawn().unwrap();
        Bridge { child, log, state }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits for `f` to give `Some`; on timeout fails showing the bridge's log.
pub async fn wait<T>(b: &Bridge, what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
    common::wait_showing(&b.log, what, within, f).await
}

/// A device, a fake hub that knows it, an object server and the test PKI.
pub struct Env {
    pub d: common::Device,
    pub hub: FakeIotHub,
    pub objects: ObjectServer,
    pub pki: common::Pki,
    pub conn_file: PathBuf,
}

pub async fn env_with(tweak: impl FnOnce(&mut pv_testkit::sim::SimConfig)) -> Env {
    let d = common::start_with(Generation::Gen2, tweak).await;
    let pki = common::test_pki(&d.dir.path().join("pki"));
    let hub = FakeIotHub::local(HOST, &pki.server_cert, &pki.server_key, Some(&pki.ca))
        .await
        .unwrap();
    let conn = hub.add_device("dev-1", KEY);
    let conn_file = d.dir.path().join("azure.conn");
    std::fs::write(&conn_file, format!("{conn}\n")).unwrap();
    let objects = ObjectServer::start().await.unwrap();
    Env {
        d,
        hub,
        objects,
        pki,
        conn_file,
    }
}

impl Env {
    pub fn bridge(&self, more_backend: &str) -> Bridge {
        self.bridge_with(
            &format!(
                "connection_string_file = \"{}\"\n{more_backend}",
                self.conn_file.display()
            ),
            "",
        )
    }

    /// Fast reports and logs for tests (`report_interval_secs = 1`,
    /// `log_interval_secs = 0`) and `backend`.
    pub fn bridge_with(&self, backend: &str, more: &str) -> Bridge {
        let backend = format!("report_interval_secs = 1\nlog_interval_secs = 0\n{backend}");
        Bridge::start(&self.d, &self.hub, &self.pki, &backend, more)
    }

    /// A revision: the running state with `app/root.squashfs` replaced by `data`
    /// (and `extra` keys), served with its object. Returns the desired value.
    pub async fn revision(&self, id: &str, data: &[u8], extra: Value, template: bool) -> Value {
        let running = self.d.sim.as_ref().unwrap().running();
        let mut state: Value =
            serde_json::from_slice(&self.d.pv.step(&running).await.unwrap()).unwrap();
        let sha = common::sha256_hex(data);
        state["app/root.squashfs"] = json!(sha);
        if let Value::Object(m) = extra {
            for (k, v) in m {
                state[k] = v;
            }
        }
        let bytes = serde_json::to_vec(&state).unwrap();
        self.objects.put(&format!("/objects/{sha}"), data.to_vec());
        self.objects
            .put(&format!("/states/{id}.json"), bytes.clone());
        let mut r = json!({
            "id": id,
            "stateUrl": self.objects.url(&format!("/states/{id}.json")),
            "stateSha256": common::sha256_hex(&bytes),
        });
        if template {
            r["objectUrlTemplate"] = json!(self.objects.url("/objects/{sha256}"));
        } else {
            r["objects"] = json!({ sha.clone(): self.objects.url(&format!("/objects/{sha}")) });
        }
        r
    }

    pub fn reported(&self) -> Value {
        self.hub.reported("dev-1")
    }

    pub async fn connected(&self, b: &Bridge) {
        wait(
            b,
            "the bridge's first report",
            Duration::from_secs(20),
            || {
                self.reported()["pantavisor"]["bridge"]["version"]
                    .as_str()
                    .map(drop)
            },
        )
        .await;
    }

    pub async fn ack(
        &self,
        b: &Bridge,
        key: &str,
        av: u64,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        wait(
            b,
            &format!("the {key} ack of version {av}"),
            Duration::from_secs(60),
            || {
                let a = self.reported()[key].clone();
                (a["av"] == av && done(&a)).then_some(a)
            },
        )
        .await
    }
}
