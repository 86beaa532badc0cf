//! Tailing Pantavisor's log tree (`/pantavisor/logs`, read-only in the container).
//!
//! Each poll follows `current` to the running revision's directory and reads the new
//! complete lines of every source: `pantavisor/pantavisor.log`, container sources
//! such as `<platform>/lxc/console.log`, or the singlefile `pv.log`.
//!
//! Rotation: Pantavisor's logserver gzips a full file to `<name>.<n>.gz` and deletes
//! it (`logserver_rotation.c`). The lines written after the last poll and before the
//! rotation are read back from the rotations newer than the cursor's last one (the
//! first from the cursor's offset, when it starts like the cursor's file); older
//! `.gz` files are history and skipped. A file replaced or truncated otherwise is
//! read from its start. Cursors (inode, offset, head fingerprint, last rotation per
//! file) are kept in the bridge's own storage, since the log mount is read-only. A
//! token bucket per source turns floods away, counted.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pv_adapter_api::LogRecord;
use serde::{Deserialize, Serialize};

use super::parse;

/// Most bytes read from one file per poll.
const CHUNK: u64 = 1024 * 1024;
/// How deep source paths may nest under a platform.
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    ino: u64,
    offset: u64,
    /// Fingerprint of the file's first bytes (up to 256) as read: a file truncated
    /// and refilled to the same length shows up as a different head.
    #[serde(default)]
    head: u64,
    /// Modification time (ns) when last read; the head is re-checked when it moves.
    #[serde(default)]
    mtime: i64,
    /// The highest `<name>.<n>.gz` rotation already read (or history when the
    /// cursor was made): later ones hold lines not yet read.
    #[serde(default)]
    rotated: u64,
}

const HEAD: u64 = 256;
/// Most bytes read back from one rotated `.gz`.
const MAX_ROTATED: u64 = 16 * 1024 * 1024;

/// The revision a cursor key belongs to: `locals/<name>` or a number.
fn revision_of(key: &str) -> Option<&str> {
    let end = if key.starts_with("locals/") {
        key.match_indices('/').nth(1)?.0
    } else {
        key.find('/')?
    };
    Some(&key[..end])
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The rotations of `path` (`<name>.<n>.gz` beside it), oldest first.
fn rotations(path: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            let n = f.strip_prefix(&prefix)?.strip_suffix(".gz")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The first `limit` bytes of a gzip file, decompressed.
fn gunzip(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(File::open(path).ok()?)
        .take(limit)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn head_of(f: &mut File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; len.min(HEAD) as usize];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut buf)?;
    Ok(fingerprint(&buf))
}

/// Per-source rate limit.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Lines per second, on average.
    pub per_sec: f64,
    /// Lines allowed in a burst.
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Tailer {
    /// Revisions whose logs to read once more, besides the running one.
    requested: Arc<Mutex<BTreeSet<String>>>,
    /// When this tailer started: rotations older than that are history.
    started: std::time::SystemTime,
    root: PathBuf,
    cursor_path: PathBuf,
    cursors: BTreeMap<String, Cursor>,
    rate: Rate,
    buckets: BTreeMap<(String, String), Bucket>,
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct Poll {
    pub records: Vec<LogRecord>,
    /// Lines turned away by the rate limits.
    pub dropped: u64,
}

fn now() -> (i64, u32) {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() as i64, d.subsec_nanos()))
        .unwrap_or((0, 0))
}

fn files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            files(&p, depth + 1, out);
        } else if t.is_file() && p.extension().is_none_or(|x| x != "gz") {
            out.push(p);
        }
    }
}

