//! The update coordinator: one update at a time, from an adapter's offer to
//! Pantavisor's final status (architecture.md §4).
//!
//! validate the state → preflight (objects already on the device, free space) →
//! fetch missing objects with bounded concurrency, hashing as they stream into
//! `PUT /objects` → check they landed → `PUT /steps/locals/<id>` → `LOCAL_RUN` →
//! mirror `/steps/<rev>/progress` to the owning adapter until final → journal it.
//! Every step before `LOCAL_RUN` that fails ends the update as WONTGO with a precise
//! reason; nothing half-installed ever runs.
//!
//! By role: [`plan`] decides what to fetch (pure), [`stage`] validates, fetches and
//! stages up to an accepted LOCAL_RUN, [`transfer`] moves object bytes into
//! Pantavisor, and [`follow`] mirrors Pantavisor's progress to the end, across
//! restarts of the bridge and reboots of the device.

mod follow;
mod plan;
mod stage;
mod trail;
mod transfer;

use std::sync::Arc;
use std::time::Duration;

use pv_adapter_api::{Progress, UpdateStatus, valid_offer_id};
use tracing::{error, info, warn};

use super::Views;
use super::arbiter::{Active, Job};
use super::journal::{Current, Finished, Journal, Phase};
use crate::pvctrl::{PvCtrl, PvStatus};

/// Settings of the update pipeline.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    /// Objects fetched and uploaded at once.
    pub fetch_concurrency: usize,
    /// Cap on fetch bandwidth in bytes per second across all objects; 0 = none.
    pub bandwidth_limit: u64,
    /// How often Pantavisor's progress is read while an update runs.
    pub poll_interval: Duration,
    /// How long a sent LOCAL_RUN may go without its revision starting (progress
    /// NEW, or none on ≤ 024) while pv-ctrl answers, before it is sent again once;
    /// as long again after that, and the update ends: the device lost the command
    /// (a power cut, or BLOCK_REBOOT, drops a queued command after its 200).
    pub lost_command_after: Duration,
    /// Largest state JSON accepted.
    pub max_state_bytes: usize,
    /// Bytes one update may download from URLs; 0 = no limit.
    pub max_update_bytes: u64,
    /// Where URL objects are downloaded; `None` = the engine's default
    /// (`<state_dir>/cache`).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Extra trust anchors (PEM) for https downloads.
    pub ca_file: Option<std::path::PathBuf>,
    /// More trust anchors: the backends' own `ca_file`s (a hub with a private CA
    /// serves its objects under the same certificate).
    pub backend_ca_files: Vec<std::path::PathBuf>,
    /// HTTP proxy for downloads (`http://host:port`); `None` = the environment's
    /// `HTTPS_PROXY`/`HTTP_PROXY`, with `NO_PROXY`.
    pub proxy: Option<String>,
}

impl Default for UpdateOptions {
    fn default() -> Self {
        Self {
            fetch_concurrency: 4,
            bandwidth_limit: 0,
            poll_interval: Duration::from_millis(500),
            lost_command_after: Duration::from_secs(30),
            max_state_bytes: crate::state::DEFAULT_MAX_STATE_BYTES,
            max_update_bytes: 0,
            cache_dir: None,
            ca_file: None,
            backend_ca_files: Vec::new(),
            proxy: None,
        }
    }
}

/// Why an update ended before Pantavisor ran it.
#[derive(Debug)]
struct Refusal {
    status: UpdateStatus,
    msg: String,
}

impl Refusal {
    fn wontgo(msg: impl Into<String>) -> Self {
        Self {
            status: UpdateStatus::Wontgo,
            msg: msg.into(),
        }
    }
}

/// Maps Pantavisor's progress status to the bridge's vocabulary.
pub fn map_status(s: &PvStatus) -> UpdateStatus {
    match s {
        PvStatus::New | PvStatus::Queued => UpdateStatus::Queued,
        PvStatus::Downloading => UpdateStatus::Downloading,
        PvStatus::Testing => UpdateStatus::Testing,
        PvStatus::Updated => UpdateStatus::Updated,
        PvStatus::Done => UpdateStatus::Done,
        PvStatus::Wontgo => UpdateStatus::Wontgo,
        PvStatus::Error => UpdateStatus::Error,
        PvStatus::Cancelled => UpdateStatus::Cancelled,
        _ => UpdateStatus::Inprogress,
    }
}

