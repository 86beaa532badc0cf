//! Logs as device-to-cloud messages: JSON arrays of Pantavisor log entries
//! (`{tsec, tnano, plat, src, lvl, msg, rev, seq}`; `seq` is the record's spool
//! position, the same in every copy of an entry sent again), `$.ct=application/json`, and
//! `$.ce=utf-8` (or `gzip` when compressed), within a daily allowance counted in
//! the hub's 4 KiB metering units.

use std::io::Write;
use std::path::{Path, PathBuf};

use pv_adapter_api::LogRecord;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The hub's limit for one message, properties included; bodies stay below it.
pub const MAX_MESSAGE: usize = 255 * 1024;
/// The hub meters messages in units of this size.
pub const UNIT: usize = 4096;

/// The message body of `records`. Each entry's `rev` is the revision whose log
/// directory the line came from (`running` when the engine does not know).
pub fn body(records: &[LogRecord], running: Option<&str>) -> Vec<u8> {
    let entries: Vec<_> = records
        .iter()
        .map(|r| {
            let rev = if r.rev.is_empty() {
                running.unwrap_or("")
            } else {
                r.rev.as_str()
            };
            json!({"tsec": r.tsec, "tnano": r.tnano, "plat": r.plat, "src": r.src,
                   "lvl": r.lvl, "msg": r.msg, "rev": rev, "seq": r.seq})
        })
        .collect();
    serde_json::to_vec(&entries).unwrap_or_default()
}

/// gzip of `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

/// Application and system properties of a log message.
pub fn properties(gzipped: bool, dropped: u64) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("$.ct", "application/json".to_owned()),
        ("$.ce", if gzipped { "gzip" } else { "utf-8" }.to_owned()),
        ("type", "pvlog".to_owned()),
    ];
    if dropped > 0 {
        p.push(("dropped", dropped.to_string()));
    }
    p
}

/// Metering units of a message of `len` bytes.
pub fn units(len: usize) -> u64 {
    len.div_ceil(UNIT).max(1) as u64
}

/// The daily allowance, kept in a file so a restart does not reset it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Days since the Unix epoch (UTC).
    pub day: u64,
    /// Units spent on `day`.
    pub used: u64,
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

impl Budget {
    pub fn load(path: &Path) -> Budget {
        let mut b: Budget = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        b.path = Some(path.to_owned());
        b
    }

    fn roll(&mut self, now_secs: u64) {
        let day = now_secs / 86_400;
        if day != self.day {
            self.day = day;
            self.used = 0;
        }
    }

    /// Whether a message of `len` bytes fits today's `limit_kib` (0: no limit).
    pub fn allows(&mut self, len: usize, limit_kib: u64, now_secs: u64) -> bool {
        self.roll(now_secs);
        limit_kib == 0 || (self.used + units(len)) * (UNIT as u64 / 1024) <= limit_kib
    }

    /// Records a sent message.
    pub fn spend(&mut self, len: usize, now_secs: u64) {
        self.roll(now_secs);
        self.used += units(len);
        if let Some(p) = &self.path {
            if let Ok(b) = serde_json::to_vec(self) {
                let _ = pv_adapter_api::durable::write_durable(p, &b);
            }
        }
    }

    /// KiB counted today.
    pub fn used_kib(&self) -> u64 {
        self.used * (UNIT as u64 / 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(msg: &str) -> LogRecord {
        LogRecord {
            seq: 0,
            tsec: 1_700_000_000,
            tnano: 5,
            lvl: "INFO".into(),
            plat: "app".into(),
            src: "lxc/console.log".into(),
            msg: msg.into(),
            rev: String::new(),
        }
    }

    #[test]
    fn bodies_are_json_arrays_of_pantavisor_entries() {
        let b = body(&[rec("a"), rec("b")], Some("locals/r1"));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v[1]["msg"], "b");
        assert_eq!(v[0]["rev"], "locals/r1");
        assert_eq!(v[0]["tsec"], 1_700_000_000);
        let z = gzip(&b);
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&z[..]), &mut out).unwrap();
        assert_eq!(out, b);
        assert_eq!(properties(true, 3)[1], ("$.ce", "gzip".to_owned()));
        assert_eq!(properties(false, 3)[3], ("dropped", "3".to_owned()));
    }

    #[test]
    fn the_budget_meters_in_4_kib_units_and_rolls_daily() {
        assert_eq!(units(1), 1);
        assert_eq!(units(4096), 1);
        assert_eq!(units(4097), 2);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("budget.json");
        let mut b = Budget::load(&f);
        let day = 20_000 * 86_400;
        assert!(b.allows(8192, 8, day));
        b.spend(8192, day);
        assert!(!b.allows(1, 8, day), "8 KiB spent of 8");
        assert!(b.allows(1, 0, day), "0 is no limit");
        let mut again = Budget::load(&f);
        assert_eq!(again.used_kib(), 8, "kept across restarts");
        assert!(again.allows(1, 8, day + 86_400), "a new day");
    }
}
