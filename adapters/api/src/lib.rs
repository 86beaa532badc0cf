//! The contract between pv-bridge's engine and its backend adapters.
//!
//! An adapter translates one backend protocol (Pantacor Hub, Azure IoT Hub, MQTT, a
//! local directory) into the engine's vocabulary defined here: offers of new
//! revisions, desired user-meta, commands, and — the other way — update progress,
//! device-meta, logs and health. This crate has no I/O dependencies so that an
//! adapter can be read, built and tested on its own.
//!
//! An adapter implements [`Adapter`]; the engine runs it with an [`EngineLink`]
//! through which it sends [`BackendEvent`]s and watches its [`DeviceView`].
//! See `docs/writing-an-adapter.md`.

pub mod attempts;
pub mod durable;
pub mod secrets;
pub mod timing;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch};

/// A boxed, sendable future (the trait methods below return these so that adapters
/// can be trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
    /// Pantavisor's log lines about a failure (newline-separated JSON), when it
    /// gave any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
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

impl Capabilities {
    /// Everything: updates, user-meta, device-meta, logs and commands.
    pub const ALL: Capabilities = Capabilities {
        updates: true,
        user_meta: true,
        device_meta: true,
        logs: true,
        commands: true,
    };
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

/// Streams the bytes of objects an adapter provides itself (a file on a USB stick,
/// MQTT chunk pulls, a signed URL fetched lazily).
pub trait ObjectFetcher: Send + Sync {
    /// Opens the object the adapter named `key`, returning its reader and length.
    fn open(&self, key: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>>;

    /// For objects whose URL the adapter can only name when the fetch starts (the
    /// signed, expiring URLs of Pantacor Hub): the http(s) URL to download with the
    /// engine's downloader (Range resume, retries, cache), or `None` to stream
    /// [`ObjectFetcher::open`] instead. Called once per fetch.
    fn url(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, AdapterError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }
}

/// Read access to what the device stores, for adapters that mirror it to their
/// backend (Pantacor Hub's factory sync uploads the running revision).
pub trait DeviceStore: Send + Sync {
    /// The state JSON of the revision `rev`, byte for byte as Pantavisor keeps it.
    fn state(&self, rev: &str) -> BoxFuture<'_, Result<Vec<u8>, AdapterError>>;
    /// Opens a stored object: its reader and length. The reader fails (never ends
    /// short silently) when the device cannot deliver all the bytes, and at the
    /// end with [`std::io::ErrorKind::InvalidData`] when they do not hash to
    /// `sha` (a writable object that changed since it was installed).
    fn object(&self, sha: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>>;
    /// Sets one device-meta key on the device itself (what an adapter wants local
    /// users and containers to see, such as a claim challenge); `None` deletes it.
    fn set_device_meta<'a>(
        &'a self,
        key: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AdapterError>>;
}

/// A state JSON to download: its URL and the sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateUrl {
    pub url: String,
    pub sha256: String,
}

/// The bytes of one object.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// A new revision offered by a backend.
#[derive(Clone)]
pub struct Offer {
    /// Backend-chosen id, `[A-Za-z0-9._-]{1,64}`; the revision is installed as
    /// `locals/<id>`.
    pub id: String,
    /// The state JSON, byte for byte as the backend sent it (signatures cover it).
    /// Empty when `state_url` is set.
    pub state: Vec<u8>,
    /// Where the engine downloads the state instead (states too big for the
    /// backend's messages); its bytes must hash to the given sha256.
    pub state_url: Option<StateUrl>,
    /// Sources of the objects the state references, keyed by sha256. Objects the
    /// device already has need no source.
    pub objects: BTreeMap<String, ObjectRef>,
    /// Opens [`ObjectSource::Adapter`] objects.
    pub fetcher: Option<Arc<dyn ObjectFetcher>>,
}

impl fmt::Debug for Offer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offer")
            .field("id", &self.id)
            .field("state_bytes", &self.state.len())
            .field("state_url", &self.state_url)
            .field("objects", &self.objects.len())
            .field("fetcher", &self.fetcher.is_some())
            .finish()
    }
}

