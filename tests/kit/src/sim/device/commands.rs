//! The command slot: `POST /commands` acceptance (`ctrl/ctrl_cmd.c:
//! pv_ctrl_cmd_add`), its processing on a tick (`pantavisor.c: _pv_command`), and
//! BLOCK_REBOOT (`_pv_block_reboot`), where only DEFER_REBOOT is carried out.

use std::io;

use serde_json::Value;

use super::{Cmd, Device, Power};
use crate::sim::Generation;
use crate::sim::wire::Reply;

const MSG_BUSY: &str = "A command is already in progress. Try again";
const MSG_UPDATING: &str = "Cannot do this operation while update is ongoing";

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

impl Device {
    /// The op waiting in the command slot.
    pub fn pending_command(&self) -> Option<&str> {
        self.slot.as_ref().map(|c| c.op)
    }

    /// A debug shell session is open: the test creates `<storage>/sim/debug-shell`
    /// (Pantavisor's `pv_debug_is_shell_open`, with `PV_DEBUG_SHELL=1`).
    pub fn debug_shell_open(&self) -> bool {
        self.cfg.storage.join("sim/debug-shell").exists()
    }

    /// BLOCK_REBOOT (`pantavisor.c: _pv_block_reboot`): DEFER_REBOOT is carried
    /// out; every other command, already answered 200, is dropped. Nothing else
    /// moves until the shell closes; then the held reboot happens.
    pub(super) fn block_reboot(&mut self) -> Option<Power> {
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

    pub(super) fn execute(&mut self, cmd: Cmd) -> io::Result<Option<Power>> {
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
}
