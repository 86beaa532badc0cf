//! What `pv-fleet deploy` shows: a live table for a few devices, status lines
//! and counts for many, a summary at the end, and the `--json` summary.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::fleet::rollout::{Record, State};

/// A device as the deploy view shows it.
#[derive(Default, Clone)]
pub struct Row {
    pub status: String,
    pub msg: String,
    pub progress: u64,
    pub bytes: (u64, u64),
    pub objects: (u64, u64),
}

/// The percentage shown for a device: it never goes back within a deployment.
/// After its download the engine passes through Pantavisor's QUEUED ("Update
/// ready to be run", 0 %) and NEW: those sit above the download, not at its start.
pub fn shown_progress(before: &Row, status: &str, reported: u64) -> u64 {
    let staged = matches!(status, "QUEUED" | "NEW")
        && (before.status == "DOWNLOADING"
            || (before.bytes.1 > 0 && before.bytes.0 >= before.bytes.1));
    let p = if staged {
        reported.max(before.progress).max(40)
    } else {
        reported
    };
    p.max(before.progress).min(100)
}

/// A `revision/progress` payload as a row, after `before`.
pub fn row_from(before: &Row, p: &Value) -> Row {
    let status = p["status"].as_str().unwrap_or("?").to_owned();
    let progress = shown_progress(before, &status, p["progress"].as_u64().unwrap_or(0));
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    Row {
        status,
        msg: p["status_msg"].as_str().unwrap_or("").to_owned(),
        progress,
        bytes: (n("bytes_done"), n("bytes_total")),
        objects: (n("objects_done"), n("objects_total")),
    }
}

pub fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// One device's line: bar, status, counters, message.
pub fn line(dev: &str, r: &Row, width: usize) -> String {
    let filled = (r.progress.min(100) as usize * 20) / 100;
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled));
    let status = if r.status.is_empty() {
        "waiting"
    } else {
        &r.status
    };
    let mut s = format!("{dev:width$}  {bar} {:>3}%  {status:<11}", r.progress);
    if r.bytes.1 > 0 {
        s += &format!(
            "  {}/{} MiB  {}/{} objects",
            mib(r.bytes.0),
            mib(r.bytes.1),
            r.objects.0,
            r.objects.1
        );
    }
    if !r.msg.is_empty() {
        s += &format!("  {}", r.msg);
    }
    s
}

/// Devices per current status among the offered ones, for a one-line view of
/// a large rollout: `wave 2/3 · DONE 40 · DOWNLOADING 12 · waiting 3`.
pub fn counts_line(rec: &Record, rows: &BTreeMap<String, Row>) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    let mut wave = 0;
    for e in rec.devices.iter().filter(|e| e.offered_at.is_some()) {
        wave = wave.max(e.wave + 1);
        let s = if e.timed_out {
            "TIMED-OUT".to_owned()
        } else {
            match rows.get(&e.device).map(|r| r.status.as_str()) {
                Some("") | None => "waiting".to_owned(),
                Some(s) => s.to_owned(),
            }
        };
        *by.entry(s).or_default() += 1;
    }
    let mut s = format!("{}: wave {wave}/{}", rec.id, rec.waves());
    for (k, n) in by {
        s += &format!(" · {k} {n}");
    }
    let left = rec
        .devices
        .iter()
        .filter(|e| e.offered_at.is_none())
        .count();
    if left > 0 {
        s += &format!(" · not offered {left}");
    }
    s
}

/// How the rollout ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Halted,
    Stopped,
    TimedOut,
}

impl Outcome {
    pub fn of(rec: &Record, stopped: bool, timed_out: bool) -> Outcome {
        let c = rec.counts();
        if stopped {
            Outcome::Stopped
        } else if timed_out && !rec.done() {
            Outcome::TimedOut
        } else if rec.state == State::Halted {
            Outcome::Halted
        } else if c.failed > 0 || c.cancelled > 0 {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Halted => "halted",
            Outcome::Stopped => "stopped",
            Outcome::TimedOut => "timeout",
        }
    }