/// Runs updates one at a time.
pub struct Coordinator {
    pv: PvCtrl,
    journal: Journal,
    views: Views,
    opts: UpdateOptions,
    /// Set once the backend owning updates is connected: the bridge may then
    /// confirm its READY goal while Pantavisor installs an update.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// Where offers wait and the running update is marked (see `arbiter`).
    slot: crate::engine::arbiter::Shared,
    /// Downloads URL objects; `None` if no HTTP client could be made.
    downloader: Option<Arc<crate::engine::fetch::Downloader>>,
    /// Where a failed revision is named for the log tailer to read its logs.
    log_requests: Option<crate::engine::logs::LogRequests>,
}

/// A progress report with the coarse percentage of its status.
pub(crate) fn progress(id: &str, rev: &str, status: UpdateStatus, msg: &str) -> Progress {
    let pct = match status {
        UpdateStatus::Queued => 5,
        UpdateStatus::Downloading => 25,
        UpdateStatus::Inprogress => 50,
        UpdateStatus::Testing => 75,
        _ => 100,
    };
    Progress {
        id: id.to_owned(),
        rev: rev.to_owned(),
        status,
        status_msg: msg.to_owned(),
        progress: pct,
        bytes_done: 0,
        bytes_total: 0,
        objects_done: 0,
        objects_total: 0,
        logs: None,
    }
}

