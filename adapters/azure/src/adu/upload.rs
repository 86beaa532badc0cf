//! Device Update log collection (reference §9): the Pantavisor log tree of the
//! running revision (`<logs>/<revision>/<source>/…`, the bridge's own lines
//! included, as Pantavisor keeps every container's output) goes to the Blob
//! container of the request, one component per source, as block blobs named
//! `<device>/<operation>/<source>/<file>`.
//!
//! Per component only files written in the last [`WINDOW`] are taken, newest
//! first, up to [`BUDGET`] bytes (a file is cut to its newest bytes when it
//! alone is larger). The SAS query string never reaches a log or the twin.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::agent::Agent;
use super::diagnostics::{Request, result};

/// How far back log files are taken.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Bytes per component (the reference agent's default is 50 KB per path; a
/// Pantavisor source's tail is worth more).
pub const BUDGET: u64 = 1024 * 1024;

/// One file to upload: its blob file name and what to read.
#[derive(Debug, PartialEq, Eq)]
pub struct Part {
    pub component: String,
    pub name: String,
    pub path: PathBuf,
    /// Bytes from the end of the file to send.
    pub len: u64,
}

/// The files of each source under `revision_dir`, within the window and budget.
pub fn select(revision_dir: &Path, now: SystemTime) -> Vec<Part> {
    let mut out = Vec::new();
    let Ok(sources) = std::fs::read_dir(revision_dir) else {
        return out;
    };
    let mut sources: Vec<_> = sources.filter_map(Result::ok).collect();
    sources.sort_by_key(|e| e.file_name());
    for src in sources {
        let component = src.file_name().to_string_lossy().into_owned();
        if !src.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let mut files = Vec::new();
        collect(&src.path(), "", 0, &mut files);
        files.retain(|(_, _, len, modified)| {
            *len > 0
                && now
                    .duration_since(*modified)
                    .map_or(true, |age| age <= WINDOW)
        });
        files.sort_by_key(|f| std::cmp::Reverse(f.3));
        let mut left = BUDGET;
        for (name, path, len, _) in files {
            if left == 0 {
                break;
            }
            let take = len.min(left);
            left -= take;
            out.push(Part {
                component: component.clone(),
                name,
                path,
                len: take,
            });
        }
    }
    out
}

/// Sub-directories of a source followed this deep (their names join with `.`).
const DEPTH: usize = 4;

fn collect(
    dir: &Path,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, PathBuf, u64, SystemTime)>,
) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if depth < DEPTH {
                collect(&e.path(), &format!("{name}."), depth + 1, out);
            }
        } else if meta.is_file() {
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((name, e.path(), meta.len(), modified));
        }
    }
}

/// Reads the last `len` bytes of `path`.
fn tail(path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    f.seek(SeekFrom::Start(size.saturating_sub(len)))?;
    let mut buf = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Uploads and reports one request.
pub(crate) async fn run(agent: Arc<Agent>, req: Request) {
    let code = upload(&agent, &req).await;
    agent.diagnostics_done(&req.operation_id, code);
}

async fn upload(agent: &Agent, req: &Request) -> i64 {
    let Some(logs) = agent.log_dir.clone() else {
        return result::NO_COMPONENTS;
    };
    let running = agent.link.view().borrow().running.clone();
    let Some(running) = running else {
        warn!(backend = %agent.backend, "log upload: the running revision is not known yet");
        return result::NO_LOGS;
    };
    let dir = logs.join(&running);
    let parts = match tokio::task::spawn_blocking(move || select(&dir, SystemTime::now())).await {
        Ok(p) => p,
        Err(_) => return result::FAILURE,
    };
    if parts.is_empty() {
        warn!(backend = %agent.backend, revision = %running, "log upload: no log files for the running revision");
        return result::NO_LOGS;
    }
    let device = agent
        .device_name
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    let mut bytes = 0u64;
    for p in &parts {
        let body = {
            let (path, len) = (p.path.clone(), p.len);
            match tokio::task::spawn_blocking(move || tail(&path, len)).await {
                Ok(Ok(b)) => b,
                _ => {
                    warn!(backend = %agent.backend, file = %p.path.display(), "log upload: a log file cannot be read");
                    return result::NO_LOGS;
                }
            }
        };
        let url = req.blob_url(&device, &p.component, &p.name);
        bytes += body.len() as u64;
        let sent = agent
            .http
            .request("PUT", &url)
            .header("x-ms-blob-type", "BlockBlob")
            .header("x-ms-version", "2021-08-06")
            .header("Content-Type", "text/plain")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status == 201 => {}
            Ok(r) => {
                warn!(backend = %agent.backend, status = r.status, blob = %pv_http::redact(&url), "log upload refused by the storage account");
                return result::UPLOAD_FAILED;
            }
            Err(e) => {
                warn!(backend = %agent.backend, error = %e, blob = %pv_http::redact(&url), "log upload failed");
                return result::UPLOAD_FAILED;
            }
        }
    }
    info!(backend = %agent.backend, operation = %req.operation_id, files = parts.len(), bytes, "logs uploaded for Device Update diagnostics");
    result::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_source_is_a_component_newest_files_first_within_the_budget() {
        let d = tempfile::tempdir().unwrap();
        let rev = d.path();
        std::fs::create_dir_all(rev.join("pantavisor")).unwrap();
        std::fs::create_dir_all(rev.join("app/lxc")).unwrap();
        std::fs::write(rev.join("pantavisor/pantavisor.log"), b"pv line\n").unwrap();
        std::fs::write(rev.join("app/lxc/console.log"), vec![b'x'; 10]).unwrap();
        std::fs::write(rev.join("empty"), b"").unwrap();
        let big = rev.join("big");
        std::fs::create_dir_all(&big).unwrap();
        std::fs::write(big.join("huge.log"), vec![b'y'; (BUDGET + 10) as usize]).unwrap();
        let parts = select(rev, SystemTime::now());
        let names: Vec<_> = parts
            .iter()
            .map(|p| (p.component.as_str(), p.name.as_str(), p.len))
            .collect();
        assert_eq!(
            names,
            vec![
                ("app", "lxc.console.log", 10),
                ("big", "huge.log", BUDGET),
                ("pantavisor", "pantavisor.log", 8)
            ]
        );
        assert_eq!(tail(&big.join("huge.log"), 3).unwrap(), b"yyy");
        // Old files are outside the window.
        let later = SystemTime::now() + WINDOW + Duration::from_secs(60);
        assert!(select(rev, later).is_empty());
    }
}
