//! Client for Pantavisor's local control socket, pv-ctrl.
//!
//! Every endpoint of the pv-ctrl reference is covered, against both server
//! generations: gen-1 (Pantavisor ≤ 023: one request per connection, empty reason
//! phrases, an error followed by `200 OK`) and gen-2 (024+, libevent). Each request
//! uses a fresh connection, as the device may reboot at any moment. Commands are
//! retried while Pantavisor's single command slot is busy.
//!
//! ```no_run
//! # async fn demo() -> Result<(), pv_bridge::pvctrl::Error> {
//! use pv_bridge::pvctrl::{Command, PvCtrl};
//! let pv = PvCtrl::new("/pantavisor/pv-ctrl");
//! for c in pv.containers().await? {
//!     println!("{} {}", c.name, c.status);
//! }
//! let rev = "locals/r1".parse().expect("a valid local revision name");
//! pv.command(Command::LocalRun(rev)).await?;
//! # Ok(()) }
//! ```

mod error;
mod http;
mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::debug;

pub use error::{BUSY_SLOT_TEXT, Error, UPDATE_ONGOING_TEXT};
pub use types::{
    AutoRecovery, ConfigEntry, Container, Daemon, Driver, GcReport, Group, ObjectInfo, Progress,
    PvStatus, Step,
};

use crate::state::{Revision, is_sha256_hex};
use http::{Body, Framing, Head};

/// The socket path inside a Pantavisor container.
pub const DEFAULT_SOCKET: &str = "/pantavisor/pv-ctrl";
/// Largest body Pantavisor takes on `/signal`, `/commands` and metadata PUTs; gen-1
/// wants strictly less than 4096 bytes, so this is the bound for both.
pub const MAX_SMALL_BODY: usize = 4095;
/// Largest commit message (`/steps/<rev>/commitmsg`).
pub const MAX_COMMITMSG: usize = 256;

/// Timeouts and retry policy of a [`PvCtrl`] client.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connecting to the socket.
    pub connect_timeout: Duration,
    /// A whole ordinary request, connect included.
    pub request_timeout: Duration,
    /// A whole object upload or download.
    pub transfer_timeout: Duration,
    /// One `/commands` attempt. Pantavisor 024 never answers a rejected command, so
    /// a timeout here counts as "busy".
    pub command_timeout: Duration,
    /// Total time spent retrying a busy command before giving up.
    pub command_retry_budget: Duration,
    /// Wait between busy retries when the server gives no usable `Retry-After`.
    pub busy_retry_wait: Duration,
    /// Cap on an honoured `Retry-After`. Pantavisor says 120 s for a busy slot that
    /// frees within one 1–2 s tick.
    pub retry_after_cap: Duration,
    /// Largest JSON or text response accepted.
    pub max_response_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(240),
            transfer_timeout: Duration::from_secs(4 * 3600),
            command_timeout: Duration::from_secs(10),
            command_retry_budget: Duration::from_secs(60),
            busy_retry_wait: Duration::from_secs(1),
            retry_after_cap: Duration::from_secs(2),
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A pv-ctrl command (`POST /commands`).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Remote mode only: adds the first key/value pair to device-meta.
    UpdateMetadata(serde_json::Map<String, Value>),
    /// Graceful reboot; the message is only logged.
    Reboot(String),
    /// Graceful power-off; the message is only logged.
    Poweroff(String),
    /// Run a staged revision.
    LocalRun(Revision),
    /// Run a revision and force the reboot path, so it ends DONE.
    LocalRunCommit(Revision),
    /// Unclaimed devices only: make a revision (or the running one) the factory one.
    MakeFactory(Option<Revision>),
    RunGc,
    EnableSsh,
    DisableSsh,
    GoRemote,
    /// New reboot-hold timeout in seconds (debug shell only).
    DeferReboot(u32),
    /// 029+: forget the Pantacor Hub credentials.
    Unclaim,
    /// Any other op, sent verbatim (e.g. TRY_ONCE, which no Pantavisor implements).
    Raw {
        op: String,
        payload: String,
    },
}

