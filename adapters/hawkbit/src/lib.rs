//! The `hawkbit` adapter: Eclipse hawkBit's Direct Device Integration API
//! (`shared/reference/hawkbit-ddi.md`), a pull model. The device polls
//! `<url>/<tenant>/controller/v1/<controller>` as often as the server's
//! `config.polling.sleep` says; a `deploymentBase` link becomes an engine
//! offer (a `pvr export` artifact, or a `.swu` holding one), progress goes
//! back as sparse feedback with one final `closed`, a `cancelAction` is
//! accepted before Pantavisor starts and rejected after, and selected
//! device-meta goes up as `configData` attributes. See `docs/hawkbit.md`.

pub mod attrs;
pub mod client;
pub mod config;
pub mod ddi;
mod deploy;
pub mod record;
pub mod swu;
mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pv_adapter_api::{Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink};
use tokio::sync::watch;
use tracing::{info, warn};

use client::{Ddi, DdiError};
pub use config::HawkbitConfig;
use ddi::{Deployment, Execution, Finished};
use record::{Action, Pending, Store};

/// The adapter of one `hawkbit` backend.
pub struct HawkbitAdapter {
    name: String,
    cfg: HawkbitConfig,
    work_dir: PathBuf,
}

impl HawkbitAdapter {
    pub fn new(name: &str, cfg: HawkbitConfig, work_dir: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            cfg,
            work_dir,
        }
    }
}

/// What the poll loop and a deployment task share.
pub(crate) struct Ctx {
    pub name: String,
    pub ddi: Ddi,
    pub link: EngineLink,
    pub dir: PathBuf,
    store: Mutex<Store>,
    /// The poll interval in force (the server's, bounded).
    sleep: Mutex<Duration>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Ctx {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, s: &Store) {
        if let Err(e) = s.save() {
            warn!(backend = %self.name, error = %e, "the hawkBit record was not written");
        }
    }