/// Reads a secret (key, token, password) from a `*_file` setting. Call it on every
/// (re)connect, so a rotated secret needs no restart. Surrounding white space is
/// trimmed; an empty file is an error. The error names the file, never the content.
pub fn read_secret(setting: &str, path: &std::path::Path) -> Result<String, AdapterError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AdapterError::Config(format!("{setting}: cannot read {}: {e}", path.display()))
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(AdapterError::Config(format!(
            "{setting}: {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_owned())
}

/// Lower-case hex of bytes (how Pantavisor writes sha256 digests).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// True for exactly 64 lower-case hex digits: how Pantavisor names objects.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// True for ids an offer may carry: `[A-Za-z0-9._-]{1,64}`, not `.` or `..`.
pub fn valid_offer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

impl CommandKind {
    /// The command's name in backend protocols (`ssh` for both SSH kinds).
    pub fn name(&self) -> &'static str {
        match self {
            CommandKind::Reboot => "reboot",
            CommandKind::Poweroff => "poweroff",
            CommandKind::Gc => "gc",
            CommandKind::SshOn | CommandKind::SshOff => "ssh",
            CommandKind::Resync => "resync",
            CommandKind::Cancel => "cancel",
            CommandKind::Ping => "ping",
        }
    }
}

/// Adds, for every object `state` names (a top-level value that is a sha256) and
/// `objects` does not list yet, a URL source from `template` (`{sha256}` replaced).
pub fn objects_from_template(
    state: &serde_json::Map<String, serde_json::Value>,
    template: &str,
    objects: &mut BTreeMap<String, ObjectRef>,
) {
    for v in state.values() {
        if let serde_json::Value::String(sha) = v {
            if is_sha256_hex(sha) && !objects.contains_key(sha) {
                objects.insert(
                    sha.clone(),
                    ObjectRef {
                        sha256: sha.clone(),
                        size: None,
                        source: ObjectSource::Url {
                            url: template.replace("{sha256}", sha),
                        },
                    },
                );
            }
        }
    }
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
#[derive(Debug, Clone)]
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
    /// The backend link is up: the engine may signal the device ready.
    Connected,
    /// The backend link is down, and why.
    Disconnected {
        reason: String,
    },
    /// Something a person at the device must do for this backend (claim it on
    /// the hub with a challenge, …), or `None` once done. Shown only locally
    /// (D-Bus `Notices`), never to another backend: it may hold a secret.
    Notice {
        text: Option<String>,
    },
}

/// Where a command stands. The engine keeps the latest of each id in
/// [`DeviceView::commands`]; an adapter may see `successful` without having seen
/// `accepted` (views coalesce), so it reports both when needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: String,
    pub kind: CommandKind,
    pub status: CommandStatus,
    /// Why it failed or was rejected, or a detail of success.
    pub reason: Option<String>,
}

/// One log line, as Pantavisor and Pantacor Hub describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The record's position in the engine's log spool, given when it is spooled:
    /// unique per device and increasing. Delivery is at-least-once, and a record sent
    /// again carries the same `seq`, so consumers can drop the copies.
    #[serde(default)]
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub tsec: i64,
    /// Nanoseconds within the second.
    pub tnano: u32,
    /// Level: DEBUG, INFO, WARN, ERROR, …
    pub lvl: String,
    /// The platform (container) or `pantavisor`.
    pub plat: String,
    /// The source within the platform (`lxc/console.log`, a Pantavisor module, …).
    pub src: String,
    pub msg: String,
    /// The revision whose log directory the line came from (a failed try
    /// revision's lines keep its name after the rollback); empty when unknown.
    #[serde(default)]
    pub rev: String,
}

/// Log records handed to one adapter. Ack `next` once they are delivered; until
/// then the same records are offered again (at-least-once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogBatch {
    /// Position of the first record in the engine's spool.
    pub first: u64,
    /// Position after the last record: what to pass to [`LogFeed::ack`].
    pub next: u64,
    pub records: Vec<LogRecord>,
    /// Records this adapter will never see, since its previous batch (spool caps,
    /// rate limits).
    pub dropped: u64,
}

/// The engine's log spool as one adapter sees it.
pub trait LogFeed: Send + Sync {
    /// Waits for records after this backend's last ack, up to the given bounds.
    fn next(&self, backend: &str, max_records: usize, max_bytes: usize) -> BoxFuture<'_, LogBatch>;
    /// Marks everything before `next` delivered.
    fn ack(&self, backend: &str, next: u64);
}

/// Health of one backend as the engine sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub connected: bool,
    pub last_error: Option<String>,
    /// Unix seconds of the last success.
    pub last_success: Option<u64>,
}

/// What an adapter sees of the device; the engine updates it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceView {
    /// The running revision.
    pub running: Option<String>,
    /// Progress of the latest update this adapter offered.
    pub update: Option<Progress>,
    /// Device-meta as last read from Pantavisor.
    pub device_meta: BTreeMap<String, serde_json::Value>,
    /// Health of every backend, by name.
    pub health: BTreeMap<String, Health>,
    /// The latest state of this backend's recent commands, by id.
    pub commands: BTreeMap<String, CommandResult>,
    /// User-meta as applied, once this backend's desired map has been applied.
    pub user_meta: Option<AppliedUserMeta>,
}