    /// The exit code (see the module docs of `fleet`).
    pub fn code(self) -> i32 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::Failed | Outcome::Halted => 1,
            Outcome::TimedOut => 3,
            Outcome::Stopped => 4,
        }
    }
}

/// The human summary, for stderr.
pub fn summary(rec: &Record, outcome: Outcome, record: Option<&std::path::Path>) -> String {
    let c = rec.counts();
    let mut s = format!("{}: {} succeeded, {} failed", rec.id, c.succeeded, c.failed);
    if c.timed_out > 0 {
        s += &format!(" ({} timed out)", c.timed_out);
    }
    for (n, what) in [
        (c.cancelled, "cancelled"),
        (c.unfinished, "unfinished"),
        (c.not_offered, "not offered"),
    ] {
        if n > 0 {
            s += &format!(", {n} {what}");
        }
    }
    match outcome {
        Outcome::Halted => {
            s += &format!(
                "\nhalted: {} failures, more than the {} tolerated by --max-failures {}",
                rec.failures(),
                rec.allowance().unwrap_or(0),
                rec.max_failures.map(|m| m.to_string()).unwrap_or_default()
            );
        }
        Outcome::Stopped => s += "\nstopped by the operator",
        Outcome::TimedOut => s += "\nstopped: --timeout reached",
        _ => {}
    }
    let failed: Vec<_> = rec.devices.iter().filter(|e| e.failed()).collect();
    for e in failed.iter().take(20) {
        let why = if e.timed_out {
            format!(
                "timed out ({})",
                if e.status.is_empty() {
                    "no answer"
                } else {
                    &e.status
                }
            )
        } else {
            format!("{} {}", e.status, e.msg)
        };
        s += &format!("\n  failed: {}  {}", e.device, why.trim_end());
    }
    if failed.len() > 20 {
        s += &format!(
            "\n  … and {} more (the record or --json lists all)",
            failed.len() - 20
        );
    }
    let resumable = matches!(
        outcome,
        Outcome::Halted | Outcome::Stopped | Outcome::TimedOut
    );
    match (record, resumable) {
        (Some(p), true) => {
            s += &format!("\ncontinue with: pv-fleet deploy --resume {}", p.display());
            if outcome == Outcome::Halted {
                s += " --max-failures <higher>";
            }
        }
        (None, true) if outcome != Outcome::Halted => {
            s += "\n(no --record: this rollout cannot be resumed)";
        }
        _ => {}
    }
    s
}

/// The `--json` summary, for scripts.
pub fn json_summary(rec: &Record, outcome: Outcome, record: Option<&std::path::Path>) -> Value {
    json!({
        "v": 1,
        "id": rec.id,
        "outcome": outcome.name(),
        "exit_code": outcome.code(),
        "record": record.map(|p| p.display().to_string()),
        "waves": rec.waves(),
        "max_failures": rec.max_failures.map(|m| m.to_string()),
        "failures_tolerated": rec.allowance(),
        "counts": rec.counts(),
        "devices": rec.devices.iter().map(|e| json!({
            "device": e.device,
            "wave": e.wave,
            "offered": e.offered_at.is_some(),
            "status": if e.status.is_empty() { Value::Null } else { json!(e.status) },
            "status_msg": e.msg,
            "timed_out": e.timed_out,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_never_goes_back_through_staging() {
        let mut row = Row::default();
        for (status, reported, want) in [
            ("QUEUED", 5, 5),
            ("DOWNLOADING", 25, 25),
            ("DOWNLOADING", 38, 38),
            ("QUEUED", 0, 40),
            ("INPROGRESS", 50, 50),
            ("TESTING", 75, 75),
            ("INPROGRESS", 50, 75),
            ("DONE", 100, 100),
        ] {
            let shown = shown_progress(&row, status, reported);
            assert_eq!(shown, want, "{status} {reported}");
            row.status = status.to_owned();
            row.progress = shown;
        }
    }
}
