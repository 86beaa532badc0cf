//! The simulated Pantavisor: running revision, containers, the one-slot command
//! queue consumed on each tick, the update state machine and garbage collection.
//! Everything here is synchronous; the async layer in `mod.rs` calls it under a lock.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::revision::{Outcome, Rev, transition};
use super::store::{MetaKind, Store};
use super::wire::Reply;
use super::{Generation, SimConfig, factory};

pub const MSG_BUSY: &str = "A command is already in progress. Try again";
pub const MSG_UPDATING: &str = "Cannot do this operation while update is ongoing";

/// Command ops in Pantavisor's enum order (`ctrl/ctrl_cmd.h`); `op` prefixes are
/// matched against them in this order.
const OPS_GEN2: [&str; 15] = [
    "UPDATE_METADATA",
    "REBOOT_DEVICE",
    "POWEROFF_DEVICE",
    "TRY_ONCE",
    "LOCAL_RUN",
    "MAKE_FACTORY",
    "RUN_GC",
    "ENABLE_SSH",
    "DISABLE_SSH",
    "GO_REMOTE",
    "DEFER_REBOOT",
    "LOCAL_RUN_COMMIT",
    "LOCAL_APPLY",
    "XCONNECT_GRAPH",
    "UNCLAIM",
];
/// Pantavisor 020–023 knows the first twelve.
const OPS_GEN1: usize = 12;

/// What the device asks its runner to do after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Reboot,
    Poweroff,
}

#[derive(Debug, Clone)]
struct Cmd {
    op: &'static str,
    payload: String,
}

#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for every status goal; `never` simulates a goal that is not reached.
    Goals {
        deadline: Instant,
        never: bool,
    },
    Testing {
        until: Instant,
    },
    Fail {
        at: Instant,
        msg: String,
    },
    /// The reboot into the new revision is pending.
    Rebooting,
}

#[derive(Debug, Clone)]
struct Update {
    rev: String,
    reboot: bool,
    restarted: BTreeSet<String>,
    objects: BTreeSet<String>,
    phase: Phase,
}

/// Runtime state of one container.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub status: &'static str,
    pub user_stopped: bool,
}

pub struct Device {
    cfg: SimConfig,
    store: Store,
    booted: Instant,
    running: String,
    rev: Rev,
    containers: BTreeMap<String, Runtime>,
    slot: Option<Cmd>,
    update: Option<Update>,
    ssh: Option<bool>,
    loaded: BTreeSet<(String, String)>,
    daemons: BTreeMap<&'static str, i64>,
    log_credit: f64,
    log_seq: u64,
    last_log: Instant,
    /// How many times each container was started since this boot.
    starts: BTreeMap<String, u64>,
    /// BLOCK_REBOOT: a reboot is due but a debug shell holds it.
    held: bool,
}

/// A progress object, byte for byte as Pantavisor writes it
/// (`update/update_progress.c: _ser_progress`).
pub fn progress_json(status: &str, msg: &str) -> String {
    progress_with_logs(status, msg, None)
}

fn progress_with_logs(status: &str, msg: &str, logs: Option<&str>) -> String {
    let pct = match status {
        "NEW" => 0,
        "QUEUED" => 5,
        "DOWNLOADING" => 25,
        "INPROGRESS" => 50,
        "TESTING" => 75,
        _ => 100,
    };
    let q = |s: &str| Value::String(s.to_owned()).to_string();
    let logs = logs
        .map(|l| format!(",\"logs\":{}", q(l)))
        .unwrap_or_default();
    format!(
        "{{\"status\":{},\"status-msg\":{},\"progress\":{pct},\"retries\":0{logs}}}",
        q(status),
        q(msg)
    )
}

fn is_final(p: &Value) -> bool {
    matches!(
        p.get("status").and_then(Value::as_str),
        Some("DONE" | "UPDATED" | "ERROR" | "WONTGO")
    )
}

