//! The update coordinator: one update at a time, from an adapter's offer to
//! Pantavisor's final status (architecture.md §4).
//!
//! validate the state → preflight (objects already on the device, free space) →
//! fetch missing objects with bounded concurrency, hashing as they stream into
//! `PUT /objects` → check they landed → `PUT /steps/locals/<id>` → `LOCAL_RUN` →
//! mirror `/steps/<rev>/progress` to the owning adapter until final → journal it.
//! Every step before `LOCAL_RUN` that fails ends the update as WONTGO with a precise
//! reason; nothing half-installed ever runs.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pv_adapter_api::{
    DeviceView, ObjectFetcher, ObjectReader, ObjectSource, Offer, Progress, UpdateStatus,
    valid_offer_id,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::journal::{Current, Finished, Journal, Phase};
use crate::pvctrl::{Command, Meta, PvCtrl, PvStatus, hex};
use crate::state::{Revision, State};

/// Settings of the update pipeline.
#[derive(Debug, Clone)]
pub struct UpdateOptions {
    /// Objects fetched and uploaded at once.
    pub fetch_concurrency: usize,
    /// Cap on fetch bandwidth in bytes per second across all objects; 0 = none.
    pub bandwidth_limit: u64,
    /// How often Pantavisor's progress is read while an update runs.
    pub poll_interval: Duration,
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
            max_state_bytes: crate::state::DEFAULT_MAX_STATE_BYTES,
            max_update_bytes: 0,
            cache_dir: None,
            ca_file: None,
            backend_ca_files: Vec::new(),
            proxy: None,
        }
    }
}

/// One offer to carry out.
pub struct Job {
    pub backend: String,
    pub offer: Offer,
}

/// The views of every adapter, by backend name.
pub type Views = Arc<BTreeMap<String, watch::Sender<DeviceView>>>;

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

/// An object to fetch and upload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fetch {
    sha: String,
    source: Src,
    size: Option<u64>,
}

/// Where an object's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Src {
    /// The adapter's fetcher, with its key.
    Adapter(String),
    /// An http/https URL.
    Url(String),
}

/// Decides which objects must be fetched, given what the device has (sha → size).
/// Pure, so the rules are tested without a device.
fn plan(state: &State, offer: &Offer, have: &BTreeMap<String, u64>) -> Result<Vec<Fetch>, Refusal> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (path, sha) in state.objects() {
        if !seen.insert(sha) {
            continue;
        }
        let src = offer.objects.get(sha);
        let expected = src.and_then(|s| s.size);
        // A partial upload is listed under its final name: trust only the size.
        if have
            .get(sha)
            .is_some_and(|got| expected.is_none_or(|e| e == *got))
        {
            continue;
        }
        let Some(src) = src else {
            return Err(Refusal::wontgo(format!(
                "object {sha} ({path}) is not on the device and the offer gives no source for it"
            )));
        };
        match &src.source {
            ObjectSource::Adapter { key } if offer.fetcher.is_some() => out.push(Fetch {
                sha: sha.to_owned(),
                source: Src::Adapter(key.clone()),
                size: src.size,
            }),
            ObjectSource::Adapter { key } => {
                return Err(Refusal::wontgo(format!(
                    "object {sha} ({path}): source {key:?} needs the adapter's fetcher, which the offer lacks"
                )));
            }
            ObjectSource::Url { url }
                if url.starts_with("http://") || url.starts_with("https://") =>
            {
                out.push(Fetch {
                    sha: sha.to_owned(),
                    source: Src::Url(url.clone()),
                    size: src.size,
                })
            }
            ObjectSource::Url { url } => {
                return Err(Refusal::wontgo(format!(
                    "object {sha} ({path}): source {url:?} is not an http or https URL"
                )));
            }
        }
    }
    Ok(out)
}