impl Command {
    fn op_and_payload(&self) -> (&str, Payload) {
        use Payload::Text;
        match self {
            Self::UpdateMetadata(m) => ("UPDATE_METADATA", Payload::Json(Value::Object(m.clone()))),
            Self::Reboot(msg) => ("REBOOT_DEVICE", Text(msg.clone())),
            Self::Poweroff(msg) => ("POWEROFF_DEVICE", Text(msg.clone())),
            Self::LocalRun(r) => ("LOCAL_RUN", Text(r.to_string())),
            Self::LocalRunCommit(r) => ("LOCAL_RUN_COMMIT", Text(r.to_string())),
            Self::MakeFactory(r) => (
                "MAKE_FACTORY",
                Text(r.as_ref().map(ToString::to_string).unwrap_or_default()),
            ),
            Self::RunGc => ("RUN_GC", Text(String::new())),
            Self::EnableSsh => ("ENABLE_SSH", Text(String::new())),
            Self::DisableSsh => ("DISABLE_SSH", Text(String::new())),
            Self::GoRemote => ("GO_REMOTE", Text(String::new())),
            Self::DeferReboot(secs) => ("DEFER_REBOOT", Text(secs.to_string())),
            Self::Unclaim => ("UNCLAIM", Text(String::new())),
            Self::Raw { op, payload } => (op, Text(payload.clone())),
        }
    }

    /// The request body, refusing payloads Pantavisor would garble: it does not
    /// unescape JSON strings, so `"`, `\` and control characters cannot be sent.
    pub fn to_body(&self) -> Result<Vec<u8>, Error> {
        let (op, payload) = self.op_and_payload();
        check_raw_text("command op", op)?;
        let payload = match payload {
            Payload::Text(t) => {
                check_raw_text("command payload", &t)?;
                Value::String(t)
            }
            Payload::Json(v) => v,
        };
        let body = serde_json::json!({"op": op, "payload": payload});
        let body = serde_json::to_vec(&body).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if body.len() > MAX_SMALL_BODY {
            return Err(Error::InvalidArgument(format!(
                "command body is {} bytes; pv-ctrl accepts at most {MAX_SMALL_BODY}",
                body.len()
            )));
        }
        Ok(body)
    }
}

enum Payload {
    Text(String),
    Json(Value),
}

fn check_raw_text(what: &str, s: &str) -> Result<(), Error> {
    if let Some(c) = s
        .chars()
        .find(|c| *c == '"' || *c == '\\' || c.is_control())
    {
        return Err(Error::InvalidArgument(format!(
            "{what} {s:?} contains {c:?}, which Pantavisor's JSON reader does not unescape"
        )));
    }
    Ok(())
}

/// How pv-ctrl took a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    /// 200: queued in the command slot; carried out on the next tick.
    Queued,
    /// 204: nothing to do (GO_REMOTE while remote, UNCLAIM while unclaimed).
    AlreadyInEffect,
}

/// `PUT /containers/<name>` actions (027+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerAction {
    Start,
    Stop,
    Restart,
}

/// `PUT /daemons/<name>` actions (027+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonAction {
    Start,
    Stop,
}

/// Which pv-ctrl implementation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// Pantavisor ≤ 023: hand-written server.
    Gen1,
    /// Pantavisor 024+: libevent server.
    Gen2,
}

/// What [`PvCtrl::probe`] learnt about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub generation: Generation,
    /// Device-meta `pantavisor.version` (`<git describe>-<yymmdd>`), when present.
    pub version: Option<String>,
}

/// Which metadata store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// Cloud → device (`/user-meta`).
    User,
    /// Device → cloud (`/device-meta`).
    Device,
}

impl Meta {
    fn path(self) -> &'static str {
        match self {
            Self::User => "/user-meta",
            Self::Device => "/device-meta",
        }
    }
}

/// A raw answer with a small body.
struct Response {
    head: Head,
    body: Vec<u8>,
}

/// A pv-ctrl client. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct PvCtrl {
    socket: PathBuf,
    opts: Options,
}

