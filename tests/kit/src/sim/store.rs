//! The simulated device's storage, laid out like Pantavisor's:
//!
//! ```text
//! DIR/objects/<sha>                      content-addressed blobs
//! DIR/trails/<rev>/.pvr/json             state JSON as uploaded
//! DIR/trails/<rev>/.pv/{progress,commitmsg,done}
//! DIR/trails/<rev>/<path>                objects hard-linked when run
//! DIR/trails/current -> <rev>
//! DIR/boot.json                          bootloader: pv_rev, pv_try, tried
//! DIR/run/{user,device}-meta/<key>       one file per key (+ <meta>.<plat>/<sub>)
//! DIR/logs/<rev>/<platform>/<source>     the log tree, DIR/logs/current -> <rev>
//! ```
//!
//! Every file is written to a temporary name and renamed, so a `kill -9` at any
//! point leaves either the old or the new content.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The bootloader's view (`pv_rev`, `pv_try`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boot {
    /// Last committed (DONE) revision: the rollback point.
    pub rev: String,
    /// Revision to try at the next boot.
    #[serde(rename = "try")]
    pub try_rev: Option<String>,
    /// The try revision has been booted once already.
    pub tried: bool,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Log files rotate at this size; 0 = never.
    log_rotate: u64,
}

/// Writes `data` to `path` atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!(
        "{}tmp~",
        path.extension()
            .map(|e| format!("{}.", e.to_string_lossy()))
            .unwrap_or_default()
    ));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(data)?;
    drop(f);
    fs::rename(&tmp, path)
}

/// Points symlink `link` at `target`, replacing it atomically.
fn set_symlink(link: &Path, target: &str) -> io::Result<()> {
    let tmp = link.with_extension("lnk~");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link)
}

/// Which metadata store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    User,
    Device,
}

impl MetaKind {
    pub fn dir(self) -> &'static str {
        match self {
            Self::User => "user-meta",
            Self::Device => "device-meta",
        }
    }
}

