//! One deployment (reference §7.5): root key package, signature chain, manifest
//! and compatibility, then the installed check, and only then the In progress
//! report, the downloads, the offer to the engine and its outcome.
//!
//! Nothing is downloaded before the manifest verified; nothing downloaded is
//! executed; the engine checks every object against its name before Pantavisor
//! sees it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pv_adapter_api::{BackendEvent, Offer, Progress, UpdateStatus};
use tokio::sync::watch;
use tracing::{info, warn};

use super::agent::Agent;
use super::download;
use super::handlers::{self, Plan};
use super::install;
use super::jws::Trust;
use super::manifest::{FileEntry, Manifest, Step, UpdateId, erc};
use super::rootkeys::Package;
use super::wire::{self, StepResult, Workflow};
use super::workflow::Phase;

/// Largest root key package or child manifest read.
const MAX_SMALL_FILE: usize = 1024 * 1024;
const STORED_PACKAGE: &str = "rootkeys.json";

/// What a deployment brings.
pub(crate) struct Deploy {
    pub workflow: Workflow,
    pub manifest: String,
    pub signature: String,
    pub file_urls: BTreeMap<String, String>,
    pub root_key_package_url: Option<String>,
    /// A new run (report In progress) rather than a resumed one.
    pub fresh: bool,
}

/// Why a deployment fails, with its extended result code.
struct Fail {
    erc: u32,
    reason: String,
}

fn fail(erc: u32, reason: impl Into<String>) -> Fail {
    Fail {
        erc,
        reason: reason.into(),
    }
}

/// A verified deployment: the update, the one revision it installs, and every
/// file the manifests sign.
struct Checked {
    update: UpdateId,
    plan: Plan,
    steps: usize,
    files: BTreeMap<String, FileEntry>,
}