impl Tailer {
    /// Tails the tree at `root`, keeping cursors in `cursor_path`.
    pub fn new(root: &Path, cursor_path: &Path, rate: Rate) -> Tailer {
        let cursors = fs::read(cursor_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Tailer {
            requested: Arc::default(),
            started: std::time::SystemTime::now(),
            root: root.to_owned(),
            cursor_path: cursor_path.to_owned(),
            cursors,
            rate,
            buckets: BTreeMap::new(),
        }
    }

    /// Saves the cursors. Call once what `poll` returned is safely spooled.
    pub fn save(&self) -> io::Result<()> {
        let data = serde_json::to_vec(&self.cursors).map_err(io::Error::other)?;
        pv_adapter_api::durable::write_durable(&self.cursor_path, &data)
    }

    fn allow(&mut self, plat: &str, src: &str) -> bool {
        let rate = self.rate;
        let b = self
            .buckets
            .entry((plat.to_owned(), src.to_owned()))
            .or_insert(Bucket {
                tokens: rate.burst,
                at: Instant::now(),
            });
        let now = Instant::now();
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_sec).min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Reads what is new in the running revision's logs, then the last lines of
    /// the revisions left behind (the cursors of one that stopped running: an
    /// update switched away or rolled back) and of those asked for with
    /// [`Tailer::with_requests`] (a revision that failed: its try boot's logs). A
    /// revision left behind is forgotten once a poll finds nothing more in it.
    pub fn poll(&mut self) -> Poll {
        let mut out = Poll::default();
        let current = fs::read_link(self.root.join("current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let mut behind: BTreeSet<String> = self
            .cursors
            .keys()
            .filter_map(|k| revision_of(k))
            .map(str::to_owned)
            .collect();
        behind.extend(lock(&self.requested).iter().cloned());
        if let Some(c) = &current {
            behind.remove(c);
            self.poll_revision(c, &mut out);
        }
        for rev in behind {
            let before = out.records.len() as u64 + out.dropped;
            self.poll_revision(&rev, &mut out);
            if out.records.len() as u64 + out.dropped == before {
                let prefix = format!("{rev}/");
                self.cursors.retain(|k, _| !k.starts_with(&prefix));
                lock(&self.requested).remove(&rev);
            }
        }
        out
    }

    /// Shares the set of revisions whose logs to read once more (the update
    /// coordinator adds a revision that failed).
    pub fn with_requests(mut self, requested: super::LogRequests) -> Self {
        self.requested = requested;
        self
    }

    /// Reads what is new in one revision's log directory.
    fn poll_revision(&mut self, rev: &str, out: &mut Poll) {
        if rev.is_empty() || rev.split('/').any(|seg| seg.is_empty() || seg == "..") {
            return;
        }
        let rev_dir = self.root.join(rev);
        let mut list = Vec::new();
        files(&rev_dir, 0, &mut list);
        // A file rotated away and not started again still has lines to recover.
        let prefix = format!("{rev}/");
        for key in self.cursors.keys() {
            if let Some(rel) = key.strip_prefix(&prefix) {
                let p = rev_dir.join(rel);
                if !list.contains(&p) {
                    list.push(p);
                }
            }
        }
        list.sort();
        let singlefile = rev_dir.join("pv.log");
        for path in list {
            let Ok(rel) = path.strip_prefix(&rev_dir) else {
                continue;
            };
            let rel_s = rel.to_string_lossy().into_owned();
            let key = format!("{rev}/{rel_s}");
            let (plat, src) = match rel_s.split_once('/') {
                Some((p, s)) => (p.to_owned(), s.to_owned()),
                None => ("pantavisor".to_owned(), rel_s.clone()),
            };
            let mut lines = self.recover_rotated(&path, &key);
            lines.extend(match self.read_new(&path, &key) {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "cannot read log file");
                    Vec::new()
                }
            });
            let stamp = now();
            for line in lines {
                if line.is_empty() {
                    continue;
                }
                let mut rec = if path == singlefile {
                    parse::singlefile(&line, stamp)
                } else if plat == "pantavisor" && src == "pantavisor.log" {
                    parse::pantavisor(&line, stamp)
                } else {
                    parse::raw(&plat, &src, &line, stamp)
                };
                rec.rev = rev.to_owned();
                if self.allow(&rec.plat, &rec.src) {
                    out.records.push(rec);
                } else {
                    out.dropped += 1;
                }
            }
        }
    }

    /// The lines of `path` rotated away before they were read, when its file is gone
    /// or replaced: every `<name>.<n>.gz` newer than the cursor's last rotation, the
    /// first from the cursor's offset when it starts like the file the cursor was
    /// in. Leaves a cursor that reads the new file, if any, from its start.
    fn recover_rotated(&mut self, path: &Path, key: &str) -> Vec<String> {
        // A file met for the first time: what it rotated since this tailer started
        // is not history yet.
        let cur = match self.cursors.get(key).copied() {
            Some(c) => c,
            None => Cursor {
                ino: 0,
                offset: 0,
                head: 0,
                mtime: 0,
                rotated: self.history(path),
            },
        };
        let newer = || -> Vec<(u64, PathBuf)> {
            rotations(path)
                .into_iter()
                .filter(|(n, _)| *n > cur.rotated)
                .collect()
        };
        // Still the file the cursor is in? A new file can get the old one's inode
        // at once: shorter than the cursor, or starting differently, it is another.
        // (Between the logserver's gzip and its delete, the old file is still
        // there: it is read on, and the `.gz` only once the file is gone.)
        let same = match fs::metadata(path) {
            Ok(md) if md.ino() == cur.ino && md.len() >= cur.offset => {
                let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
                if mtime == cur.mtime {
                    true
                } else if cur.offset == 0 {
                    // Nothing to compare: only a rotation since says it was replaced.
                    newer().is_empty()
                } else {
                    File::open(path)
                        .and_then(|mut f| head_of(&mut f, cur.offset))
                        .is_ok_and(|h| h == cur.head)
                }
            }
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        };
        if same {
            return Vec::new();
        }
        let newer = newer();
        if newer.is_empty() {
            // Replaced or truncated without a rotation: `read_new` starts over.
            return Vec::new();
        }
        let rotated = newer.last().map_or(cur.rotated, |(n, _)| *n);
        // The new file, if any, is read from its start by `read_new`.
        self.cursors.insert(
            key.to_owned(),
            Cursor {
                ino: 0,
                offset: 0,
                head: 0,
                mtime: 0,
                rotated,
            },
        );
        let mut text = Vec::new();
        for (i, (_, p)) in newer.iter().enumerate() {
            let Some(data) = gunzip(p, MAX_ROTATED) else {
                continue;
            };
            let start = cur.offset.min(HEAD) as usize;
            let continues = i == 0
                && cur.offset > 0
                && data.len() >= start
                && fingerprint(&data[..start]) == cur.head;
            let from = if continues { cur.offset as usize } else { 0 };
            if let Some(rest) = data.get(from..) {
                text.extend_from_slice(rest);
                if !text.is_empty() && !text.ends_with(b"\n") {
                    text.push(b'\n');
                }
            }
        }
        if !text.is_empty() {
            tracing::debug!(path = %path.display(), bytes = text.len(), "read back lines rotated away");
        }
        String::from_utf8_lossy(&text)
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect()
    }

    /// The newest rotation of `path` made before this tailer started: what is
    /// history to it (read when the file is first met).
    fn history(&self, path: &Path) -> u64 {
        rotations(path)
            .into_iter()
            .filter(|(_, p)| {
                fs::metadata(p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < self.started)
            })
            .map(|(n, _)| n)
            .max()
            .unwrap_or(0)
    }

    /// The complete new lines of one file, advancing its cursor.
    fn read_new(&mut self, path: &Path, key: &str) -> io::Result<Vec<String>> {
        let md = fs::metadata(path)?;
        let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
        let rotated = match self.cursors.get(key) {
            Some(c) => c.rotated,
            None => self.history(path),
        };
        let fresh = Cursor {
            ino: md.ino(),
            offset: 0,
            head: 0,
            mtime,
            rotated,
        };
        let mut cur = *self.cursors.entry(key.to_owned()).or_insert(fresh);
        if cur.ino != md.ino() || md.len() < cur.offset {
            // Replaced or truncated: start again.
            cur = fresh;
        }
        if md.len() == cur.offset && cur.mtime == mtime {
            return Ok(Vec::new());
        }
        let mut f = File::open(path)?;
        if cur.offset > 0 && head_of(&mut f, cur.offset)? != cur.head {
            // Rewritten in place (truncated and refilled): start again.
            cur = fresh;
        }
        f.seek(SeekFrom::Start(cur.offset))?;
        let mut buf = Vec::new();
        (&mut f).take(CHUNK).read_to_end(&mut buf)?;
        let consumed = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            // A full chunk without a newline is one (cut) line; otherwise wait.
            None if buf.len() as u64 == CHUNK => buf.len(),
            None => 0,
        };
        cur.offset += consumed as u64;
        cur.mtime = mtime;
        if cur.offset > 0 {
            cur.head = head_of(&mut f, cur.offset)?;
        }
        self.cursors.insert(key.to_owned(), cur);
        Ok(String::from_utf8_lossy(&buf[..consumed])
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect())
    }
}

#[cfg(test)]
#[path = "tail_tests.rs"]
mod tests;