/// A token bucket shared by every fetch of an update: at most `rate` bytes per
/// second on average, with bursts of one second's worth.
pub struct Throttle {
    rate: f64,
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec as f64;
        Self {
            rate,
            state: std::sync::Mutex::new((rate, tokio::time::Instant::now())),
        }
    }

    /// Takes `n` bytes' worth of tokens; returns how long to wait before the next
    /// read to stay under the rate.
    pub fn take(&self, n: usize) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.rate) - n as f64;
        st.1 = now;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
    }
}

/// Hashes and counts the bytes that stream through it, within the bandwidth cap.
struct Hashing {
    inner: ObjectReader,
    hasher: Sha256,
    counter: Arc<AtomicU64>,
    throttle: Option<Arc<Throttle>>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Hashing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let this = &mut *self;
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.counter.fetch_add(new.len() as u64, Ordering::Relaxed);
            let wait = this.throttle.as_ref().map(|t| t.take(new.len()));
            if let Some(wait) = wait.filter(|w| !w.is_zero()) {
                this.pause = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        r
    }
}

/// What `upload` needs besides the object.
#[derive(Clone)]
struct Sources {
    fetcher: Option<Arc<dyn ObjectFetcher>>,
    downloader: Option<Arc<super::fetch::Downloader>>,
    budget: Arc<super::fetch::Budget>,
}

