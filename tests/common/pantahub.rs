//! The pv-bridge binary with one `pantahub` backend, and helpers the Pantacor Hub
//! tests share.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use pv_testkit::hub::FakeHub;
use serde_json::{Value, json};

use crate::common;

/// pv-bridge with one `pantahub` backend (plus `extra` config).
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

/// Fast timers so a test takes seconds, not minutes.
pub const FAST: &str = "poll_interval_secs = 0.3\nuser_meta_interval_secs = 0.3\ndevice_meta_interval_secs = 0.5\nprogress_interval_secs = 0.5\n";

impl Bridge {
    pub fn start(
        d: &common::Device,
        dir: &Path,
        hub: &FakeHub,
        top: &str,
        backend: &str,
    ) -> Bridge {
        Self::start_env(d, dir, hub, top, backend, &[])
    }

    pub fn start_env(
        d: &common::Device,
        dir: &Path,
        hub: &FakeHub,
        top: &str,
        backend: &str,
        env: &[(&str, &str)],
    ) -> Bridge {
        let cfg = dir.join("bridge.toml");
        let state = dir.join("state");
        // A caller that sets its own timers gets none of the fast ones.
        let fast = if backend.contains("poll_interval_secs") {
            ""
        } else {
            FAST
        };
        std::fs::write(
            &cfg,
            format!(
                "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n[logs]\npoll_interval_ms = 100\n{top}\n[[backend]]\ntype = \"pantahub\"\nname = \"hub\"\nurl = \"{}\"\ninsecure = true\n{fast}{backend}\n",
                d.cfg().socket.display(),
                d.storage().join("logs").display(),
                state.display(),
                hub.url(),
            ),
        )
        .unwrap();
        let log = dir.join("bridge.log");
        let mut cmd = common::bridge_command(&cfg, &log);
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().unwrap();
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

/// Starts pv-sim, the fake hub and the bridge; waits for registration, claims the
/// device and waits for the factory sync. Returns the device id.
pub async fn claimed(
    d: &common::Device,
    hub: &FakeHub,
    top: &str,
    backend: &str,
) -> (Bridge, String) {
    let b = Bridge::start(d, d.dir.path(), hub, top, backend);
    let id = wait(&b, "registration", Duration::from_secs(20), || {
        hub.device_ids().first().cloned()
    })
    .await;
    assert_eq!(hub.claim(&id), 200);
    wait(&b, "the factory sync", Duration::from_secs(30), || {
        hub.factory_state(&id)
    })
    .await;
    (b, id)
}

/// The running state of the device with `app/root.squashfs` replaced by an object
/// the user uploads to the hub (and `extra` keys merged).
pub async fn next_state(d: &common::Device, hub: &FakeHub, data: &[u8], extra: Value) -> Value {
    let running = d.sim.as_ref().unwrap().running();
    let mut state: Value = serde_json::from_slice(&d.pv.step(&running).await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(hub.upload("app/root.squashfs", data));
    if let Value::Object(m) = extra {
        for (k, v) in m {
            state[k] = v;
        }
    }
    state
}

pub fn hub_status(hub: &FakeHub, id: &str, rev: i64) -> String {
    hub.step(id, rev)
        .and_then(|s| s["progress"]["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub async fn final_on_hub(b: &Bridge, hub: &FakeHub, id: &str, rev: i64) -> String {
    wait(
        b,
        &format!("a final status of rev {rev} on the hub"),
        Duration::from_secs(60),
        || {
            let s = hub_status(hub, id, rev);
            ["DONE", "UPDATED", "ERROR", "WONTGO", "CANCEL"]
                .contains(&s.as_str())
                .then_some(s)
        },
    )
    .await
}
