//! The update state machine on each tick of Pantavisor's WAIT state
//! (`pantavisor.c: _pv_wait`): goals, TESTING, commit (DONE/UPDATED), failure and
//! rollback, `pv_update_run` (reboot or non-reboot transition), and GC
//! (`storage.c: pv_storage_gc_run`).

use std::collections::BTreeSet;
use std::io;
use std::time::Instant;

use serde_json::Value;

use super::{Device, Phase, Power, Update, initial, progress_with_logs, sha256_file};
use crate::sim::revision::{Outcome, Rev, transition};

impl Device {
    /// The WAIT state proper.
    pub(super) fn wait(&mut self, now: Instant) -> io::Result<Option<Power>> {
        if let Some(cmd) = self.slot.take() {
            if let Some(p) = self.execute(cmd)? {
                return Ok(Some(p));
            }
        }
        let Some(up) = self.update.clone() else {
            self.refresh_device_meta();
            return Ok(None);
        };
        let action = match up.phase {
            Phase::Rebooting => Some(Power::Reboot),
            Phase::Fail { at, ref msg } if now >= at => Some(self.fail(&up.rev, msg)?),
            Phase::Fail { .. } => None,
            Phase::Goals { deadline, never } => {
                let reached = !never
                    && self.rev.platforms().values().all(|p| {
                        !(up.reboot || up.restarted.contains(&p.name))
                            || p.goal != "READY"
                            || self
                                .containers
                                .get(&p.name)
                                .is_some_and(|c| c.status == "READY")
                    });
                if reached {
                    let msg = if up.reboot {
                        "Awaiting to set rollback point if update is stable"
                    } else {
                        "Awaiting to see if update is stable"
                    };
                    self.set_progress(&up.rev, "TESTING", msg)?;
                    self.set_phase(Phase::Testing {
                        until: now + self.cfg.commit_delay,
                    });
                    None
                } else if now >= deadline {
                    Some(self.fail(&up.rev, "Status goal not reached")?)
                } else {
                    None
                }
            }
            Phase::Testing { until } if now >= until => {
                self.commit(&up)?;
                None
            }
            Phase::Testing { .. } => None,
        };
        self.refresh_device_meta();
        Ok(action)
    }

    fn set_phase(&mut self, phase: Phase) {
        if let Some(u) = self.update.as_mut() {
            u.phase = phase;
        }
    }

    fn commit(&mut self, up: &Update) -> io::Result<()> {
        let mut boot = self.store.boot()?.unwrap_or_default();
        if up.reboot {
            self.set_progress(
                &up.rev,
                "DONE",
                "Update finished, revision set as rollback point",
            )?;
            self.store.mark_done(&up.rev)?;
            boot.rev = up.rev.clone();
            boot.try_rev = None;
            boot.tried = false;
        } else {
            self.set_progress(
                &up.rev,
                "UPDATED",
                "Update finished, revision not set as rollback point",
            )?;
        }
        self.store.set_boot(&boot)?;
        self.update = None;
        Ok(())
    }

    /// ERROR, then a reboot into the last DONE revision. The `logs` member reads
    /// like Pantavisor's (golden output of `lifecycle/reboot-nonreboot-rollback`).
    fn fail(&mut self, rev: &str, msg: &str) -> io::Result<Power> {
        let tsec = self.tsec();
        let named = match self.rev.outcome(&self.cfg.storage) {
            Outcome::Error(Some(c)) => Some(c),
            _ => None,
        };
        let culprit = named
            .or_else(|| {
                self.update
                    .as_ref()
                    .and_then(|u| u.restarted.iter().next().cloned())
            })
            .or_else(|| self.containers.keys().next().cloned())
            .unwrap_or_default();
        let (src, first) = match msg {
            "A container could not be started" => {
                ("state", format!("platform '{culprit}' is not running"))
            }
            "Status goal not reached" => (
                "state",
                format!("platform '{culprit}' did not reach its status goal"),
            ),
            "Object validation went wrong" => {
                ("storage", "object checksum validation failed".to_owned())
            }
            other => ("updater", other.to_owned()),
        };
        let line = |lvl: &str, src: &str, m: &str| {
            format!(
                "{{\"tsec\":{tsec},\"tnano\":0,\"platform\":\"pantavisor\",\"lvl\":\"{lvl}\",\"src\":\"{src}\",\"msg\":{}}}\n",
                Value::String(m.to_owned())
            )
        };
        let logs = line("ERROR", src, &first)
            + &line(
                "ERROR",
                "controller",
                "a platform did not work as expected. Tearing down...",
            );
        let p = progress_with_logs("ERROR", msg, Some(&logs));
        self.log("ERROR", "updater", &format!("revision {rev}: ERROR {msg}"));
        self.store.set_progress(rev, &p)?;
        let mut boot = self.store.boot()?.unwrap_or_default();
        boot.try_rev = None;
        boot.tried = false;
        self.store.set_boot(&boot)?;
        self.update = None;
        Ok(Power::Reboot)
    }