pub fn sha256_file(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(hex(&h.finalize()))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Device {
    /// Boots the device from its storage, creating the factory revision first if
    /// the storage is new.
    pub fn boot(cfg: SimConfig) -> io::Result<Device> {
        let store = Store::new(&cfg.storage).with_log_rotation(cfg.log_rotation());
        store.init()?;
        let mut boot = match store.boot()? {
            Some(b) => b,
            None => factory::create(&store)?,
        };
        let now = Instant::now();
        let mut dev = Device {
            store,
            booted: now,
            running: String::new(),
            rev: Rev {
                doc: Default::default(),
            },
            containers: BTreeMap::new(),
            slot: None,
            update: None,
            ssh: None,
            loaded: BTreeSet::new(),
            daemons: [("hwrngd", 0), ("pv-xconnect", 412)].into_iter().collect(),
            log_credit: 0.0,
            log_seq: 0,
            last_log: now,
            starts: BTreeMap::new(),
            held: false,
            cfg,
        };
        // The bootloader: try a pending revision once; after a try that did not
        // commit, fall back to the last DONE revision.
        let mut trying = None;
        match boot.try_rev.clone() {
            Some(t) if !boot.tried => {
                boot.tried = true;
                dev.store.set_boot(&boot)?;
                trying = Some(t);
            }
            Some(t) => {
                if dev.store.progress(&t).is_some_and(|p| !is_final(&p)) {
                    dev.store
                        .set_progress(&t, &progress_json("ERROR", "Unexpected rollback"))?;
                    dev.log(
                        "ERROR",
                        "updater",
                        &format!("revision {t} failed to commit: Unexpected rollback"),
                    );
                }
                boot.try_rev = None;
                boot.tried = false;
                dev.store.set_boot(&boot)?;
            }
            None => {}
        }
        let load = |rev: &str| dev.store.state_json(rev).and_then(|j| Rev::parse(&j).ok());
        if let Some(t) = trying.clone().filter(|t| load(t).is_none()) {
            // The try revision cannot even be parsed: it fails and the bootloader
            // falls back to the last DONE revision.
            dev.store
                .set_progress(&t, &progress_json("ERROR", "State JSON has bad format"))?;
            boot.try_rev = None;
            boot.tried = false;
            dev.store.set_boot(&boot)?;
            trying = None;
        }
        let target = trying.clone().unwrap_or_else(|| boot.rev.clone());
        let rev = load(&target).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot boot: revision {target} has no valid state JSON"),
            )
        })?;
        dev.running = target.clone();
        dev.rev = rev;
        dev.store.set_current(&target)?;
        dev.containers = dev
            .rev
            .platforms()
            .values()
            .map(|p| (p.name.clone(), initial(&p.goal)))
            .collect();
        dev.starts = dev.containers.keys().map(|n| (n.clone(), 1)).collect();
        dev.log("INFO", "pantavisor", &format!("booted revision {target}"));
        for name in dev.containers.keys() {
            dev.store.append_log(
                &target,
                name,
                "lxc/lxc.log",
                &format!("lxc-start {name} 20261126 container started\n"),
            );
        }
        if let Some(t) = trying {
            dev.set_progress(&t, "INPROGRESS", "Trying new revision")?;
            let objects: BTreeSet<String> = dev
                .rev
                .objects()
                .iter()
                .map(|(_, s)| s.to_string())
                .collect();
            let bad = dev
                .rev
                .objects()
                .into_iter()
                .find(|(_, sha)| sha256_file(&dev.store.object(sha)).as_deref() != Some(*sha));
            let phase = if let Some((path, _)) = bad {
                dev.log(
                    "ERROR",
                    "storage",
                    &format!("object {path} failed validation"),
                );
                Phase::Fail {
                    at: now,
                    msg: "Object validation went wrong".into(),
                }
            } else {
                dev.phase_for(&dev.rev.outcome(), now, true)
            };
            dev.update = Some(Update {
                rev: t,
                reboot: true,
                restarted: dev.containers.keys().cloned().collect(),
                objects,
                phase,
            });
        }
        dev.refresh_device_meta();
        Ok(dev)
    }

    /// The first phase of a revision that starts running: `at_boot` when it is
    /// tried in a boot, else in a non-reboot transition.
    fn phase_for(&self, outcome: &Outcome, now: Instant, at_boot: bool) -> Phase {
        match outcome {
            Outcome::Error(_) => Phase::Fail {
                at: now + self.cfg.tick,
                msg: "A container could not be started".into(),
            },
            Outcome::ErrorAfterReboot if at_boot => Phase::Fail {
                at: now + self.cfg.tick,
                msg: "A container could not be started".into(),
            },
            Outcome::GoalTimeout => Phase::Goals {
                deadline: now + self.cfg.goals_timeout,
                never: true,
            },
            _ => Phase::Goals {
                deadline: now + self.cfg.goals_timeout,
                never: false,
            },
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn running(&self) -> &str {
        &self.running
    }

    /// How many times `container` was started since the last boot (0: not running).
    pub fn starts(&self, container: &str) -> u64 {
        self.starts.get(container).copied().unwrap_or(0)
    }

    /// The op waiting in the command slot.
    pub fn pending_command(&self) -> Option<&str> {
        self.slot.as_ref().map(|c| c.op)
    }

    pub fn update_active(&self) -> bool {
        self.update.is_some()
    }

    fn tsec(&self) -> u64 {
        self.booted.elapsed().as_secs()
    }

    /// Appends to `pantavisor/pantavisor.log` in Pantavisor's line format.
    pub fn log(&self, level: &str, module: &str, msg: &str) {
        let line = format!(
            "[pantavisor] {} {level}\t -- [{module}]: {msg}\n",
            self.tsec()
        );
        self.store
            .append_log(&self.running, "pantavisor", "pantavisor.log", &line);
    }

    fn set_progress(&self, rev: &str, status: &str, msg: &str) -> io::Result<()> {
        self.log(
            "INFO",
            "updater",
            &format!("revision {rev}: {status} {msg}"),
        );
        self.store.set_progress(rev, &progress_json(status, msg))
    }

    // --- ticks -------------------------------------------------------------------

    /// One turn of Pantavisor's WAIT state: run the queued command, move the update
    /// along, write logs. Returns a power action for the runner to carry out.
    pub fn tick(&mut self, now: Instant) -> io::Result<Option<Power>> {
        self.write_container_logs(now);
        let action = if self.held {
            self.block_reboot()
        } else {
            self.wait(now)?
        };
        if action == Some(Power::Reboot) && self.debug_shell_open() {
            // `_pv_reboot`: a reboot waits in BLOCK_REBOOT while a debug shell is open.
            if !self.held {
                self.log(
                    "INFO",
                    "pantavisor",
                    "holding on reboot because shell is opened",
                );
            }
            self.held = true;
            return Ok(None);
        }
        self.held = false;
        Ok(action)
    }

    /// A debug shell session is open: the test creates `<storage>/sim/debug-shell`
    /// (Pantavisor's `pv_debug_is_shell_open`, with `PV_DEBUG_SHELL=1`).
    pub fn debug_shell_open(&self) -> bool {
        self.cfg.storage.join("sim/debug-shell").exists()
    }

    /// BLOCK_REBOOT (`pantavisor.c: _pv_block_reboot`): DEFER_REBOOT is carried
    /// out; every other command, already answered 200, is dropped. Nothing else
    /// moves until the shell closes; then the held reboot happens.
    fn block_reboot(&mut self) -> Option<Power> {
        if let Some(cmd) = self.slot.take() {
            if cmd.op == "DEFER_REBOOT" {
                self.log(
                    "DEBUG",
                    "pantavisor",
                    &format!(
                        "defer reboot command received, new timeout '{}'",
                        cmd.payload
                    ),
                );
            } else {
                self.log(
                    "WARN",
                    "pantavisor",
                    "cmd received but ignored. Only defer-reboot cmd allowed in this state",
                );
            }
        }
        Some(Power::Reboot)
    }

    /// The WAIT state proper.
    fn wait(&mut self, now: Instant) -> io::Result<Option<Power>> {
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
        let named = match self.rev.outcome() {
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

    fn execute(&mut self, cmd: Cmd) -> io::Result<Option<Power>> {
        self.log(
            "INFO",
            "ctrl",
            &format!("processing command {} {:?}", cmd.op, cmd.payload),
        );
        // `_pv_command`: these are ignored, after their 200, when an update is in
        // progress by the time the command is processed.
        let ignored = match cmd.op {
            "REBOOT_DEVICE" => Some("reboot"),
            "POWEROFF_DEVICE" => Some("poweroff"),
            "LOCAL_RUN" => Some("install local"),
            "LOCAL_RUN_COMMIT" => Some("local run commit"),
            "MAKE_FACTORY" => Some("make factory"),
            _ => None,
        };
        if let Some(what) = ignored.filter(|_| self.update.is_some()) {
            self.log(
                "WARN",
                "pantavisor",
                &format!("ignoring {what} command because an update is in progress"),
            );
            return Ok(None);
        }
        match cmd.op {
            "REBOOT_DEVICE" => return Ok(Some(Power::Reboot)),
            "POWEROFF_DEVICE" => return Ok(Some(Power::Poweroff)),
            "LOCAL_RUN" => return self.run(&cmd.payload, false),
            "LOCAL_RUN_COMMIT" => return self.run(&cmd.payload, true),
            "MAKE_FACTORY" => {
                let src = if cmd.payload.is_empty() {
                    self.running.clone()
                } else {
                    cmd.payload.clone()
                };
                if let Some(j) = self.store.state_json(&src) {
                    self.store.put_state_json("0", &j)?;
                    return self.run("0", false);
                }
                self.log(
                    "WARN",
                    "ctrl",
                    &format!("MAKE_FACTORY: revision {src} not found"),
                );
            }
            "RUN_GC" => {
                self.gc();
            }
            "ENABLE_SSH" => self.ssh = Some(true),
            "DISABLE_SSH" => self.ssh = Some(false),
            "DEFER_REBOOT" => self.log(
                "DEBUG",
                "pantavisor",
                &format!(
                    "defer reboot command received, new timeout '{}'",
                    cmd.payload
                ),
            ),
            other => self.log("WARN", "ctrl", &format!("unknown command {other}")),
        }
        Ok(None)
    }

    /// `pv_update_run`: WONTGO, a reboot transition or a non-reboot transition.
    fn run(&mut self, rev: &str, commit: bool) -> io::Result<Option<Power>> {
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
        if let Outcome::Wontgo(msg) = new.outcome() {
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
                    .filter(|(p, _)| restarted.contains(super::revision::owner(p)))
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
                    self.phase_for(&new.outcome(), now, false)
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

    fn write_container_logs(&mut self, now: Instant) {
        let dt = now.duration_since(self.last_log).as_secs_f64();
        self.last_log = now;
        self.log_credit = (self.log_credit + dt * self.cfg.log_rate).min(10_000.0);
        let running: Vec<String> = self
            .containers
            .iter()
            .filter(|(_, c)| matches!(c.status, "STARTED" | "READY"))
            .map(|(n, _)| n.clone())
            .collect();
        if running.is_empty() {
            return;
        }
        let mut batches: BTreeMap<(&str, &str), String> = BTreeMap::new();
        while self.log_credit >= 1.0 {
            self.log_credit -= 1.0;
            self.log_seq += 1;
            let name = &running[(self.log_seq as usize) % running.len()];
            let round = self.log_seq / running.len() as u64;
            let source = if round % 4 == 0 {
                "var/log/syslog"
            } else {
                "lxc/console.log"
            };
            batches
                .entry((name, source))
                .or_default()
                .push_str(&format!(
                    "{name}: synthetic log line {} at {}s\n",
                    self.log_seq,
                    self.tsec()
                ));
        }
        for ((name, source), text) in batches {
            self.store.append_log(&self.running, name, source, &text);
        }
    }

    fn refresh_device_meta(&self) {
        let used = self.store.used_bytes();
        let total = self.cfg.capacity;
        let free = total.saturating_sub(used);
        let reserved = total * 5 / 100;
        let storage = json!({"total": total, "free": free, "reserved": reserved,
                              "real_free": free.saturating_sub(reserved)});
        let status = if self.update.is_some() {
            "UPDATING"
        } else {
            "READY"
        };
        let version = match self.cfg.generation {
            Generation::Gen1 => "023-sim-261126",
            Generation::Gen2 => "029-sim-261126",
        };
        let entries: [(&str, String); 14] = [
            (
                "pantavisor.arch",
                format!("{}/64/EL", std::env::consts::ARCH),
            ),
            ("pantavisor.version", version.into()),
            ("pantavisor.dtmodel", "pv-sim".into()),
            ("pantavisor.cpumodel", "pv-sim virtual cpu".into()),
            ("pantavisor.revision", self.running.clone()),
            ("pantavisor.mode", "local".into()),
            ("pantavisor.status", status.into()),
            (
                "pantavisor.uname",
                json!({"sysname": "Linux", "machine": std::env::consts::ARCH}).to_string(),
            ),
            ("storage", storage.to_string()),
            (
                "sysinfo",
                json!({"uptime": self.tsec(), "loads": [0, 0, 0], "procs": 42}).to_string(),
            ),
            ("pantahub.claimed", "0".into()),
            ("pantahub.online", "0".into()),
            ("interfaces", json!({"lo": ["127.0.0.1"]}).to_string()),
            ("time", {
                // gettimeofday(2), as `metadata.c: pv_devmeta_time` writes it.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                json!({"timeval": {"tv_sec": t.as_secs(), "tv_usec": t.subsec_micros()}})
                    .to_string()
            }),
        ];
        for (k, v) in entries {
            let _ = self.store.set_meta(MetaKind::Device, k, v.as_bytes());
        }
    }

    // --- pv-ctrl operations --------------------------------------------------------

    /// The platform a caller's process belongs to, or `None` (unknown caller).
    pub fn caller_mgmt(&self, caller: &str) -> Option<bool> {
        self.rev.platforms().get(caller).map(|p| p.mgmt)
    }

    /// `POST /commands` acceptance (`ctrl/ctrl_cmd.c: pv_ctrl_cmd_add`).
    pub fn submit(&mut self, body: &[u8]) -> Reply {
        match self.accept(body) {
            Reply::Error { .. } if self.cfg.pv_024 => Reply::Silence,
            other => other,
        }
    }

    fn accept(&mut self, body: &[u8]) -> Reply {
        let gen1 = self.cfg.generation == Generation::Gen1;
        if body.is_empty() {
            return Reply::err(400, "No command found");
        }
        let bad = || Reply::err(400, "Command has bad format");
        let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
            return bad();
        };
        let (Some(Value::String(op)), Some(payload)) = (m.get("op"), m.get("payload")) else {
            return bad();
        };
        let known = if gen1 {
            &OPS_GEN2[..OPS_GEN1]
        } else {
            &OPS_GEN2[..]
        };
        let Some(op) = known
            .iter()
            .copied()
            .find(|name| name.starts_with(op.as_str()))
        else {
            return bad();
        };
        let payload = match payload {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let refuse = |code: u16, text: &str, retry: Option<u32>| {
            if gen1 {
                Reply::err(409, text)
            } else {
                Reply::Error {
                    code,
                    text: text.into(),
                    retry_after: retry,
                    then_ok: false,
                }
            }
        };
        if op == "UPDATE_METADATA" {
            return refuse(409, "Cannot do this operation while on local mode", None);
        }
        if self.update.is_some()
            && matches!(
                op,
                "REBOOT_DEVICE"
                    | "POWEROFF_DEVICE"
                    | "LOCAL_RUN"
                    | "LOCAL_RUN_COMMIT"
                    | "MAKE_FACTORY"
                    | "UNCLAIM"
            )
        {
            return refuse(503, MSG_UPDATING, Some(600));
        }
        if op == "GO_REMOTE" {
            return refuse(
                409,
                "Cannot do this operation when remote mode is disabled by config",
                None,
            );
        }
        if op == "DEFER_REBOOT" && !self.debug_shell_open() {
            return refuse(
                409,
                "Cannot do this operation when debug shell is not active",
                None,
            );
        }
        if op == "UNCLAIM" {
            return Reply::NoContent;
        }
        if self.slot.is_some() {
            return refuse(503, MSG_BUSY, Some(120));
        }
        self.slot = Some(Cmd { op, payload });
        Reply::Ok
    }

    /// `POST /signal`.
    pub fn signal(&mut self, caller: &str, body: &[u8]) -> Reply {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let Some(kind) = v.get("type").and_then(Value::as_str) else {
            return Reply::err(400, "Signal has bad format");
        };
        let goal_ready = self
            .rev
            .platforms()
            .get(caller)
            .is_some_and(|p| p.goal == "READY");
        if kind != "ready" || !goal_ready {
            return Reply::err(500, "Signal not expected from this platform");
        }
        if let Some(c) = self.containers.get_mut(caller) {
            c.status = "READY";
        }
        self.log(
            "INFO",
            "state",
            &format!("platform {caller} signalled ready"),
        );
        Reply::Ok
    }

    pub fn containers_json(&self) -> Vec<u8> {
        let gen2 = self.cfg.generation == Generation::Gen2;
        let list: Vec<ContainerOut> = self
            .rev
            .platforms()
            .values()
            .map(|p| {
                let rt = self
                    .containers
                    .get(&p.name)
                    .cloned()
                    .unwrap_or_else(|| initial(&p.goal));
                ContainerOut {
                    name: p.name.clone(),
                    group: p.group.clone(),
                    status: rt.status,
                    status_goal: p.goal.clone(),
                    restart_policy: if p.system { "system" } else { "container" },
                    roles: if p.mgmt { vec!["mgmt"] } else { vec![] },
                    auto_recovery: (gen2 && p.auto_recovery).then(|| {
                        json!({"policy": "on-failure",
                        "max_retries": 5, "current_retries": 0, "stable_timeout": 30,
                        "is_stable": "true", "backoff_policy": "reboot"})
                    }),
                    user_stopped: (gen2 && !p.system).then_some(if rt.user_stopped {
                        "true"
                    } else {
                        "false"
                    }),
                }
            })
            .collect();
        serde_json::to_vec(&list).unwrap_or_default()
    }

    pub fn groups_json(&self) -> Vec<u8> {
        let plats = self.rev.platforms();
        let mut groups: Vec<(String, String, bool)> = [
            ("data", "MOUNTED", true),
            ("root", "STARTED", true),
            ("platform", "STARTED", true),
            ("app", "STARTED", false),
        ]
        .into_iter()
        .map(|(n, g, s)| (n.to_owned(), g.to_owned(), s))
        .collect();
        for p in plats.values() {
            if !groups.iter().any(|g| g.0 == p.group) {
                groups.push((p.group.clone(), p.goal.clone(), p.system));
            }
        }
        let gen2 = self.cfg.generation == Generation::Gen2;
        let list: Vec<GroupOut> = groups
            .into_iter()
            .map(|(name, status_goal, system)| GroupOut {
                name,
                status_goal,
                restart_policy: if system { "system" } else { "container" },
                status: "READY",
                auto_recovery: (!system && gen2).then(
                    || json!({"max_retries": 5, "stable_timeout": 30, "backoff_policy": "reboot"}),
                ),
            })
            .collect();
        serde_json::to_vec(&list).unwrap_or_default()
    }

    /// `PUT /containers/<name>` (027+).
    pub fn container_action(&mut self, name: &str, body: &[u8]) -> Reply {
        let plats = self.rev.platforms();
        let Some(p) = plats.get(name) else {
            return Reply::err(404, "Container not found");
        };
        if p.system {
            return Reply::err(
                403,
                "Container has restart_policy 'system' and cannot be controlled via API",
            );
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return Reply::err(400, "Invalid JSON");
        };
        let Some(action) = v.get("action").and_then(Value::as_str) else {
            return Reply::err(400, "Missing 'action' field");
        };
        let Some(rt) = self.containers.get_mut(name) else {
            return Reply::err(404, "Container not found");
        };
        match action {
            "stop" => {
                rt.status = "STOPPED";
                rt.user_stopped = true;
            }
            "start" => {
                if !matches!(rt.status, "STOPPED" | "STOPPING" | "RECOVERING") {
                    return Reply::err(
                        400,
                        "Container must be in STOPPED, STOPPING, or RECOVERING state to start",
                    );
                }
                *rt = initial(&p.goal);
                *self.starts.entry(name.to_owned()).or_default() += 1;
            }
            "restart" => {
                if !matches!(rt.status, "STARTED" | "READY" | "RECOVERING") {
                    return Reply::err(400, "Container state does not allow restart");
                }
                *rt = initial(&p.goal);
                *self.starts.entry(name.to_owned()).or_default() += 1;
            }
            _ => return Reply::err(400, "Invalid action. Use 'start', 'stop', or 'restart'"),
        }
        self.log("INFO", "ctrl", &format!("container {name}: {action}"));
        Reply::Ok
    }

    pub fn drivers_json(&self, caller: &str) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct DriverOut {
            name: String,
            #[serde(rename = "type")]
            kind: &'static str,
            status: &'static str,
        }
        let plats = self.rev.platforms();
        let drivers = plats
            .get(caller)
            .map(|p| p.drivers.clone())
            .unwrap_or_default();
        if drivers.is_empty() {
            return b"{}".to_vec();
        }
        let list: Vec<DriverOut> = drivers
            .into_iter()
            .map(|(name, kind)| {
                let loaded =
                    kind != "MANUAL" || self.loaded.contains(&(caller.to_owned(), name.clone()));
                DriverOut {
                    name,
                    kind,
                    status: if loaded { "LOADED" } else { "UNLOADED" },
                }
            })
            .collect();
        serde_json::to_vec(&list).unwrap_or_default()
    }

    pub fn driver_action(&mut self, caller: &str, name: Option<&str>, load: bool) -> Reply {
        let plats = self.rev.platforms();
        let manual: Vec<String> = plats
            .get(caller)
            .map(|p| {
                p.drivers
                    .iter()
                    .filter(|d| d.1 == "MANUAL")
                    .map(|d| d.0.clone())
                    .collect()
            })
            .unwrap_or_default();
        let targets: Vec<String> = match name {
            Some("") => return Reply::err(400, "No driver name"),
            Some(n) if manual.iter().any(|m| m == n) => vec![n.to_owned()],
            Some(_) => return Reply::err(400, "Error loading driver(s)"),
            None => manual,
        };
        for t in targets {
            let key = (caller.to_owned(), t);
            if load {
                self.loaded.insert(key);
            } else {
                self.loaded.remove(&key);
            }
        }
        Reply::Ok
    }

    pub fn daemons_json(&self) -> Value {
        Value::Array(
            self.daemons
                .iter()
                .map(|(n, pid)| json!({"name": n, "pid": pid, "respawn": true}))
                .collect(),
        )
    }

    pub fn daemon_action(&mut self, name: &str, body: &[u8]) -> Reply {
        let Some(pid) = self.daemons.get_mut(name) else {
            return Reply::err(404, "Daemon not found");
        };
        let action = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("action").and_then(Value::as_str).map(str::to_owned));
        match action.as_deref() {
            Some("start") => *pid = 1000 + name.len() as i64,
            Some("stop") => *pid = 0,
            _ => {}
        }
        Reply::Ok
    }

    pub fn config_json(&self) -> Value {
        json!({
            "bootloader.type": 0, "control.remote": false, "control.remote.always": false,
            "debug.shell": false, "debug.ssh": self.ssh.unwrap_or(false), "log.push": false,
            "log.server.outputs": 1, "secureboot.mode": 2, "storage.gc.keep_factory": self.cfg.gc_keep_factory,
            "storage.gc.reserved": 5, "updater.commit.delay": self.cfg.commit_delay.as_secs(),
            "updater.goals.timeout": self.cfg.goals_timeout.as_secs()
        })
    }

    pub fn config2_json(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            key: &'a str,
            value: String,
            modified: &'a str,
        }
        let e = |key, value, modified| Entry {
            key,
            value,
            modified,
        };
        let list = [
            e("PH_CREDS_PRN", "(null)".into(), "default"),
            e("PH_CREDS_SECRET", "(null)".into(), "default"),
            e("PV_CONTROL_REMOTE", "0".into(), "env"),
            e("PV_CONTROL_REMOTE_ALWAYS", "0".into(), "default"),
            e("PV_DEBUG_SHELL", "0".into(), "default"),
            e(
                "PV_DEBUG_SSH",
                if self.ssh.unwrap_or(false) { "1" } else { "0" }.into(),
                if self.ssh.is_some() {
                    "command"
                } else {
                    "default"
                },
            ),
            e("PV_LOG_PUSH", "0".into(), "default"),
            e("PV_LOG_SERVER_OUTPUTS", "filetree".into(), "default"),
            e("PV_SECUREBOOT_MODE", "lenient".into(), "default"),
            e(
                "PV_STORAGE_GC_KEEP_FACTORY",
                if self.cfg.gc_keep_factory { "1" } else { "0" }.into(),
                "args",
            ),
            e("PV_STORAGE_GC_RESERVED", "5".into(), "default"),
            e(
                "PV_UPDATER_COMMIT_DELAY",
                self.cfg.commit_delay.as_secs().to_string(),
                "args",
            ),
            e(
                "PV_UPDATER_GOALS_TIMEOUT",
                self.cfg.goals_timeout.as_secs().to_string(),
                "args",
            ),
        ];
        serde_json::to_vec(&list).unwrap_or_default()
    }

    pub fn free_bytes(&self) -> u64 {
        let reserved = self.cfg.capacity * 5 / 100;
        self.cfg
            .capacity
            .saturating_sub(reserved)
            .saturating_sub(self.store.used_bytes())
    }

    /// `GET /steps` text: Pantavisor prints a space after each comma.
    pub fn steps_text(&self) -> String {
        let items: Vec<String> = self
            .store
            .revisions()
            .into_iter()
            .map(|rev| {
                let progress = self
                    .store
                    .progress_raw(&rev)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|| "{}".into());
                let date = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(self.store.trail_mtime(&rev).max(0) as u64),
                );
                format!(
                    "{{\"name\":{}, \"date\":\"{date}\", \"commitmsg\":{}, \"progress\":{progress}}}",
                    Value::String(rev.clone()),
                    Value::String(self.store.commitmsg(&rev)),
                )
            })
            .collect();
        format!("[{}]", items.join(", "))
    }
}

