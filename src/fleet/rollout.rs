//! A rollout's plan and its record: the devices in waves, what each reported,
//! the failure threshold and the per-device timeout. Pure logic: the driver in
//! `deploy.rs` feeds it progress and the clock and carries out its [`Step`]s.
//!
//! The record is written to disk (durably) after every change that matters, so
//! an operator can stop pv-fleet at any moment and `--resume` the rollout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A size given as a count (`3`) or as a share of the selection (`5%`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Amount {
    Count(usize),
    Percent(f64),
}

impl FromStr for Amount {
    type Err = String;
    fn from_str(s: &str) -> Result<Amount, String> {
        let bad = || format!("{s:?}: expected a count (3) or a percentage (5%)");
        match s.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.trim().parse().map_err(|_| bad())?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(format!("{s:?}: a percentage is between 0% and 100%"));
                }
                Ok(Amount::Percent(p))
            }
            None => s.trim().parse().map(Amount::Count).map_err(|_| bad()),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(c) => write!(f, "{c}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Amount {
    /// A wave of `n` devices: a percentage rounds up (5% of 10 is 1 device).
    pub fn wave_of(self, n: usize) -> usize {
        match self {
            Amount::Count(c) => c.min(n),
            Amount::Percent(p) => ((p * n as f64 / 100.0).ceil() as usize).min(n),
        }
    }

    /// Failures tolerated among `n` devices: a percentage rounds down (2% of 10
    /// tolerates none, so the first failure stops the rollout).
    pub fn allowance_of(self, n: usize) -> usize {
        match self {
            Amount::Count(c) => c,
            Amount::Percent(p) => (p * n as f64 / 100.0 + 1e-9).floor() as usize,
        }
    }
}

/// Splits `devices` into waves: the canary first, then waves of `wave` (the
/// rest at once without it). Returns each device's wave number (from 0).
pub fn plan(n: usize, canary: Option<Amount>, wave: Option<Amount>) -> Vec<usize> {
    let mut waves = Vec::with_capacity(n);
    let first = canary.map(|c| c.wave_of(n).max(1)).unwrap_or(0).min(n);
    waves.resize(first, 0);
    let base = usize::from(first > 0);
    let rest = n - first;
    let size = wave.map(|w| w.wave_of(n).max(1)).unwrap_or(rest.max(1));
    for i in 0..rest {
        waves.push(base + i / size);
    }
    waves
}

/// Final statuses of `revision/progress`.
pub fn is_final(s: &str) -> bool {
    matches!(s, "DONE" | "UPDATED" | "WONTGO" | "ERROR" | "CANCELLED")
}

pub fn is_success(s: &str) -> bool {
    matches!(s, "DONE" | "UPDATED")
}

/// Where the rollout is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Offering waves and following them.
    Running,
    /// Stopped by the failure threshold: no further wave is offered.
    Halted,
    /// Every planned device has its outcome.
    Finished,
}

/// One device of the rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub device: String,
    pub wave: usize,
    /// Unix seconds of the offer; `None` until its wave starts.
    pub offered_at: Option<u64>,
    /// The last status reported for this offer ("" before the first).
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub msg: String,
    /// No final status within the per-device timeout: counted as a failure.
    #[serde(default)]
    pub timed_out: bool,
    /// The offer was withdrawn (halted rollout or timeout).
    #[serde(default)]
    pub withdrawn: bool,
}

impl Entry {
    /// A planned device, not offered yet.
    pub fn new(device: String, wave: usize) -> Entry {
        Entry {
            device,
            wave,
            offered_at: None,
            status: String::new(),
            msg: String::new(),
            timed_out: false,
            withdrawn: false,
        }
    }

    /// Nothing more is waited for from this device.
    pub fn settled(&self) -> bool {
        is_final(&self.status) || self.timed_out
    }

    pub fn failed(&self) -> bool {
        self.timed_out || matches!(self.status.as_str(), "WONTGO" | "ERROR")
    }
}

/// How objects reach the devices; kept so a resumed rollout offers the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Serving {
    pub serve: String,
    /// The address the HTTP server had (bound again on resume).
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub object_url_template: Option<String>,
}

/// The rollout record (`--record FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub id: String,
    pub export: PathBuf,
    pub serving: Serving,
    pub max_failures: Option<Amount>,
    pub device_timeout_secs: Option<u64>,
    pub state: State,
    pub devices: Vec<Entry>,
}

/// What the driver must do now.
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Publish the offer to these devices (their wave started).
    pub offer: Vec<String>,
    /// Withdraw the offer from these devices.
    pub withdraw: Vec<String>,
    /// A wave that started (for the operator's log).
    pub wave_started: Option<usize>,
    /// The threshold was crossed in this step.
    pub halted: bool,
    /// Devices that just timed out.
    pub timed_out: Vec<String>,
}