/// The device's user-meta after the engine applied a backend's desired map.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppliedUserMeta {
    /// The `version` of the backend's desired map that is now in effect.
    pub version: u64,
    /// The device's whole user-meta (every key, whichever backend set it).
    pub data: BTreeMap<String, serde_json::Value>,
}

/// An event tagged with the backend that sent it.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub backend: String,
    pub event: BackendEvent,
}

/// An adapter's side of its connection to the engine.
#[derive(Clone)]
pub struct EngineLink {
    backend: String,
    events: mpsc::Sender<Envelope>,
    view: watch::Receiver<DeviceView>,
    logs: Option<Arc<dyn LogFeed>>,
    stop: Option<watch::Receiver<bool>>,
    device: Option<Arc<dyn DeviceStore>>,
}

impl fmt::Debug for EngineLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineLink")
            .field("backend", &self.backend)
            .field("logs", &self.logs.is_some())
            .finish()
    }
}

impl EngineLink {
    /// Made by the engine for each adapter it runs.
    pub fn new(
        backend: &str,
        events: mpsc::Sender<Envelope>,
        view: watch::Receiver<DeviceView>,
    ) -> Self {
        Self {
            backend: backend.to_owned(),
            events,
            view,
            logs: None,
            stop: None,
            device: None,
        }
    }

    /// With read access to the device's store.
    pub fn with_device(mut self, store: Arc<dyn DeviceStore>) -> Self {
        self.device = Some(store);
        self
    }

    /// The device's store, when the engine gave access to it.
    pub fn device(&self) -> Option<Arc<dyn DeviceStore>> {
        self.device.clone()
    }

    /// With the engine's stop signal.
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Completes when the engine is stopping: say goodbye to the backend (the
    /// engine waits up to 2 s) and return `Ok(())`.
    pub async fn stopping(&self) {
        match self.stop.clone() {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending::<()>().await,
        }
    }

    /// With the engine's log feed (when logs are on for this backend).
    pub fn with_logs(mut self, feed: Arc<dyn LogFeed>) -> Self {
        self.logs = Some(feed);
        self
    }

    /// The next batch of log records for this backend; `None` when logs are off.
    pub async fn next_logs(&self, max_records: usize, max_bytes: usize) -> Option<LogBatch> {
        let feed = self.logs.as_ref()?;
        Some(feed.next(&self.backend, max_records, max_bytes).await)
    }

    /// Acknowledges delivery of everything before `next` (from [`LogBatch::next`]).
    pub fn ack_logs(&self, next: u64) {
        if let Some(feed) = &self.logs {
            feed.ack(&self.backend, next);
        }
    }

    /// The configured name of this backend.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Sends an event; fails only when the engine has stopped.
    pub async fn send(&self, event: BackendEvent) -> Result<(), AdapterError> {
        self.events
            .send(Envelope {
                backend: self.backend.clone(),
                event,
            })
            .await
            .map_err(|_| AdapterError::EngineGone)
    }

    /// A receiver of this adapter's device view.
    pub fn view(&self) -> watch::Receiver<DeviceView> {
        self.view.clone()
    }
}

/// A backend adapter. `run` owns the adapter until it returns; the engine's
/// supervisor builds a fresh one to restart it.
pub trait Adapter: Send + 'static {
    /// The configured backend name.
    fn name(&self) -> &str;
    fn capabilities(&self) -> Capabilities;
    /// Runs until the engine stops (`Ok`) or the adapter fails (`Err`).
    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>>;
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
    /// Reading an adapter-provided object failed.
    #[error("object {key}: {reason}")]
    Object { key: String, reason: String },
    /// The engine stopped; the adapter should return.
    #[error("the engine has stopped")]
    EngineGone,
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
    fn secrets_are_read_trimmed_and_never_echoed() {
        let dir = std::env::temp_dir().join(format!("pv-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "  s3cr3t\n").unwrap();
        assert_eq!(read_secret("password_file", &f).unwrap(), "s3cr3t");
        std::fs::write(&f, "\n").unwrap();
        let e = read_secret("password_file", &f).unwrap_err().to_string();
        assert!(e.contains("is empty") && !e.contains("s3cr3t"), "{e}");
        let e = read_secret("password_file", &dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("configuration: password_file: cannot read "),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn offer_ids_follow_the_protocol() {
        for ok in ["r1", "v1.2.3", "a_b-c", &"x".repeat(64)] {
            assert!(valid_offer_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_offer_id(bad), "{bad:?}");
        }
    }
}
