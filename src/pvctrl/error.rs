use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong talking to pv-ctrl. `what` names the request, e.g.
/// `"PUT /steps/locals/r1"`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket is missing or refuses connections (the device may be rebooting).
    #[error("cannot connect to pv-ctrl at {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// No complete answer in time. Pantavisor 024 never answers a rejected command.
    #[error("{what}: no answer from pv-ctrl within {after:?}")]
    Timeout { what: String, after: Duration },
    /// The connection broke mid-request.
    #[error("{what}: connection to pv-ctrl failed: {source}")]
    Io { what: String, source: io::Error },
    /// The answer was not HTTP we understand.
    #[error("{what}: malformed answer from pv-ctrl: {detail}")]
    Protocol { what: String, detail: String },
    /// pv-ctrl answered with an error status; `message` is its `{"Error": ...}` text
    /// (or the raw body when it sent something else).
    #[error("{what}: pv-ctrl answered {status}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// An object whose bytes do not hash to its name (a writable object changed
    /// since it was installed, a partial upload's leftover).
    #[error("{what}: the object's bytes do not match its name: {detail}")]
    BadHash { what: String, detail: String },
    /// A 200 answer whose JSON does not have the expected shape.
    #[error("{what}: unexpected JSON from pv-ctrl: {detail}")]
    Decode { what: String, detail: String },
    /// The call was refused before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A command stayed refused as busy for the whole retry budget.
    #[error("{what}: pv-ctrl still busy after {attempts} attempts over {waited:?}: {last}")]
    Busy {
        what: String,
        attempts: u32,
        waited: Duration,
        last: Box<Error>,
    },
}

/// Text of Pantavisor's refusal while its single command slot is occupied.
pub const BUSY_SLOT_TEXT: &str = "A command is already in progress. Try again";
/// Text of Pantavisor's refusal while an update is active.
pub const UPDATE_ONGOING_TEXT: &str = "Cannot do this operation while update is ongoing";

impl Error {
    /// The HTTP status, for [`Error::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Busy { last, .. } => last.status(),
            _ => None,
        }
    }

    /// Pantavisor's error text, for [`Error::Status`].
    pub fn message(&self) -> Option<&str> {
        match self {
            Self::Status { message, .. } => Some(message),
            Self::Busy { last, .. } => last.message(),
            _ => None,
        }
    }

    /// 404 from pv-ctrl ("Resource does not exist", "User meta does not exist", …).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The command slot was taken (503 from 025, 409 on gen-1); worth a retry soon.
    pub fn is_busy_slot(&self) -> bool {
        matches!(self.status(), Some(503 | 409)) && self.message() == Some(BUSY_SLOT_TEXT)
    }

    /// An update is active; REBOOT, LOCAL_RUN and friends are refused until it ends.
    pub fn is_update_ongoing(&self) -> bool {
        matches!(self.status(), Some(503 | 409)) && self.message() == Some(UPDATE_ONGOING_TEXT)
    }

    /// The device is not reachable right now (socket gone, connection dropped).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Io { .. })
    }
}