/// Completes when a cancel was asked (never when nobody can ask any more).
async fn cancel_asked(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn step_results(n: usize, code: i64, ercs: &[u32], details: &str) -> Vec<StepResult> {
    (0..n)
        .map(|_| StepResult {
            result_code: code,
            ercs: ercs.to_vec(),
            details: details.to_owned(),
        })
        .collect()
}

pub(crate) async fn run(agent: Arc<Agent>, d: Deploy, mut cancel: watch::Receiver<bool>) {
    let w = d.workflow.clone();
    let dir = agent.dir.join("files");
    let checked = tokio::select! {
        r = check(&agent, &d, &dir) => r,
        _ = cancel_asked(&mut cancel) => {
            agent.report(&w, Phase::Cancelled, wire::cancelled(&w, "cancelled before the update was verified"), None);
            return;
        }
    };
    let c = match checked {
        Ok(c) => c,
        Err(f) => return agent.fail(&w, f.erc, &f.reason, &[]),
    };
    let update = c.update.to_json_string();
    let running = agent.link.view().borrow().running.clone();
    if handlers::installed(std::slice::from_ref(&c.plan), running.as_deref())
        || agent.installed_as(&update, running.as_deref())
    {
        info!(backend = %agent.backend, workflow = %w.id, update = %update, "the update is already installed");
        let steps = step_results(c.steps, 700, &[], "");
        agent.report(
            &w,
            Phase::Succeeded,
            wire::succeeded(&w, &update, &steps),
            Some(update),
        );
        return;
    }
    if d.fresh && !agent.report(&w, Phase::Accepted, wire::in_progress(&w), None) {
        return;
    }
    let offer = tokio::select! {
        r = fetch_and_prepare(&agent, &d, &c, &dir) => r,
        _ = cancel_asked(&mut cancel) => {
            info!(backend = %agent.backend, workflow = %w.id, "deployment cancelled before anything was offered");
            agent.report(&w, Phase::Cancelled, wire::cancelled(&w, "cancelled"), None);
            return;
        }
    };
    let mut offer = match offer {
        Ok(o) => o,
        Err(f) => {
            let steps = step_results(c.steps, 0, &[f.erc], &f.reason);
            return agent.fail(&w, f.erc, &f.reason, &steps);
        }
    };
    // A name whose offer already ended has its final status in the engine's
    // journal and in Pantavisor's trail: another attempt needs another name.
    offer.id = agent.attempt(&offer.id);
    let rev = offer.id.clone();
    if !agent.switching(&w, &rev, &update) {
        return;
    }
    info!(backend = %agent.backend, workflow = %w.id, revision = %rev, "offering the update's revision");
    finish(&agent, &w, &rev, &update, c.steps, Some(offer), cancel).await;
}

/// After a restart, a cancel for an offer whose deployment has no task:
/// withdraw it and report what became of it.
pub(crate) async fn follow_only(
    agent: Arc<Agent>,
    w: Workflow,
    rev: String,
    update: String,
    cancel: watch::Receiver<bool>,
) {
    finish(&agent, &w, &rev, &update, 1, None, cancel).await;
}

async fn finish(
    agent: &Agent,
    w: &Workflow,
    rev: &str,
    update: &str,
    steps: usize,
    offer: Option<Offer>,
    mut cancel: watch::Receiver<bool>,
) {
    let Some((p, asked)) = follow(agent, rev, offer, &mut cancel).await else {
        return;
    };
    let msg = format!("Pantavisor: {} {}", p.status, p.status_msg);
    if p.status.is_success() {
        info!(backend = %agent.backend, workflow = %w.id, revision = %rev, "update installed");
        let r = step_results(steps, 700, &[], "");
        agent.report(
            w,
            Phase::Succeeded,
            wire::succeeded(w, update, &r),
            Some(update.to_owned()),
        );
    } else if p.status == UpdateStatus::Cancelled && asked {
        agent.report(w, Phase::Cancelled, wire::cancelled(w, &msg), None);
    } else {
        let code = match p.status {
            UpdateStatus::Error => erc::ROLLED_BACK,
            _ => erc::REVISION_REFUSED,
        };
        let mut details = msg;
        if let Some(logs) = p.logs.as_deref().filter(|l| !l.is_empty()) {
            details.push_str("; logs: ");
            details.push_str(logs);
        }
        let r = step_results(steps, 0, &[code], &crate::report::truncate(&details, 512));
        agent.fail(w, code, &details, &r);
    }
}

/// Sends `offer` (when there is one) and waits for the final status of `rev`,
/// withdrawing it when a cancel is asked. Returns the final progress and
/// whether a cancel was asked; `None` when the engine stopped.
async fn follow(
    agent: &Agent,
    rev: &str,
    offer: Option<Offer>,
    cancel: &mut watch::Receiver<bool>,
) -> Option<(Progress, bool)> {
    let mut view = agent.link.view();
    view.borrow_and_update();
    // Without a new offer the engine may already hold the outcome; with one,
    // only what the engine says after it counts (an older final of the same
    // revision is not this run's).
    let mut look = offer.is_none();
    if let Some(o) = offer {
        agent.link.send(BackendEvent::Offer(o)).await.ok()?;
    }
    let mut asked = false;
    let mut cancel_gone = false;
    loop {
        if !asked && *cancel.borrow() {
            info!(backend = %agent.backend, revision = %rev, "withdrawing the offered revision");
            agent
                .link
                .send(BackendEvent::Cancel { id: rev.to_owned() })
                .await
                .ok()?;
            asked = true;
        }
        if look {
            let done = view
                .borrow()
                .update
                .clone()
                .filter(|p| p.id == rev && p.status.is_final());
            if let Some(p) = done {
                return Some((p, asked));
            }
        }
        look = true;
        tokio::select! {
            r = view.changed() => r.ok()?,
            r = cancel.changed(), if !asked && !cancel_gone => {
                if r.is_err() {
                    cancel_gone = true;
                }
                look = false;
            }
        }
    }
}

/// Root key package, signature chain, manifest (and its children),
/// compatibility and the plan. Downloads only the package and child manifests.
async fn check(agent: &Agent, d: &Deploy, dir: &Path) -> Result<Checked, Fail> {
    let trust = trust(agent, d.root_key_package_url.as_deref()).await?;
    super::jws::verify(&d.signature, &d.manifest, &trust)
        .map_err(|r| fail(r.erc(), r.to_string()))?;
    let mut m = Manifest::parse(&d.manifest).map_err(|e| fail(erc::MANIFEST_INVALID, e.0))?;
    if let Some(id) = m.detached.clone() {
        let bytes = small_file(agent, d, &m.files, &id, dir).await?;
        m = Manifest::parse_child(&bytes).map_err(|e| fail(erc::MANIFEST_INVALID, e.0))?;
    }
    let device = BTreeMap::from([
        ("manufacturer".to_owned(), agent.cfg.manufacturer.clone()),
        ("model".to_owned(), agent.cfg.model.clone()),
    ]);
    if !m.compatible(&device) {
        return Err(fail(
            erc::INCOMPATIBLE,
            format!(
                "the update is for {:?}; this device is manufacturer={:?} model={:?}",
                m.compatibility, agent.cfg.manufacturer, agent.cfg.model
            ),
        ));
    }
    let mut files = m.files.clone();
    let mut plans = Vec::new();
    for step in &m.steps {
        match step {
            Step::Inline { .. } => plans.push(handlers::plan(step, &m.files)),
            Step::Reference { file_id } => {
                let bytes = small_file(agent, d, &m.files, file_id, dir).await?;
                let child =
                    Manifest::parse_child(&bytes).map_err(|e| fail(erc::MANIFEST_INVALID, e.0))?;
                for s in &child.steps {
                    plans.push(handlers::plan(s, &child.files));
                }
                files.extend(child.files);
            }
        }
    }
    if let Some(Plan::Unsupported { erc, reason }) =
        plans.iter().find(|p| matches!(p, Plan::Unsupported { .. }))
    {
        return Err(fail(*erc, reason.clone()));
    }
    let plan = match <[Plan; 1]>::try_from(plans) {
        Ok([p]) => p,
        Err(p) => {
            return Err(fail(
                erc::UNSUPPORTED_HANDLER,
                format!(
                    "the update has {} install steps; a Pantavisor device installs one revision per update",
                    p.len()
                ),
            ));
        }
    };
    Ok(Checked {
        update: m.update_id.clone(),
        plan,
        steps: m.steps.len(),
        files,
    })
}

/// What verification trusts: the embedded keys and, when there is one, a
/// validated root key package (the deployment's, or the one stored before).
async fn trust(agent: &Agent, url: Option<&str>) -> Result<Trust, Fail> {
    let stored = agent.dir.join(STORED_PACKAGE);
    let production = !agent.testing();
    if let Some(url) = url {
        let shown = pv_http::redact(url);
        let resp = agent.http.get(url).send().await.map_err(|e| {
            fail(
                erc::DOWNLOAD_FAILED,
                format!("root key package {shown}: {e}"),
            )
        })?;
        if resp.status != 200 {
            return Err(fail(
                erc::DOWNLOAD_FAILED,
                format!("root key package {shown}: HTTP {}", resp.status),
            ));
        }
        let b = resp.bytes(MAX_SMALL_FILE).await.map_err(|e| {
            fail(
                erc::DOWNLOAD_FAILED,
                format!("root key package {shown}: {e}"),
            )
        })?;
        let pkg =
            Package::parse(&b).map_err(|e| fail(e.erc(), format!("root key package: {e}")))?;
        pkg.validate(&agent.roots, production)
            .map_err(|e| fail(e.erc(), format!("root key package: {e}")))?;
        if std::fs::read(&stored).ok().as_deref() != Some(&b[..]) {
            if let Err(e) = pv_adapter_api::durable::write_durable(&stored, &b) {
                warn!(backend = %agent.backend, error = %e, "the root key package was not stored");
            }
        }
        return Ok(pkg.trust(&agent.roots));
    }
    if let Ok(b) = std::fs::read(&stored) {
        match Package::parse(&b).and_then(|p| p.validate(&agent.roots, production).map(|_| p)) {
            Ok(p) => return Ok(p.trust(&agent.roots)),
            Err(e) => {
                warn!(backend = %agent.backend, error = %e, "the stored root key package is not valid; using the embedded keys")
            }
        }
    }
    Ok(Trust {
        roots: agent.roots.clone(),
        ..Trust::default()
    })
}

/// A file id usable as a file name.
fn safe(id: &str) -> Result<&str, Fail> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(id)
    } else {
        Err(fail(
            erc::MANIFEST_INVALID,
            format!("file id {id:?} is not usable"),
        ))
    }
}

