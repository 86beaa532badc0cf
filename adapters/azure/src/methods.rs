//! Direct methods: names, payloads and what they ask of the engine.
//!
//! | method | payload | answer |
//! |---|---|---|
//! | `ping`, `gc`, `resync`, `cancel` | none | 200 when done, 500 when it failed, 202 when still running after `method_wait_secs` |
//! | `ssh` | `{"enable": true\|false}` | as above |
//! | `reboot`, `poweroff` | none | 202 at once; the outcome goes to reported `pantavisor.commands` |
//! | `update` | the desired `revision` object | 202 with the id; progress in reported `pantavisor.update` |

use pv_adapter_api::CommandKind;
use serde_json::{Value, json};

use crate::twin::{self, DesiredRevision};

/// Every method the bridge answers.
pub const METHODS: [&str; 8] = [
    "reboot", "poweroff", "gc", "ssh", "resync", "cancel", "ping", "update",
];

/// Largest method payload the hub delivers.
pub const MAX_PAYLOAD: usize = 128 * 1024;

/// What a method call asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Command(CommandKind),
    Update(DesiredRevision),
}

/// True for commands that answer 202 at once (the device goes away).
pub fn answers_at_once(k: &CommandKind) -> bool {
    matches!(k, CommandKind::Reboot | CommandKind::Poweroff)
}

/// Parses a call; the error is the status and message to answer with.
pub fn parse(name: &str, payload: &[u8]) -> Result<Action, (u16, String)> {
    if payload.len() > MAX_PAYLOAD {
        return Err((
            413,
            format!("payload of {} bytes (limit {MAX_PAYLOAD})", payload.len()),
        ));
    }
    let body: Value = if payload.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(payload).map_err(|e| (400, format!("payload is not JSON: {e}")))?
    };
    let no_args = |kind: CommandKind| match &body {
        Value::Null => Ok(Action::Command(kind)),
        Value::Object(o) if o.is_empty() => Ok(Action::Command(kind)),
        other => Err((
            400,
            format!("{name} takes no payload, got {}", twin::kind(other)),
        )),
    };
    match name {
        "reboot" => no_args(CommandKind::Reboot),
        "poweroff" => no_args(CommandKind::Poweroff),
        "gc" => no_args(CommandKind::Gc),
        "resync" => no_args(CommandKind::Resync),
        "cancel" => no_args(CommandKind::Cancel),
        "ping" => no_args(CommandKind::Ping),
        "ssh" => match body.get("enable") {
            Some(Value::Bool(true)) => Ok(Action::Command(CommandKind::SshOn)),
            Some(Value::Bool(false)) => Ok(Action::Command(CommandKind::SshOff)),
            _ => Err((400, "ssh needs {\"enable\": true|false}".into())),
        },
        "update" => DesiredRevision::parse(&body)
            .map(Action::Update)
            .map_err(|e| (400, e)),
        other => Err((
            404,
            format!(
                "no method {other:?}; the bridge answers {}",
                METHODS.join(", ")
            ),
        )),
    }
}

/// An error answer body.
pub fn error_body(message: &str) -> Value {
    json!({"error": message})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_map_to_engine_actions() {
        assert_eq!(
            parse("reboot", b"").unwrap(),
            Action::Command(CommandKind::Reboot)
        );
        assert_eq!(
            parse("ping", b"null").unwrap(),
            Action::Command(CommandKind::Ping)
        );
        assert_eq!(
            parse("gc", b"{}").unwrap(),
            Action::Command(CommandKind::Gc)
        );
        assert_eq!(
            parse("ssh", br#"{"enable": false}"#).unwrap(),
            Action::Command(CommandKind::SshOff)
        );
        let sha = "b".repeat(64);
        let up = format!(r#"{{"id":"r9","stateUrl":"https://x/s","stateSha256":"{sha}"}}"#);
        assert!(
            matches!(parse("update", up.as_bytes()).unwrap(), Action::Update(r) if r.id == "r9")
        );
        for (name, body, status, want) in [
            ("reboot", &b"{\"now\": 1}"[..], 400, "takes no payload"),
            ("ssh", b"", 400, "enable"),
            ("update", b"{}", 400, "revision.id is missing"),
            ("update", b"{", 400, "not JSON"),
            ("selfdestruct", b"", 404, "no method \"selfdestruct\""),
        ] {
            let (s, m) = parse(name, body).unwrap_err();
            assert_eq!(s, status, "{name}");
            assert!(m.contains(want), "{name}: {m}");
        }
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(parse("ping", &big).unwrap_err().0, 413);
    }
}
