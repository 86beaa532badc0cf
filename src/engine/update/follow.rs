//! After LOCAL_RUN: Pantavisor's progress mirrored to the owning backend until it
//! is final, across reboots of the device and restarts of the bridge.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pv_adapter_api::UpdateStatus;
use tracing::{error, info, warn};

use super::{Coordinator, Refusal, map_status, progress};
use crate::engine::arbiter::Active;
use crate::engine::journal::{Current, Phase};
use crate::pvctrl::{Command, PvStatus};
use crate::state::Revision;

impl Coordinator {
    /// Re-reports the last final status of every backend, finishes the update that
    /// was in flight when the bridge stopped, and settles an UPDATED revision the
    /// reboot tried again.
    pub(super) async fn recover(&mut self) {
        for f in self.journal.latest_per_backend() {
            let mut p = progress(&f.id, &f.rev, f.status, &f.status_msg);
            p.logs = f.logs.clone();
            self.report(&f.backend, p);
        }
        if let Some(cur) = self.journal.current().cloned() {
            self.resume(cur).await;
        }
        self.settle_updated().await;
    }

    /// Finishes the update that was in flight when the bridge stopped.
    async fn resume(&mut self, cur: Current) {
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
                self.slot.lock().active = Some(Active::owned_by_pantavisor(&cur.backend, &cur.id));
                let resumed = match cur.phase {
                    Phase::Staged => self.resume_run(&cur).await,
                    _ => Ok(()),
                };
                let (status, msg, logs) = match resumed {
                    Ok(()) => self.follow(&cur.backend, &cur.id, &cur.rev).await,
                    Err(r) => (r.status, r.msg, None),
                };
                self.finish(&cur.backend, &cur.id, &cur.rev, status, &msg, logs);
                self.slot.lock().active = None;
            }
        }
    }

    /// UPDATED is final for now, not for good: the revision is no rollback point,
    /// and Pantavisor tries it again at the next boot, where it becomes DONE or
    /// fails (ERROR) and the device rolls back; Pantavisor's own hub client then
    /// reports the new status of the same revision. After a restart, the latest
    /// UPDATED update of each backend is looked at again: a new final status is
    /// journaled and reported; one being tried right now is followed to its end.
    async fn settle_updated(&mut self) {
        let updated: Vec<_> = self
            .journal
            .latest_per_backend()
            .into_iter()
            .filter(|f| f.status == UpdateStatus::Updated)
            .cloned()
            .collect();
        for f in updated {
            let Ok(p) = self.pv.progress(&f.rev).await else {
                continue;
            };
            let (status, msg, logs) = match p.status {
                PvStatus::Updated => continue,
                s if s.is_final() => (map_status(&s), p.status_msg, p.logs),
                PvStatus::New => continue,
                _ => {
                    info!(backend = %f.backend, id = %f.id, rev = %f.rev,
                        "the UPDATED revision is being tried again after a reboot; following it");
                    self.slot.lock().active = Some(Active::owned_by_pantavisor(&f.backend, &f.id));
                    self.follow(&f.backend, &f.id, &f.rev).await
                }
            };
            if status == UpdateStatus::Updated {
                continue;
            }
            info!(backend = %f.backend, id = %f.id, status = %status,
                "the UPDATED revision has a new final status after a reboot");
            self.finish(&f.backend, &f.id, &f.rev, status, &msg, logs);
        }
    }

    /// After a restart in `Staged`: send LOCAL_RUN unless Pantavisor already took it.
    pub(super) async fn resume_run(&mut self, cur: &Current) -> Result<(), Refusal> {
        if self.started(&cur.rev).await {
            return Ok(());
        }
        let rev = cur
            .rev
            .parse::<Revision>()
            .map_err(|e| Refusal::wontgo(e.to_string()))?;
        self.send_local_run(&rev).await
    }

    /// Pantavisor has started `rev` (its progress is past NEW).
    async fn started(&self, rev: &str) -> bool {
        matches!(self.pv.progress(rev).await, Ok(p) if p.status != PvStatus::New)
    }

    /// Sends LOCAL_RUN. `Ok` when Pantavisor took it, or may have: an answer lost
    /// to a timeout or a broken connection leaves it uncertain, and `follow` sends
    /// it again only if the revision does not start (a blind retry could run a
    /// revision twice, even one that already failed and rolled back). `Err` only
    /// for a definite refusal.
    pub(super) async fn send_local_run(&self, rev: &Revision) -> Result<(), Refusal> {
        match self.pv.command_once(Command::LocalRun(rev.clone())).await {
            Ok(_) => Ok(()),
            // "update ongoing" may be our own earlier attempt, whose 200 was lost
            // (a retry after a timeout): the revision's progress tells.
            Err(e) if e.is_update_ongoing() => {
                if self.started(&rev.to_string()).await {
                    info!(rev = %rev, "LOCAL_RUN had reached Pantavisor; its answer was lost");
                    Ok(())
                } else {
                    Err(Refusal::wontgo(
                        "busy: the device is running another update",
                    ))
                }
            }
            Err(e @ crate::pvctrl::Error::Status { .. }) => {
                Err(Refusal::wontgo(format!("LOCAL_RUN refused: {e}")))
            }
            Err(e) => {
                warn!(rev = %rev, error = %e,
                    "LOCAL_RUN may not have reached Pantavisor; following the revision, and sending it again if it does not start");
                Ok(())
            }
        }
    }

    /// Mirrors Pantavisor's progress until it is final, across reboots.
    ///
    /// A LOCAL_RUN answered 200 can still be lost: the command slot lives in RAM
    /// (a power cut empties it) and BLOCK_REBOOT drops commands. When the revision
    /// has not started (progress NEW, or none before 025) for `lost_command_after`
    /// while pv-ctrl answers, LOCAL_RUN is sent once more; when it still has not
    /// started after as long again, the update ends ERROR, saying the device lost
    /// the command (nothing was installed).
    pub(super) async fn follow(
        &mut self,
        backend: &str,
        id: &str,
        rev: &str,
    ) -> (UpdateStatus, String, Option<String>) {
        let mut offline = false;
        let mut idle_since: Option<Instant> = None;
        let mut resent = false;
        loop {
            let mut idle = false;
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
                    idle = p.status == PvStatus::New;
                    self.report(backend, out);
                }
                Err(e) if e.is_unreachable() => {
                    if !offline {
                        info!(rev = %rev, "pv-ctrl unreachable (device rebooting?); waiting");
                        offline = true;
                    }
                }
                Err(e) if e.is_not_found() => idle = true,
                Err(e) => warn!(rev = %rev, error = %e, "reading progress failed"),
            }
            if !idle {
                idle_since = None;
            } else if idle_since.get_or_insert_with(Instant::now).elapsed()
                >= self.opts.lost_command_after
            {
                let waited = self.opts.lost_command_after.as_secs();
                if resent {
                    let msg = format!(
                        "the device lost the LOCAL_RUN command: {rev} had not started {waited} s \
                         after it was sent a second time (a power cut, or a reboot held by a \
                         debug shell, drops a queued command); nothing was installed"
                    );
                    error!(backend = %backend, id = %id, "{msg}");
                    return (UpdateStatus::Error, msg, None);
                }
                warn!(rev = %rev, waited, "the revision has not started: LOCAL_RUN was lost; sending it again");
                let sent = match rev.parse::<Revision>() {
                    Ok(r) => self.send_local_run(&r).await,
                    Err(e) => Err(Refusal::wontgo(e.to_string())),
                };
                match sent {
                    Ok(()) => resent = true,
                    Err(r) => {
                        warn!(rev = %rev, reason = %r.msg, "LOCAL_RUN not taken again; waiting");
                    }
                }
                idle_since = Some(Instant::now());
            }
            tokio::time::sleep(self.opts.poll_interval).await;
        }
    }
}