/// Downloads and verifies one file of the manifest into `dir`.
async fn fetch(
    agent: &Agent,
    d: &Deploy,
    files: &BTreeMap<String, FileEntry>,
    id: &str,
    dir: &Path,
) -> Result<PathBuf, Fail> {
    let entry = files.get(id).ok_or_else(|| {
        fail(
            erc::MANIFEST_INVALID,
            format!("file id {id} is not in the manifest"),
        )
    })?;
    let url = d.file_urls.get(id).ok_or_else(|| {
        fail(
            erc::DOWNLOAD_FAILED,
            format!("fileUrls has no URL for {} ({id})", entry.name),
        )
    })?;
    let dest = dir.join(safe(id)?);
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| fail(erc::DOWNLOAD_FAILED, format!("{}: {e}", dir.display())))?;
    download::fetch(&agent.http, url, entry, &dest)
        .await
        .map_err(|e| fail(e.erc, e.reason))?;
    Ok(dest)
}

async fn small_file(
    agent: &Agent,
    d: &Deploy,
    files: &BTreeMap<String, FileEntry>,
    id: &str,
    dir: &Path,
) -> Result<Vec<u8>, Fail> {
    if files
        .get(id)
        .is_some_and(|f| f.size > MAX_SMALL_FILE as u64)
    {
        return Err(fail(
            erc::MANIFEST_INVALID,
            format!("the child manifest {id} is larger than {MAX_SMALL_FILE} bytes"),
        ));
    }
    let path = fetch(agent, d, files, id, dir).await?;
    tokio::fs::read(&path)
        .await
        .map_err(|e| fail(erc::DOWNLOAD_FAILED, format!("{}: {e}", path.display())))
}

