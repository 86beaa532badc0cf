//! Commands from backends (architecture.md §4): reboot, poweroff, gc, ssh on/off,
//! resync, cancel and ping, carried out through pv-ctrl.
//!
//! Each command is deduplicated by (backend, id) in a durable journal, refused after
//! its `expires_at`, and answered `accepted`, durably, before anything destructive
//! happens. A reboot or power-off takes the bridge down with the device; on the
//! next start the journal turns the `accepted` into `successful`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pv_adapter_api::{CommandKind, CommandResult, CommandStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Views;
use crate::pvctrl::{Command, PvCtrl};

/// Commands remembered for deduplication.
const KEEP: usize = 256;
/// Results kept in each adapter's view.
const KEEP_IN_VIEW: usize = 32;

/// A command to carry out.
#[derive(Debug, Clone)]
pub struct Request {
    pub backend: String,
    pub id: String,
    pub kind: CommandKind,
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    backend: String,
    result: CommandResult,
    /// When a reboot or power-off was accepted (ms since the epoch): after a
    /// restart, the device's uptime tells whether it booted since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accepted_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Doc {
    entries: Vec<Entry>,
}

fn now() -> u64 {
    now_ms() / 1000
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// When the device booted (ms since the epoch), from one device-meta refresh:
/// `time` (gettimeofday) minus `sysinfo.uptime` (whole seconds), both written by
/// the same refresh (`metadata.c`), so a stale device-meta (none is written in
/// BLOCK_REBOOT) still gives the right boot. At most a second late; a device is up
/// for more than a second before it takes a command, so a boot after the command
/// is never mistaken. Without `time`, `read_ms` (when device-meta was read) stands
/// in, which a stale device-meta can fool.
fn boot_ms(meta: &BTreeMap<String, serde_json::Value>, read_ms: u64) -> Option<u64> {
    let field = |key: &str| -> Option<serde_json::Value> {
        match meta.get(key)? {
            // Values that are objects come embedded; a string may hold JSON.
            serde_json::Value::String(s) => serde_json::from_str(s).ok(),
            v => Some(v.clone()),
        }
    };
    let uptime = field("sysinfo")?.get("uptime")?.as_u64()?;
    let at = field("time")
        .and_then(|t| {
            let tv = t.get("timeval")?;
            Some(tv.get("tv_sec")?.as_u64()? * 1000 + tv.get("tv_usec")?.as_u64()? / 1000)
        })
        .unwrap_or(read_ms);
    Some(at.saturating_sub(uptime.saturating_mul(1000)))
}

/// The command executor.
pub struct Commands {
    pv: PvCtrl,
    views: Views,
    resync: mpsc::Sender<()>,
    slot: super::arbiter::Shared,
    path: PathBuf,
    doc: Doc,
}

impl Commands {
    pub fn new(
        pv: PvCtrl,
        views: Views,
        resync: mpsc::Sender<()>,
        state_dir: &Path,
        slot: super::arbiter::Shared,
    ) -> Self {
        let path = state_dir.join("journal/commands.json");
        let doc = super::journal::load_json(&path);
        Self {
            pv,
            views,
            resync,
            slot,
            path,
            doc,
        }
    }

    /// Finishes what a restart interrupted, then serves requests.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        self.recover().await;
        while let Some(r) = requests.recv().await {
            self.handle(r).await;
        }
    }

    fn save(&self) {
        super::journal::save_json(&self.path, &self.doc, "command journal");
    }

    fn find(&self, backend: &str, id: &str) -> Option<&CommandResult> {
        self.doc
            .entries
            .iter()
            .find(|e| e.backend == backend && e.result.id == id)
            .map(|e| &e.result)
    }

    /// Journals (durably) and reports a command's new state.
    fn record(&mut self, backend: &str, result: CommandResult) {
        self.record_at(backend, result, None);
    }

    fn record_at(&mut self, backend: &str, result: CommandResult, accepted_ms: Option<u64>) {
        self.doc
            .entries
            .retain(|e| !(e.backend == backend && e.result.id == result.id));
        self.doc.entries.push(Entry {
            backend: backend.to_owned(),
            result: result.clone(),
            accepted_ms,
        });
        let excess = self.doc.entries.len().saturating_sub(KEEP);
        self.doc.entries.drain(..excess);
        self.save();
        self.report(backend, result);
    }

    fn report(&self, backend: &str, result: CommandResult) {
        if let Some(v) = self.views.get(backend) {
            v.send_modify(|view| {
                view.commands.insert(result.id.clone(), result.clone());
                while view.commands.len() > KEEP_IN_VIEW {
                    // Drop the oldest by journal order.
                    let oldest = self
                        .doc
                        .entries
                        .iter()
                        .filter(|e| e.backend == backend)
                        .map(|e| e.result.id.clone())
                        .find(|id| view.commands.contains_key(id));
                    match oldest {
                        Some(id) => view.commands.remove(&id),
                        None => break,
                    };
                }
            });
        }
    }

    /// After a restart: a reboot or power-off that was accepted is successful if the
    /// device booted since (its uptime says so), and failed if only the bridge
    /// restarted; anything else that was accepted was interrupted.
    async fn recover(&mut self) {
        let pending: Vec<Entry> = self
            .doc
            .entries
            .iter()
            .filter(|e| e.result.status == CommandStatus::Accepted)
            .cloned()
            .collect();
        let mut boot = None;
        for e in pending {
            let mut r = e.result.clone();
            if matches!(r.kind, CommandKind::Reboot | CommandKind::Poweroff) {
                if boot.is_none() {
                    boot = Some(self.device_boot().await);
                }
                let (status, reason) = match (e.accepted_ms, boot.flatten()) {
                    (Some(at), Some(booted)) if booted > at => {
                        (CommandStatus::Successful, "the device restarted".to_owned())
                    }
                    (Some(at), Some(booted)) => (
                        CommandStatus::Failed,
                        format!(
                            "the device did not restart (up since {} s before the \
                             command): only the bridge restarted",
                            at.saturating_sub(booted) / 1000
                        ),
                    ),
                    _ => (
                        CommandStatus::Failed,
                        "the bridge restarted, but whether the device did cannot be told \
                         (no uptime in device-meta sysinfo)"
                            .to_owned(),
                    ),
                };
                r.status = status;
                r.reason = Some(reason);
            } else {
                r.status = CommandStatus::Failed;
                r.reason = Some("interrupted by a restart of the bridge".into());
            }
            info!(backend = %e.backend, id = %r.id, status = ?r.status, reason = ?r.reason, "command outcome after restart");
            self.record(&e.backend, r);
        }
        let latest: Vec<Entry> = self.doc.entries.clone();
        for e in latest {
            self.report(&e.backend, e.result);
        }
    }

    /// When the device booted (see [`boot_ms`]). pv-ctrl may still be coming up:
    /// a few tries.
    async fn device_boot(&self) -> Option<u64> {
        for attempt in 0..10u32 {
            match self.pv.meta(crate::pvctrl::Meta::Device).await {
                Ok(m) => return boot_ms(&m, now_ms()),
                Err(e) if e.is_unreachable() && attempt < 9 => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot read device-meta to tell whether the device restarted");
                    return None;
                }
            }
        }
        None
    }

    async fn handle(&mut self, req: Request) {
        let Request {
            backend,
            id,
            kind,
            expires_at,
        } = req;
        if let Some(done) = self.find(&backend, &id).cloned() {
            info!(backend = %backend, id = %id, status = ?done.status, "duplicate command; not run again");
            self.report(&backend, done);
            return;
        }
        let result = |status, reason: Option<String>| CommandResult {
            id: id.clone(),
            kind: kind.clone(),
            status,
            reason,
        };
        if let Some(t) = expires_at.filter(|t| *t <= now()) {
            warn!(backend = %backend, id = %id, "command expired");
            self.record(
                &backend,
                result(CommandStatus::Rejected, Some(format!("expired at {t}"))),
            );
            return;
        }
        // Staged objects and the staged trail are not yet Pantavisor's: GC deletes
        // them (link count 1) and a reboot cuts uploads short. Refused, not
        // deferred: the sender decides whether to cancel the update or wait.
        if matches!(
            kind,
            CommandKind::Reboot | CommandKind::Poweroff | CommandKind::Gc
        ) {
            if let Some(update) = super::arbiter::in_progress(&self.slot) {
                let why = format!(
                    "refused while {update}: a {} now would destroy or cut short its work; \
                     cancel the update or send the command again after its final status",
                    kind.name()
                );
                warn!(backend = %backend, id = %id, reason = %why, "command refused");
                self.record(&backend, result(CommandStatus::Rejected, Some(why)));
                return;
            }
        }
        let at = matches!(kind, CommandKind::Reboot | CommandKind::Poweroff).then(now_ms);
        self.record_at(&backend, result(CommandStatus::Accepted, None), at);
        info!(backend = %backend, id = %id, kind = ?kind, "command accepted");
        let outcome: Result<Option<String>, String> = match &kind {
            CommandKind::Ping => Ok(Some("pong".into())),
            CommandKind::Reboot | CommandKind::Poweroff => {
                let why = format!("requested by backend {backend} (command {id})");
                let cmd = if kind == CommandKind::Reboot {
                    Command::Reboot(why.replace(['"', '\\'], ""))
                } else {
                    Command::Poweroff(why.replace(['"', '\\'], ""))
                };
                match self.pv.command(cmd).await {
                    // The device goes down now; the journal finishes this after it.
                    Ok(_) => return,
                    Err(e) if e.is_update_ongoing() => Err("an update is in progress".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
            CommandKind::Gc => match self.pv.storage_gc().await {
                Ok(r) => Ok(Some(format!("reclaimed {} bytes", r.reclaimed))),
                // Before Pantavisor 029 there is no synchronous GC: queue RUN_GC.
                Err(e) if e.status() == Some(400) => self
                    .pv
                    .command(Command::RunGc)
                    .await
                    .map(|_| Some("garbage collection queued".into()))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            CommandKind::SshOn | CommandKind::SshOff => {
                let cmd = if kind == CommandKind::SshOn {
                    Command::EnableSsh
                } else {
                    Command::DisableSsh
                };
                self.pv
                    .command(cmd)
                    .await
                    .map(|_| None)
                    .map_err(|e| e.to_string())
            }
            CommandKind::Resync => self
                .resync
                .send(())
                .await
                .map(|_| None)
                .map_err(|_| "the metadata task has stopped".into()),
            CommandKind::Cancel => {
                let reason = format!("cancelled by backend {backend} (command {id})");
                match super::arbiter::cancel(&self.slot, &backend, None, &reason) {
                    Ok((update, Some(job))) => {
                        super::report_final(
                            &self.views,
                            &job.backend,
                            &update,
                            pv_adapter_api::UpdateStatus::Cancelled,
                            &reason,
                        );
                        Ok(Some(format!("update {update} cancelled")))
                    }
                    Ok((update, None)) => Ok(Some(format!("update {update} cancelled"))),
                    Err(why) => Err(why),
                }
            }
        };
        let r = match outcome {
            Ok(detail) => result(CommandStatus::Successful, detail),
            Err(why) => {
                warn!(backend = %backend, id = %id, reason = %why, "command failed");
                result(CommandStatus::Failed, Some(why))
            }
        };
        self.record(&backend, r);
    }
}

/// Results by id, for tests and adapters that want a plain map.
pub type Results = BTreeMap<String, CommandResult>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_is_told_from_one_refresh_of_device_meta() {
        let meta = |time: &str, uptime: u64| -> BTreeMap<String, serde_json::Value> {
            BTreeMap::from([
                ("time".to_owned(), serde_json::from_str(time).unwrap()),
                (
                    "sysinfo".to_owned(),
                    serde_json::json!({"uptime": uptime, "procs": 3}),
                ),
            ])
        };
        let m = meta(r#"{"timeval":{"tv_sec":1000000,"tv_usec":250000}}"#, 30);
        // However late it is read, the same refresh gives the same boot.
        assert_eq!(boot_ms(&m, 1_000_000_000), Some(999_970_250));
        assert_eq!(boot_ms(&m, 2_000_000_000), Some(999_970_250));
        // Without `time`, the read time stands in.
        let m = BTreeMap::from([("sysinfo".to_owned(), serde_json::json!({"uptime": 5}))]);
        assert_eq!(boot_ms(&m, 10_000), Some(5_000));
        assert_eq!(boot_ms(&BTreeMap::new(), 10_000), None);
        // A string holding JSON, as some versions store it.
        let m = BTreeMap::from([(
            "sysinfo".to_owned(),
            serde_json::Value::String(r#"{"uptime": 7}"#.into()),
        )]);
        assert_eq!(boot_ms(&m, 10_000), Some(3_000));
    }
}