    pub fn sleep(&self) -> Duration {
        *self.sleep.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes up deployment `d`: the record's action when it is this one (a
    /// restart resumes it), else a new one. `None` when there is nothing to
    /// do: the update is installed already (its success is reported).
    pub async fn take_action(&self, d: &Deployment) -> Option<Action> {
        let running = self.link.view().borrow().running.clone();
        let installed_already = {
            let mut s = self.store();
            if let Some(a) = s.record.action.clone().filter(|a| a.id == d.id) {
                return Some(a);
            }
            let fresh = deploy::new_action(d);
            if let Some(old) = s.record.action.take() {
                info!(backend = %self.name, old = %old.id, new = %d.id, "the server moved on to another action");
            }
            let installed = s.record.installed.as_ref().is_some_and(|i| {
                i.version == fresh.version
                    && running.as_deref().and_then(|r| r.strip_prefix("locals/"))
                        == Some(i.revision.as_str())
            });
            s.record.action = Some(fresh.clone());
            self.save(&s);
            if !installed {
                return Some(fresh);
            }
            fresh
        };
        info!(backend = %self.name, action = %d.id, version = %installed_already.version, "already installed and running; reported installed");
        let detail = format!(
            "{} is installed and running (locals/{})",
            installed_already.version,
            running
                .as_deref()
                .unwrap_or_default()
                .trim_start_matches("locals/")
        );
        self.finish(&d.id, true, false, vec![detail]).await;
        None
    }

    /// The revision name for action `id`: the one already offered, else the
    /// next unspent name for `version`. Recorded before the offer goes.
    pub async fn revision_for(&self, id: &str, version: &str) -> String {
        let mut s = self.store();
        let next = s.record.spent.next(&pv_adapter_local::offer_id(version));
        let Some(a) = s.record.action.as_mut().filter(|a| a.id == id) else {
            return next;
        };
        if let Some(r) = &a.revision {
            return r.clone();
        }
        let rev = next;
        a.revision = Some(rev.clone());
        self.save(&s);
        rev
    }

    /// Sends an intermediate feedback once per action and milestone.
    pub async fn milestone(&self, id: &str, key: &str, exec: Execution, detail: &str) {
        {
            let mut s = self.store();
            let Some(a) = s.record.action.as_mut().filter(|a| a.id == id) else {
                return;
            };
            if a.sent.iter().any(|k| k == key) {
                return;
            }
            a.sent.push(key.to_owned());
            self.save(&s);
        }
        let body = ddi::feedback(
            id,
            exec,
            Finished::None,
            None,
            &[detail.to_owned()],
            now_ms(),
        );
        self.intermediate(id, &body).await;
    }

    /// A progress feedback (`cnt` of `of` objects staged on the device).
    pub async fn progress(&self, id: &str, cnt: u64, of: u64) {
        let detail = format!("staging objects on the device: {cnt} of {of}");
        let body = ddi::feedback(
            id,
            Execution::Proceeding,
            Finished::None,
            Some((cnt, of)),
            &[detail],
            now_ms(),
        );
        self.intermediate(id, &body).await;
    }

    async fn intermediate(&self, id: &str, body: &serde_json::Value) {
        if let Err(e) = self.ddi.feedback(id, false, body).await {
            // Intermediate feedback is not retried: the final one matters.
            warn!(backend = %self.name, action = %id, error = %e, "a progress feedback was not taken");
        }
    }

    /// Rejects the server's cancel request: Pantavisor owns the update now.
    pub async fn cancel_rejected(&self, id: &str, why: &str) {
        info!(backend = %self.name, action = %id, reason = %why, "cancel rejected");
        let body = ddi::feedback(
            id,
            Execution::Rejected,
            Finished::None,
            None,
            &[why.to_owned()],
            now_ms(),
        );
        if let Err(e) = self.ddi.feedback(id, true, &body).await {
            warn!(backend = %self.name, action = %id, error = %e, "the cancel rejection was not taken");
        }
    }

    /// The one final feedback of action `id` (`cancel`: the accepted cancel,
    /// on the cancel resource). Recorded durably first, then sent until the
    /// server took it.
    pub async fn finish(&self, id: &str, success: bool, cancel: bool, details: Vec<String>) {
        let finished = if success || cancel {
            Finished::Success
        } else {
            Finished::Failure
        };
        let body = ddi::feedback(id, Execution::Closed, finished, None, &details, now_ms());
        {
            let mut s = self.store();
            s.record.finish(id, success);
            s.record.pending = Some(Pending {
                action: id.to_owned(),
                cancel,
                body,
            });
            self.save(&s);
        }
        let _ = tokio::fs::remove_dir_all(self.dir.join("files").join(id)).await;
        info!(backend = %self.name, action = %id, success, cancel, details = ?details, "final feedback");
        self.flush().await;
    }

    /// Sends the recorded final feedback; kept for the next try when the
    /// server could not take it.
    pub async fn flush(&self) {
        let Some(p) = self.store().record.pending.clone() else {
            return;
        };
        match self.ddi.feedback(&p.action, p.cancel, &p.body).await {
            Ok(()) => {}
            Err(DdiError::Gone) => {
                info!(backend = %self.name, action = %p.action, "the server had closed the action already");
            }
            Err(e @ (DdiError::NotFound | DdiError::Status(400..=422, _))) => {
                warn!(backend = %self.name, action = %p.action, error = %e, "the server refused the final feedback; not sent again");
            }
            Err(e) => {
                warn!(backend = %self.name, action = %p.action, error = %e, "the final feedback was not taken; it is sent again");
                return;
            }
        }
        let mut s = self.store();
        if s.record
            .pending
            .as_ref()
            .is_some_and(|q| q.action == p.action)
        {
            s.record.pending = None;
            self.save(&s);
        }
    }
}

/// A deployment task.
struct Task {
    action: String,
    cancel: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<bool>,
}

impl Adapter for HawkbitAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            updates: true,
            device_meta: true,
            ..Capabilities::default()
        }
    }

    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            self.cfg.validate().map_err(AdapterError::Config)?;
            let controller = self.cfg.controller().map_err(AdapterError::Config)?;
            let ddi = Ddi::new(&self.cfg, &controller).map_err(AdapterError::Config)?;
            let (store, problem) = Store::load(&self.work_dir);
            if let Some(p) = problem {
                warn!(backend = %self.name, error = %p, "the hawkBit record is unreadable; starting afresh");
            }
            info!(backend = %self.name, server = %pv_http::redact(ddi.base()), controller = %controller, "polling hawkBit");
            let ctx = Arc::new(Ctx {
                name: self.name.clone(),
                ddi,
                link: link.clone(),
                dir: self.work_dir.clone(),
                store: Mutex::new(store),
                sleep: Mutex::new(Duration::from_secs(self.cfg.poll_interval_secs)),
            });
            poll_loop(&self.cfg, &ctx).await
        })
    }
}