/// Downloads the plan's files and builds the engine offer.
async fn fetch_and_prepare(
    agent: &Agent,
    d: &Deploy,
    c: &Checked,
    dir: &Path,
) -> Result<Offer, Fail> {
    let ids: Vec<&String> = match &c.plan {
        Plan::Overlay { export, script, .. } => vec![script, export],
        Plan::Whole { export, .. } => vec![export],
        Plan::Unsupported { erc, reason } => return Err(fail(*erc, reason.clone())),
    };
    for id in ids {
        fetch(agent, d, &c.files, id, dir).await?;
    }
    let running = match &c.plan {
        Plan::Overlay { .. } => Some(running_state(agent).await?),
        _ => None,
    };
    let stage = dir.join("stage");
    let _ = tokio::fs::remove_dir_all(&stage).await;
    install::prepare(
        &c.plan,
        |id| dir.join(id),
        |id| c.files.get(id).map(|f| f.name.clone()).unwrap_or_default(),
        &stage,
        running.as_deref(),
    )
    .await
    .map_err(|e| fail(e.erc, e.reason))
}

/// The running revision's state, from the device.
async fn running_state(agent: &Agent) -> Result<Vec<u8>, Fail> {
    let running = agent.link.view().borrow().running.clone().ok_or_else(|| {
        fail(
            erc::OVERLAY_FAILED,
            "the running revision is not known yet (Pantavisor not reached)",
        )
    })?;
    let store = agent
        .link
        .device()
        .ok_or_else(|| fail(erc::OVERLAY_FAILED, "the device store is not available"))?;
    store.state(&running).await.map_err(|e| {
        fail(
            erc::OVERLAY_FAILED,
            format!("the running revision {running}: {e}"),
        )
    })
}
