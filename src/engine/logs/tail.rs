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
                let rec = if path == singlefile {
                    parse::singlefile(&line, stamp)
                } else if plat == "pantavisor" && src == "pantavisor.log" {
                    parse::pantavisor(&line, stamp)
                } else {
                    parse::raw(&plat, &src, &line, stamp)
                };
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
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        fs::create_dir_all(logs.join("0")).unwrap();
        std::os::unix::fs::symlink("0", logs.join("current")).unwrap();
        (dir, logs)
    }

    const FREE: Rate = Rate {
        per_sec: 1e9,
        burst: 1e9,
    };

    fn msgs(p: &Poll) -> Vec<String> {
        p.records
            .iter()
            .map(|r| format!("{}/{}: {}", r.plat, r.src, r.msg))
            .collect()
    }

    #[test]
    fn reads_complete_new_lines_of_every_source() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
        append(
            &logs.join("0/pantavisor/pantavisor.log"),
            "[pantavisor] 1 INFO\t -- [ctrl]: hello\n",
        );
        append(&logs.join("0/app/lxc/console.log"), "one\ntwo\npart");
        append(&logs.join("0/app/lxc/console.log.1.gz"), "old history\n");
        let p = t.poll();
        assert_eq!(
            msgs(&p),
            [
                "app/lxc/console.log: one",
                "app/lxc/console.log: two",
                "pantavisor/ctrl: hello"
            ]
        );
        append(&logs.join("0/app/lxc/console.log"), "ial\n");
        assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: partial"]);
        assert!(t.poll().records.is_empty());
    }

    #[test]
    fn rotation_by_replacement_or_truncation_starts_over() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
        let f = logs.join("0/app/var/log/syslog");
        append(&f, "a\nb\n");
        assert_eq!(t.poll().records.len(), 2);
        // Replaced: rotated to .gz, a new file started.
        fs::rename(&f, logs.join("0/app/var/log/syslog.1.gz")).unwrap();
        append(&f, "c\n");
        assert_eq!(msgs(&t.poll()), ["app/var/log/syslog: c"]);
        // Truncated in place.
        fs::write(&f, "").unwrap();
        append(&f, "d\n");
        assert_eq!(msgs(&t.poll()), ["app/var/log/syslog: d"]);
    }

    /// What Pantavisor's logserver does at its size limit: gzip to the next
    /// `<name>.<n>.gz`, delete the file.
    fn rotate(f: &Path, n: u32) {
        let data = fs::read(f).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &data).unwrap();
        let name = f.file_name().unwrap().to_string_lossy();
        fs::write(
            f.with_file_name(format!("{name}.{n}.gz")),
            gz.finish().unwrap(),
        )
        .unwrap();
        fs::remove_file(f).unwrap();
    }

    #[test]
    fn lines_written_just_before_a_rotation_are_read_back_from_the_gz() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
        let f = logs.join("0/app/lxc/console.log");
        append(&f, "a\nb\n");
        assert_eq!(t.poll().records.len(), 2);
        // Between two polls: more lines, a rotation, a new file.
        append(&f, "c\nd\n");
        rotate(&f, 1);
        append(&f, "e\n");
        assert_eq!(
            msgs(&t.poll()),
            [
                "app/lxc/console.log: c",
                "app/lxc/console.log: d",
                "app/lxc/console.log: e"
            ]
        );
        // Two rotations between polls, and no new file yet.
        append(&f, "f\n");
        rotate(&f, 2);
        append(&f, "g\nh");
        rotate(&f, 3);
        assert_eq!(
            msgs(&t.poll()),
            [
                "app/lxc/console.log: f",
                "app/lxc/console.log: g",
                "app/lxc/console.log: h"
            ]
        );
        assert!(t.poll().records.is_empty(), "nothing read twice");
        append(&f, "i\n");
        assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: i"]);
        // Old rotations are history: a fresh tailer does not read them.
        let mut fresh = Tailer::new(&logs, &dir.path().join("other.json"), FREE);
        assert_eq!(msgs(&fresh.poll()), ["app/lxc/console.log: i"]);
    }

    #[test]
    fn a_revision_left_behind_is_read_to_its_end_then_forgotten() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
        let a = logs.join("0/app/lxc/console.log");
        append(&a, "a1\n");
        assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: a1"]);
        // The last line before a switch (a rollback reboot), then the switch.
        append(&a, "a2\n");
        append(&logs.join("locals/x/app/lxc/console.log"), "x1\n");
        fs::remove_file(logs.join("current")).unwrap();
        std::os::unix::fs::symlink("locals/x", logs.join("current")).unwrap();
        let mut got = msgs(&t.poll());
        got.sort();
        assert_eq!(got, ["app/lxc/console.log: a2", "app/lxc/console.log: x1"]);
        assert!(t.poll().records.is_empty());
        assert!(
            t.cursors.keys().all(|k| k.starts_with("locals/x/")),
            "{:?}",
            t.cursors.keys()
        );
    }

    #[test]
    fn a_failed_revision_asked_for_is_read_once() {
        let (dir, logs) = tree();
        let requests = super::super::LogRequests::default();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE)
            .with_requests(requests.clone());
        append(
            &logs.join("locals/bad/pantavisor/pantavisor.log"),
            "[pantavisor] 3 ERROR\t -- [updater]: boom\n",
        );
        assert!(t.poll().records.is_empty(), "not the running revision");
        requests.lock().unwrap().insert("locals/bad".into());
        let p = t.poll();
        assert_eq!(p.records.len(), 1);
        assert_eq!(
            (p.records[0].lvl.as_str(), p.records[0].msg.as_str()),
            ("ERROR", "boom")
        );
        assert!(t.poll().records.is_empty());
        assert!(requests.lock().unwrap().is_empty(), "done with it");
        assert_eq!(revision_of("locals/bad/app/x.log"), Some("locals/bad"));
        assert_eq!(revision_of("12/app/x.log"), Some("12"));
    }

    #[test]
    fn a_growing_file_past_the_fingerprint_is_not_mistaken_for_a_rotation() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
        let f = logs.join("0/app/lxc/console.log");
        append(&f, "short\n");
        assert_eq!(t.poll().records.len(), 1);
        append(&f, &format!("{}\n", "x".repeat(1000)));
        assert_eq!(t.poll().records.len(), 1);
        append(&f, "tail\n");
        assert_eq!(
            msgs(&t.poll()),
            ["app/lxc/console.log: tail"],
            "nothing read twice"
        );
    }

    #[test]
    fn cursors_survive_a_restart_and_follow_current() {
        let (dir, logs) = tree();
        let cursors = dir.path().join("cursors.json");
        let f = logs.join("0/app/lxc/console.log");
        append(&f, "before\n");
        let mut t = Tailer::new(&logs, &cursors, FREE);
        assert_eq!(t.poll().records.len(), 1);
        t.save().unwrap();
        append(&f, "after\n");
        let mut t = Tailer::new(&logs, &cursors, FREE);
        assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: after"]);
        // A new revision runs: its tree is followed.
        fs::create_dir_all(logs.join("locals/r1/pantavisor")).unwrap();
        append(
            &logs.join("locals/r1/pantavisor/pantavisor.log"),
            "[pantavisor] 0 INFO\t -- [pantavisor]: booted revision locals/r1\n",
        );
        fs::remove_file(logs.join("current")).unwrap();
        std::os::unix::fs::symlink("locals/r1", logs.join("current")).unwrap();
        assert_eq!(
            msgs(&t.poll()),
            ["pantavisor/pantavisor: booted revision locals/r1"]
        );
    }

    #[test]
    fn singlefile_layout_is_parsed_as_json() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
        append(
            &logs.join("0/pv.log"),
            "{\"tsec\":5,\"tnano\":0,\"platform\":\"app\",\"lvl\":\"WARN\",\"src\":\"lxc/console.log\",\"msg\":\"hot\"}\n",
        );
        let p = t.poll();
        assert_eq!(
            (p.records[0].plat.as_str(), p.records[0].lvl.as_str()),
            ("app", "WARN")
        );
    }

    #[test]
    fn floods_are_limited_per_source_and_counted() {
        let (dir, logs) = tree();
        let mut t = Tailer::new(
            &logs,
            &dir.path().join("cursors.json"),
            Rate {
                per_sec: 0.001,
                burst: 10.0,
            },
        );
        append(&logs.join("0/app/lxc/console.log"), &"spam\n".repeat(100));
        append(&logs.join("0/other/lxc/console.log"), "quiet\n");
        let p = t.poll();
        assert_eq!(
            p.records.len(),
            11,
            "10 of the flood, and the quiet source untouched"
        );
        assert_eq!(p.dropped, 90);
    }
}