/// Validates one path segment taken from the caller (meta key, container name…).
/// Pantavisor does not percent-decode, so only visible ASCII without `/`, `?`, `#`
/// and `%` can travel.
fn check_segment(what: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '/' | '?' | '#' | '%'))
    {
        return Err(Error::InvalidArgument(format!(
            "{what} {s:?} contains {c:?}; pv-ctrl paths are not decoded, so only visible \
             ASCII without '/', '?', '#' and '%' is allowed"
        )));
    }
    Ok(())
}

fn check_sha(sha: &str) -> Result<(), Error> {
    if is_sha256_hex(sha) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "object id {sha:?} is not a sha256 (64 lower-case hex digits)"
        )))
    }
}

/// `/steps/<rev>` for a revision name or the alias `current`.
fn step_path(rev: &str) -> Result<String, Error> {
    if rev != "current" {
        rev.parse::<Revision>()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    }
    Ok(format!("/steps/{rev}"))
}

fn retry_after(head: &Head) -> Option<Duration> {
    head.header("retry-after")?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

fn status_error(what: &str, head: &Head, body: &[u8]) -> Error {
    let message = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) if m.get("Error").is_some_and(Value::is_string) => {
            m["Error"].as_str().unwrap_or_default().to_owned()
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                if head.reason.is_empty() {
                    "(empty body)".to_owned()
                } else {
                    head.reason.clone()
                }
            } else {
                text.chars().take(512).collect()
            }
        }
    };
    Error::Status {
        what: what.to_owned(),
        status: head.status,
        message,
        retry_after: retry_after(head),
    }
}

/// Decides whether a failed command attempt is worth another try, and when.
fn command_retry_wait(err: &Error, opts: &Options) -> Option<Duration> {
    match err {
        e if e.is_busy_slot() => {
            let hinted = match e {
                Error::Status { retry_after, .. } => *retry_after,
                _ => None,
            };
            Some(hinted.map_or(opts.busy_retry_wait, |d| d.min(opts.retry_after_cap)))
        }
        // Pantavisor 024 drops rejected commands without an answer.
        Error::Timeout { .. } => Some(opts.busy_retry_wait),
        _ => None,
    }
}