impl Store {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            log_rotate: 0,
        }
    }

    /// Rotates log files at `bytes` (0 = never).
    pub fn with_log_rotation(mut self, bytes: u64) -> Self {
        self.log_rotate = bytes;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }

    pub fn object(&self, sha: &str) -> PathBuf {
        self.objects_dir().join(sha)
    }

    pub fn trails_dir(&self) -> PathBuf {
        self.root.join("trails")
    }

    pub fn trail(&self, rev: &str) -> PathBuf {
        self.trails_dir().join(rev)
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn meta_dir(&self, kind: MetaKind) -> PathBuf {
        self.root.join("run").join(kind.dir())
    }

    pub fn init(&self) -> io::Result<()> {
        for d in [
            self.objects_dir(),
            self.trails_dir().join("locals"),
            self.logs_dir(),
            self.meta_dir(MetaKind::User),
            self.meta_dir(MetaKind::Device),
        ] {
            fs::create_dir_all(d)?;
        }
        Ok(())
    }

    pub fn boot(&self) -> io::Result<Option<Boot>> {
        match fs::read(self.root.join("boot.json")) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set_boot(&self, b: &Boot) -> io::Result<()> {
        let data = serde_json::to_vec_pretty(b).map_err(io::Error::other)?;
        write_atomic(&self.root.join("boot.json"), &data)
    }

    // --- trails ---------------------------------------------------------------

    pub fn state_json(&self, rev: &str) -> Option<Vec<u8>> {
        fs::read(self.trail(rev).join(".pvr/json")).ok()
    }

    pub fn put_state_json(&self, rev: &str, data: &[u8]) -> io::Result<()> {
        write_atomic(&self.trail(rev).join(".pvr/json"), data)
    }

    pub fn progress_raw(&self, rev: &str) -> Option<Vec<u8>> {
        fs::read(self.trail(rev).join(".pv/progress")).ok()
    }

    pub fn progress(&self, rev: &str) -> Option<Value> {
        serde_json::from_slice(&self.progress_raw(rev)?).ok()
    }

    pub fn set_progress(&self, rev: &str, p: &str) -> io::Result<()> {
        write_atomic(&self.trail(rev).join(".pv/progress"), p.as_bytes())
    }

    pub fn commitmsg(&self, rev: &str) -> String {
        fs::read_to_string(self.trail(rev).join(".pv/commitmsg")).unwrap_or_default()
    }

    pub fn set_commitmsg(&self, rev: &str, msg: &[u8]) -> io::Result<()> {
        write_atomic(&self.trail(rev).join(".pv/commitmsg"), msg)
    }

    pub fn mark_done(&self, rev: &str) -> io::Result<()> {
        write_atomic(&self.trail(rev).join(".pv/done"), b"")
    }

    pub fn trail_exists(&self, rev: &str) -> bool {
        self.trail(rev).is_dir()
    }

    pub fn remove_trail(&self, rev: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.trail(rev)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Revision names with a trail, `locals/*` first (as Pantavisor lists them).
    pub fn revisions(&self) -> Vec<String> {
        let mut locals = Vec::new();
        let mut others = Vec::new();
        let list = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        for name in list(&self.trails_dir().join("locals")) {
            locals.push(format!("locals/{name}"));
        }
        for name in list(&self.trails_dir()) {
            if name != "locals" {
                others.push(name);
            }
        }
        others.sort_by_key(|n| (n.parse::<u64>().unwrap_or(u64::MAX), n.clone()));
        locals.extend(others);
        locals
    }

    /// Seconds since the epoch of the trail directory's mtime.
    pub fn trail_mtime(&self, rev: &str) -> i64 {
        fs::metadata(self.trail(rev))
            .map(|m| m.mtime())
            .unwrap_or(0)
    }

    pub fn set_current(&self, rev: &str) -> io::Result<()> {
        set_symlink(&self.trails_dir().join("current"), rev)?;
        fs::create_dir_all(self.logs_dir().join(rev))?;
        set_symlink(&self.logs_dir().join("current"), rev)
    }

    /// Hard-links every object into the trail and writes inline JSON files, as
    /// `LOCAL_RUN` does. Missing objects are skipped (Pantavisor only logs them).
    pub fn link_revision(&self, rev: &str, objects: &[(&str, &str)], jsons: &[(&str, &Value)]) {
        let trail = self.trail(rev);
        for (path, sha) in objects {
            let dst = trail.join(path);
            if let Some(d) = dst.parent() {
                let _ = fs::create_dir_all(d);
            }
            let _ = fs::remove_file(&dst);
            let _ = fs::hard_link(self.object(sha), &dst);
        }
        for (path, v) in jsons {
            let _ = write_atomic(&trail.join(path), v.to_string().as_bytes());
        }
    }

    // --- objects ---------------------------------------------------------------

    /// Complete objects: names exactly 64 characters long, with their sizes.
    pub fn objects(&self) -> BTreeMap<String, (u64, u64)> {
        fs::read_dir(self.objects_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let md = e.metadata().ok()?;
                (name.len() == 64 && md.is_file()).then(|| (name, (md.len(), md.nlink())))
            })
            .collect()
    }

    pub fn used_bytes(&self) -> u64 {
        fs::read_dir(self.objects_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    // --- metadata --------------------------------------------------------------

    /// All keys of a store with their raw values.
    pub fn meta(&self, kind: MetaKind) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(self.meta_dir(kind))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with("tmp~") {
                    return None;
                }
                Some((name, fs::read(e.path()).ok()?))
            })
            .collect()
    }

    /// Writes one key, plus `<meta>.<prefix>/<rest>` when the key has a `.`.
    /// Returns false when the value was already that.
    pub fn set_meta(&self, kind: MetaKind, key: &str, value: &[u8]) -> io::Result<bool> {
        let path = self.meta_dir(kind).join(key);
        if fs::read(&path).is_ok_and(|old| old == value) {
            return Ok(false);
        }
        write_atomic(&path, value)?;
        if let Some((plat, rest)) = key.split_once('.') {
            if !plat.is_empty() && !rest.is_empty() {
                let split = self
                    .root
                    .join("run")
                    .join(format!("{}.{plat}", kind.dir()))
                    .join(rest);
                write_atomic(&split, value)?;
            }
        }
        Ok(true)
    }

    /// Deletes one key; false when it did not exist.
    pub fn delete_meta(&self, kind: MetaKind, key: &str) -> io::Result<bool> {
        match fs::remove_file(self.meta_dir(kind).join(key)) {
            Ok(()) => {
                if let Some((plat, rest)) = key.split_once('.') {
                    let _ = fs::remove_file(
                        self.root
                            .join("run")
                            .join(format!("{}.{plat}", kind.dir()))
                            .join(rest),
                    );
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    // --- logs --------------------------------------------------------------------

    /// Appends lines to `logs/<rev>/<platform>/<source>`.
    pub fn append_log(&self, rev: &str, platform: &str, source: &str, text: &str) {
        let path = self.logs_dir().join(rev).join(platform).join(source);
        if let Some(d) = path.parent() {
            let _ = fs::create_dir_all(d);
        }
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = f.write_all(text.as_bytes());
            if self.log_rotate > 0 && f.metadata().is_ok_and(|m| m.len() >= self.log_rotate) {
                drop(f);
                let _ = rotate_log(&path);
            }
        }
    }

    /// Appends to `sim/bad-runs.log`: `rev` was run with these objects missing or
    /// partial (`path=sha` each).
    pub fn record_bad_run(&self, rev: &str, objects: &[String]) {
        let path = self.root.join("sim/bad-runs.log");
        let _ = fs::create_dir_all(self.root.join("sim"));
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{rev} {}", objects.join(" "));
        }
    }

    /// Every run recorded by `record_bad_run`, one line each.
    pub fn bad_runs(&self) -> Vec<String> {
        fs::read_to_string(self.root.join("sim/bad-runs.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn remove_logs(&self, rev: &str) {
        let _ = fs::remove_dir_all(self.logs_dir().join(rev));
    }
}

/// Pantavisor's log rotation (`logserver/logserver_rotation.c:
/// pv_logserver_rot_log_rot`): the file is gzipped to `<name>.<n>.gz`, `n` one more
/// than the highest rotation beside it, and the live file is deleted; the next
/// line starts it again.
fn rotate_log(path: &Path) -> io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let name = name.to_string_lossy().into_owned();
    let next = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            f.strip_prefix(&format!("{name}."))?
                .strip_suffix(".gz")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0)
        + 1;
    let data = fs::read(path)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&data)?;
    write_atomic(&dir.join(format!("{name}.{next}.gz")), &gz.finish()?)?;
    fs::remove_file(path)
}
