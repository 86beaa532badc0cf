//! The local D-Bus API (`docs/dbus.md`): service `org.pantavisor.Bridge1` at
//! `/org/pantavisor/Bridge1`, for other containers and local tools.
//!
//! Properties `Version`, `Revision`, `UpdateStatus`, `Backends` (name, connected,
//! last error); methods `Status` (JSON), `Resync`, `CancelUpdate`; signals
//! `UpdateProgress` and `BackendHealthChanged`. Off unless `[dbus] bus` is set.

// The code zbus generates for a signal takes one argument per signal field.
#![allow(clippy::too_many_arguments)]

use std::collections::BTreeMap;

use pv_adapter_api::{DeviceView, Progress, UpdateStatus};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};
use zbus::object_server::SignalEmitter;

use super::arbiter;

pub const SERVICE: &str = "org.pantavisor.Bridge1";
pub const PATH: &str = "/org/pantavisor/Bridge1";

/// What the D-Bus object reads and drives.
pub struct Bridge1 {
    views: super::Views,
    notices: super::Notices,
    resync: mpsc::Sender<()>,
    slot: arbiter::Shared,
}

/// The device as all backends' views together tell it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    running: String,
    /// The latest update: the one of a backend with an update that is not final,
    /// else the last one seen.
    update: Option<(String, Progress)>,
    health: BTreeMap<String, (bool, String)>,
}

fn snapshot(views: &super::Views) -> Snapshot {
    let mut s = Snapshot::default();
    for (name, tx) in views.iter() {
        // Only the fields the API shows; device-meta is not copied.
        let v = tx.borrow();
        if let Some(r) = v.running.as_ref().filter(|r| !r.is_empty()) {
            s.running = r.clone();
        }
        if let Some(p) = &v.update {
            let replace = match &s.update {
                None => true,
                Some((_, cur)) => cur.status.is_final() && !p.status.is_final(),
            };
            if replace {
                s.update = Some((name.clone(), p.clone()));
            }
        }
        for (b, h) in &v.health {
            s.health.insert(
                b.clone(),
                (h.connected, h.last_error.clone().unwrap_or_default()),
            );
        }
    }
    for name in views.keys() {
        s.health.entry(name.clone()).or_default();
    }
    s
}

#[zbus::interface(name = "org.pantavisor.Bridge1")]
impl Bridge1 {
    /// pv-bridge's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// The revision the device runs (`locals/…`, or a number for hub revisions).
    #[zbus(property)]
    fn revision(&self) -> String {
        snapshot(&self.views).running
    }

    /// The status of the latest update (`QUEUED` … `DONE`), empty if none yet.
    #[zbus(property)]
    fn update_status(&self) -> String {
        snapshot(&self.views)
            .update
            .map(|(_, p)| p.status.to_string())
            .unwrap_or_default()
    }

    /// Every backend: name, connected, last error.
    #[zbus(property)]
    fn backends(&self) -> Vec<(String, bool, String)> {
        snapshot(&self.views)
            .health
            .into_iter()
            .map(|(n, (c, e))| (n, c, e))
            .collect()
    }

    /// What a backend asks of a person at the device: backend, text (e.g. the
    /// Pantacor Hub claim challenge while the device is unclaimed). Local only:
    /// never sent to a backend.
    #[zbus(property(emits_changed_signal = "false"))]
    fn notices(&self) -> Vec<(String, String)> {
        self.notices
            .borrow()
            .iter()
            .map(|(b, t)| (b.clone(), t.clone()))
            .collect()
    }

    /// Everything above as one JSON document.
    fn status(&self) -> String {
        let s = snapshot(&self.views);
        let notices: Vec<_> = self
            .notices
            .borrow()
            .iter()
            .map(|(b, t)| json!({"backend": b, "text": t}))
            .collect();
        json!({
            "version": crate::VERSION,
            "revision": s.running,
            "update": s.update.map(|(backend, p)| json!({
                "backend": backend, "id": p.id, "revision": p.rev,
                "status": p.status.as_str(), "status_msg": p.status_msg,
                "progress": p.progress, "bytes_done": p.bytes_done,
                "bytes_total": p.bytes_total,
            })),
            "backends": s.health.into_iter().map(|(n, (c, e))| json!({
                "name": n, "connected": c, "last_error": (!e.is_empty()).then_some(e),
            })).collect::<Vec<_>>(),
            "notices": notices,
        })
        .to_string()
    }

    /// Reads device-meta and applies user-meta again now.
    async fn resync(&self) -> zbus::fdo::Result<()> {
        self.resync
            .send(())
            .await
            .map_err(|_| zbus::fdo::Error::Failed("the metadata task has stopped".into()))
    }