impl PvCtrl {
    /// A client for the socket at `socket` with default [`Options`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::with_options(socket, Options::default())
    }

    pub fn with_options(socket: impl Into<PathBuf>, opts: Options) -> Self {
        Self {
            socket: socket.into(),
            opts,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    async fn connect(&self) -> Result<UnixStream, Error> {
        match tokio::time::timeout(self.opts.connect_timeout, UnixStream::connect(&self.socket))
            .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(Error::Connect {
                path: self.socket.clone(),
                source,
            }),
            Err(_) => Err(Error::Connect {
                path: self.socket.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.opts.connect_timeout),
                ),
            }),
        }
    }

    /// One request with a small body and a small answer, any status.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<(&[u8], &str)>,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let what = format!("{method} {path}");
        let started = Instant::now();
        let work = async {
            let mut stream = self.connect().await?;
            let mut req = http::encode_head(
                method,
                path,
                body.map(|(b, _)| b.len() as u64),
                body.map(|(_, ct)| ct),
            );
            if let Some((b, _)) = body {
                req.extend_from_slice(b);
            }
            let io_err = |source| Error::Io {
                what: what.clone(),
                source,
            };
            // Written in one piece: gen-1 waits at most 1 s per read.
            let write = stream.write_all(&req).await;
            let mut reader = BufReader::new(stream);
            let head = match http::read_head(&mut reader).await {
                Ok(h) => h,
                Err(e) => return Err(write.err().map_or_else(|| read_error(&what, e), io_err)),
            };
            let framing = framing_of(&what, &head, method == "HEAD")?;
            let body = Body::new(reader, framing)
                .read_to_vec(self.opts.max_response_bytes)
                .await
                .map_err(|e| read_error(&what, e))?;
            Ok(Response { head, body })
        };
        let res = within(&what, timeout, work).await;
        match &res {
            Ok(r) => {
                debug!(request = %what, status = r.head.status, elapsed = ?started.elapsed(), "pv-ctrl")
            }
            Err(e) => debug!(request = %what, error = %e, "pv-ctrl"),
        }
        res
    }

    /// A request that must succeed (2xx); returns the answer.
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&[u8], &str)>,
    ) -> Result<Response, Error> {
        let r = self
            .exchange(method, path, body, self.opts.request_timeout)
            .await?;
        if (200..300).contains(&r.head.status) {
            Ok(r)
        } else {
            Err(status_error(&format!("{method} {path}"), &r.head, &r.body))
        }
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let r = self.call("GET", path, None).await?;
        serde_json::from_slice(&r.body).map_err(|e| Error::Decode {
            what: format!("GET {path}"),
            detail: e.to_string(),
        })
    }

    async fn put_small(&self, path: &str, body: &[u8], ct: &str) -> Result<(), Error> {
        self.call("PUT", path, Some((body, ct))).await.map(drop)
    }

    // --- containers, groups, signal -------------------------------------------

    /// `GET /containers`: the platforms of the running revision.
    pub async fn containers(&self) -> Result<Vec<Container>, Error> {
        self.get_json("/containers").await
    }

    /// `PUT /containers/<name>` (027+): start, stop or restart a container whose
    /// restart policy is `container`.
    pub async fn container_action(&self, name: &str, action: ContainerAction) -> Result<(), Error> {
        check_segment("container name", name)?;
        let action = match action {
            ContainerAction::Start => "start",
            ContainerAction::Stop => "stop",
            ContainerAction::Restart => "restart",
        };
        self.put_action(&format!("/containers/{name}"), action)
            .await
    }

    /// `PUT <path>` with `{"action": <action>}` (containers and daemons).
    async fn put_action(&self, path: &str, action: &str) -> Result<(), Error> {
        let body = serde_json::json!({ "action": action }).to_string();
        self.put_small(path, body.as_bytes(), "application/json")
            .await
    }

    /// `GET /groups`.
    pub async fn groups(&self) -> Result<Vec<Group>, Error> {
        self.get_json("/groups").await
    }

    /// `POST /signal` with any type. Only `ready` means something to Pantavisor.
    pub async fn signal(&self, kind: &str, payload: &str) -> Result<(), Error> {
        check_raw_text("signal type", kind)?;
        check_raw_text("signal payload", payload)?;
        let body = serde_json::json!({ "type": kind, "payload": payload }).to_string();
        self.call(
            "POST",
            "/signal",
            Some((body.as_bytes(), "application/json")),
        )
        .await
        .map(drop)
    }

    /// `POST /signal {"type":"ready"}`: the caller's container reached READY.
    pub async fn signal_ready(&self) -> Result<(), Error> {
        self.signal("ready", "").await
    }

    // --- commands ------------------------------------------------------------

    /// `POST /commands`, retried while the command slot is busy (503 with
    /// `Retry-After`, gen-1's 409, or 024's missing answer) for up to
    /// [`Options::command_retry_budget`]. Other refusals — e.g. an update is
    /// ongoing ([`Error::is_update_ongoing`]) — are returned at once.
    pub async fn command(&self, cmd: Command) -> Result<CommandOutcome, Error> {
        self.command_retrying(cmd, true).await
    }

    /// [`PvCtrl::command`] for commands that must not be carried out twice, such
    /// as LOCAL_RUN: retried only while the slot is definitely busy. A lost answer
    /// (timeout, broken connection) is returned, since Pantavisor may have taken
    /// the command; the caller finds out from the device (e.g. the revision's
    /// progress) instead of sending it again blindly.
    pub async fn command_once(&self, cmd: Command) -> Result<CommandOutcome, Error> {
        self.command_retrying(cmd, false).await
    }

    async fn command_retrying(
        &self,
        cmd: Command,
        retry_lost_answers: bool,
    ) -> Result<CommandOutcome, Error> {
        let body = cmd.to_body()?;
        let what = format!("POST /commands {}", cmd.op_and_payload().0);
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let err = match self
                .exchange(
                    "POST",
                    "/commands",
                    Some((&body, "application/json")),
                    self.opts.command_timeout,
                )
                .await
            {
                Ok(r) if r.head.status == 204 => return Ok(CommandOutcome::AlreadyInEffect),
                Ok(r) if (200..300).contains(&r.head.status) => return Ok(CommandOutcome::Queued),
                Ok(r) => status_error(&what, &r.head, &r.body),
                Err(e) => e,
            };
            let Some(wait) = command_retry_wait(&err, &self.opts)
                .filter(|_| retry_lost_answers || err.is_busy_slot())
            else {
                return Err(err);
            };
            if started.elapsed() + wait > self.opts.command_retry_budget {
                return Err(Error::Busy {
                    what,
                    attempts,
                    waited: started.elapsed(),
                    last: Box::new(err),
                });
            }
            debug!(request = %what, attempt = attempts, wait = ?wait, reason = %err, "pv-ctrl busy; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    // --- objects -------------------------------------------------------------

    /// `GET /objects`: every complete object in the device's store.
    pub async fn objects(&self) -> Result<Vec<ObjectInfo>, Error> {
        self.get_json("/objects").await
    }

    /// `GET /objects/<sha>` streamed into `out`; checks the bytes hash to `sha`.
    /// Returns the number of bytes written.
    pub async fn get_object<W: AsyncWrite + Unpin>(
        &self,
        sha: &str,
        out: &mut W,
    ) -> Result<u64, Error> {
        check_sha(sha)?;
        let path = format!("/objects/{sha}");
        let what = format!("GET {path}");
        let timeout = self.opts.transfer_timeout;
        let work = async {
            let mut stream = self.connect().await?;
            let io_err = |source| Error::Io {
                what: what.clone(),
                source,
            };
            stream
                .write_all(&http::encode_head("GET", &path, None, None))
                .await
                .map_err(io_err)?;
            let mut reader = BufReader::new(stream);
            let head = http::read_head(&mut reader)
                .await
                .map_err(|e| read_error(&what, e))?;
            let framing = framing_of(&what, &head, false)?;
            let mut body = Body::new(reader, framing);
            if head.status != 200 {
                let text = body
                    .read_to_vec(64 * 1024)
                    .await
                    .map_err(|e| read_error(&what, e))?;
                return Err(status_error(&what, &head, &text));
            }
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = body
                    .read(&mut buf)
                    .await
                    .map_err(|e| read_error(&what, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).await.map_err(io_err)?;
                total += n as u64;
            }
            out.flush().await.map_err(io_err)?;
            let got = hex(&hasher.finalize());
            if got != sha {
                return Err(Error::BadHash {
                    what: what.clone(),
                    detail: format!("the {total} bytes received hash to {got}"),
                });
            }
            Ok(total)
        };
        within(&what, timeout, work).await
    }

    /// `PUT /objects/<sha>` streamed from `src`, which must yield exactly `len`
    /// bytes. Pantavisor checks the sha256 (422 "Object has bad checksum") and free
    /// space (507); since a full disk can still be answered 200 on gen-2, callers
    /// should confirm with [`PvCtrl::objects`].
    pub async fn put_object<R: AsyncRead + Unpin>(
        &self,
        sha: &str,
        src: R,
        len: u64,
    ) -> Result<(), Error> {
        check_sha(sha)?;
        let path = format!("/objects/{sha}");
        let what = format!("PUT {path}");
        let timeout = self.opts.transfer_timeout;
        let work = async {
            let mut stream = self.connect().await?;
            let head = http::encode_head("PUT", &path, Some(len), Some("application/octet-stream"));
            let sent = async {
                stream.write_all(&head).await?;
                let mut limited = src.take(len);
                let n = tokio::io::copy(&mut limited, &mut stream).await?;
                stream.flush().await?;
                Ok::<u64, std::io::Error>(n)
            }
            .await;
            if let Ok(n) = sent {
                if n < len {
                    // The server still waits for the rest: give up on this
                    // connection now rather than wait for an answer.
                    return Err(Error::InvalidArgument(format!(
                        "object source for {sha} ended after {n} of {len} bytes"
                    )));
                }
            }
            // Pantavisor may answer (and close) before taking the whole body; read
            // its answer before reporting a failed write.
            let mut reader = BufReader::new(stream);
            let answer = http::read_head(&mut reader).await;
            let head = match (sent, answer) {
                (_, Ok(h)) => h,
                (Err(e), Err(_)) => {
                    return Err(Error::Io {
                        what: what.clone(),
                        source: e,
                    });
                }
                (Ok(_), Err(e)) => return Err(read_error(&what, e)),
            };
            let framing = framing_of(&what, &head, false)?;
            let body = Body::new(reader, framing)
                .read_to_vec(64 * 1024)
                .await
                .map_err(|e| read_error(&what, e))?;
            if (200..300).contains(&head.status) {
                Ok(())
            } else {
                Err(status_error(&what, &head, &body))
            }
        };
        within(&what, timeout, work).await
    }

    // --- steps ---------------------------------------------------------------

    /// `GET /steps`: every revision stored on the device.
    pub async fn steps(&self) -> Result<Vec<Step>, Error> {
        self.get_json("/steps").await
    }

    /// `GET /steps/<rev>`: the state JSON of a revision, verbatim. `rev` is a
    /// revision name or `current`.
    pub async fn step(&self, rev: &str) -> Result<Vec<u8>, Error> {
        Ok(self.call("GET", &step_path(rev)?, None).await?.body)
    }

    /// `PUT /steps/locals/<name>`: stage a state JSON. Objects are not checked here;
    /// upload them first.
    pub async fn put_step(&self, rev: &Revision, state: &[u8]) -> Result<(), Error> {
        if !rev.is_local() {
            return Err(Error::InvalidArgument(format!(
                "only local revisions can be staged, got {rev}"
            )));
        }
        if state.is_empty() {
            return Err(Error::InvalidArgument("state JSON is empty".into()));
        }
        self.put_small(&format!("/steps/{rev}"), state, "application/json")
            .await
    }

    /// `GET /steps/<rev>/progress`.
    pub async fn progress(&self, rev: &str) -> Result<Progress, Error> {
        self.get_json(&format!("{}/progress", step_path(rev)?))
            .await
    }

    /// `PUT /steps/<rev>/commitmsg` (1 to 256 bytes: Pantavisor never answers an
    /// empty one and refuses longer ones with 507).
    pub async fn put_commitmsg(&self, rev: &str, msg: &str) -> Result<(), Error> {
        if msg.is_empty() || msg.len() > MAX_COMMITMSG {
            return Err(Error::InvalidArgument(format!(
                "commit message must be 1 to {MAX_COMMITMSG} bytes, got {}",
                msg.len()
            )));
        }
        self.put_small(
            &format!("{}/commitmsg", step_path(rev)?),
            msg.as_bytes(),
            "text/plain",
        )
        .await
    }

    // --- metadata ------------------------------------------------------------

    /// `GET /user-meta` or `/device-meta`. Values are whatever JSON Pantavisor sent:
    /// objects and arrays embedded, everything else as strings.
    pub async fn meta(&self, which: Meta) -> Result<BTreeMap<String, Value>, Error> {
        self.get_json(which.path()).await
    }

    /// `PUT /user-meta/<key>` or `/device-meta/<key>` with the raw value (1 to 4095
    /// bytes). Keys cannot contain `/`; a `.` also writes
    /// `<meta>.<prefix>/<rest>` for container `<prefix>`.
    pub async fn put_meta(&self, which: Meta, key: &str, value: &[u8]) -> Result<(), Error> {
        check_segment("metadata key", key)?;
        if value.is_empty() || value.len() > MAX_SMALL_BODY {
            return Err(Error::InvalidArgument(format!(
                "metadata value for {key:?} must be 1 to {MAX_SMALL_BODY} bytes, got {}",
                value.len()
            )));
        }
        self.put_small(&format!("{}/{key}", which.path()), value, "text/plain")
            .await
    }

    /// `DELETE /user-meta/<key>` or `/device-meta/<key>`; 404 when absent.
    pub async fn delete_meta(&self, which: Meta, key: &str) -> Result<(), Error> {
        check_segment("metadata key", key)?;
        self.call(
            "DELETE",
            &format!("{}/{key}", which.path()),
            Some((b"", "text/plain")),
        )
        .await
        .map(drop)
    }

    // --- build, config, drivers, daemons, storage -----------------------------

    /// `GET /buildinfo`: the repo manifest (empty for CMake builds).
    pub async fn buildinfo(&self) -> Result<String, Error> {
        let r = self.call("GET", "/buildinfo", None).await?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// `GET /config`: legacy alias keys with typed values.
    pub async fn config(&self) -> Result<serde_json::Map<String, Value>, Error> {
        self.get_json("/config").await
    }

    /// `GET /config2` (020+): every key with its value and level. Secrets are not
    /// masked by Pantavisor; never log this wholesale.
    pub async fn config2(&self) -> Result<Vec<ConfigEntry>, Error> {
        self.get_json("/config2").await
    }

    /// `GET /drivers`: the calling container's drivers (`{}` means none).
    pub async fn drivers(&self) -> Result<Vec<Driver>, Error> {
        let v: Value = self.get_json("/drivers").await?;
        match v {
            Value::Object(m) if m.is_empty() => Ok(Vec::new()),
            v => serde_json::from_value(v).map_err(|e| Error::Decode {
                what: "GET /drivers".into(),
                detail: e.to_string(),
            }),
        }
    }

    /// `PUT /drivers/{load,unload}` for all manual drivers, or
    /// `PUT /drivers/<name>/{load,unload}` for one.
    pub async fn driver_action(&self, name: Option<&str>, load: bool) -> Result<(), Error> {
        let verb = if load { "load" } else { "unload" };
        let path = match name {
            Some(n) => {
                check_segment("driver name", n)?;
                format!("/drivers/{n}/{verb}")
            }
            None => format!("/drivers/{verb}"),
        };
        self.put_small(&path, b"{}", "application/json").await
    }

    /// `GET /daemons` (027+).
    pub async fn daemons(&self) -> Result<Vec<Daemon>, Error> {
        self.get_json("/daemons").await
    }

    /// `PUT /daemons/<name>` (027+).
    pub async fn daemon_action(&self, name: &str, action: DaemonAction) -> Result<(), Error> {
        check_segment("daemon name", name)?;
        let action = match action {
            DaemonAction::Start => "start",
            DaemonAction::Stop => "stop",
        };
        self.put_action(&format!("/daemons/{name}"), action).await
    }

    /// `GET /xconnect-graph` (027+; 404 when built without xconnect).
    pub async fn xconnect_graph(&self) -> Result<Vec<Value>, Error> {
        self.get_json("/xconnect-graph").await
    }

    /// `GET /wakelocks` (after 029).
    pub async fn wakelocks(&self) -> Result<Value, Error> {
        self.get_json("/wakelocks").await
    }

    /// `POST /storage/gc` (029+): synchronous garbage collection. It deletes staged
    /// revisions that are not running and unlinked objects: never call it between
    /// uploading an update and running it.
    pub async fn storage_gc(&self) -> Result<GcReport, Error> {
        let r = self
            .call("POST", "/storage/gc", Some((b"{}", "application/json")))
            .await?;
        serde_json::from_slice(&r.body).map_err(|e| Error::Decode {
            what: "POST /storage/gc".into(),
            detail: e.to_string(),
        })
    }

    /// Learns the server generation (gen-2 answers JSON with a content type, gen-1
    /// with none) and Pantavisor's version from device-meta.
    pub async fn probe(&self) -> Result<ServerInfo, Error> {
        let r = self.call("GET", "/containers", None).await?;
        let generation = if r.head.header("content-type").is_some() {
            Generation::Gen2
        } else {
            Generation::Gen1
        };
        let version = self
            .meta(Meta::Device)
            .await?
            .get("pantavisor.version")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(ServerInfo {
            generation,
            version,
        })
    }
}

/// Runs `work`, turning an elapsed `timeout` into [`Error::Timeout`].
async fn within<T>(
    what: &str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout {
                what: what.to_owned(),
                after: timeout,
            })
        })
}

