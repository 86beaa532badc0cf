//! The on-disk log spool: records wait here until every backend has acknowledged
//! them (at-least-once), within caps on bytes and age.
//!
//! Segments are JSON-lines files named by the position of their first record
//! (`<state_dir>/spool/<first>.jsonl`); `ledger.json` keeps each backend's ack
//! position. Over a cap the oldest segment goes; each backend that had not read its
//! records is told how many it lost (`dropped`), as it is for records the rate
//! limits turned away. A slow backend holds back nobody but itself.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pv_adapter_api::durable::write_durable;
use pv_adapter_api::{LogBatch, LogRecord};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// Caps of the spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub segment_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            max_bytes: 16 * 1024 * 1024,
            max_age: Duration::from_secs(24 * 3600),
            segment_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    /// backend → position of its first unacknowledged record
    acks: BTreeMap<String, u64>,
}

pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    segments: Vec<Segment>,
    next: u64,
    ledger: Ledger,
    /// Acknowledgements not yet written to `ledger.json`.
    ledger_dirty: bool,
    writer: Option<File>,
    /// backend → records lost (caps, rate limits) not yet acknowledged as reported
    drops: BTreeMap<String, u64>,
    /// backend → drops included in the last batch handed out
    reported: BTreeMap<String, u64>,
    /// Every record dropped, for the record.
    pub dropped_total: u64,
}

