//! The `local` adapter: offline updates from a directory (a USB stick, a share on an
//! air-gapped site).
//!
//! Each `pvr export` in the watched directory is offered once as the revision
//! `locals/<name, sanitised>`: an unpacked folder (a `json` state file and
//! `objects/<sha256>` files) or an archive (`.tar`, `.tgz`, `.tar.gz`, unpacked into
//! the bridge's state directory first). Progress is written beside it to
//! `<name>.status.json` as it changes; once that file holds a final status the
//! export is never offered again.
//!
//! ```toml
//! [[backend]]
//! type = "local"
//! name = "usb"
//! dir = "/media/updates"
//! scan_interval_secs = 2   # optional
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink, ObjectFetcher,
    ObjectReader, ObjectRef, ObjectSource, Offer, Progress,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub mod archive;

/// Largest state file read from an export.
pub(crate) const MAX_STATE_BYTES: u64 = 4 * 1024 * 1024;

/// Settings of a `local` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The directory to watch.
    pub dir: PathBuf,
    /// Seconds between scans of the directory.
    #[serde(default = "default_scan")]
    pub scan_interval_secs: f64,
}

fn default_scan() -> f64 {
    2.0
}

/// What `<name>.status.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusFile {
    pub status: String,
    pub status_msg: String,
    pub rev: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Pantavisor's log lines about a failure, one JSON object per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

impl StatusFile {
    /// A status the adapter sets itself, before the engine reports.
    fn new(status: &str, status_msg: String, id: &str) -> Self {
        Self {
            status: status.into(),
            status_msg,
            rev: format!("locals/{id}"),
            bytes_done: 0,
            bytes_total: 0,
            logs: None,
        }
    }

    fn from_progress(p: &Progress) -> Self {
        Self {
            status: p.status.to_string(),
            status_msg: p.status_msg.clone(),
            rev: p.rev.clone(),
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            logs: p.logs.clone(),
        }
    }

    fn is_final(&self) -> bool {
        matches!(
            self.status.as_str(),
            "UPDATED" | "DONE" | "WONTGO" | "ERROR" | "CANCELLED"
        )
    }
}

/// The offer id for an export named `name`: characters outside `[A-Za-z0-9._-]`
/// become `-`, at most 64 characters.
pub fn offer_id(name: &str) -> String {
    let mut id: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        id = format!("export-{}", id.len());
    }
    id
}

/// Opens objects by path.
struct Files;

impl ObjectFetcher for Files {
    fn open(&self, key: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>> {
        let path = PathBuf::from(key);
        Box::pin(async move {
            let err = |e: std::io::Error| AdapterError::Object {
                key: path.display().to_string(),
                reason: e.to_string(),
            };
            let f = tokio::fs::File::open(&path).await.map_err(err)?;
            let len = f.metadata().await.map_err(err)?.len();
            Ok((Box::new(f) as ObjectReader, len))
        })
    }
}

pub struct LocalAdapter {
    name: String,
    cfg: LocalConfig,
    /// Where archives are unpacked (the bridge gives each adapter its own).
    work_dir: PathBuf,
}

impl LocalAdapter {
    pub fn new(name: &str, cfg: LocalConfig, work_dir: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            cfg,
            work_dir,
        }
    }
}

/// An export being offered: its entry in the watched directory and, for archives,
/// where it was unpacked.
#[derive(Debug, Clone)]
struct Offered {
    entry: String,
    unpacked: Option<PathBuf>,
}

fn status_path(dir: &Path, entry: &str) -> PathBuf {
    dir.join(format!("{entry}.status.json"))
}

async fn read_status(path: &Path) -> Option<StatusFile> {
    serde_json::from_slice(&tokio::fs::read(path).await.ok()?).ok()
}

async fn write_status(path: &Path, s: &StatusFile) {
    let data = match serde_json::to_vec_pretty(s) {
        Ok(d) => d,
        Err(_) => return,
    };
    let target = path.to_owned();
    let written =
        tokio::task::spawn_blocking(move || pv_adapter_api::durable::write_durable(&target, &data))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "cannot write status file");
    }
}