/// How the body after `head` ends, or a protocol error naming the request.
fn framing_of(what: &str, head: &Head, head_request: bool) -> Result<Framing, Error> {
    head.framing(head_request)
        .map_err(|detail| Error::Protocol {
            what: what.to_owned(),
            detail,
        })
}

fn read_error(what: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidData {
        Error::Protocol {
            what: what.to_owned(),
            detail: e.to_string(),
        }
    } else {
        Error::Io {
            what: what.to_owned(),
            source: e,
        }
    }
}

/// Lower-case hex of a digest (the adapter API's, shared with the adapters).
pub use pv_adapter_api::hex;

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, msg: &str, retry_after: Option<u64>) -> Error {
        Error::Status {
            what: "POST /commands".into(),
            status,
            message: msg.into(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn command_bodies_are_flat_json() {
        let b = Command::LocalRun("locals/r1".parse().unwrap())
            .to_body()
            .unwrap();
        assert_eq!(b, br#"{"op":"LOCAL_RUN","payload":"locals/r1"}"#);
        let b = Command::RunGc.to_body().unwrap();
        assert_eq!(b, br#"{"op":"RUN_GC","payload":""}"#);
        let mut m = serde_json::Map::new();
        m.insert("k".into(), "v".into());
        let b = Command::UpdateMetadata(m).to_body().unwrap();
        assert_eq!(b, br#"{"op":"UPDATE_METADATA","payload":{"k":"v"}}"#);
        let b = Command::MakeFactory(None).to_body().unwrap();
        assert_eq!(b, br#"{"op":"MAKE_FACTORY","payload":""}"#);
    }

    #[test]
    fn payloads_pantavisor_would_garble_are_refused() {
        for bad in ["say \"hi\"", "a\\b", "line\nbreak"] {
            let err = Command::Reboot(bad.into()).to_body().unwrap_err();
            assert!(err.to_string().contains("does not unescape"), "{err}");
        }
        let err = Command::Reboot("x".repeat(5000)).to_body().unwrap_err();
        assert!(err.to_string().contains("at most 4095"), "{err}");
    }

    #[test]
    fn only_busy_slot_and_silence_are_retried() {
        let o = Options::default();
        assert_eq!(
            command_retry_wait(&status(503, BUSY_SLOT_TEXT, Some(120)), &o),
            Some(Duration::from_secs(2)),
            "Retry-After is honoured up to the cap"
        );
        assert_eq!(
            command_retry_wait(&status(503, BUSY_SLOT_TEXT, Some(1)), &o),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            command_retry_wait(&status(409, BUSY_SLOT_TEXT, None), &o),
            Some(o.busy_retry_wait),
            "gen-1 busy"
        );
        let timeout = Error::Timeout {
            what: "x".into(),
            after: Duration::from_secs(10),
        };
        assert_eq!(command_retry_wait(&timeout, &o), Some(o.busy_retry_wait));
        assert_eq!(
            command_retry_wait(&status(503, UPDATE_ONGOING_TEXT, Some(600)), &o),
            None
        );
        assert_eq!(
            command_retry_wait(&status(400, "Command has bad format", None), &o),
            None
        );
        assert!(status(503, UPDATE_ONGOING_TEXT, Some(600)).is_update_ongoing());
    }

    #[test]
    fn path_segments_are_checked() {
        assert!(check_segment("k", "pv-bridge.backends").is_ok());
        for bad in ["", "a/b", "a b", "a?b", "a#b", "a%2f", "ключ"] {
            assert!(check_segment("k", bad).is_err(), "{bad:?}");
        }
        assert!(step_path("current").is_ok());
        assert!(step_path("locals/x").is_ok());
        assert!(step_path("locals/a/b").is_err());
        assert!(check_sha(&"A".repeat(64)).is_err());
    }

    #[test]
    fn error_bodies_yield_pantavisor_text() {
        let head = Head {
            status: 422,
            reason: "Unprocessable Content".into(),
            headers: vec![],
        };
        let e = status_error(
            "PUT /objects/x",
            &head,
            br#"{"Error":"Object has bad checksum"}"#,
        );
        assert_eq!(e.message(), Some("Object has bad checksum"));
        assert_eq!(
            e.to_string(),
            "PUT /objects/x: pv-ctrl answered 422: Object has bad checksum"
        );
        let e = status_error("GET /x", &head, b"");
        assert_eq!(e.message(), Some("Unprocessable Content"));
        let e = status_error("GET /x", &head, b"plain text\n");
        assert_eq!(e.message(), Some("plain text"));
    }
}