impl Coordinator {
    pub fn new(
        pv: PvCtrl,
        journal: Journal,
        views: Views,
        opts: UpdateOptions,
        ready: Arc<std::sync::atomic::AtomicBool>,
        slot: crate::engine::arbiter::Shared,
    ) -> Self {
        let downloader = opts.cache_dir.as_deref().and_then(|dir| {
            // A backend's own CA file that does not load is that backend's
            // problem (its adapter says so); downloads go on without it.
            let usable = opts.backend_ca_files.iter().filter(|p| {
                crate::engine::fetch::load_ca(p)
                    .map_err(|e| warn!(error = %e, "not trusted for downloads"))
                    .is_ok()
            });
            let cas: Vec<&std::path::Path> = opts
                .ca_file
                .iter()
                .chain(usable)
                .map(|p| p.as_path())
                .collect();
            match crate::engine::fetch::Downloader::new(dir, &cas, opts.proxy.as_deref()) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    error!(error = %e, "URL object sources will be refused");
                    None
                }
            }
        });
        Self {
            pv,
            journal,
            views,
            opts,
            ready,
            slot,
            downloader,
            log_requests: None,
        }
    }

    /// Names each revision that fails to the log tailer, which then reads the logs
    /// its try boot wrote (the bridge may not have run long enough to send them).
    pub fn with_log_requests(mut self, requests: crate::engine::logs::LogRequests) -> Self {
        self.log_requests = Some(requests);
        self
    }

    /// Publishes progress to a backend's view. The download totals of an update
    /// carry over into its later statuses, so the final report still says how
    /// many bytes and objects were fetched.
    fn report(&self, backend: &str, mut p: Progress) {
        if let Some(v) = self.views.get(backend) {
            v.send_if_modified(|view| {
                if let Some(prev) = &view.update {
                    if prev.id == p.id
                        && p.status != UpdateStatus::Downloading
                        && p.bytes_total == 0
                        && p.objects_total == 0
                    {
                        p.bytes_done = prev.bytes_done;
                        p.bytes_total = prev.bytes_total;
                        p.objects_done = prev.objects_done;
                        p.objects_total = prev.objects_total;
                    }
                }
                let changed = view.update.as_ref() != Some(&p);
                view.update = Some(p.clone());
                changed
            });
        }
    }

    fn set_running(&self, rev: &str) {
        for v in self.views.values() {
            v.send_if_modified(|view| {
                let changed = view.running.as_deref() != Some(rev);
                view.running = Some(rev.to_owned());
                changed
            });
        }
    }

    /// Before LOCAL_RUN nothing was installed: a journal that cannot be written
    /// ends the update WONTGO (Pantavisor's ERROR means "failed and rolled back").
    fn journal_err(e: std::io::Error) -> Refusal {
        error!(error = %e, "cannot write the update journal");
        Refusal::wontgo(format!(
            "the bridge cannot write its update journal ({e}); nothing was installed"
        ))
    }

    /// Recovers after a restart, then runs offers until the channel closes.
    pub async fn run(mut self) {
        self.recover().await;
        loop {
            let next = {
                let mut s = self.slot.lock();
                match s.next.take() {
                    Some(p) => {
                        let cancel = Arc::new(tokio::sync::Notify::new());
                        s.active = Some(Active {
                            backend: p.job.backend.clone(),
                            id: p.job.offer.id.clone(),
                            priority: p.priority,
                            committed: false,
                            cancelled: None,
                            cancel: cancel.clone(),
                        });
                        Some((p.job, cancel))
                    }
                    None => None,
                }
            };
            match next {
                Some((job, cancel)) => {
                    self.handle(job, cancel).await;
                    self.slot.lock().active = None;
                }
                None => self.slot.wake.notified().await,
            }
        }
    }

    async fn handle(&mut self, job: Job, cancel: Arc<tokio::sync::Notify>) {
        let Job { backend, offer } = job;
        let id = offer.id.clone();
        if let Some(f) = self.journal.finished(&backend, &id).cloned() {
            info!(backend = %backend, id = %id, status = %f.status, "offer already finished; not running it again");
            self.report(&backend, progress(&f.id, &f.rev, f.status, &f.status_msg));
            return;
        }
        if !valid_offer_id(&id) {
            let msg = format!("offer id {id:?} must be 1 to 64 of A-Z a-z 0-9 . _ -");
            warn!(backend = %backend, "{msg}");
            self.report(&backend, progress(&id, "", UpdateStatus::Wontgo, &msg));
            return;
        }
        let rev = format!("locals/{id}");
        info!(backend = %backend, id = %id, rev = %rev, "update offered");
        let staged = tokio::select! {
            r = self.stage_and_run(&backend, &offer, &rev) => r,
            _ = cancel.notified() => {
                let why = self
                    .slot
                    .lock()
                    .active
                    .as_ref()
                    .and_then(|a| a.cancelled.clone())
                    .unwrap_or_else(|| "cancelled".into());
                Err(Refusal { status: UpdateStatus::Cancelled, msg: why })
            }
        };
        let cancelled = matches!(&staged, Err(r) if r.status == UpdateStatus::Cancelled);
        match staged {
            Ok(trail::Trail::Free) => {
                let (status, msg, logs) = self.follow(&backend, &id, &rev).await;
                self.finish(&backend, &id, &rev, status, &msg, logs);
            }
            Ok(trail::Trail::Finished { status, msg, logs }) => {
                info!(backend = %backend, id = %id, status = %status,
                    "this offer already ran on the device; its status is reported, it is not run again");
                self.finish(&backend, &id, &rev, status, &msg, logs);
            }
            Err(r) => {
                warn!(backend = %backend, id = %id, status = %r.status, reason = %r.msg, "update refused");
                self.finish(&backend, &id, &rev, r.status, &r.msg, None);
            }
        }
        // The cache only serves an update until it ends; a superseding offer may
        // still use what a cancelled one downloaded.
        if !cancelled {
            if let Some(dl) = &self.downloader {
                dl.clear().await;
            }
        }
    }

    fn finish(
        &mut self,
        backend: &str,
        id: &str,
        rev: &str,
        status: UpdateStatus,
        msg: &str,
        logs: Option<String>,
    ) {
        let f = Finished {
            backend: backend.to_owned(),
            id: id.to_owned(),
            rev: rev.to_owned(),
            status,
            status_msg: msg.to_owned(),
            logs: logs.clone(),
        };
        if let Err(e) = self.journal.finish(f) {
            error!(error = %e, "cannot journal a final status");
        }
        info!(backend = %backend, id = %id, status = %status, msg = %msg, "update finished");
        // Free the slot before anyone hears of the end: a backend that acts on the
        // final status at once (a GC, the next offer) must find it free.
        {
            let mut s = self.slot.lock();
            if s.active
                .as_ref()
                .is_some_and(|a| a.backend == backend && a.id == id)
            {
                s.active = None;
            }
        }
        if status == UpdateStatus::Error {
            if let Some(r) = &self.log_requests {
                r.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rev.to_owned());
            }
        }
        let mut p = progress(id, rev, status, msg);
        p.logs = logs;
        self.report(backend, p);
    }

    fn set_phase(
        &mut self,
        backend: &str,
        id: &str,
        rev: &str,
        phase: Phase,
    ) -> Result<(), Refusal> {
        self.journal
            .set_current(Current {
                backend: backend.to_owned(),
                id: id.to_owned(),
                rev: rev.to_owned(),
                phase,
            })
            .map_err(Self::journal_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_bridge_vocabulary() {
        assert_eq!(map_status(&PvStatus::New), UpdateStatus::Queued);
        assert_eq!(map_status(&PvStatus::Inprogress), UpdateStatus::Inprogress);
        assert_eq!(
            map_status(&PvStatus::Other("X".into())),
            UpdateStatus::Inprogress
        );
        assert_eq!(map_status(&PvStatus::Done), UpdateStatus::Done);
        assert_eq!(map_status(&PvStatus::Updated), UpdateStatus::Updated);
    }
}