impl Record {
    pub fn waves(&self) -> usize {
        self.devices.iter().map(|e| e.wave + 1).max().unwrap_or(0)
    }

    pub fn failures(&self) -> usize {
        self.devices.iter().filter(|e| e.failed()).count()
    }

    /// Failures tolerated; `None` without a threshold.
    pub fn allowance(&self) -> Option<usize> {
        self.max_failures
            .map(|m| m.allowance_of(self.devices.len()))
    }

    pub fn over_threshold(&self) -> bool {
        self.allowance().is_some_and(|a| self.failures() > a)
    }

    /// Every offered device settled and nothing more will be offered.
    pub fn done(&self) -> bool {
        let offered_settled = self
            .devices
            .iter()
            .all(|e| e.offered_at.is_none() || e.settled());
        let nothing_left = self.state == State::Halted
            || self.state == State::Finished
            || self.devices.iter().all(|e| e.offered_at.is_some());
        offered_settled && nothing_left
    }

    /// A status for `device`'s offer. Returns whether the record changed in a
    /// way worth saving (a final status).
    pub fn report(&mut self, device: &str, status: &str, msg: &str) -> bool {
        let Some(e) = self.devices.iter_mut().find(|e| e.device == device) else {
            return false;
        };
        if e.offered_at.is_none() || is_final(&e.status) {
            return false;
        }
        e.status = status.to_owned();
        e.msg = msg.to_owned();
        is_final(status)
    }

    /// Advances the rollout at `now` (unix seconds).
    pub fn step(&mut self, now: u64) -> Step {
        let mut step = Step::default();
        if let Some(t) = self.device_timeout_secs {
            for e in &mut self.devices {
                if let Some(at) = e.offered_at {
                    if !e.settled() && now.saturating_sub(at) >= t {
                        e.timed_out = true;
                        step.timed_out.push(e.device.clone());
                        if !e.withdrawn {
                            e.withdrawn = true;
                            step.withdraw.push(e.device.clone());
                        }
                    }
                }
            }
        }
        if self.state == State::Running && self.over_threshold() {
            self.state = State::Halted;
            step.halted = true;
            for e in &mut self.devices {
                if e.offered_at.is_some() && !e.settled() && !e.withdrawn {
                    e.withdrawn = true;
                    step.withdraw.push(e.device.clone());
                }
            }
        }
        if self.state == State::Running {
            let next = self
                .devices
                .iter()
                .filter(|e| e.offered_at.is_none())
                .map(|e| e.wave)
                .min();
            let previous_settled = self
                .devices
                .iter()
                .all(|e| e.offered_at.is_none() || e.settled());
            match next {
                Some(w) if previous_settled => {
                    for e in self.devices.iter_mut().filter(|e| e.wave == w) {
                        e.offered_at = Some(now);
                        step.offer.push(e.device.clone());
                    }
                    step.wave_started = Some(w);
                }
                Some(_) => {}
                None if previous_settled => self.state = State::Finished,
                None => {}
            }
        }
        step
    }