/// Builds the offer for an unpacked export folder (`json` and `objects/<sha>`):
/// the state byte for byte, every object from its file. Shared by the adapters
/// that receive `pvr export` archives.
pub async fn export_offer(folder: &Path, id: &str) -> Result<Offer, String> {
    let json = folder.join("json");
    let meta = tokio::fs::metadata(&json)
        .await
        .map_err(|e| format!("{}: {e}", json.display()))?;
    if meta.len() > MAX_STATE_BYTES {
        return Err(format!(
            "{}: {} bytes is larger than {MAX_STATE_BYTES}",
            json.display(),
            meta.len()
        ));
    }
    let state = tokio::fs::read(&json)
        .await
        .map_err(|e| format!("{}: {e}", json.display()))?;
    let mut objects = BTreeMap::new();
    let objdir = folder.join("objects");
    if let Ok(mut rd) = tokio::fs::read_dir(&objdir).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(md) = e.metadata().await else { continue };
            if !pv_adapter_api::is_sha256_hex(&name) || !md.is_file() {
                continue;
            }
            objects.insert(
                name.clone(),
                ObjectRef {
                    sha256: name,
                    size: Some(md.len()),
                    source: ObjectSource::Adapter {
                        key: e.path().display().to_string(),
                    },
                },
            );
        }
    }
    Ok(Offer {
        id: id.to_owned(),
        state,
        state_url: None,
        objects,
        fetcher: Some(Arc::new(Files)),
    })
}

impl LocalAdapter {
    /// Offers the first export (by name) not offered yet and not finished; returns
    /// its id. One at a time: a newer offer would supersede the running one.
    async fn scan(
        &self,
        link: &EngineLink,
        offered: &mut BTreeMap<String, Offered>,
    ) -> Result<Option<String>, AdapterError> {
        let dir = &self.cfg.dir;
        let mut rd = match tokio::fs::read_dir(dir).await {
            Ok(rd) => rd,
            Err(e) => {
                warn!(backend = %self.name, dir = %dir.display(), error = %e, "cannot read the update directory");
                return Ok(None);
            }
        };
        // entry name → archive compression (None for folders)
        let mut entries: BTreeMap<String, Option<archive::Compression>> = BTreeMap::new();
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match e.file_type().await {
                Ok(t) if t.is_dir() && e.path().join("json").exists() => {
                    entries.insert(name, None);
                }
                Ok(t) if t.is_file() => {
                    if let Some(kind) = archive::kind(&name) {
                        entries.insert(name, Some(kind));
                    }
                }
                _ => {}
            }
        }
        for (entry, compression) in entries {
            let stem = if compression.is_some() {
                archive::stem(&entry)
            } else {
                &entry
            };
            let id = offer_id(stem);
            if offered.contains_key(&id) {
                continue;
            }
            let status = status_path(dir, &entry);
            if read_status(&status).await.is_some_and(|s| s.is_final()) {
                offered.insert(
                    id,
                    Offered {
                        entry,
                        unpacked: None,
                    },
                );
                continue;
            }
            let (folder, unpacked) = match compression {
                None => (dir.join(&entry), None),
                Some(kind) => {
                    let dest = self.work_dir.join(&id);
                    let src = dir.join(&entry);
                    let d2 = dest.clone();
                    let res = tokio::task::spawn_blocking(move || archive::unpack(&src, kind, &d2))
                        .await
                        .unwrap_or_else(|e| Err(format!("unpacking failed: {e}")));
                    if let Err(why) = res {
                        let _ = tokio::fs::remove_dir_all(&dest).await;
                        self.refuse(&status, &id, &entry, &why).await;
                        offered.insert(
                            id,
                            Offered {
                                entry,
                                unpacked: None,
                            },
                        );
                        continue;
                    }
                    (dest.clone(), Some(dest))
                }
            };
            match export_offer(&folder, &id).await {
                Ok(offer) => {
                    info!(backend = %self.name, export = %entry, id = %id, objects = offer.objects.len(), "offering update");
                    offered.insert(
                        id.clone(),
                        Offered {
                            entry: entry.clone(),
                            unpacked,
                        },
                    );
                    write_status(
                        &status,
                        &StatusFile::new("QUEUED", "Offered to the bridge".into(), &id),
                    )
                    .await;
                    link.send(BackendEvent::Offer(offer)).await?;
                    return Ok(Some(id));
                }
                Err(why) => {
                    self.refuse(&status, &id, &entry, &why).await;
                    offered.insert(
                        id,
                        Offered {
                            entry,
                            unpacked: None,
                        },
                    );
                }
            }
        }
        Ok(None)
    }

    async fn refuse(&self, status: &Path, id: &str, entry: &str, why: &str) {
        warn!(backend = %self.name, export = %entry, reason = %why, "unusable export");
        write_status(
            status,
            &StatusFile::new("WONTGO", format!("unusable export: {why}"), id),
        )
        .await;
    }
}

