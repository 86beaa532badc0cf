//! The simulated Pantavisor: running revision, containers, the one-slot command
//! queue consumed on each tick, the update state machine and garbage collection.
//! Everything here is synchronous; the async layer in `mod.rs` calls it under a lock.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::Instant;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::revision::{Outcome, Rev};
use super::store::{MetaKind, Store};
use super::{Generation, SimConfig, factory};

mod commands;
mod endpoints;
mod update;

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
            None => factory::create(&store, cfg.object_pool.as_deref())?,
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
                dev.phase_for(&dev.rev.outcome(&dev.cfg.storage), now, true)
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