impl Spool {
    /// Opens the spool in `dir` for these backends.
    pub fn open(dir: &Path, opts: SpoolOptions, backends: &[String]) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let mut segments: Vec<Segment> = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let first = name.strip_suffix(".jsonl")?.parse().ok()?;
                let bytes = e.metadata().ok()?.len();
                Some(Segment {
                    first,
                    path: e.path(),
                    bytes,
                })
            })
            .collect();
        segments.sort_by_key(|s| s.first);
        let next = match segments.last_mut() {
            Some(last) => {
                // A power cut can leave half a line at the end: cut it, so the next
                // record starts on a line of its own.
                last.bytes = cut_torn_tail(&last.path)?;
                last_seq(&last.path)?.map_or(last.first, |s| s + 1)
            }
            None => 0,
        };
        let ledger: Ledger = fs::read(dir.join("ledger.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut spool = Spool {
            dir: dir.to_owned(),
            opts,
            segments,
            next,
            ledger,
            ledger_dirty: false,
            writer: None,
            drops: backends.iter().map(|b| (b.clone(), 0)).collect(),
            reported: BTreeMap::new(),
            dropped_total: 0,
        };
        let oldest = spool.oldest();
        for b in backends {
            spool.ledger.acks.entry(b.clone()).or_insert(oldest);
        }
        Ok(spool)
    }

    fn oldest(&self) -> u64 {
        self.segments.first().map_or(self.next, |s| s.first)
    }

    /// Position of the next record appended.
    pub fn next_position(&self) -> u64 {
        self.next
    }

    /// Counts records turned away before the spool (rate limits) for every backend.
    pub fn note_dropped(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.dropped_total += n;
        for d in self.drops.values_mut() {
            *d += n;
        }
    }

    /// Appends records, rotating segments and enforcing the caps.
    pub fn append(&mut self, records: Vec<LogRecord>) -> io::Result<()> {
        for mut rec in records {
            let needs_new = match self.segments.last() {
                None => true,
                Some(s) => s.bytes >= self.opts.segment_bytes || self.writer.is_none(),
            };
            if needs_new {
                self.rotate()?;
            }
            rec.seq = self.next;
            let mut line = serde_json::to_vec(&rec).map_err(io::Error::other)?;
            line.push(b'\n');
            if let Some(w) = self.writer.as_mut() {
                w.write_all(&line)?;
            }
            if let Some(s) = self.segments.last_mut() {
                s.bytes += line.len() as u64;
            }
            self.next += 1;
        }
        self.enforce_caps();
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if let Some(w) = self.writer.take() {
            w.sync_all()?;
        }
        // Reuse the last segment if it still has room (after a restart).
        if let Some(last) = self.segments.last() {
            if last.bytes < self.opts.segment_bytes {
                self.writer = Some(OpenOptions::new().append(true).open(&last.path)?);
                return Ok(());
            }
        }
        let path = self.dir.join(format!("{}.jsonl", self.next));
        self.writer = Some(OpenOptions::new().create(true).append(true).open(&path)?);
        self.segments.push(Segment {
            first: self.next,
            path,
            bytes: 0,
        });
        Ok(())
    }

    /// Makes appended records durable.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(w) = self.writer.as_mut() {
            w.sync_data()?;
        }
        Ok(())
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn enforce_caps(&mut self) {
        let now = SystemTime::now();
        while self.segments.len() > 1 {
            let first = &self.segments[0];
            let too_old = fs::metadata(&first.path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > self.opts.max_age);
            if self.total_bytes() <= self.opts.max_bytes && !too_old {
                break;
            }
            let gone = self.segments.remove(0);
            let until = self.oldest();
            if let Err(e) = fs::remove_file(&gone.path) {
                warn!(path = %gone.path.display(), error = %e, "cannot remove a spool segment");
            }
            let lost = until - gone.first;
            self.dropped_total += lost;
            for (backend, ack) in self.ledger.acks.iter_mut() {
                if *ack < until {
                    let missed = until - (*ack).max(gone.first);
                    *self.drops.entry(backend.clone()).or_default() += missed;
                    *ack = until;
                    self.ledger_dirty = true;
                }
            }
        }
    }

    /// The next batch for `backend` (may be empty).
    pub fn read(
        &mut self,
        backend: &str,
        max_records: usize,
        max_bytes: usize,
    ) -> io::Result<LogBatch> {
        let oldest = self.oldest();
        let pos = self
            .ledger
            .acks
            .get(backend)
            .copied()
            .unwrap_or(oldest)
            .max(oldest);
        let dropped = self.drops.get(backend).copied().unwrap_or(0);
        self.reported.insert(backend.to_owned(), dropped);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut last = pos;
        'segments: for (i, seg) in self.segments.iter().enumerate() {
            let end = self.segments.get(i + 1).map_or(self.next, |s| s.first);
            if end <= pos {
                continue;
            }
            let f = match File::open(&seg.path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                // A damaged line (torn by a power cut, bad bytes on flash) is skipped,
                // never the whole spool.
                let Ok(rec) = serde_json::from_slice::<LogRecord>(&line) else {
                    continue;
                };
                if rec.seq < pos {
                    continue;
                }
                if records.len() >= max_records
                    || (bytes + line.len() > max_bytes && !records.is_empty())
                {
                    break 'segments;
                }
                bytes += line.len();
                last = rec.seq + 1;
                records.push(rec);
            }
        }
        Ok(LogBatch {
            first: pos,
            next: last.max(pos),
            records,
            dropped,
        })
    }

    /// Records `backend` delivered everything before `next` (in memory; see
    /// [`Spool::save_ledger`]).
    pub fn ack(&mut self, backend: &str, next: u64) {
        let ack = self.ledger.acks.entry(backend.to_owned()).or_insert(0);
        if next > *ack {
            *ack = next.min(self.next);
            self.ledger_dirty = true;
        }
        if let Some(r) = self.reported.remove(backend) {
            let d = self.drops.entry(backend.to_owned()).or_default();
            *d = d.saturating_sub(r);
        }
    }

    /// Writes the acknowledgements durably, if they changed. A power cut before
    /// this costs records sent twice, never records lost.
    pub fn save_ledger(&mut self) -> io::Result<()> {
        if !self.ledger_dirty {
            return Ok(());
        }
        let b = serde_json::to_vec(&self.ledger).map_err(io::Error::other)?;
        write_durable(&self.dir.join("ledger.json"), &b)?;
        self.ledger_dirty = false;
        Ok(())
    }
}

/// The position of the last complete record in a segment.
fn last_seq(path: &Path) -> io::Result<Option<u64>> {
    let mut last = None;
    for line in BufReader::new(File::open(path)?).split(b'\n') {
        if let Ok(rec) = serde_json::from_slice::<LogRecord>(&line?) {
            last = Some(rec.seq);
        }
    }
    Ok(last)
}