impl Adapter for LocalAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            updates: true,
            ..Capabilities::default()
        }
    }

    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let period = Duration::try_from_secs_f64(self.cfg.scan_interval_secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    AdapterError::Config("scan_interval_secs must be a positive number".into())
                })?;
            link.send(BackendEvent::Connected).await?;
            let mut view = link.view();
            let mut offered: BTreeMap<String, Offered> = BTreeMap::new();
            let mut in_flight: Option<String> = None;
            let mut last_written: Option<StatusFile> = None;
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if in_flight.is_none() {
                            in_flight = self.scan(&link, &mut offered).await?;
                        }
                    }
                    changed = view.changed() => {
                        if changed.is_err() {
                            return Err(AdapterError::EngineGone);
                        }
                        let update = view.borrow_and_update().update.clone();
                        let Some(p) = update else { continue };
                        let Some(o) = offered.get(&p.id).cloned() else { continue };
                        let s = StatusFile::from_progress(&p);
                        if last_written.as_ref() != Some(&s) {
                            write_status(&status_path(&self.cfg.dir, &o.entry), &s).await;
                            if s.is_final() {
                                if let Some(dir) = &o.unpacked {
                                    let _ = tokio::fs::remove_dir_all(dir).await;
                                }
                                if in_flight.as_deref() == Some(p.id.as_str()) {
                                    in_flight = None;
                                }
                            }
                            last_written = Some(s);
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_ids_are_sanitised() {
        assert_eq!(offer_id("release-1.2"), "release-1.2");
        assert_eq!(offer_id("my update (v2)"), "my-update--v2-");
        assert_eq!(offer_id(&"x".repeat(80)).len(), 64);
        assert!(pv_adapter_api::valid_offer_id(&offer_id("..")));
        assert!(pv_adapter_api::valid_offer_id(&offer_id("ünïcode")));
    }

    #[tokio::test]
    async fn exports_become_offers_with_file_sources() {
        let dir = tempfile::tempdir().unwrap();
        let ex = dir.path().join("rel1");
        std::fs::create_dir_all(ex.join("objects")).unwrap();
        std::fs::write(
            ex.join("json"),
            br##"{"#spec":"pantavisor-service-system@1"}"##,
        )
        .unwrap();
        let sha = "ab".repeat(32);
        std::fs::write(ex.join("objects").join(&sha), b"blob").unwrap();
        std::fs::write(ex.join("objects").join("README"), b"ignored").unwrap();
        let o = export_offer(&ex, "rel1").await.unwrap();
        assert_eq!(o.objects.len(), 1);
        let r = &o.objects[&sha];
        assert_eq!(r.size, Some(4));
        let ObjectSource::Adapter { key } = &r.source else {
            panic!()
        };
        let (mut reader, len) = o.fetcher.unwrap().open(key).await.unwrap();
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut buf)
            .await
            .unwrap();
        assert_eq!((len, buf.as_slice()), (4, &b"blob"[..]));
        let missing = export_offer(&dir.path().join("nope"), "x")
            .await
            .unwrap_err();
        assert!(missing.contains("nope/json"), "{missing}");
    }
}
