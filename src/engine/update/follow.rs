//! After LOCAL_RUN: Pantavisor's progress mirrored to the owning backend until it
//! is final, across reboots of the device and restarts of the bridge.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pv_adapter_api::UpdateStatus;
use tracing::{error, info, warn};

use super::{Coordinator, map_status, progress};
use crate::engine::arbiter::Active;
use crate::engine::journal::{Current, Phase};
use crate::pvctrl::{Command, PvStatus};
use crate::state::Revision;

impl Coordinator {
    /// Re-reports the last final status of every backend and finishes the update
    /// that was in flight when the bridge stopped.
    pub(super) async fn recover(&mut self) {
        for f in self.journal.latest_per_backend() {
            let mut p = progress(&f.id, &f.rev, f.status, &f.status_msg);
            p.logs = f.logs.clone();
            self.report(&f.backend, p);
        }
        let Some(cur) = self.journal.current().cloned() else {
            return;
        };
        match cur.phase {
            Phase::Accepted => {
                // Nothing ran. The adapter offers it again; objects already uploaded
                // are found by the preflight and not fetched twice.
                info!(backend = %cur.backend, id = %cur.id, "update was interrupted before staging; waiting for it to be offered again");
                if let Err(e) = self.journal.clear_current() {
                    error!(error = %e, "cannot write the update journal");
                }
            }
            Phase::Staged | Phase::Running => {
                info!(backend = %cur.backend, id = %cur.id, rev = %cur.rev, "resuming the update in flight");
                // Pantavisor may already own it: nothing may supersede it now.
                self.slot.lock().active = Some(Active {
                    backend: cur.backend.clone(),
                    id: cur.id.clone(),
                    priority: i64::MAX,
                    committed: true,
                    cancelled: None,
                    cancel: Arc::new(tokio::sync::Notify::new()),
                });
                if cur.phase == Phase::Staged {
                    self.resume_run(&cur).await;
                }
                let (status, msg, logs) = self.follow(&cur.backend, &cur.id, &cur.rev).await;
                self.finish(&cur.backend, &cur.id, &cur.rev, status, &msg, logs);
                self.slot.lock().active = None;
            }
        }
    }

    /// After a restart in `Staged`: send LOCAL_RUN unless Pantavisor already took it.
    pub(super) async fn resume_run(&mut self, cur: &Current) {
        let started = match self.pv.progress(&cur.rev).await {
            Ok(p) => p.status != PvStatus::New,
            Err(_) => false,
        };
        if started {
            return;
        }
        let Ok(rev) = cur.rev.parse::<Revision>() else {
            return;
        };
        match self.pv.command(Command::LocalRun(rev)).await {
            Ok(_) => {}
            // Our own run got there first and is now active.
            Err(e) if e.is_update_ongoing() => {}
            Err(e) => {
                warn!(error = %e, rev = %cur.rev, "LOCAL_RUN after restart failed; following progress anyway")
            }
        }
    }

    pub(super) async fn follow(
        &mut self,
        backend: &str,
        id: &str,
        rev: &str,
    ) -> (UpdateStatus, String, Option<String>) {
        let mut offline = false;
        loop {
            match self.pv.progress(rev).await {
                Ok(p) => {
                    if offline {
                        info!(rev = %rev, "pv-ctrl is back");
                        offline = false;
                    }
                    let status = map_status(&p.status);
                    let mut out = progress(id, rev, status, &p.status_msg);
                    out.progress = p.progress.min(100) as u8;
                    if p.status.is_final() {
                        if p.status.is_success() {
                            self.set_running(rev);
                        }
                        return (status, p.status_msg, p.logs);
                    }
                    if p.status == PvStatus::Inprogress && self.ready.load(Ordering::Relaxed) {
                        // Pantavisor (re)started the containers and waits for their
                        // goals; the bridge's own READY is one of them.
                        let _ = self.pv.signal_ready().await;
                    }
                    self.report(backend, out);
                }
                Err(e) if e.is_unreachable() => {
                    if !offline {
                        info!(rev = %rev, "pv-ctrl unreachable (device rebooting?); waiting");
                        offline = true;
                    }
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => warn!(rev = %rev, error = %e, "reading progress failed"),
            }
            tokio::time::sleep(self.opts.poll_interval).await;
        }
    }
}
