//! The contract between pv-bridge's engine and its backend adapters.
//!
//! An adapter translates one backend protocol (Pantacor Hub, Azure IoT Hub, MQTT, a
//! local directory) into the engine's vocabulary defined here: offers of new
//! revisions, desired user-meta, commands, and — the other way — update progress,
//! device-meta, logs and health. This crate has no I/O dependencies so that an
//! adapter can be read, built and tested on its own.
//!
//! The asynchronous link between engine and adapters (channels, the `Adapter` trait
//! object) is added by the engine issue; the message types below are already final
//! in shape and are what both sides serialise into backend payloads.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Status of an update as reported to backends: Pantavisor's own vocabulary plus the
/// bridge's DOWNLOADING phase and CANCELLED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum UpdateStatus {
    /// Accepted and journaled, waiting for its turn or for the fetch to start.
    Queued,
    /// The bridge is fetching objects.
    Downloading,
    /// Pantavisor is installing or transitioning to the revision.
    Inprogress,
    /// Goals reached; Pantavisor waits for the commit delay.
    Testing,
    /// Final: running after a non-reboot transition, not a rollback point.
    Updated,
    /// Final: committed rollback point.
    Done,
    /// Final: refused before installation started.
    Wontgo,
    /// Final: failed during installation or testing; the device rolled back.
    Error,
    /// Final: withdrawn or superseded before installation started.
    Cancelled,
}

impl UpdateStatus {
    /// Every status, in life-cycle order.
    pub const ALL: [UpdateStatus; 9] = [
        Self::Queued,
        Self::Downloading,
        Self::Inprogress,
        Self::Testing,
        Self::Updated,
        Self::Done,
        Self::Wontgo,
        Self::Error,
        Self::Cancelled,
    ];

    /// True once nothing more will happen to this update.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Updated | Self::Done | Self::Wontgo | Self::Error | Self::Cancelled
        )
    }

    /// True for the final statuses that mean the revision runs.
    pub fn is_success(self) -> bool {
        matches!(self, Self::Updated | Self::Done)
    }

    /// The upper-case wire name (`"INPROGRESS"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Downloading => "DOWNLOADING",
            Self::Inprogress => "INPROGRESS",
            Self::Testing => "TESTING",
            Self::Updated => "UPDATED",
            Self::Done => "DONE",
            Self::Wontgo => "WONTGO",
            Self::Error => "ERROR",
            Self::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for UpdateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of parsing an unknown status name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown update status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for UpdateStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Progress of one update, as mirrored to the backend that owns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The offer id the backend used.
    pub id: String,
    /// The Pantavisor revision name (`locals/<id>`).
    pub rev: String,
    pub status: UpdateStatus,
    /// Human-readable detail, Pantavisor's `status-msg` where it has one.
    pub status_msg: String,
    /// Percentage 0..=100 (Pantavisor's coarse value outside DOWNLOADING).
    pub progress: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub objects_done: u32,
    pub objects_total: u32,
}

/// What a backend can do; the engine routes work only to adapters that declare it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub updates: bool,
    pub user_meta: bool,
    pub device_meta: bool,
    pub logs: bool,
    pub commands: bool,
}

/// Where the bytes of one object come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectSource {
    /// An http or https URL; fetched with Range resume.
    Url { url: String },
    /// Fetched through the adapter itself (e.g. MQTT chunk pull); `key` is the
    /// adapter's own handle for it.
    Adapter { key: String },
}

/// One object an offer needs, addressed by the lower-case hex sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub sha256: String,
    pub size: Option<u64>,
    pub source: ObjectSource,
}

/// A new revision offered by a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Backend-chosen id, `[A-Za-z0-9._-]{1,64}`; the revision is installed as
    /// `locals/<id>`.
    pub id: String,
    /// The state JSON, verbatim as the backend sent it.
    pub state: serde_json::Value,
    /// Sources of the objects the state references, keyed by sha256.
    pub objects: BTreeMap<String, ObjectRef>,
}

/// A command a backend asks the device to carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Reboot,
    Poweroff,
    Gc,
    SshOn,
    SshOff,
    Resync,
    Cancel,
    Ping,
}

/// Outcome of a command, in the order a backend sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Accepted,
    Successful,
    Failed,
    Rejected,
}

/// Events an adapter sends to the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BackendEvent {
    Offer(Offer),
    /// Withdraw the offer with this id (honoured before INPROGRESS).
    Cancel {
        id: String,
    },
    /// The complete desired user-meta owned by this backend.
    UserMeta {
        version: u64,
        data: BTreeMap<String, serde_json::Value>,
    },
    Command {
        id: String,
        kind: CommandKind,
        /// Unix seconds after which the command must be refused.
        expires_at: Option<u64>,
    },
}

/// Errors an adapter reports to its supervisor.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Bad configuration: the adapter cannot run until it is fixed.
    #[error("configuration: {0}")]
    Config(String),
    /// The backend could not be reached or dropped the connection; retried with backoff.
    #[error("connection: {0}")]
    Connection(String),
    /// The backend broke its own protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_through_str_and_json() {
        for st in UpdateStatus::ALL {
            assert_eq!(st.as_str().parse::<UpdateStatus>().unwrap(), st);
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert!("NEW".parse::<UpdateStatus>().is_err());
    }

    #[test]
    fn final_and_success_sets_match_pantavisor() {
        let finals: Vec<_> = UpdateStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        use UpdateStatus::*;
        assert_eq!(finals, vec![Updated, Done, Wontgo, Error, Cancelled]);
        assert!(Done.is_success() && Updated.is_success() && !Error.is_success());
    }

    #[test]
    fn events_serialise_with_a_tag() {
        let ev = BackendEvent::Cancel { id: "r1".into() };
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({"event": "cancel", "id": "r1"})
        );
    }
}