    /// Counts for the summary: succeeded, failed (timed out included),
    /// cancelled, not offered, unfinished.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in &self.devices {
            if e.offered_at.is_none() {
                c.not_offered += 1;
            } else if e.failed() {
                c.failed += 1;
                c.timed_out += usize::from(e.timed_out);
            } else if is_success(&e.status) {
                c.succeeded += 1;
            } else if e.status == "CANCELLED" {
                c.cancelled += 1;
            } else {
                c.unfinished += 1;
            }
        }
        c
    }

    pub fn load(path: &Path) -> Result<Record, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r: Record = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a rollout record: {e}", path.display()))?;
        if r.v != 1 {
            return Err(format!(
                "{}: rollout record version {} (this pv-fleet reads 1)",
                path.display(),
                r.v
            ));
        }
        Ok(r)
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        pv_adapter_api::durable::write_durable(path, &bytes)
            .map_err(|e| format!("cannot write the rollout record {}: {e}", path.display()))
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct Counts {
    pub succeeded: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub cancelled: usize,
    pub not_offered: usize,
    pub unfinished: usize,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(n: usize, canary: Option<&str>, wave: Option<&str>, max: Option<&str>) -> Record {
        let waves = plan(
            n,
            canary.map(|c| c.parse().unwrap()),
            wave.map(|w| w.parse().unwrap()),
        );
        Record {
            v: 1,
            id: "v2".into(),
            export: "x".into(),
            serving: Serving {
                serve: "http".into(),
                listen: None,
                advertise: None,
                object_url_template: None,
            },
            max_failures: max.map(|m| m.parse().unwrap()),
            device_timeout_secs: Some(100),
            state: State::Running,
            devices: waves
                .into_iter()
                .enumerate()
                .map(|(i, wave)| Entry::new(format!("d{i}"), wave))
                .collect(),
        }
    }

    #[test]
    fn amounts_parse_and_round_the_safe_way() {
        assert_eq!("5%".parse::<Amount>().unwrap(), Amount::Percent(5.0));
        assert_eq!("3".parse::<Amount>().unwrap(), Amount::Count(3));
        assert!("101%".parse::<Amount>().is_err());
        assert!("-1".parse::<Amount>().is_err());
        assert!("five".parse::<Amount>().is_err());
        // Waves round up, allowances round down.
        assert_eq!(Amount::Percent(5.0).wave_of(10), 1);
        assert_eq!(Amount::Percent(2.0).allowance_of(10), 0);
        assert_eq!(Amount::Percent(2.0).allowance_of(100), 2);
        assert_eq!(Amount::Percent(10.0).allowance_of(30), 3);
        assert_eq!(Amount::Count(7).wave_of(3), 3);
    }

    #[test]
    fn plans_a_canary_then_waves_then_the_rest() {
        assert_eq!(plan(5, None, None), vec![0; 5]);
        assert_eq!(
            plan(10, Some(Amount::Percent(10.0)), None),
            [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            plan(7, Some(Amount::Count(2)), Some(Amount::Count(2))),
            [0, 0, 1, 1, 2, 2, 3]
        );
        assert_eq!(plan(2, Some(Amount::Count(5)), None), [0, 0]);
        assert_eq!(plan(0, Some(Amount::Count(1)), None), Vec::<usize>::new());
    }

    #[test]
    fn a_wave_starts_when_the_previous_one_settled() {
        let mut r = record(4, Some("1"), None, None);
        let s = r.step(10);
        assert_eq!(s.offer, ["d0"]);
        assert_eq!(s.wave_started, Some(0));
        assert_eq!(r.step(11), Step::default());
        assert!(!r.report("d1", "DONE", "")); // not offered: ignored
        assert!(!r.report("d0", "DOWNLOADING", ""));
        assert_eq!(r.step(12), Step::default());
        assert!(r.report("d0", "DONE", ""));
        let s = r.step(13);
        assert_eq!(s.offer, ["d1", "d2", "d3"]);
        for d in ["d1", "d2", "d3"] {
            r.report(d, "UPDATED", "");
        }
        assert!(!r.report("d3", "ERROR", "")); // final stays final
        r.step(14);
        assert_eq!(r.state, State::Finished);
        assert!(r.done());
        assert_eq!(r.counts().succeeded, 4);
    }

    #[test]
    fn crossing_the_threshold_halts_and_withdraws_what_is_still_running() {
        let mut r = record(20, Some("4"), None, Some("10%")); // tolerates 2
        r.step(0);
        r.report("d0", "ERROR", "rolled back");
        r.report("d1", "WONTGO", "no space");
        assert_eq!(r.step(1), Step::default());
        r.report("d2", "ERROR", "rolled back");
        let s = r.step(2);
        assert!(s.halted);
        assert_eq!(s.withdraw, ["d3"]);
        assert_eq!(r.state, State::Halted);
        assert!(!r.done()); // d3 still has to answer
        r.report("d3", "CANCELLED", "withdrawn");
        assert!(r.done());
        let c = r.counts();
        assert_eq!((c.failed, c.cancelled, c.not_offered), (3, 1, 16));
        // Nothing more is offered.
        assert!(r.step(3).offer.is_empty());
    }

    #[test]
    fn a_silent_device_times_out_and_counts_as_a_failure() {
        let mut r = record(3, Some("1"), None, Some("0"));
        r.step(0);
        assert_eq!(r.step(99), Step::default());
        let s = r.step(100);
        assert_eq!(s.timed_out, ["d0"]);
        assert_eq!(s.withdraw, ["d0"]);
        assert!(s.halted);
        assert!(r.done());
        assert_eq!(r.counts().timed_out, 1);
        // A late final status is kept, the timeout too.
        r.report("d0", "DONE", "");
        assert!(r.devices[0].failed());
    }

    #[test]
    fn a_halted_record_continues_once_the_threshold_allows() {
        let mut r = record(4, Some("2"), None, Some("0"));
        r.step(0);
        r.report("d0", "ERROR", "");
        r.report("d1", "DONE", "");
        assert!(r.step(1).halted);
        // The operator raises the threshold and resumes.
        r.max_failures = Some(Amount::Count(1));
        assert!(!r.over_threshold());
        r.state = State::Running;
        assert_eq!(r.step(2).offer, ["d2", "d3"]);
    }

    #[test]
    fn the_record_survives_a_round_trip_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        let mut r = record(3, Some("1"), None, Some("5%"));
        r.step(7);
        r.save(&p).unwrap();
        let back = Record::load(&p).unwrap();
        assert_eq!(back.devices[0].offered_at, Some(7));
        assert_eq!(back.max_failures, Some(Amount::Percent(5.0)));
        std::fs::write(&p, b"{}").unwrap();
        assert!(
            Record::load(&p)
                .unwrap_err()
                .contains("not a rollout record")
        );
    }
}