/// The wait after `failures` failed polls in a row: 5 s doubling, at most
/// the poll interval.
fn backoff(failures: u32, most: Duration) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << failures.min(16).saturating_sub(1)))
        .min(most)
        .max(Duration::from_secs(1))
}

async fn poll_loop(cfg: &HawkbitConfig, ctx: &Arc<Ctx>) -> Result<(), AdapterError> {
    let link = &ctx.link;
    let most = Duration::from_secs(cfg.poll_interval_secs);
    let least = Duration::from_secs(cfg.min_poll_interval_secs);
    let mut connected = false;
    let mut failures = 0u32;
    let mut last_error = String::new();
    let mut sent_attrs: Option<BTreeMap<String, String>> = None;
    let mut task: Option<Task> = None;
    let mut quick = false;
    let mut consent: Option<String> = None;
    let mut view = link.view();
    loop {
        ctx.flush().await;
        let wait = match ctx.ddi.poll().await {
            Ok(p) => {
                if !connected {
                    connected = true;
                    link.send(BackendEvent::Connected).await?;
                }
                failures = 0;
                last_error.clear();
                let sleep = p
                    .sleep
                    .unwrap_or(most)
                    .clamp(least, Duration::from_secs(86_400));
                *ctx.sleep.lock().unwrap_or_else(|e| e.into_inner()) = sleep;
                let attrs = attributes(cfg, ctx, &view.borrow());
                let mut sleep = sleep;
                if p.config_data || sent_attrs.as_ref() != Some(&attrs) {
                    let asked = p.config_data;
                    if send_attributes(ctx, &attrs, &mut sent_attrs).await && asked && !quick {
                        // A server that asked for attributes (a registration)
                        // often has work once it has them: look again soon,
                        // once (goosebit keeps unregistered devices at 10 s).
                        sleep = least.min(Duration::from_secs(1));
                        quick = true;
                    }
                } else {
                    quick = false;
                }
                if task.as_ref().is_some_and(|t| t.handle.is_finished()) {
                    task = None;
                }
                if let Some(href) = &p.cancel {
                    cancel(ctx, href, &task).await;
                } else if let Some(href) = &p.deployment {
                    let id = ddi::action_id(href).unwrap_or_default();
                    if task.as_ref().is_none_or(|t| t.action != id) {
                        if let Some(t) = task.take() {
                            t.handle.abort();
                        }
                        let (tx, rx) = watch::channel(false);
                        let handle = tokio::spawn(deploy::run(ctx.clone(), href.clone(), rx));
                        task = Some(Task {
                            action: id,
                            cancel: tx,
                            handle,
                        });
                    }
                } else if p.confirmation.is_some() && p.confirmation != consent {
                    info!(backend = %ctx.name, "an action waits for consent on the server (confirmationBase); confirm it there");
                }
                consent = p.confirmation.clone();
                sleep
            }
            Err(e) => {
                failures += 1;
                let reason = e.to_string();
                if reason != last_error {
                    warn!(backend = %ctx.name, error = %reason, "hawkBit poll failed");
                    last_error = reason.clone();
                }
                if connected || failures == 1 {
                    connected = false;
                    link.send(BackendEvent::Disconnected { reason }).await?;
                }
                backoff(failures, most)
            }
        };
        let deadline = tokio::time::Instant::now() + pv_adapter_api::timing::jittered(wait, 0.1);
        loop {
            let finished = async {
                match &mut task {
                    Some(t) if !t.handle.is_finished() => (&mut t.handle).await.unwrap_or(false),
                    _ => std::future::pending::<bool>().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                ended = finished => {
                    task = None;
                    if ended {
                        // An action ended: poll again soon for what comes next.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                    // Paused by an error: the next poll, at its time, takes it
                    // up again (no request storm while a server misbehaves).
                }
                r = view.changed() => {
                    if r.is_err() {
                        return Err(AdapterError::EngineGone);
                    }
                    if connected {
                        let attrs = attributes(cfg, ctx, &view.borrow_and_update());
                        if sent_attrs.as_ref() != Some(&attrs) {
                            send_attributes(ctx, &attrs, &mut sent_attrs).await;
                        }
                    }
                }
                _ = link.stopping() => {
                    if let Some(t) = task.take() {
                        t.handle.abort();
                    }
                    return Ok(());
                }
            }
        }
    }
}

fn attributes(
    cfg: &HawkbitConfig,
    ctx: &Ctx,
    view: &pv_adapter_api::DeviceView,
) -> BTreeMap<String, String> {
    let sw = ctx.store().record.sw_version(view.running.as_deref());
    attrs::attributes(
        cfg.hw_boardname.as_deref(),
        cfg.hw_revision.as_deref(),
        sw.as_deref(),
        &view.device_meta,
        &cfg.attributes,
    )
}

/// Sends the attributes; true when the server took them.
async fn send_attributes(
    ctx: &Ctx,
    attrs: &BTreeMap<String, String>,
    sent: &mut Option<BTreeMap<String, String>>,
) -> bool {
    // Not sent again until they change or the server asks, taken or not: a
    // refusal (400, 429) would only repeat.
    *sent = Some(attrs.clone());
    match ctx.ddi.config_data(&ddi::config_data(attrs)).await {
        Ok(()) => true,
        Err(e) => {
            warn!(backend = %ctx.name, error = %e, "device attributes (configData) were not taken");
            false
        }
    }
}

/// A `cancelAction` link: the task of that action decides; with none, the
/// cancel is accepted (nothing of it runs here).
async fn cancel(ctx: &Arc<Ctx>, href: &str, task: &Option<Task>) {
    let stop = match ctx.ddi.get(href).await.map(|b| ddi::parse_cancel(&b)) {
        Ok(Ok(stop)) => stop,
        Ok(Err(e)) => {
            warn!(backend = %ctx.name, error = %e, "a cancel request that cannot be read");
            return;
        }
        Err(e) => {
            warn!(backend = %ctx.name, error = %e, "the cancel request could not be read");
            return;
        }
    };
    let id = ddi::action_id(href).unwrap_or_else(|| stop.clone());
    if let Some(t) = task
        .as_ref()
        .filter(|t| t.action == stop && !t.handle.is_finished())
    {
        let _ = t.cancel.send(true);
        return;
    }
    let offered = ctx
        .store()
        .record
        .action
        .as_ref()
        .filter(|a| a.id == stop)
        .and_then(|a| a.revision.clone());
    if let Some(rev) = offered {
        // After a restart: the deployment link is gone, but Pantavisor may be
        // installing it. The engine decides: withdraw, and answer by outcome.
        let _ = ctx.link.send(BackendEvent::Cancel { id: rev }).await;
        ctx.cancel_rejected(&id, "the revision was handed to Pantavisor before the restart; its outcome will be reported")
            .await;
        return;
    }
    info!(backend = %ctx.name, action = %stop, "cancel accepted: nothing of the action runs here");
    {
        let mut s = ctx.store();
        if s.record.action.as_ref().is_some_and(|a| a.id == stop) {
            s.record.action = None;
            ctx.save(&s);
        }
    }
    ctx.finish(
        &id,
        false,
        true,
        vec!["cancelled: nothing was installed".into()],
    )
    .await;
}
