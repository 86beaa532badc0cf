//! One deployment, from `deploymentBase` to its one final feedback
//! (reference §4, §5.3, §6): choose the revision artifact, download it with
//! resume and check it, honour `skip` and maintenance windows, unpack the
//! `pvr export` (from inside a `.swu` when it is one), offer it, map the
//! engine's progress to sparse feedback, and accept or reject a cancel
//! depending on whether Pantavisor started.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pv_adapter_api::{BackendEvent, Offer, Progress, UpdateStatus};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client::DdiError;
use crate::ddi::{self, Artifact, Deployment, Execution, Handling};
use crate::record::Action;
use crate::{Ctx, verify};

/// How many times a broken download is tried before the action fails.
const DOWNLOAD_TRIES: u32 = 8;
/// Least time between two progress feedbacks.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How a deployment task ended.
#[derive(Debug)]
enum Stop {
    /// The final feedback is decided: success, and its details.
    Final(bool, Vec<String>),
    /// The cancel request was accepted before anything was offered.
    Cancelled,
    /// Not finished: the next poll takes it up again (a network error, the
    /// action gone from the server).
    Later(String),
}

fn fail(why: impl Into<String>) -> Stop {
    Stop::Final(false, vec![why.into()])
}

/// Waits until a cancel is asked.
async fn cancel_asked(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs the deployment at `href`; `cancel` turns true when the server asks to
/// cancel it. True when the action ended (its final feedback is decided).
pub async fn run(ctx: Arc<Ctx>, href: String, mut cancel: watch::Receiver<bool>) -> bool {
    let id = ddi::action_id(&href).unwrap_or_default();
    let prepared = tokio::select! {
        r = prepare(&ctx, &href) => r,
        _ = cancel_asked(&mut cancel) => Err(Stop::Cancelled),
    };
    let stop = match prepared {
        Ok(Some(offer)) => follow(&ctx, &id, offer, &mut cancel).await,
        Ok(None) => return true,
        Err(s) => s,
    };
    match stop {
        Stop::Final(success, details) => {
            ctx.finish(&id, success, false, details).await;
            true
        }
        Stop::Cancelled => {
            info!(backend = %ctx.name, action = %id, "cancel accepted before anything was installed");
            ctx.finish(
                &id,
                false,
                true,
                vec!["cancelled before installation started".into()],
            )
            .await;
            true
        }
        Stop::Later(why) => {
            info!(backend = %ctx.name, action = %id, reason = %why, "deployment paused; the next poll takes it up again");
            false
        }
    }
}

/// Everything up to the offer. `Ok(None)`: nothing to do (already finished).
async fn prepare(ctx: &Ctx, href: &str) -> Result<Option<Offer>, Stop> {
    let (d, action) = loop {
        let d = get_deployment(ctx, href).await?;
        let Some(action) = ctx.take_action(&d).await else {
            return Ok(None);
        };
        if d.download != Handling::Skip {
            break (d, action);
        }
        ctx.milestone(
            &d.id,
            "waiting",
            Execution::Proceeding,
            "the server asks to wait before downloading (download: skip)",
        )
        .await;
        tokio::time::sleep(ctx.sleep()).await;
    };
    let (chunk, artifact) = choose(&d).map_err(fail)?;
    let version = action.version.clone();
    let detail = format!(
        "pv-bridge accepted action {}: {} {version} ({})",
        d.id, chunk.name, artifact.filename
    );
    ctx.milestone(&d.id, "accepted", Execution::Proceeding, &detail)
        .await;
    let dir = ctx.dir.join("files").join(&d.id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let file = dir.join(safe_name(&artifact.filename));
    ctx.milestone(
        &d.id,
        "download",
        Execution::Download,
        &format!("downloading {}", artifact.filename),
    )
    .await;
    let how = download(ctx, &artifact, &file).await?;
    ctx.milestone(
        &d.id,
        "downloaded",
        Execution::Downloaded,
        &format!("{} downloaded, {how}", artifact.filename),
    )
    .await;
    // Install only when the server lets us: `update: skip` and a closed
    // maintenance window mean "downloaded, wait".
    let mut d = d;
    while d.update == Handling::Skip || d.window_open == Some(false) {
        let why = if d.update == Handling::Skip {
            "the server asks to wait before installing (update: skip)"
        } else {
            "waiting for the maintenance window"
        };
        ctx.milestone(&d.id, "window", Execution::Proceeding, why)
            .await;
        tokio::time::sleep(ctx.sleep()).await;
        d = get_deployment(ctx, href).await?;
    }
    let stage = ctx.dir.join("stage");
    let unpacked = {
        let (file, stage, name) = (file.clone(), stage.clone(), artifact.filename.clone());
        tokio::task::spawn_blocking(move || unpack(&file, &name, &stage))
            .await
            .map_err(|e| fail(e.to_string()))?
    };
    unpacked.map_err(|e| fail(format!("{}: {e}", artifact.filename)))?;
    let rev = ctx.revision_for(&d.id, &version).await;
    let offer = pv_adapter_local::export_offer(&stage, &rev)
        .await
        .map_err(|e| fail(format!("{}: {e}", artifact.filename)))?;
    Ok(Some(offer))
}

async fn get_deployment(ctx: &Ctx, href: &str) -> Result<Deployment, Stop> {
    match ctx.ddi.get(href).await {
        Ok(body) => match ddi::parse_deployment(&body) {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(Stop::Later("the server has nothing due any more".into())),
            Err(e) => {
                warn!(backend = %ctx.name, error = %e, "a deployment that cannot be read");
                Err(fail(format!("the deployment cannot be read: {e}")))
            }
        },
        Err(DdiError::NotFound) | Err(DdiError::Gone) => Err(Stop::Later(
            "the action is gone (cancelled, or waiting for confirmation)".into(),
        )),
        Err(e) => Err(Stop::Later(e.to_string())),
    }
}

/// The one artifact that carries the revision: a `pvr export` archive or a
/// `.swu` holding one.
fn choose(d: &Deployment) -> Result<(&ddi::Chunk, Artifact), String> {
    let found: Vec<(&ddi::Chunk, &Artifact)> = d
        .chunks
        .iter()
        .flat_map(|c| c.artifacts.iter().map(move |a| (c, a)))
        .filter(|(_, a)| installable(&a.filename))
        .collect();
    match found.as_slice() {
        [(c, a)] => {
            if c.encrypted {
                return Err(format!(
                    "artifact {} is encrypted (hawkBit artifact encryption), which pv-bridge does not decrypt",
                    a.filename
                ));
            }
            if a.href.is_none() {
                return Err(format!("artifact {} has no download link", a.filename));
            }
            if a.hashes.sha256.is_none() && a.hashes.sha1.is_none() && a.hashes.md5.is_none() {
                return Err(format!(
                    "artifact {} comes without a hash; an unverifiable artifact is not installed",
                    a.filename
                ));
            }
            Ok((c, (*a).clone()))
        }
        [] => Err(format!(
            "the deployment carries no revision: expected one artifact that is a pvr export (.tgz, .tar.gz, .tar) or a .swu holding one; got {}",
            names(d)
        )),
        many => Err(format!(
            "the deployment carries {} revision artifacts ({}); exactly one is expected",
            many.len(),
            many.iter()
                .map(|(_, a)| a.filename.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn names(d: &Deployment) -> String {
    let all: Vec<&str> = d
        .chunks
        .iter()
        .flat_map(|c| c.artifacts.iter().map(|a| a.filename.as_str()))
        .collect();
    if all.is_empty() {
        "no artifacts".into()
    } else {
        all.join(", ")
    }
}

fn installable(name: &str) -> bool {
    name.ends_with(".swu") || pv_adapter_local::archive::kind(name).is_some()
}

/// A file name safe to create in the work directory.
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if s.trim_matches('.').is_empty() {
        "artifact".into()
    } else {
        s
    }
}

/// Downloads and checks the artifact; returns how it was verified.
async fn download(ctx: &Ctx, a: &Artifact, file: &Path) -> Result<String, Stop> {
    let href = a.href.as_deref().unwrap_or_default();
    let mut tries = 0;
    loop {
        tries += 1;
        let auth = ctx
            .ddi
            .authorization(href)
            .map_err(|e| Stop::Later(e.to_string()))?;
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|v| ("Authorization", v.as_str())).collect();
        let got = pv_http::resume_to_file(ctx.ddi.http(), href, &headers, file, a.size).await;
        let why = match got {
            Ok(()) => match verify::check(file, &a.hashes).await {
                Ok(how) => {
                    if !how.starts_with("sha256") {
                        warn!(backend = %ctx.name, artifact = %a.filename, "{how}");
                    }
                    return Ok(how);
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(file).await;
                    return Err(fail(format!("{}: {e}", a.filename)));
                }
            },
            Err(pv_http::FetchError::TooLong) => {
                return Err(fail(format!(
                    "{} is longer than the {} bytes the server announced",
                    a.filename, a.size
                )));
            }
            Err(pv_http::FetchError::Status(412)) => {
                // The artifact changed on the server: start over.
                let _ = tokio::fs::remove_file(file).await;
                "HTTP 412: the artifact changed".to_owned()
            }
            Err(pv_http::FetchError::Status(s @ (401 | 403))) if !ctx.ddi.same_origin(href) => {
                format!(
                    "HTTP {s} from another host (the device's token goes only to the server's own address)"
                )
            }
            Err(e) => e.to_string(),
        };
        warn!(backend = %ctx.name, artifact = %a.filename, from = %pv_http::redact(href), attempt = tries, error = %why, "artifact download failed");
        if tries >= DOWNLOAD_TRIES {
            return Err(fail(format!(
                "{}: the download failed {tries} times, last: {why}",
                a.filename
            )));
        }
        let wait = Duration::from_secs(2u64.saturating_pow(tries).min(60));
        tokio::time::sleep(pv_adapter_api::timing::jittered(wait, 0.2)).await;
    }
}

/// Unpacks the export: straight from a `.tgz`/`.tar`, or from its member of a
/// `.swu`, in place.
fn unpack(file: &Path, name: &str, stage: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let mut head = [0u8; 6];
    let n = f.read(&mut head).map_err(|e| e.to_string())?;
    if crate::swu::is_swu(&head[..n]) {
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        let members = crate::swu::members(&mut f, len)?;
        let m = crate::swu::payload(&members)?.clone();
        let kind = pv_adapter_local::archive::kind(&m.name).ok_or("not an archive member")?;
        f.seek(SeekFrom::Start(m.offset))
            .map_err(|e| e.to_string())?;
        return pv_adapter_local::archive::unpack_from(f.take(m.size), kind, stage)
            .map_err(|e| format!("{}: {e}", m.name));
    }
    if name.ends_with(".swu") {
        return Err("not a cpio newc archive, as a .swu must be".into());
    }
    let kind = pv_adapter_local::archive::kind(name).ok_or("not a .tgz, .tar.gz or .tar")?;
    pv_adapter_local::archive::unpack(file, kind, stage)
}

/// Offers the revision and maps the engine's progress to feedback until the
/// final status; a cancel asked meanwhile is tried on the engine, and
/// accepted or rejected by what happened.
async fn follow(ctx: &Ctx, id: &str, offer: Offer, cancel: &mut watch::Receiver<bool>) -> Stop {
    let rev = offer.id.clone();
    let mut view = ctx.link.view();
    view.borrow_and_update();
    ctx.milestone(
        id,
        "installing",
        Execution::Proceeding,
        &format!("installing revision locals/{rev}"),
    )
    .await;
    info!(backend = %ctx.name, action = %id, revision = %rev, "offering the revision");
    if ctx.link.send(BackendEvent::Offer(offer)).await.is_err() {
        return Stop::Later("the engine stopped".into());
    }
    let mut asked = false;
    let mut answered = false;
    let mut started = false;
    let mut last_progress: Option<(Instant, u32)> = None;
    loop {
        let p: Option<Progress> = view
            .borrow_and_update()
            .update
            .clone()
            .filter(|p| p.id == rev);
        if let Some(p) = p {
            started |= matches!(p.status, UpdateStatus::Inprogress | UpdateStatus::Testing);
            if p.status.is_final() {
                if asked && p.status == UpdateStatus::Cancelled {
                    return Stop::Cancelled;
                }
                if asked && !answered {
                    ctx.cancel_rejected(id, &format!("the update already ended: {}", p.status))
                        .await;
                }
                return final_of(&p);
            }
            match p.status {
                UpdateStatus::Queued | UpdateStatus::Downloading if p.objects_total > 0 => {
                    let due = last_progress.is_none_or(|(t, n)| {
                        n != p.objects_done
                            && (t.elapsed() >= PROGRESS_EVERY || p.objects_done == p.objects_total)
                    });
                    if due {
                        last_progress = Some((Instant::now(), p.objects_done));
                        ctx.progress(id, u64::from(p.objects_done), u64::from(p.objects_total))
                            .await;
                    }
                }
                UpdateStatus::Inprogress => {
                    if asked && !answered {
                        answered = true;
                        ctx.cancel_rejected(id, "revision switch in progress: Pantavisor started installing the revision")
                            .await;
                    }
                    ctx.milestone(
                        id,
                        "pantavisor",
                        Execution::Proceeding,
                        &format!("Pantavisor: INPROGRESS {}", p.status_msg),
                    )
                    .await;
                }
                UpdateStatus::Testing => {
                    ctx.milestone(
                        id,
                        "testing",
                        Execution::Proceeding,
                        &format!("Pantavisor: TESTING {}", p.status_msg),
                    )
                    .await;
                }
                _ => {}
            }
        }
        tokio::select! {
            r = view.changed() => if r.is_err() {
                return Stop::Later("the engine stopped".into());
            },
            _ = cancel_asked(cancel), if !asked => {
                asked = true;
                if started {
                    // Past the point of no return: Pantavisor owns it.
                    answered = true;
                    ctx.cancel_rejected(id, "revision switch in progress: Pantavisor started installing the revision")
                        .await;
                } else {
                    info!(backend = %ctx.name, action = %id, "the server asks to cancel; withdrawing the offer");
                    if ctx.link.send(BackendEvent::Cancel { id: rev.clone() }).await.is_err() {
                        return Stop::Later("the engine stopped".into());
                    }
                }
            }
        }
    }
}

fn final_of(p: &Progress) -> Stop {
    let mut details = vec![
        format!("Pantavisor: {} {}", p.status, p.status_msg)
            .trim_end()
            .to_owned(),
    ];
    if let Some(logs) = p.logs.as_deref() {
        let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines.len().saturating_sub(ddi::MAX_DETAILS - 1);
        details.extend(lines[tail..].iter().map(|l| (*l).to_owned()));
    }
    Stop::Final(p.status.is_success(), details)
}

/// A fresh action record.
pub fn new_action(d: &Deployment) -> Action {
    let version = d
        .chunks
        .iter()
        .find(|c| c.artifacts.iter().any(|a| installable(&a.filename)))
        .map(|c| c.version.clone())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("hawkbit-{}", d.id));
    Action {
        id: d.id.clone(),
        version,
        revision: None,
        sent: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(artifacts: &[&str]) -> Deployment {
        Deployment {
            id: "4".into(),
            download: Handling::Forced,
            update: Handling::Forced,
            window_open: None,
            chunks: vec![ddi::Chunk {
                part: "os".into(),
                encrypted: false,
                version: "1.2.3".into(),
                name: "rev".into(),
                artifacts: artifacts
                    .iter()
                    .map(|n| Artifact {
                        filename: (*n).into(),
                        size: 1,
                        hashes: ddi::Hashes {
                            sha1: Some("0".repeat(40)),
                            ..ddi::Hashes::default()
                        },
                        href: Some("http://h/a".into()),
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn exactly_one_revision_artifact_is_chosen() {
        assert_eq!(
            choose(&dep(&["r.tgz", "notes.txt"])).unwrap().1.filename,
            "r.tgz"
        );
        assert_eq!(choose(&dep(&["r.swu"])).unwrap().1.filename, "r.swu");
        let e = choose(&dep(&["notes.txt"])).unwrap_err();
        assert!(
            e.contains("carries no revision") && e.contains("notes.txt"),
            "{e}"
        );
        let e = choose(&dep(&["a.tgz", "b.tar"])).unwrap_err();
        assert!(e.contains("2 revision artifacts (a.tgz, b.tar)"), "{e}");
        let mut unhashed = dep(&["r.tgz"]);
        unhashed.chunks[0].artifacts[0].hashes = ddi::Hashes::default();
        assert!(choose(&unhashed).unwrap_err().contains("without a hash"));
        let mut encrypted = dep(&["r.tgz"]);
        encrypted.chunks[0].encrypted = true;
        assert!(choose(&encrypted).unwrap_err().contains("encrypted"));
        assert_eq!(new_action(&dep(&["r.tgz"])).version, "1.2.3");
        let mut unnamed = dep(&["r.tgz"]);
        unnamed.chunks[0].version.clear();
        assert_eq!(new_action(&unnamed).version, "hawkbit-4");
    }

    #[test]
    fn artifact_names_stay_in_the_work_directory() {
        assert_eq!(safe_name("rev-1.2.3.tgz"), "rev-1.2.3.tgz");
        assert_eq!(safe_name("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(safe_name(".."), "artifact");
        assert_eq!(safe_name(""), "artifact");
    }
}