    /// Cancels the running or waiting update, if it has not reached INPROGRESS.
    /// Returns what was cancelled.
    fn cancel_update(&self) -> zbus::fdo::Result<String> {
        let backend = {
            let s = self.slot.lock();
            s.active
                .as_ref()
                .map(|a| a.backend.clone())
                .or_else(|| s.next.as_ref().map(|n| n.job.backend.clone()))
        };
        let Some(backend) = backend else {
            return Err(zbus::fdo::Error::Failed("no update to cancel".into()));
        };
        let reason = "cancelled over D-Bus";
        match arbiter::cancel(&self.slot, &backend, None, reason) {
            Ok((id, Some(job))) => {
                super::report_final(
                    &self.views,
                    &job.backend,
                    &id,
                    UpdateStatus::Cancelled,
                    reason,
                );
                Ok(format!("update {id} cancelled"))
            }
            Ok((id, None)) => Ok(format!("update {id} cancelled")),
            Err(why) => Err(zbus::fdo::Error::Failed(why)),
        }
    }

    /// An update moved: backend, offer id, revision, status, message, percent,
    /// bytes done and total.
    #[zbus(signal)]
    async fn update_progress(
        emitter: &SignalEmitter<'_>,
        backend: &str,
        id: &str,
        revision: &str,
        status: &str,
        message: &str,
        progress: u8,
        bytes_done: u64,
        bytes_total: u64,
    ) -> zbus::Result<()>;

    /// A backend connected or lost its connection.
    #[zbus(signal)]
    async fn backend_health_changed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        connected: bool,
        error: &str,
    ) -> zbus::Result<()>;
}

/// Serves the API on `bus` (`system`, `session`, or a D-Bus address) until the
/// engine stops; retries with backoff while the bus is away.
pub async fn serve(
    bus: String,
    views: super::Views,
    resync: mpsc::Sender<()>,
    slot: arbiter::Shared,
    notices: super::Notices,
) {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        let builder = match bus.as_str() {
            "system" => zbus::connection::Builder::system(),
            "session" => zbus::connection::Builder::session(),
            addr => zbus::connection::Builder::address(addr),
        };
        let object = Bridge1 {
            views: views.clone(),
            notices: notices.clone(),
            resync: resync.clone(),
            slot: slot.clone(),
        };
        match builder.name(SERVICE).serve_at(PATH, object).build().await {
            Ok(conn) => {
                info!(bus = %bus, service = SERVICE, "D-Bus API up");
                watch_and_signal(&conn, &views).await;
                // The object stays served for as long as the connection lives.
                std::future::pending::<()>().await;
            }
            Err(e) => warn!(bus = %bus, error = %e, retry_in = ?wait, "cannot serve the D-Bus API"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(60));
    }
}

/// Emits signals and property changes whenever a view changes; returns when the
/// connection is gone.
async fn watch_and_signal(conn: &zbus::Connection, views: &super::Views) {
    let iface = match conn.object_server().interface::<_, Bridge1>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "D-Bus: no object to signal from");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watchers = Vec::new();
    for v in views.values() {
        let mut sub: watch::Receiver<DeviceView> = v.subscribe();
        let tx = tx.clone();
        watchers.push(tokio::spawn(async move {
            while sub.changed().await.is_ok() {
                let _ = tx.try_send(());
            }
        }));
    }
    drop(tx);
    let mut last = snapshot(views);
    while rx.recv().await.is_some() {
        let now = snapshot(views);
        let emitter = iface.signal_emitter();
        if let Some((backend, p)) = &now.update
            && last.update.as_ref().map(|(_, q)| q) != Some(p)
        {
            let r = Bridge1::update_progress(
                emitter,
                backend,
                &p.id,
                &p.rev,
                p.status.as_str(),
                &p.status_msg,
                p.progress,
                p.bytes_done,
                p.bytes_total,
            )
            .await;
            if let Err(e) = r {
                warn!(error = %e, "D-Bus: cannot emit UpdateProgress");
            }
            let b = iface.get().await;
            let _ = b.update_status_changed(emitter).await;
        }
        for (name, (connected, error)) in &now.health {
            if last.health.get(name) != Some(&(*connected, error.clone())) {
                let _ = Bridge1::backend_health_changed(emitter, name, *connected, error).await;
                let b = iface.get().await;
                let _ = b.backends_changed(emitter).await;
            }
        }
        if now.running != last.running {
            let b = iface.get().await;
            let _ = b.revision_changed(emitter).await;
        }
        last = now;
    }
    for w in watchers {
        w.abort();
    }
}