/// Cuts a segment after its last newline (what a power cut in the middle of a
/// write leaves) and returns its length.
fn cut_torn_tail(path: &Path) -> io::Result<u64> {
    let data = fs::read(path)?;
    let keep = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if keep < data.len() {
        warn!(path = %path.display(), bytes = data.len() - keep,
            "the log spool's last record was torn (power cut?): cut");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(keep as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: usize) -> LogRecord {
        LogRecord {
            seq: 0,
            tsec: 1_790_000_000 + i as i64,
            tnano: 0,
            lvl: "INFO".into(),
            plat: "app".into(),
            src: "lxc/console.log".into(),
            msg: format!("line {i} {}", "x".repeat(100)),
            rev: String::new(),
        }
    }

    fn backends() -> Vec<String> {
        vec!["fast".into(), "slow".into()]
    }

    #[test]
    fn each_backend_reads_and_acks_at_its_own_pace() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default(), &backends()).unwrap();
        s.append((0..10).map(rec).collect()).unwrap();
        let b = s.read("fast", 4, 1 << 20).unwrap();
        assert_eq!((b.first, b.next, b.records.len(), b.dropped), (0, 4, 4, 0));
        // Not acked: offered again.
        assert_eq!(s.read("fast", 4, 1 << 20).unwrap().first, 0);
        s.ack("fast", b.next);
        let b = s.read("fast", 100, 1 << 20).unwrap();
        assert_eq!((b.first, b.next), (4, 10));
        assert_eq!(b.records[0].msg, rec(4).msg);
        // The slow one still starts at the beginning.
        assert_eq!(s.read("slow", 100, 1 << 20).unwrap().records.len(), 10);
    }

    #[test]
    fn positions_and_acks_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), SpoolOptions::default(), &backends()).unwrap();
            s.append((0..5).map(rec).collect()).unwrap();
            s.flush().unwrap();
            s.ack("fast", 3);
            s.save_ledger().unwrap();
        }
        let mut s = Spool::open(dir.path(), SpoolOptions::default(), &backends()).unwrap();
        assert_eq!(s.next_position(), 5);
        let b = s.read("fast", 100, 1 << 20).unwrap();
        assert_eq!((b.first, b.records.len()), (3, 2));
        s.append(vec![rec(5)]).unwrap();
        assert_eq!(s.read("fast", 100, 1 << 20).unwrap().next, 6);
    }

    #[test]
    fn a_torn_last_line_and_bad_bytes_cost_only_themselves() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), SpoolOptions::default(), &backends()).unwrap();
            s.append((0..4).map(rec).collect()).unwrap();
            s.flush().unwrap();
        }
        // Flash damage inside the second record, and a power cut in the middle of a
        // fifth one, cut inside a multi-byte character.
        let seg = dir.path().join("0.jsonl");
        let mut data = std::fs::read(&seg).unwrap();
        let second = data.iter().position(|b| *b == b'\n').unwrap() + 10;
        data[second] = 0xff;
        data.extend_from_slice("{\"seq\":4,\"tsec\":1,\"msg\":\"caf\u{e9}".as_bytes());
        data.pop();
        std::fs::write(&seg, &data).unwrap();

        let mut s = Spool::open(dir.path(), SpoolOptions::default(), &backends()).unwrap();
        assert_eq!(s.next_position(), 4, "the torn record is not counted");
        s.append(vec![rec(4)]).unwrap();
        let b = s.read("fast", 100, 1 << 20).unwrap();
        let seqs: Vec<u64> = b.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![0, 2, 3, 4], "only the damaged record is lost");
        assert_eq!(b.records[3].msg, rec(4).msg);
        assert_eq!(b.next, 5);
    }

    #[test]
    fn caps_drop_the_oldest_and_every_drop_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            max_bytes: 4 * 1024,
            segment_bytes: 1024,
            ..SpoolOptions::default()
        };
        let mut s = Spool::open(dir.path(), opts, &backends()).unwrap();
        s.append((0..100).map(rec).collect()).unwrap();
        assert!(s.total_bytes() <= 4 * 1024 + 1024, "{}", s.total_bytes());
        let b = s.read("slow", 1000, 1 << 20).unwrap();
        assert_eq!(
            b.dropped + b.records.len() as u64,
            100,
            "every record is delivered or counted"
        );
        assert!(b.dropped > 0);
        assert_eq!(b.first, 100 - b.records.len() as u64);
        s.ack("slow", b.next);
        assert_eq!(
            s.read("slow", 10, 1 << 20).unwrap().dropped,
            0,
            "reported once"
        );
        // Rate-limit drops reach every backend, until acknowledged.
        s.note_dropped(7);
        assert_eq!(s.read("fast", 1, 1 << 20).unwrap().dropped, b.dropped + 7);
        assert_eq!(s.read("slow", 1, 1 << 20).unwrap().dropped, 7);
        assert_eq!(s.dropped_total, b.dropped + 7);
    }

    #[test]
    fn batches_respect_the_byte_bound_but_always_carry_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default(), &backends()).unwrap();
        s.append((0..10).map(rec).collect()).unwrap();
        let b = s.read("fast", 100, 500).unwrap();
        assert!((1..10).contains(&b.records.len()), "{}", b.records.len());
        let b = s.read("fast", 100, 1).unwrap();
        assert_eq!(b.records.len(), 1);
    }
}
