//! pv-bridge with one `hawkbit` backend, and the revisions the hawkBit tests
//! deploy: shared by the goosebit and the DDI fake tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common;

pub struct Bridge {
    pub child: Child,
    pub log: PathBuf,
    cfg: PathBuf,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bridge {
    /// pv-bridge with one `hawkbit` backend for controller `dev-1` on board
    /// `pv-sim` revision `1.0`, polling at most once a second; `more`: extra
    /// settings of the backend.
    pub fn start(d: &common::Device, url: &str, more: &str) -> Bridge {
        let dir = d.dir.path();
        let cfg = dir.join("bridge.toml");
        std::fs::write(
            &cfg,
            format!(
                "[pantavisor]\nsocket = \"{}\"\nlogs = \"{}\"\n[bridge]\nstate_dir = \"{}\"\n\n\
                 [[backend]]\ntype = \"hawkbit\"\nname = \"hawkbit\"\nurl = \"{url}\"\n\
                 controller_id = \"dev-1\"\nhw_boardname = \"pv-sim\"\nhw_revision = \"1.0\"\n\
                 min_poll_interval_secs = 1\n{more}",
                d.cfg().socket.display(),
                d.storage().join("logs").display(),
                dir.join("state").display(),
            ),
        )
        .unwrap();
        let log = dir.join("bridge.log");
        let child = common::bridge_command(&cfg, &log).spawn().unwrap();
        Bridge { child, log, cfg }
    }

    /// kill -9, then the same bridge again.
    pub fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = common::bridge_command(&self.cfg, &self.log)
            .spawn()
            .unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Polls `f` until it gives `Some`; on timeout fails with the bridge's log and
/// `more()` (the server's side).
pub async fn wait<T>(
    b: &Bridge,
    what: &str,
    within: Duration,
    more: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n--- bridge log:\n{}\n--- server:\n{}",
            b.log_text(),
            more()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `pvr export` archive of the running state with `app/root.squashfs`
/// replaced by `root` (and `extra` keys).
pub async fn export(d: &common::Device, version: &str, root: &[u8], extra: Value) -> Vec<u8> {
    let mut state: Value = serde_json::from_slice(&d.pv.step("current").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(common::sha256_hex(root));
    if let Value::Object(m) = extra {
        for (k, v) in m {
            state[k] = v;
        }
    }
    common::pack_export(d.dir.path(), &format!("rev-{version}.tgz"), &state, &[root])
}
