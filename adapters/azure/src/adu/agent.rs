//! The Device Update agent inside the Azure adapter (reference §7): it owns the
//! `deviceUpdate` and `diagnosticInformation` components of the reported
//! section, decides what each desired `service` means against the durable
//! workflow record, and runs one deployment at a time.
//!
//! Everything it reports is a document (see [`Agent::subscribe`]) that the
//! adapter's reporter keeps equal to the twin: a decided report goes until the
//! hub has it and never again, across reconnects and restarts, because the
//! record holding it is written before it is shown.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use pv_adapter_api::{BackendEvent, EngineLink};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::config::DeviceUpdateConfig;
use super::diagnostics;
use super::jws::{self, RootKey};
use super::wire::{self, Service, StepResult, Workflow};
use super::workflow::{Current, Decision, Phase, Record, decide};
use super::{pipeline, upload};
use crate::report::truncate;

/// A deployment running in its task.
struct Task {
    id: String,
    retry: Option<String>,
    cancel: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

struct Inner {
    record: Record,
    /// The ACK of the last `service` value: desired `$version` and code.
    ack: Option<(u64, u16)>,
    task: Option<Task>,
    /// `diagnosticInformation`: the ACK value, the report, the operations done.
    diag_ack: Option<(u64, Option<String>)>,
    diag_report: Option<(i64, String)>,
    diag_done: diagnostics::Done,
    diag_task: Option<tokio::task::JoinHandle<()>>,
}

/// The agent of one `azure` backend.
pub struct Agent {
    pub(crate) cfg: DeviceUpdateConfig,
    /// `<backend state>/adu`: the record, the stored root key package, files.
    pub(crate) dir: PathBuf,
    pub(crate) backend: String,
    pub(crate) http: pv_http::Client,
    pub(crate) link: EngineLink,
    /// Microsoft's production keys, plus the configured test keys.
    pub(crate) roots: Vec<RootKey>,
    /// The device name blobs are filed under (`deviceId` or `deviceId/moduleId`),
    /// set at each connection.
    pub(crate) device_name: Mutex<String>,
    /// Pantavisor's log tree (`[pantavisor] logs`), for log uploads.
    pub(crate) log_dir: Option<PathBuf>,
    doc: watch::Sender<Value>,
    inner: Mutex<Inner>,
}

const RECORD: &str = "workflow.json";
const DIAGNOSTICS: &str = "diagnostics.json";

impl Agent {
    /// Loads the record from `<work>/adu`.
    pub fn new(
        backend: &str,
        cfg: DeviceUpdateConfig,
        work: PathBuf,
        http: pv_http::Client,
        link: EngineLink,
        log_dir: Option<PathBuf>,
    ) -> Result<Arc<Agent>, String> {
        let dir = work.join("adu");
        let mut roots = jws::production_root_keys();
        roots.extend(cfg.test_root_keys()?);
        let record = Record::load(&dir.join(RECORD)).unwrap_or_else(|e| {
            warn!(backend = %backend, error = %e, "the Device Update record is unreadable; starting afresh");
            Record::default()
        });
        let diag_done = std::fs::read(dir.join(DIAGNOSTICS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let agent = Arc::new(Agent {
            cfg,
            dir,
            backend: backend.to_owned(),
            http,
            link,
            roots,
            device_name: Mutex::new(String::new()),
            log_dir,
            doc: watch::channel(Value::Null).0,
            inner: Mutex::new(Inner {
                record,
                ack: None,
                task: None,
                diag_ack: None,
                diag_report: None,
                diag_done,
                diag_task: None,
            }),
        });
        {
            let inner = agent.lock();
            agent.publish(&inner);
        }
        Ok(agent)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether test root keys are configured (then test root key packages are
    /// accepted too).
    pub(crate) fn testing(&self) -> bool {
        self.cfg.test_root_keys_file.is_some()
    }

    /// The identity blobs are filed under, from the connection.
    pub fn set_device_name(&self, name: String) {
        if let Ok(mut d) = self.device_name.lock() {
            *d = name;
        }
    }

    /// The components the agent reports, as the twin should hold them.
    pub fn subscribe(&self) -> watch::Receiver<Value> {
        self.doc.subscribe()
    }

    fn publish(&self, inner: &Inner) {
        let mut agent = wire::startup(
            &self.cfg.manufacturer,
            &self.cfg.model,
            env!("CARGO_PKG_VERSION"),
        );
        if let (Some(Value::Object(r)), Some(a)) = (&inner.record.report, agent.as_object_mut()) {
            for (k, v) in r {
                a.insert(k.clone(), v.clone());
            }
        }
        if let Some(i) = &inner.record.installed {
            agent["installedUpdateId"] = json!(i);
        }
        let mut du = json!({"__t": "c", "agent": agent});
        if let Some((av, ac)) = inner.ack {
            du["service"] = wire::service_ack(av, ac)[wire::COMPONENT]["service"].take();
        }
        let mut doc = Map::new();
        doc.insert(wire::COMPONENT.into(), du);
        if inner.diag_ack.is_some() || inner.diag_report.is_some() {
            let mut di = json!({"__t": "c"});
            if let Some((av, op)) = &inner.diag_ack {
                di["service"] =
                    diagnostics::ack(*av, op.as_deref())[diagnostics::COMPONENT]["service"].take();
            }
            if let Some((code, op)) = &inner.diag_report {
                di["agent"] =
                    diagnostics::report(*code, op)[diagnostics::COMPONENT]["agent"].take();
            }
            doc.insert(diagnostics::COMPONENT.into(), di);
        }
        self.doc.send_replace(Value::Object(doc));
    }

    fn save(&self, inner: &Inner) {
        if let Err(e) = inner.record.save(&self.dir.join(RECORD)) {
            warn!(backend = %self.backend, error = %e, "the Device Update record was not written");
        }
    }

    /// A desired `deviceUpdate.service` value, new or changed, at desired
    /// `$version` `av`.
    pub fn service(self: &Arc<Self>, av: u64, value: &Value) {
        let mut inner = self.lock();
        let svc = match Service::parse(value) {
            Ok(s) => s,
            Err(e) => {
                warn!(backend = %self.backend, version = av, reason = %e, "a Device Update service value that cannot be read");
                inner.ack = Some((av, 406));
                self.publish(&inner);
                return;
            }
        };
        inner.ack = Some((av, 200));
        let decision = decide(&svc, &inner.record);
        match decision {
            Decision::Ignore => {
                // After a restart nothing runs the workflow the record says is
                // running: take it up again (files already verified are kept).
                let resume = match (&svc, inner.record.running()) {
                    (Service::Deploy { workflow, .. }, Some(c)) => {
                        c.id == workflow.id && inner.task.is_none()
                    }
                    _ => false,
                };
                if resume {
                    info!(backend = %self.backend, workflow = %svc_id(&svc), "resuming the deployment");
                    self.spawn(&mut inner, &svc, false);
                }
            }
            Decision::Idle => {
                info!(backend = %self.backend, "Device Update: cancel with nothing running; idle");
            }
            Decision::Cancel => self.cancel(&mut inner),
            Decision::Process {
                workflow,
                replaces,
                retry,
            } => {
                if let Some(old) = &replaces {
                    info!(backend = %self.backend, old = %old, new = %workflow.id, "a new deployment replaces the running one");
                }
                // A retry re-offers the same revision: the engine takes it as the
                // same offer, so it is not withdrawn.
                self.stop_task(&mut inner, !retry);
                if !retry {
                    // A new workflow starts with nothing of another's files.
                    let _ = std::fs::remove_dir_all(self.dir.join("files"));
                }
                inner.record.current = Some(Current {
                    id: workflow.id.clone(),
                    retry: workflow.retry_timestamp.clone(),
                    phase: Phase::Accepted,
                    revision: None,
                    update: None,
                });
                info!(backend = %self.backend, workflow = %workflow.id, retry, "Device Update deployment");
                self.spawn(&mut inner, &svc, true);
            }
        }
        self.save(&inner);
        self.publish(&inner);
    }

    /// Stops the running task. With `withdraw`, an offer it made is withdrawn
    /// from the engine (a replaced workflow: the new one may fail before it
    /// offers anything, and the old one must not go on).
    fn stop_task(&self, inner: &mut Inner, withdraw: bool) {
        if let Some(t) = inner.task.take() {
            t.handle.abort();
        }
        if withdraw {
            if let Some(rev) = inner.record.running().and_then(|c| c.revision.clone()) {
                // Withdrawn, its name has a final status in the engine.
                inner.record.ended(&rev, false);
                let link = self.link.clone();
                tokio::spawn(async move {
                    let _ = link.send(BackendEvent::Cancel { id: rev }).await;
                });
            }
        }
    }

    fn spawn(self: &Arc<Self>, inner: &mut Inner, svc: &Service, fresh: bool) {
        let Service::Deploy {
            workflow,
            manifest,
            signature,
            file_urls,
            root_key_package_url,
        } = svc
        else {
            return;
        };
        let (cancel, cancelled) = watch::channel(false);
        let d = pipeline::Deploy {
            workflow: workflow.clone(),
            manifest: manifest.clone(),
            signature: signature.clone(),
            file_urls: file_urls.clone(),
            root_key_package_url: root_key_package_url.clone(),
            fresh,
        };
        let handle = tokio::spawn(pipeline::run(self.clone(), d, cancelled));
        inner.task = Some(Task {
            id: workflow.id.clone(),
            retry: workflow.retry_timestamp.clone(),
            cancel,
            handle,
        });
    }

    fn cancel(self: &Arc<Self>, inner: &mut Inner) {
        if let Some(t) = &inner.task {
            info!(backend = %self.backend, workflow = %t.id, "Device Update: cancelling the deployment");
            let _ = t.cancel.send(true);
            return;
        }
        let Some(c) = inner.record.running().cloned() else {
            return;
        };
        let w = Workflow {
            action: 3,
            id: c.id.clone(),
            retry_timestamp: c.retry.clone(),
        };
        match (c.revision, c.update) {
            // Offered before a restart: withdraw it and report what the engine
            // says (it may be too late to stop).
            (Some(rev), Some(update)) => {
                let (cancel, cancelled) = watch::channel(true);
                let handle = tokio::spawn(pipeline::follow_only(
                    self.clone(),
                    w,
                    rev,
                    update,
                    cancelled,
                ));
                inner.task = Some(Task {
                    id: c.id,
                    retry: c.retry,
                    cancel,
                    handle,
                });
            }
            _ => {
                self.decided(
                    inner,
                    &w,
                    Phase::Cancelled,
                    wire::cancelled(&w, "cancelled"),
                    None,
                );
            }
        }
    }

    /// Records a decided report for `w` when it is still the current workflow.
    /// Returns false when another workflow replaced it (the caller stops).
    fn decided(
        &self,
        inner: &mut Inner,
        w: &Workflow,
        phase: Phase,
        report: Value,
        installed: Option<String>,
    ) -> bool {
        let Some(c) = inner.record.current_of(w) else {
            return false;
        };
        c.phase = phase;
        let offered = c.revision.clone();
        if !phase.running() {
            if let Some(rev) = &offered {
                inner.record.ended(rev, phase == Phase::Succeeded);
            }
        }
        if phase == Phase::Succeeded {
            inner.record.last_completed = Some(w.id.clone());
        }
        if let Some(i) = installed {
            inner.record.installed = Some(i);
        }
        inner.record.report = Some(report);
        if !phase.running()
            && inner
                .task
                .as_ref()
                .is_some_and(|t| t.id == w.id && t.retry == w.retry_timestamp)
        {
            inner.task = None;
        }
        self.save(inner);
        self.publish(inner);
        true
    }

    /// The pipeline's report for `w` (see [`Agent::decided`]).
    pub(crate) fn report(
        &self,
        w: &Workflow,
        phase: Phase,
        report: Value,
        installed: Option<String>,
    ) -> bool {
        let mut inner = self.lock();
        let ok = self.decided(&mut inner, w, phase, report, installed);
        if ok && !phase.running() {
            // The files served their deployment.
            let _ = std::fs::remove_dir_all(self.dir.join("files"));
        }
        ok
    }

    /// A failure report for `w`.
    pub(crate) fn fail(&self, w: &Workflow, erc: u32, details: &str, steps: &[StepResult]) {
        warn!(backend = %self.backend, workflow = %w.id, erc = %format!("{erc:08X}"), reason = %details, "Device Update deployment failed");
        let details = truncate(details, 1024);
        self.report(
            w,
            Phase::Failed,
            wire::failed(w, &[erc], &details, steps),
            None,
        );
    }

    /// The revision name for the next attempt at `revision` (see
    /// [`Record::attempt`]).
    pub(crate) fn attempt(&self, revision: &str) -> String {
        self.lock().record.attempt(revision)
    }

    /// Whether the running revision installed `update` under a retry's name.
    pub(crate) fn installed_as(&self, update: &str, running: Option<&str>) -> bool {
        self.lock().record.installed_as(update, running)
    }

    /// Notes the revision offered for `w` (before the offer goes).
    pub(crate) fn switching(&self, w: &Workflow, revision: &str, update: &str) -> bool {
        let mut inner = self.lock();
        let Some(c) = inner.record.current_of(w) else {
            return false;
        };
        c.phase = Phase::Switching;
        c.revision = Some(revision.to_owned());
        c.update = Some(update.to_owned());
        self.save(&inner);
        true
    }

    /// A desired `diagnosticInformation.service` value at `$version` `av`.
    pub fn diagnostics(self: &Arc<Self>, av: u64, value: &Value) {
        let mut inner = self.lock();
        let req = diagnostics::parse(value);
        let op = match &req {
            Ok(r) => Some(r.operation_id.clone()),
            Err((_, op)) => op.clone(),
        };
        inner.diag_ack = Some((av, op.clone()));
        match req {
            Err((code, op)) => {
                warn!(backend = %self.backend, result = code, "a log upload request that cannot be served");
                inner.diag_report = Some((code, op.unwrap_or_default()));
            }
            Ok(r) => {
                if let Some(code) = inner.diag_done.result_of(&r.operation_id) {
                    info!(backend = %self.backend, operation = %r.operation_id, "log upload already done; its result is reported again");
                    inner.diag_report = Some((code, r.operation_id));
                } else if inner.diag_task.as_ref().is_some_and(|t| !t.is_finished()) {
                    warn!(backend = %self.backend, operation = %r.operation_id, "a log upload is running; this request waits for the next change");
                } else {
                    info!(backend = %self.backend, operation = %r.operation_id, "uploading logs for Device Update diagnostics");
                    inner.diag_task = Some(tokio::spawn(upload::run(self.clone(), r)));
                }
            }
        }
        self.publish(&inner);
    }

    /// The end of a log upload: remembered (so a replay does nothing) and reported.
    pub(crate) fn diagnostics_done(&self, operation_id: &str, code: i64) {
        let mut inner = self.lock();
        inner.diag_done.record(operation_id, code);
        if let Ok(bytes) = serde_json::to_vec(&inner.diag_done) {
            if let Err(e) =
                pv_adapter_api::durable::write_durable(&self.dir.join(DIAGNOSTICS), &bytes)
            {
                warn!(backend = %self.backend, error = %e, "the diagnostics record was not written");
            }
        }
        inner.diag_report = Some((code, operation_id.to_owned()));
        self.publish(&inner);
    }
}

fn svc_id(s: &Service) -> String {
    match s {
        Service::Deploy { workflow, .. } | Service::Cancel { workflow } => workflow.id.clone(),
        Service::Ignored { action } => format!("action {action}"),
    }
}

#[cfg(test)]
mod tests;