/// Streams one object from its source into Pantavisor. Returns its length.
async fn upload(
    pv: PvCtrl,
    sources: Sources,
    f: Fetch,
    counter: Arc<AtomicU64>,
    throttle: Option<Arc<Throttle>>,
) -> Result<u64, Refusal> {
    let sha = &f.sha;
    // An adapter may name a (signed, expiring) URL only now: download it like any URL.
    let mut source = f.source.clone();
    if let (Src::Adapter(key), Some(fetcher)) = (&f.source, sources.fetcher.as_ref()) {
        match fetcher.url(key).await {
            Ok(Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
                source = Src::Url(url)
            }
            Ok(Some(url)) => {
                return Err(Refusal::wontgo(format!(
                    "object {sha}: its source {url:?} is not an http or https URL"
                )));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Refusal::wontgo(format!(
                    "object {sha}: cannot locate its source: {e}"
                )));
            }
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Adapter sources are counted as they stream; URL sources while they
        // download into the cache, before this upload.
        let (reader, len, count): (ObjectReader, u64, Arc<AtomicU64>) = match &source {
            Src::Adapter(key) => {
                let fetcher = sources.fetcher.as_ref().ok_or_else(|| {
                    Refusal::wontgo(format!("object {sha}: the offer has no fetcher"))
                })?;
                let (r, len) = fetcher.open(key).await.map_err(|e| {
                    Refusal::wontgo(format!("object {sha}: cannot read its source: {e}"))
                })?;
                (r, len, counter.clone())
            }
            Src::Url(url) => {
                let dl = sources.downloader.as_ref().ok_or_else(|| {
                    Refusal::wontgo(format!(
                        "object {sha}: no HTTP client is available for {}",
                        pv_http::redact(url)
                    ))
                })?;
                let path = if attempt == 1 {
                    dl.fetch(
                        url,
                        sha,
                        f.size,
                        &counter,
                        throttle.as_ref(),
                        &sources.budget,
                    )
                    .await
                    .map_err(Refusal::wontgo)?
                } else {
                    dl.cached(sha)
                };
                let file = tokio::fs::File::open(&path).await.map_err(|e| {
                    Refusal::wontgo(format!("object {sha}: cannot read the cached copy: {e}"))
                })?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| Refusal::wontgo(format!("object {sha}: {e}")))?
                    .len();
                (
                    Box::new(file) as ObjectReader,
                    len,
                    Arc::new(AtomicU64::new(0)),
                )
            }
        };
        if let Some(expected) = f.size.filter(|e| *e != len) {
            return Err(Refusal::wontgo(format!(
                "object {sha}: its source has {len} bytes but the offer says {expected}"
            )));
        }
        let start = count.load(Ordering::Relaxed);
        let adapter_throttle = match source {
            Src::Adapter(_) => throttle.clone(),
            Src::Url(_) => None,
        };
        let mut hashing = Hashing {
            inner: reader,
            hasher: Sha256::new(),
            counter: count.clone(),
            throttle: adapter_throttle,
            pause: None,
        };
        match pv.put_object(sha, &mut hashing, len).await {
            Ok(()) => {
                let got = hex(&hashing.hasher.finalize());
                if &got != sha {
                    return Err(Refusal::wontgo(format!(
                        "object {sha}: its bytes hash to {got}"
                    )));
                }
                return Ok(len);
            }
            Err(e) if e.status() == Some(422) => {
                let got = hex(&hashing.hasher.finalize());
                return Err(Refusal::wontgo(format!(
                    "object {sha}: its bytes hash to {got}; refusing the update"
                )));
            }
            Err(e) if e.status() == Some(507) => {
                return Err(Refusal::wontgo(format!(
                    "object {sha}: the device is out of space: {e}"
                )));
            }
            Err(e) if e.is_unreachable() && attempt < 5 => {
                // Give back the bytes counted for this attempt and try again.
                let counted = count.load(Ordering::Relaxed).saturating_sub(start);
                count.fetch_sub(counted, Ordering::Relaxed);
                warn!(object = %sha, attempt, error = %e, "upload interrupted; retrying");
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
            }
            Err(e) => return Err(Refusal::wontgo(format!("object {sha}: upload failed: {e}"))),
        }
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
    slot: super::arbiter::Shared,
    /// Downloads URL objects; `None` if no HTTP client could be made.
    downloader: Option<Arc<super::fetch::Downloader>>,
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
        slot: super::arbiter::Shared,
    ) -> Self {
        let downloader = opts.cache_dir.as_deref().and_then(|dir| {
            // A backend's own CA file that does not load is that backend's
            // problem (its adapter says so); downloads go on without it.
            let usable = opts.backend_ca_files.iter().filter(|p| {
                super::fetch::load_ca(p)
                    .map_err(|e| warn!(error = %e, "not trusted for downloads"))
                    .is_ok()
            });
            let cas: Vec<&std::path::Path> = opts
                .ca_file
                .iter()
                .chain(usable)
                .map(|p| p.as_path())
                .collect();
            match super::fetch::Downloader::new(dir, &cas, opts.proxy.as_deref()) {
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
        }
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

    fn journal_err(e: std::io::Error) -> Refusal {
        error!(error = %e, "cannot write the update journal");
        Refusal {
            status: UpdateStatus::Error,
            msg: format!("cannot write the update journal: {e}"),
        }
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
                        s.active = Some(super::arbiter::Active {
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

    /// Re-reports the last final status of every backend and finishes the update
    /// that was in flight when the bridge stopped.
    async fn recover(&mut self) {
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
                self.slot.lock().active = Some(super::arbiter::Active {
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
    async fn resume_run(&mut self, cur: &Current) {
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
            Ok(()) => {
                let (status, msg, logs) = self.follow(&backend, &id, &rev).await;
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
        let mut p = progress(id, rev, status, msg);
        p.logs = logs;
        self.report(backend, p);
    }

    /// Downloads a state given by URL: at most `max_state_bytes`, hashed to the
    /// sha256 the offer names.
    async fn fetch_state(&self, s: &pv_adapter_api::StateUrl) -> Result<Vec<u8>, Refusal> {
        let dl = self.downloader.as_ref().ok_or_else(|| {
            Refusal::wontgo(format!(
                "no HTTP client is available for the state at {}",
                pv_http::redact(&s.url)
            ))
        })?;
        let budget = super::fetch::Budget {
            limit: self.opts.max_state_bytes as u64,
            used: AtomicU64::new(0),
        };
        let path = dl
            .fetch(&s.url, &s.sha256, None, &AtomicU64::new(0), None, &budget)
            .await
            .map_err(|e| {
                if e.contains("byte budget") {
                    Refusal::wontgo(format!(
                        "the state at {} is larger than max_state_bytes ({} bytes)",
                        pv_http::redact(&s.url),
                        self.opts.max_state_bytes
                    ))
                } else {
                    Refusal::wontgo(format!("state: {e}"))
                }
            })?;
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| Refusal::wontgo(format!("state: cannot read the download: {e}")))?;
        let _ = tokio::fs::remove_file(&path).await;
        Ok(bytes)
    }

    /// Everything up to an accepted LOCAL_RUN.
    async fn stage_and_run(
        &mut self,
        backend: &str,
        offer: &Offer,
        rev: &str,
    ) -> Result<(), Refusal> {
        let id = &offer.id;
        self.report(
            backend,
            progress(id, rev, UpdateStatus::Queued, "Validating the state"),
        );
        let fetched;
        let state_bytes: &[u8] = match &offer.state_url {
            Some(s) => {
                fetched = self.fetch_state(s).await?;
                &fetched
            }
            None => &offer.state,
        };
        let state = State::parse_for_staging(state_bytes, self.opts.max_state_bytes)
            .map_err(|e| Refusal::wontgo(e.to_string()))?;
        let revision: Revision = rev
            .parse()
            .map_err(|e: crate::state::RevisionError| Refusal::wontgo(e.to_string()))?;
        let have: BTreeMap<String, u64> = self
            .device_objects(backend, id, rev)
            .await
            .map_err(|e| Refusal::wontgo(format!("cannot list the device's objects: {e}")))?;
        let todo = plan(&state, offer, &have)?;
        let bytes_total: u64 = todo.iter().filter_map(|f| f.size).sum();
        if let Some(free) = self.free_space().await {
            if bytes_total > free {
                return Err(Refusal::wontgo(format!(
                    "Space required {bytes_total} B, available {free} B"
                )));
            }
        }
        self.journal
            .set_current(Current {
                backend: backend.to_owned(),
                id: id.clone(),
                rev: rev.to_owned(),
                phase: Phase::Accepted,
            })
            .map_err(Self::journal_err)?;
        if !todo.is_empty() {
            let sources = Sources {
                fetcher: offer.fetcher.clone(),
                downloader: self.downloader.clone(),
                budget: Arc::new(super::fetch::Budget {
                    limit: self.opts.max_update_bytes,
                    used: AtomicU64::new(0),
                }),
            };
            self.fetch_all(backend, id, rev, sources, todo, bytes_total)
                .await?;
        }
        self.pv
            .put_step(&revision, state_bytes)
            .await
            .map_err(|e| Refusal::wontgo(format!("Pantavisor refused the state: {e}")))?;
        self.set_phase(backend, id, rev, Phase::Staged)?;
        // The point of no return: after this, only Pantavisor decides.
        {
            let mut s = self.slot.lock();
            if let Some(a) = s.active.as_mut() {
                if let Some(why) = &a.cancelled {
                    return Err(Refusal {
                        status: UpdateStatus::Cancelled,
                        msg: why.clone(),
                    });
                }
                a.committed = true;
            }
        }
        match self.pv.command(Command::LocalRun(revision)).await {
            Ok(_) => {}
            Err(e) if e.is_update_ongoing() => {
                return Err(Refusal::wontgo(
                    "busy: the device is running another update",
                ));
            }
            Err(e) => return Err(Refusal::wontgo(format!("LOCAL_RUN refused: {e}"))),
        }
        self.set_phase(backend, id, rev, Phase::Running)?;
        Ok(())
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

    /// The device's objects (sha → size). While pv-ctrl is unreachable (the device
    /// is booting or rebooting) the update stays QUEUED and this waits.
    async fn device_objects(
        &self,
        backend: &str,
        id: &str,
        rev: &str,
    ) -> Result<BTreeMap<String, u64>, crate::pvctrl::Error> {
        let mut wait = Duration::from_millis(250);
        let mut told = false;
        loop {
            match self.pv.objects().await {
                Ok(list) => return Ok(list.into_iter().map(|o| (o.sha256, o.size)).collect()),
                Err(e) if e.is_unreachable() => {
                    if !told {
                        info!(rev = %rev, error = %e, "waiting for pv-ctrl before staging");
                        self.report(
                            backend,
                            progress(id, rev, UpdateStatus::Queued, "Waiting for pv-ctrl"),
                        );
                        told = true;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn free_space(&self) -> Option<u64> {
        let dm = self.pv.meta(Meta::Device).await.ok()?;
        dm.get("storage")?.get("real_free")?.as_u64()
    }

    async fn fetch_all(
        &mut self,
        backend: &str,
        id: &str,
        rev: &str,
        sources: Sources,
        todo: Vec<Fetch>,
        bytes_total: u64,
    ) -> Result<(), Refusal> {
        let objects_total = todo.len() as u32;
        let counter = Arc::new(AtomicU64::new(0));
        let throttle = (self.opts.bandwidth_limit > 0)
            .then(|| Arc::new(Throttle::new(self.opts.bandwidth_limit)));
        // Smallest first: cheap objects finish early and progress moves.
        let mut queue: std::collections::VecDeque<Fetch> = {
            let mut v = todo;
            v.sort_by_key(|f| (f.size.unwrap_or(u64::MAX), f.sha.clone()));
            v.into()
        };
        let mut set = JoinSet::new();
        let limit = self.opts.fetch_concurrency.max(1);
        let mut uploaded = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let report = |objects_done: u32| {
            let mut p = progress(id, rev, UpdateStatus::Downloading, "Fetching objects");
            p.bytes_done = counter.load(Ordering::Relaxed);
            p.bytes_total = bytes_total.max(p.bytes_done);
            p.objects_done = objects_done;
            p.objects_total = objects_total;
            self.report(backend, p);
        };
        loop {
            while set.len() < limit {
                let Some(f) = queue.pop_front() else { break };
                let (pv, sources, counter, throttle) = (
                    self.pv.clone(),
                    sources.clone(),
                    counter.clone(),
                    throttle.clone(),
                );
                set.spawn(async move {
                    let sha = f.sha.clone();
                    upload(pv, sources, f, counter, throttle)
                        .await
                        .map(|len| (sha, len))
                });
            }
            tokio::select! {
                r = set.join_next() => match r {
                    None => break,
                    Some(Ok(Ok(done))) => {
                        uploaded.push(done);
                        report(uploaded.len() as u32);
                    }
                    Some(Ok(Err(refusal))) => {
                        set.abort_all();
                        return Err(refusal);
                    }
                    Some(Err(e)) => {
                        set.abort_all();
                        return Err(Refusal::wontgo(format!("object upload task failed: {e}")));
                    }
                },
                _ = tick.tick() => report(uploaded.len() as u32),
            }
        }
        // Pantavisor may answer 200 to an upload it could not store: check.
        let listed: BTreeMap<String, u64> = self
            .pv
            .objects()
            .await
            .map_err(|e| Refusal::wontgo(format!("cannot list the device's objects: {e}")))?
            .into_iter()
            .map(|o| (o.sha256, o.size))
            .collect();
        for (sha, len) in &uploaded {
            if listed.get(sha) != Some(len) {
                return Err(Refusal::wontgo(format!(
                    "object {sha} did not land on the device (listed as {:?} bytes, sent {len})",
                    listed.get(sha)
                )));
            }
        }
        debug!(objects = uploaded.len(), "objects uploaded and verified");
        Ok(())
    }

    /// Mirrors Pantavisor's progress until it is final, across reboots.
    async fn follow(
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

#[cfg(test)]
mod tests {
    use super::*;
    use pv_adapter_api::ObjectRef;
    use serde_json::json;

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    struct NoFetch;
    impl ObjectFetcher for NoFetch {
        fn open(
            &self,
            key: &str,
        ) -> pv_adapter_api::BoxFuture<'_, Result<(ObjectReader, u64), pv_adapter_api::AdapterError>>
        {
            let key = key.to_owned();
            Box::pin(async move {
                Err(pv_adapter_api::AdapterError::Object {
                    key,
                    reason: "unused".into(),
                })
            })
        }
    }

    fn offer(objects: &[(String, Option<u64>, ObjectSource)]) -> Offer {
        Offer {
            id: "r1".into(),
            state: vec![],
            state_url: None,
            objects: objects
                .iter()
                .map(|(s, size, src)| {
                    (
                        s.clone(),
                        ObjectRef {
                            sha256: s.clone(),
                            size: *size,
                            source: src.clone(),
                        },
                    )
                })
                .collect(),
            fetcher: Some(Arc::new(NoFetch)),
        }
    }

    fn state() -> State {
        State::from_value(json!({
            "#spec": "pantavisor-service-system@1",
            "bsp/kernel.img": sha(1),
            "app/root.squashfs": sha(2),
            "app/copy": sha(2),
        }))
        .unwrap()
    }

    fn key(k: &str) -> ObjectSource {
        ObjectSource::Adapter { key: k.into() }
    }

    #[test]
    fn plan_skips_objects_on_the_device_and_fetches_the_rest_once() {
        let o = offer(&[(sha(1), Some(10), key("k1")), (sha(2), Some(20), key("k2"))]);
        let have = BTreeMap::from([(sha(1), 10)]);
        let p = plan(&state(), &o, &have).unwrap();
        assert_eq!(
            p,
            vec![Fetch {
                sha: sha(2),
                source: Src::Adapter("k2".into()),
                size: Some(20)
            }]
        );
    }

    #[test]
    fn plan_refetches_a_partial_object() {
        let o = offer(&[(sha(1), Some(10), key("k1")), (sha(2), Some(20), key("k2"))]);
        let have = BTreeMap::from([(sha(1), 3), (sha(2), 20)]);
        let p = plan(&state(), &o, &have).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].sha, sha(1));
    }

    #[test]
    fn plan_names_the_object_without_a_source() {
        let o = offer(&[(sha(2), Some(20), key("k2"))]);
        let e = plan(&state(), &o, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            e.msg,
            format!(
                "object {} (bsp/kernel.img) is not on the device and the offer gives no source for it",
                sha(1)
            )
        );
        let o = offer(&[
            (
                sha(1),
                None,
                ObjectSource::Url {
                    url: "https://x/1".into(),
                },
            ),
            (sha(2), None, key("k")),
        ]);
        let p = plan(&state(), &o, &BTreeMap::new()).unwrap();
        assert!(p.iter().any(|f| f.source == Src::Url("https://x/1".into())));
        let o = offer(&[
            (
                sha(1),
                None,
                ObjectSource::Url {
                    url: "ftp://x/1".into(),
                },
            ),
            (sha(2), None, key("k")),
        ]);
        let e = plan(&state(), &o, &BTreeMap::new()).unwrap_err();
        assert!(e.msg.contains("is not an http or https URL"), "{}", e.msg);
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_keeps_the_average_rate() {
        let t = Throttle::new(1000);
        // One second of burst is free, then every 500 bytes cost half a second.
        assert_eq!(t.take(1000), Duration::ZERO);
        assert_eq!(t.take(500), Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(t.take(500), Duration::from_millis(500));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            t.take(1000),
            Duration::ZERO,
            "idle time refills up to one second's worth"
        );
        assert_eq!(t.take(1), Duration::from_millis(1));
    }

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
