//! What the other pv-ctrl endpoints read and change: callers' roles, `/signal`,
//! containers and groups, drivers, daemons, config, free space and `/steps`.

use serde_json::{Value, json};

use std::time::Duration;

use super::{ContainerOut, Device, GroupOut, initial};
use crate::sim::Generation;
use crate::sim::wire::Reply;

impl Device {
    /// The platform a caller's process belongs to, or `None` (unknown caller).
    pub fn caller_mgmt(&self, caller: &str) -> Option<bool> {
        self.rev.platforms().get(caller).map(|p| p.mgmt)
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