    /// `pv_update_run`: WONTGO, a reboot transition or a non-reboot transition.
    pub(super) fn run(&mut self, rev: &str, commit: bool) -> io::Result<Option<Power>> {
        let Some(json) = self.store.state_json(rev) else {
            if self.store.trail_exists(rev) {
                self.set_progress(rev, "WONTGO", "State JSON not found")?;
            }
            self.log(
                "ERROR",
                "updater",
                &format!("state JSON of {rev} not found"),
            );
            return Ok(None);
        };
        let new = match Rev::parse(&json) {
            Ok(r) => r,
            Err(_) => {
                self.set_progress(rev, "WONTGO", "State JSON has bad format")?;
                return Ok(None);
            }
        };
        if let Outcome::Wontgo(msg) = new.outcome(&self.cfg.storage) {
            self.set_progress(rev, "WONTGO", &msg)?;
            return Ok(None);
        }
        let objects: Vec<(&str, &str)> = new.objects();
        // Pantavisor does not check objects here (reference §4.1 step 7); the
        // simulator writes down every run of a revision with a missing or partial
        // object so tests can assert that a client never asks for one.
        let bad: Vec<String> = objects
            .iter()
            .filter(|(_, sha)| sha256_file(&self.store.object(sha)).as_deref() != Some(*sha))
            .map(|(path, sha)| format!("{path}={sha}"))
            .collect();
        if !bad.is_empty() {
            self.store.record_bad_run(rev, &bad);
        }
        self.store.link_revision(rev, &objects, &new.jsons());
        let object_set = objects.iter().map(|(_, s)| s.to_string()).collect();
        let mut boot = self.store.boot()?.unwrap_or_default();
        boot.try_rev = Some(rev.to_owned());
        boot.tried = false;
        self.store.set_boot(&boot)?;
        let decision = if commit {
            Err("LOCAL_RUN_COMMIT forces a reboot".to_owned())
        } else {
            transition(&self.rev, &new)
        };
        match decision {
            Err(reason) => {
                self.log(
                    "INFO",
                    "updater",
                    &format!("running {rev} requires reboot: {reason}"),
                );
                self.set_progress(rev, "INPROGRESS", "Rebooting")?;
                self.update = Some(Update {
                    rev: rev.to_owned(),
                    reboot: true,
                    restarted: BTreeSet::new(),
                    objects: object_set,
                    phase: Phase::Rebooting,
                });
                Ok(Some(Power::Reboot))
            }
            Ok(restarted) => {
                self.set_progress(
                    rev,
                    "INPROGRESS",
                    "Transitioning to new revision without rebooting",
                )?;
                let now = Instant::now();
                // A missing or partial object breaks the container that uses it
                // (its squashfs does not mount).
                let missing = objects
                    .iter()
                    .filter(|(p, _)| restarted.contains(crate::sim::revision::owner(p)))
                    .any(|(path, sha)| bad.iter().any(|b| *b == format!("{path}={sha}")));
                self.running = rev.to_owned();
                self.store.set_current(rev)?;
                let plats = new.platforms();
                self.containers.retain(|n, _| plats.contains_key(n));
                for p in plats.values() {
                    if restarted.contains(&p.name) || !self.containers.contains_key(&p.name) {
                        self.containers.insert(p.name.clone(), initial(&p.goal));
                        *self.starts.entry(p.name.clone()).or_default() += 1;
                    }
                }
                let phase = if missing {
                    Phase::Fail {
                        at: now,
                        msg: "A container could not be started".into(),
                    }
                } else {
                    self.phase_for(&new.outcome(&self.cfg.storage), now, false)
                };
                self.rev = new;
                self.update = Some(Update {
                    rev: rev.to_owned(),
                    reboot: false,
                    restarted,
                    objects: object_set,
                    phase,
                });
                Ok(None)
            }
        }
    }

    /// Pantavisor's GC: drop every trail but the running, updating, last DONE (and
    /// factory, if configured) ones, then every object no trail links.
    pub fn gc(&mut self) -> u64 {
        let boot = self.store.boot().ok().flatten().unwrap_or_default();
        let mut keep: BTreeSet<String> = [self.running.clone(), boot.rev.clone()].into();
        if let Some(u) = &self.update {
            keep.insert(u.rev.clone());
        }
        if self.cfg.gc_keep_factory {
            keep.insert("0".into());
        }
        for rev in self.store.revisions() {
            if !keep.contains(&rev) {
                let _ = self.store.remove_trail(&rev);
                self.store.remove_logs(&rev);
                self.log("INFO", "storage", &format!("removed revision {rev}"));
            }
        }
        let protected = self
            .update
            .as_ref()
            .map(|u| u.objects.clone())
            .unwrap_or_default();
        let mut reclaimed = 0;
        for (sha, (size, links)) in self.store.objects() {
            if links <= 1
                && !protected.contains(&sha)
                && std::fs::remove_file(self.store.object(&sha)).is_ok()
            {
                reclaimed += size;
            }
        }
        self.log(
            "INFO",
            "storage",
            &format!("garbage collector reclaimed {reclaimed} bytes"),
        );
        reclaimed
    }
}