/// `GET /containers` entries, fields in Pantavisor's order.
#[derive(serde::Serialize)]
struct ContainerOut {
    name: String,
    group: String,
    status: &'static str,
    status_goal: String,
    restart_policy: &'static str,
    roles: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_recovery: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_stopped: Option<&'static str>,
}

/// `GET /groups` entries, fields in Pantavisor's order.
#[derive(serde::Serialize)]
struct GroupOut {
    name: String,
    status_goal: String,
    restart_policy: &'static str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    auto_recovery: Option<Value>,
}

/// The status a container has right after it starts.
fn initial(goal: &str) -> Runtime {
    Runtime {
        status: if goal == "MOUNTED" {
            "MOUNTED"
        } else {
            "STARTED"
        },
        user_stopped: false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `_pv_command` checks again when it processes a command: one that was
    /// accepted before an update became active is ignored, not carried out.
    #[test]
    fn commands_processed_during_an_update_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SimConfig::fast(dir.path().join("s"), dir.path().join("sock"));
        let mut dev = Device::boot(cfg).unwrap();
        let mut state: Value =
            serde_json::from_slice(&dev.store().state_json("0").unwrap()).unwrap();
        state["app/extra.json"] = json!({"x": 1});
        dev.store()
            .put_state_json("locals/a", state.to_string().as_bytes())
            .unwrap();
        dev.slot = Some(Cmd {
            op: "LOCAL_RUN",
            payload: "locals/a".into(),
        });
        assert_eq!(dev.tick(Instant::now()).unwrap(), None, "non-reboot update");
        assert!(dev.update_active());
        for op in ["REBOOT_DEVICE", "POWEROFF_DEVICE", "LOCAL_RUN"] {
            dev.slot = Some(Cmd {
                op,
                payload: "locals/a".into(),
            });
            assert_eq!(dev.tick(Instant::now()).unwrap(), None, "{op} ignored");
        }
        let log =
            std::fs::read_to_string(dir.path().join("s/logs/locals/a/pantavisor/pantavisor.log"))
                .unwrap();
        for what in ["reboot", "poweroff", "install local"] {
            assert!(
                log.contains(&format!(
                    "ignoring {what} command because an update is in progress"
                )),
                "{log}"
            );
        }
    }
}
