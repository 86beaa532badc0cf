//! A fake Pantacor Hub: the device-facing API of `pantacor-hub-api.md`, quirks
//! included, plus the user-side calls `pvr` makes, so that tests (and `pv-fake-hub`)
//! can drive a device the way Pantacor Hub users do.
//!
//! Quirks kept on purpose: collection roots without their trailing slash get a 301
//! to it; `/devices/<id>/` is a 404 while trails trim one trailing slash; an unknown
//! object is 403 and an unknown step 500; trails answers are canonical JSON with
//! the `PhJsonFormat` header; error bodies are `{"error":"REST-ERR-ID-…","msg","code"}`
//! except the JWT middleware's `{"Error":"Not Authorized"}`; login answers 415
//! without a JSON content type and 403 without a User-Agent; progress keeps only
//! the hub's StepProgress fields; tokens last 60 minutes and are snapshots of the
//! device's claim (a device must log in again after being claimed: until then the
//! calls that need its owner answer 403).
//!
//! Test-only controls: [`FakeHub::fault`] (status bursts, garbage bodies, dropped
//! connections, cut or slow downloads), [`FakeHub::expire_sessions`], and a record
//! of every request ([`FakeHub::seen`]).

pub mod http;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::sim::hex;
use http::{Request, Response};

/// The user every fake hub knows (`POST /auth/login` with these).
pub const USER: &str = "user1";
pub const USER_PASSWORD: &str = "user1pass";
/// That user's PRN (the OSS hub's built-in users look like this).
pub const USER_PRN: &str = "prn:pantahub.com:auth:/user1";

const SPECS: [&str; 3] = [
    "pantavisor-multi-platform@1",
    "pantavisor-service-embed@1",
    "pantavisor-service-system@1",
];

/// How the fake behaves where the hubs differ.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Lifetime of session tokens (the hub's default: 60 minutes).
    pub token_lifetime: Duration,
    /// Statuses from which a user may cancel a step. The OSS hub allows NEW only;
    /// production (pantahub-base !415) also QUEUED, DOWNLOADING and INPROGRESS.
    pub cancel_from: Vec<String>,
    /// Base URL put into signed object URLs; the fake's own address when `None`.
    pub public_url: Option<String>,
    /// Host name for signed object URLs with the fake's own scheme and port (tests
    /// tell object downloads from API calls by it: `127.0.0.1` vs `localhost`).
    pub object_host: Option<String>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3600),
            cancel_from: ["NEW", "QUEUED", "DOWNLOADING", "INPROGRESS"]
                .map(String::from)
                .to_vec(),
            public_url: None,
            object_host: None,
        }
    }
}

/// What a fault does to the request it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer this status with the hub's error body.
    Status(u16),
    /// Answer this status with this body (garbage, oversize, …).
    Body(u16, Vec<u8>),
    /// Close the connection without answering.
    Drop,
    /// Downloads: send the head and only this many body bytes, then close.
    CutAfter(usize),
    /// Downloads: send the body at this many bytes per second.
    Slow(u64),
}

/// A fault applied to the next `times` requests whose method (if given) and path
/// prefix match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub method: Option<String>,
    pub path_prefix: String,
    pub action: Action,
    pub times: usize,
}

impl Fault {
    pub fn new(method: Option<&str>, path_prefix: &str, action: Action, times: usize) -> Self {
        Self {
            method: method.map(str::to_owned),
            path_prefix: path_prefix.to_owned(),
            action,
            times,
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub status: u16,
    pub user_agent: Option<String>,
    pub range: Option<String>,
}

#[derive(Debug, Clone)]
struct Device {
    id: String,
    prn: String,
    nick: String,
    owner: String,
    secret: String,
    challenge: String,
    user_meta: Map<String, Value>,
    device_meta: Map<String, Value>,
    created: String,
}

#[derive(Debug, Clone)]
struct Session {
    prn: String,
    nick: String,
    owner: String,
    device: bool,
    iat: u64,
    exp: u64,
}

#[derive(Debug, Clone)]
struct Step {
    rev: i64,
    commit_msg: String,
    state: Value,
    meta: Value,
    progress: Value,
    step_time: String,
    progress_time: String,
}

#[derive(Debug, Clone)]
struct Trail {
    factory_state: Value,
    steps: BTreeMap<i64, Step>,
    created: String,
    touched: String,
}

#[derive(Debug, Clone)]
struct Obj {
    name: String,
    size: u64,
    created: String,
}

#[derive(Debug, Clone)]
struct Signed {
    method: &'static str,
    storage_id: String,
    sha: String,
    size: u64,
    name: String,
    exp: u64,
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, Device>,
    sessions: HashMap<String, Session>,
    trails: BTreeMap<String, Trail>,
    /// (owner, sha) → object record.
    objects: BTreeMap<(String, String), Obj>,
    /// storage id → bytes.
    blobs: HashMap<String, Arc<Vec<u8>>>,
    signed: HashMap<String, Signed>,
    /// auto-claim token → (owner, default user-meta).
    autotokens: HashMap<String, (String, Map<String, Value>)>,
    logs: Vec<Value>,
    /// Log batches with an entry whose `msg` contains this are refused (400).
    log_poison: Option<String>,
    /// Every progress a device PUT, by (trail, rev), in order.
    history: BTreeMap<(String, i64), Vec<Value>>,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    counter: u64,
}

struct Shared {
    cfg: HubConfig,
    base: String,
    /// Base of signed object URLs.
    objects_base: String,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake hub.
pub struct FakeHub {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeHub {
    /// Plain HTTP on a free loopback port.
    pub async fn start(cfg: HubConfig) -> io::Result<FakeHub> {
        Self::start_on("127.0.0.1:0", cfg, None).await
    }

    /// HTTPS with the certificate chain and key (PEM files) given.
    pub async fn start_tls(cfg: HubConfig, cert_chain: &Path, key: &Path) -> io::Result<FakeHub> {
        Self::start_on("127.0.0.1:0", cfg, Some((cert_chain, key))).await
    }

    /// On a given address (`pv-fake-hub --listen`), plain or TLS.
    pub async fn start_on(
        listen: &str,
        cfg: HubConfig,
        tls: Option<(&Path, &Path)>,
    ) -> io::Result<FakeHub> {
        let acceptor = match tls {
            Some((c, k)) => Some(acceptor(c, k)?),
            None => None,
        };
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let host = if addr.ip().is_loopback() {
            format!("localhost:{}", addr.port())
        } else {
            addr.to_string()
        };
        let base = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{host}"));
        let objects_base = match &cfg.object_host {
            Some(h) if cfg.public_url.is_none() => format!("{scheme}://{h}:{}", addr.port()),
            _ => base.clone(),
        };
        let shared = Arc::new(Shared {
            cfg,
            base,
            objects_base,
            state: Mutex::new(State::default()),
        });
        let sh = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let sh = sh.clone();
                match acceptor.clone() {
                    Some(acc) => {
                        tokio::spawn(async move {
                            if let Ok(tls) = acc.accept(s).await {
                                serve(tls, sh).await;
                            }
                        });
                    }
                    None => {
                        tokio::spawn(serve(s, sh));
                    }
                }
            }
        });
        Ok(FakeHub { addr, shared, task })
    }

    /// The base URL (`http://localhost:<port>`).
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a fault.
    pub fn fault(&self, f: Fault) {
        self.shared.lock().faults.push_back(f);
    }

    /// Refuses (400) every log batch with an entry whose `msg` contains `text`,
    /// as a hub refuses an entry it cannot store.
    pub fn refuse_logs_containing(&self, text: &str) {
        self.shared.lock().log_poison = Some(text.to_owned());
    }

    /// Every session token expires now: the next call with one gets 401.
    pub fn expire_sessions(&self) {
        let mut st = self.shared.lock();
        for s in st.sessions.values_mut() {
            s.exp = 0;
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// Every object URL token the hub has signed (they sit in the URL path,
    /// `/local-s3/<token>`, and grant a day's access: tests check none leaks).
    pub fn signed_tokens(&self) -> Vec<String> {
        self.shared.lock().signed.keys().cloned().collect()
    }

    /// Every log entry posted, in order.
    pub fn logs(&self) -> Vec<Value> {
        self.shared.lock().logs.clone()
    }

    /// Every progress body the device sent for a step, as sent (before the
    /// hub dropped the fields it does not keep).
    pub fn progress_history(&self, id: &str, rev: i64) -> Vec<Value> {
        self.shared
            .lock()
            .history
            .get(&(id.to_owned(), rev))
            .cloned()
            .unwrap_or_default()
    }

    /// The registered devices' ids, oldest first.
    pub fn device_ids(&self) -> Vec<String> {
        let st = self.shared.lock();
        let mut v: Vec<_> = st.devices.values().collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        v.into_iter().map(|d| d.id.clone()).collect()
    }

    /// A device's record (secret included), as registration answered it.
    pub fn device(&self, id: &str) -> Option<Value> {
        self.shared
            .lock()
            .devices
            .get(id)
            .map(|d| device_json(d, true))
    }

    /// Calls the API in-process, exactly as over HTTP (tests drive the user side
    /// with it). Returns the status and the parsed JSON body (`Null` if none).
    pub fn call(
        &self,
        method: &str,
        target: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (target.to_owned(), None),
        };
        let mut headers = vec![("User-Agent".to_owned(), "pv-testkit".to_owned())];
        if let Some(t) = token {
            headers.push(("Authorization".into(), format!("Bearer {t}")));
        }
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        if !body.is_empty() {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        let req = Request {
            method: method.into(),
            path,
            query,
            http10: false,
            headers,
            body,
        };
        let reply = handle(&self.shared, &req);
        let resp = match reply {
            Reply::Plain(r) => r,
            Reply::Blob { resp, .. } => resp,
        };
        let v = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        (resp.status, v)
    }

    /// Logs in as the built-in user; returns the token.
    pub fn user_token(&self) -> String {
        let (_, v) = self.call(
            "POST",
            "/auth/login",
            None,
            Some(json!({"username": USER, "password": USER_PASSWORD})),
        );
        v["token"].as_str().unwrap_or_default().to_owned()
    }

    /// Claims a device as the built-in user, with the challenge it was given
    /// (`PUT /devices/<id>?challenge=`). Returns the status.
    pub fn claim(&self, id: &str) -> u16 {
        let challenge = self
            .shared
            .lock()
            .devices
            .get(id)
            .map(|d| d.challenge.clone())
            .unwrap_or_default();
        let tok = self.user_token();
        self.call(
            "PUT",
            &format!("/devices/{id}?challenge={challenge}"),
            Some(&tok),
            None,
        )
        .0
    }

    /// Uploads an object as the built-in user (`POST /objects/` and a PUT of the
    /// blob to the signed URL). Returns its sha256.
    pub fn upload(&self, name: &str, data: &[u8]) -> String {
        let sha = hex(&Sha256::digest(data));
        let tok = self.user_token();
        let (_, obj) = self.call(
            "POST",
            "/objects/",
            Some(&tok),
            Some(json!({"objectname": name, "size": data.len().to_string(), "sha256sum": sha})),
        );
        if let Some(url) = obj["signed-puturl"].as_str() {
            let path = url.find("/local-s3/").map(|i| &url[i..]).unwrap_or(url);
            let req = Request {
                method: "PUT".into(),
                path: path.to_owned(),
                query: None,
                http10: false,
                headers: vec![("User-Agent".into(), "pv-testkit".into())],
                body: data.to_vec(),
            };
            let _ = handle(&self.shared, &req);
        }
        sha
    }

    /// Posts the next step of a device's trail as the built-in user
    /// (`POST /trails/<id>/steps`, rev -1). Returns the status and the step.
    pub fn post_step(&self, id: &str, state: &Value, msg: &str) -> (u16, Value) {
        let tok = self.user_token();
        self.call(
            "POST",
            &format!("/trails/{id}/steps"),
            Some(&tok),
            Some(json!({"rev": -1, "commit-msg": msg, "state": state, "meta": {}})),
        )
    }

    /// A step of a device's trail as the user sees it.
    pub fn step(&self, id: &str, rev: i64) -> Option<Value> {
        let tok = self.user_token();
        let (status, v) = self.call(
            "GET",
            &format!("/trails/{id}/steps/{rev}"),
            Some(&tok),
            None,
        );
        (status == 200).then_some(v)
    }

    /// `PUT /trails/<id>/steps/<rev>/cancel` as the user; returns the status.
    pub fn cancel(&self, id: &str, rev: i64) -> u16 {
        let tok = self.user_token();
        self.call(
            "PUT",
            &format!("/trails/{id}/steps/{rev}/cancel"),
            Some(&tok),
            None,
        )
        .0
    }

    /// `PUT /devices/<id>/user-meta` as the user (replaces the map).
    pub fn set_user_meta(&self, id: &str, meta: Value) -> u16 {
        let tok = self.user_token();
        self.call(
            "PUT",
            &format!("/devices/{id}/user-meta"),
            Some(&tok),
            Some(meta),
        )
        .0
    }

    /// A device's device-meta as last written by the device.
    pub fn device_meta(&self, id: &str) -> Map<String, Value> {
        self.shared
            .lock()
            .devices
            .get(id)
            .map(|d| d.device_meta.clone())
            .unwrap_or_default()
    }

    /// The factory state of a device's trail, once it synced.
    pub fn factory_state(&self, id: &str) -> Option<Value> {
        self.shared
            .lock()
            .trails
            .get(id)
            .map(|t| t.factory_state.clone())
    }

    /// Whether the blob of an object is stored for the built-in user.
    pub fn has_blob(&self, sha: &str) -> bool {
        let st = self.shared.lock();
        st.blobs.contains_key(&storage_id(USER_PRN, sha))
    }
}

/// A TLS acceptor for a certificate chain and key (PEM files); the test kit's
/// HTTPS servers share it.
pub fn acceptor(cert_chain: &Path, key: &Path) -> io::Result<tokio_rustls::TlsAcceptor> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_chain)
        .map_err(|e| invalid(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(e.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| invalid(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What a handler produced.
enum Reply {
    Plain(Response),
    /// A blob download, written by the connection loop (which applies cut and
    /// slow faults).
    Blob {
        resp: Response,
        data: Arc<Vec<u8>>,
        start: usize,
    },
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, sh: Arc<Shared>) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    loop {
        let req = match http::read_request(&mut rd).await {
            Ok(r) => r,
            Err(http::ReadError::Bad(why)) => {
                let body = format!("{{\"Error\":{}}}", json!(why));
                let resp = Response::json(400, body);
                let _ = http::write_head(&mut wr, &resp, resp.body.len() as u64, true).await;
                let _ = wr.write_all(&resp.body).await;
                return;
            }
            Err(_) => return,
        };
        let fault = take_fault(&sh, &req);
        let reply = match &fault {
            Some(Action::Drop) => {
                record(&sh, &req, 0);
                return;
            }
            Some(Action::Status(code)) => Reply::Plain(rest_error(*code, "injected fault")),
            Some(Action::Body(code, body)) => {
                let mut r = Response::json(*code, body.clone());
                r.body = body.clone();
                Reply::Plain(r)
            }
            _ => handle(&sh, &req),
        };
        let close = req.wants_close();
        match reply {
            Reply::Plain(resp) => {
                record(&sh, &req, resp.status);
                if http::write_head(&mut wr, &resp, resp.body.len() as u64, close)
                    .await
                    .is_err()
                    || wr.write_all(&resp.body).await.is_err()
                {
                    return;
                }
            }
            Reply::Blob { resp, data, start } => {
                record(&sh, &req, resp.status);
                let body = &data[start..];
                if http::write_head(&mut wr, &resp, body.len() as u64, close)
                    .await
                    .is_err()
                {
                    return;
                }
                let (body, cut) = match fault {
                    Some(Action::CutAfter(n)) => (&body[..n.min(body.len())], true),
                    _ => (body, false),
                };
                let rate = match fault {
                    Some(Action::Slow(bps)) => Some(bps.max(1)),
                    _ => None,
                };
                let piece = rate.map_or(64 * 1024, |r| (r as usize / 10).clamp(1, 64 * 1024));
                for chunk in body.chunks(piece) {
                    if wr.write_all(chunk).await.is_err() {
                        return;
                    }
                    if let Some(r) = rate {
                        let _ = wr.flush().await;
                        tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / r as f64))
                            .await;
                    }
                }
                if cut {
                    let _ = wr.flush().await;
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
        if wr.flush().await.is_err() || close {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

fn take_fault(sh: &Shared, req: &Request) -> Option<Action> {
    let mut st = sh.lock();
    let i = st.faults.iter().position(|f| {
        f.times > 0
            && f.method.as_deref().is_none_or(|m| m == req.method)
            && req.path.starts_with(&f.path_prefix)
    })?;
    let f = &mut st.faults[i];
    f.times -= 1;
    let action = f.action.clone();
    if f.times == 0 {
        st.faults.remove(i);
    }
    Some(action)
}

fn record(sh: &Shared, req: &Request, status: u16) {
    sh.lock().seen.push(Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        status,
        user_agent: req.header("user-agent").map(str::to_owned),
        range: req.header("range").map(str::to_owned),
    });
}

// --- helpers --------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// RFC 3339 with milliseconds, UTC (what the hub returns after a Mongo round trip).
fn rfc3339(nanos: u128) -> String {
    let secs = (nanos / 1_000_000_000) as i64;
    let ms = (nanos / 1_000_000 % 1000) as u32;
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn stamp() -> String {
    rfc3339(now_nanos())
}

fn is_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_object_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn storage_id(owner: &str, sha: &str) -> String {
    hex(&Sha256::digest(format!("{owner}/{sha}").as_bytes()))
}

fn b64url(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Pseudo-random bytes (tests need uniqueness, not secrecy).
fn random(st: &mut State, n: usize) -> Vec<u8> {
    st.counter += 1;
    let seed = format!("{}-{}-{}", now_nanos(), st.counter, std::process::id());
    let mut out = Vec::new();
    let mut block = Sha256::digest(seed.as_bytes()).to_vec();
    while out.len() < n {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(n);
    out
}

fn lower_alnum(st: &mut State, n: usize) -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    random(st, n)
        .into_iter()
        .map(|b| A[b as usize % A.len()] as char)
        .collect()
}

const WORDS: [&str; 24] = [
    "keen", "brave", "otter", "quiet", "amber", "swift", "noble", "lucky", "calm", "bold", "tidy",
    "fox", "heron", "maple", "cedar", "river", "stone", "lark", "eager", "merry", "vivid", "wren",
    "birch", "pike",
];

fn petname(st: &mut State, sep: &str) -> String {
    random(st, 3)
        .into_iter()
        .map(|b| WORDS[b as usize % WORDS.len()])
        .collect::<Vec<_>>()
        .join(sep)
}

/// Canonical JSON (sorted keys, no white space), as gibson042/canonicaljson-go
/// writes the trails service's answers.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The hub's error body: an incident id, the user text and the code.
fn rest_error(code: u16, msg: &str) -> Response {
    let mut body = Map::new();
    body.insert(
        "error".into(),
        json!(format!("REST-ERR-ID-{}", now_nanos())),
    );
    if !msg.is_empty() {
        body.insert("msg".into(), json!(msg));
    }
    body.insert("code".into(), json!(code));
    Response::json(code, indent(&Value::Object(body)))
}

fn not_authorized() -> Response {
    Response::json(401, "{\n  \"Error\": \"Not Authorized\"\n}").header(
        "WWW-Authenticate",
        "JWT realm=\"pantahub services\", ph-aeps=\"/auth\"",
    )
}

fn not_found() -> Response {
    Response::json(404, "{\n  \"Error\": \"Resource not found\"\n}")
}

fn method_not_allowed() -> Response {
    Response::json(405, "{\n  \"Error\": \"Method not allowed\"\n}")
}

fn indent(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap_or_default()
}

fn ok(v: &Value) -> Response {
    Response::json(200, indent(v))
}

/// A trails answer: canonical JSON with its header.
fn trails_ok(status: u16, v: &Value) -> Response {
    Response::json(status, canonical(v)).header("PhJsonFormat", "gibson042-canonicaljson")
}

fn device_json(d: &Device, with_secret: bool) -> Value {
    let mut v = json!({
        "id": d.id, "prn": d.prn, "nick": d.nick, "owner": d.owner,
        "time-created": d.created, "time-modified": d.created,
        "challenge": d.challenge, "public": false,
        "user-meta": d.user_meta, "device-meta": d.device_meta,
        "garbage": false, "mark_public_processed": false,
    });
    if with_secret {
        v["secret"] = json!(d.secret);
    }
    if !d.owner.is_empty() {
        v["owner-nick"] = json!(d.owner.rsplit('/').next().unwrap_or_default());
    }
    v
}

// --- routing --------------------------------------------------------------------

fn handle(sh: &Shared, req: &Request) -> Reply {
    let path = req.path.as_str();
    // Go's ServeMux: a collection root without its slash is redirected.
    for root in ["/devices", "/trails", "/objects", "/logs", "/auth"] {
        if path == root {
            let q = req
                .query
                .as_deref()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            return Reply::Plain(
                Response::new(301)
                    .header("Location", format!("{root}/{q}"))
                    .header("Content-Type", "text/html; charset=utf-8"),
            );
        }
    }
    if let Some(tok) = path
        .strip_prefix("/local-s3/")
        .or_else(|| path.strip_prefix("/s3/"))
    {
        return blob(sh, req, tok);
    }
    let resp = if let Some(rest) = path.strip_prefix("/auth/") {
        auth(sh, req, rest)
    } else if let Some(rest) = path.strip_prefix("/devices/") {
        devices(sh, req, rest)
    } else if let Some(rest) = path.strip_prefix("/trails/") {
        // The trails service trims one trailing slash.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        trails(sh, req, rest)
    } else if let Some(rest) = path.strip_prefix("/objects/") {
        objects(sh, req, rest)
    } else if let Some(rest) = path.strip_prefix("/logs/") {
        logs(sh, req, rest)
    } else {
        not_found()
    };
    Reply::Plain(resp)
}

/// The caller's session, or the JWT middleware's 401.
fn session(st: &State, req: &Request) -> Result<Session, Response> {
    let tok = req.bearer().ok_or_else(not_authorized)?;
    let s = st.sessions.get(tok).ok_or_else(not_authorized)?;
    if s.exp <= now() {
        return Err(not_authorized());
    }
    Ok(s.clone())
}

fn body_json(req: &Request) -> Result<Value, Response> {
    if req.body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&req.body).map_err(|e| rest_error(400, &format!("bad JSON: {e}")))
}

fn mint(st: &mut State, cfg: &HubConfig, s: Session) -> String {
    let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = json!({
        "id": s.prn, "prn": s.prn, "nick": s.nick,
        "roles": if s.device { "device" } else { "user" },
        "type": if s.device { "DEVICE" } else { "USER" },
        "owner": s.owner, "scopes": "prn:pantahub.com:apis:/base/all",
        "exp": s.exp, "orig_iat": s.iat,
    });
    let claims = b64url(claims.to_string().as_bytes());
    let sig = b64url(&random(st, 32));
    let token = format!("{header}.{claims}.{sig}");
    let _ = cfg;
    st.sessions.insert(token.clone(), s);
    token
}

fn auth(sh: &Shared, req: &Request, rest: &str) -> Response {
    let mut st = sh.lock();
    match (req.method.as_str(), rest) {
        ("POST", "login") => {
            if !req.body.is_empty() {
                let ct = req
                    .header("content-type")
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let mut parts = ct.split(';').map(str::trim);
                let json_type = parts.next() == Some("application/json");
                let charset_ok = parts.all(|p| {
                    p.strip_prefix("charset=")
                        .is_none_or(|c| c.eq_ignore_ascii_case("utf-8"))
                });
                if !json_type || !charset_ok {
                    return rest_error(
                        415,
                        "Bad Content-Type or charset, expected 'application/json'",
                    );
                }
            }
            if req.header("user-agent").is_none_or(|u| u.trim().is_empty()) {
                return rest_error(403, "Incompatible Client; upgrade pantavisor");
            }
            let body = match body_json(req) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return rest_error(400, "bad login body"),
                Err(e) => return e,
            };
            let user = body
                .get("username")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let pass = body
                .get("password")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let iat = now();
            let exp = iat + sh.cfg.token_lifetime.as_secs();
            let session = if let Some(id) = user.strip_prefix("prn:::devices:/") {
                match st.devices.get(id) {
                    Some(d) if d.secret == pass => Session {
                        prn: d.prn.clone(),
                        nick: d.nick.clone(),
                        owner: d.owner.clone(),
                        device: true,
                        iat,
                        exp,
                    },
                    _ => return rest_error(401, ""),
                }
            } else if user == USER && pass == USER_PASSWORD {
                Session {
                    prn: USER_PRN.into(),
                    nick: USER.into(),
                    owner: USER_PRN.into(),
                    device: false,
                    iat,
                    exp,
                }
            } else {
                return rest_error(401, "");
            };
            let token = mint(&mut st, &sh.cfg, session);
            ok(&json!({ "token": token }))
        }
        ("GET", "login") => match session(&st, req) {
            Ok(mut s) => {
                s.exp = now() + sh.cfg.token_lifetime.as_secs();
                let token = mint(&mut st, &sh.cfg, s);
                ok(&json!({ "token": token }))
            }
            Err(e) => e,
        },
        ("GET", "auth_status") => match session(&st, req) {
            Ok(s) => ok(&json!({
                "prn": s.prn, "nick": s.nick, "owner": s.owner,
                "type": if s.device { "DEVICE" } else { "USER" }, "exp": s.exp,
            })),
            Err(e) => e,
        },
        (_, "login") | (_, "auth_status") => method_not_allowed(),
        _ => not_found(),
    }
}

fn devices(sh: &Shared, req: &Request, rest: &str) -> Response {
    let mut st = sh.lock();
    let segs: Vec<&str> = rest.split('/').collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("POST", [""]) => register(&mut st, req),
        ("POST", ["tokens"]) => {
            let s = match session(&st, req) {
                Ok(s) if !s.device => s,
                Ok(_) => return rest_error(403, "only users create tokens"),
                Err(e) => return e,
            };
            let body = match body_json(req) {
                Ok(v) => v,
                Err(e) => return e,
            };
            let meta = body
                .get("default-user-meta")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let raw = random(&mut st, 24);
            let token = b64url(&raw);
            st.autotokens.insert(token.clone(), (s.prn, meta));
            ok(&json!({ "id": hex(&raw[..12]), "token": token }))
        }
        ("GET", [""]) => match session(&st, req) {
            Ok(s) => {
                let list: Vec<Value> = st
                    .devices
                    .values()
                    .filter(|d| {
                        if s.device {
                            d.prn == s.prn
                        } else {
                            d.owner == s.prn
                        }
                    })
                    .map(|d| device_json(d, false))
                    .collect();
                ok(&Value::Array(list))
            }
            Err(e) => e,
        },
        ("GET", [id]) if !id.is_empty() => {
            let s = match session(&st, req) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let Some(d) = find_device(&st, &s, id) else {
                return rest_error(404, "device not found");
            };
            if !may_read(&s, d) {
                return rest_error(403, "not accessible");
            }
            ok(&device_json(d, false))
        }
        ("PUT", [id]) if !id.is_empty() => {
            let s = match session(&st, req) {
                Ok(s) => s,
                Err(e) => return e,
            };
            if !is_object_id(id) {
                return rest_error(500, "Invalid Hex");
            }
            let challenge = req.param("challenge").unwrap_or_default();
            let fresh = petname(&mut st, "_");
            let Some(d) = st.devices.get_mut(*id) else {
                return rest_error(404, "device not found");
            };
            if !d.challenge.is_empty()
                && !challenge.is_empty()
                && d.challenge == challenge
                && !s.device
            {
                d.owner = s.prn.clone();
                d.challenge.clear();
                if d.nick.starts_with("__unregistered__") {
                    d.nick = fresh;
                }
            } else if d.owner != s.prn {
                return rest_error(403, "wrong challenge or not the owner");
            }
            ok(&device_json(d, true))
        }
        (m @ ("GET" | "PUT" | "PATCH"), [id, "user-meta"]) => {
            let s = match session(&st, req) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let Some(d) = st.devices.get(*id) else {
                return rest_error(404, "device not found");
            };
            if !may_read(&s, d) {
                return rest_error(403, "not accessible");
            }
            if m == "GET" {
                return ok(&Value::Object(d.user_meta.clone()));
            }
            let Ok(Value::Object(body)) = body_json(req) else {
                return rest_error(400, "user-meta must be a JSON object");
            };
            let Some(d) = st.devices.get_mut(*id) else {
                return rest_error(404, "device not found");
            };
            merge(&mut d.user_meta, body, m == "PUT");
            ok(&Value::Object(d.user_meta.clone()))
        }
        (m @ ("PUT" | "PATCH"), [id, "device-meta"]) => {
            let s = match session(&st, req) {
                Ok(s) => s,
                Err(e) => return e,
            };
            if !s.device {
                return rest_error(400, "Device data can only be updated by Device");
            }
            if m == "PUT" && !is_object_id(id) {
                return rest_error(500, "Invalid Hex");
            }
            if s.prn != format!("prn:::devices:/{id}") {
                return rest_error(if m == "PUT" { 404 } else { 400 }, "not this device");
            }
            let Ok(Value::Object(body)) = body_json(req) else {
                return rest_error(400, "device-meta must be a JSON object");
            };
            let Some(d) = st.devices.get_mut(*id) else {
                return rest_error(404, "device not found");
            };
            merge(&mut d.device_meta, body, m == "PUT");
            ok(&json!({"status": "ok"}))
        }
        _ if segs.last() == Some(&"") => not_found(),
        _ => method_not_allowed_or_404(segs.len()),
    }
}

fn method_not_allowed_or_404(depth: usize) -> Response {
    if depth <= 2 {
        method_not_allowed()
    } else {
        not_found()
    }
}

/// Replaces (`put`) or shallow-merges (null deletes) `into` with `body`.
fn merge(into: &mut Map<String, Value>, body: Map<String, Value>, put: bool) {
    if put {
        *into = body;
        return;
    }
    for (k, v) in body {
        if v.is_null() {
            into.remove(&k);
        } else {
            into.insert(k, v);
        }
    }
}

fn find_device<'a>(st: &'a State, s: &Session, id_or_nick: &str) -> Option<&'a Device> {
    st.devices.get(id_or_nick).or_else(|| {
        st.devices
            .values()
            .find(|d| d.nick == id_or_nick && (d.owner == s.owner || d.prn == s.prn))
    })
}

fn may_read(s: &Session, d: &Device) -> bool {
    if s.device {
        d.prn == s.prn
    } else {
        d.owner == s.prn
    }
}

fn register(st: &mut State, req: &Request) -> Response {
    if req.header("user-agent").is_none_or(|u| u.trim().is_empty()) {
        return rest_error(403, "Incompatible Client; upgrade pantavisor");
    }
    let mut owner = String::new();
    if req.bearer().is_some() {
        match session(st, req) {
            Ok(s) if !s.device => owner = s.prn,
            Ok(_) => return rest_error(403, "devices cannot create devices"),
            Err(e) => return e,
        }
    }
    let mut user_meta = Map::new();
    let mut by_token = false;
    if let Some(tok) = req.header("pantahub-devices-auto-token-v1") {
        match st.autotokens.get(tok.trim()) {
            Some((o, meta)) => {
                owner = o.clone();
                user_meta = meta.clone();
                by_token = true;
            }
            None => return rest_error(400, "invalid auto token"),
        }
    }
    let body = match body_json(req) {
        Ok(Value::Null) => Map::new(),
        Ok(Value::Object(m)) => m,
        Ok(_) => return rest_error(400, "body must be a JSON object"),
        Err(e) => return e,
    };
    let id = hex(&random(st, 12));
    let secret = match body.get("secret").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => lower_alnum(st, 15),
    };
    let nick = match body.get("nick").and_then(Value::as_str) {
        Some(n) => n.to_owned(),
        None if owner.is_empty() => format!(
            "__unregistered__{}_{}",
            WORDS[random(st, 1)[0] as usize % WORDS.len()],
            lower_alnum(st, 10)
        ),
        None => petname(st, "_"),
    };
    if nick.is_empty()
        || !nick
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'%'))
    {
        return rest_error(400, "Invalid nick");
    }
    if st
        .devices
        .values()
        .any(|d| d.nick == nick && d.owner == owner && !owner.is_empty())
    {
        return rest_error(409, "device already exists");
    }
    let challenge = if owner.is_empty() {
        petname(st, "-")
    } else {
        String::new()
    };
    let _ = by_token;
    let d = Device {
        prn: format!("prn:::devices:/{id}"),
        id: id.clone(),
        nick,
        owner,
        secret,
        challenge,
        user_meta,
        device_meta: body
            .get("device-meta")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        created: stamp(),
    };
    let v = device_json(&d, true);
    st.devices.insert(id, d);
    ok(&v)
}

// --- trails ---------------------------------------------------------------------

fn step_json(trail_id: &str, d: &Device, s: &Step) -> Value {
    json!({
        "id": format!("{trail_id}-{}", s.rev), "owner": d.owner, "device": d.prn,
        "committer": "", "trail-id": trail_id, "rev": s.rev, "commit-msg": s.commit_msg,
        "state": s.state, "state-sha": hex(&Sha256::digest(canonical(&s.state).as_bytes())),
        "progress": s.progress, "step-time": s.step_time, "progress-time": s.progress_time,
        "meta": s.meta, "used_objects": [], "mark_public_processed": false, "garbage": false,
        "time-created": s.step_time, "time-modified": s.progress_time,
    })
}

fn trail_json(id: &str, d: &Device, t: &Trail) -> Value {
    json!({
        "id": id, "owner": d.owner, "device": d.prn, "last-insync": t.created,
        "last-touched": t.touched, "factory-state": t.factory_state, "used_objects": [],
    })
}

/// Checks a state the way the hub does before storing it: a known `#spec`, and
/// every object key naming an uploaded object of the owner.
fn check_state(st: &State, owner: &str, state: &Value) -> Result<(), String> {
    let Some(m) = state.as_object() else {
        return Err("state is not a JSON object".into());
    };
    if m.is_empty() {
        return Ok(());
    }
    match m.get("#spec").and_then(Value::as_str) {
        Some(s) if SPECS.contains(&s) => {}
        _ => return Err("unknown or missing #spec".into()),
    }
    for (k, v) in m {
        if k == "#spec" || k.ends_with(".json") {
            continue;
        }
        let Some(sha) = v.as_str().filter(|s| is_sha(s)) else {
            return Err(format!("{k}: not an object sha"));
        };
        let known = st.objects.contains_key(&(owner.to_owned(), sha.to_owned()))
            && st.blobs.contains_key(&storage_id(owner, sha));
        if !known {
            return Err(format!("{k}: object {sha} not uploaded"));
        }
    }
    Ok(())
}

/// The StepProgress the OSS hub keeps: unknown keys dropped, mistyped ones zero.
fn step_progress(v: &Value) -> Value {
    let int = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0);
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let obj = |o: &Value| {
        let mut m = Map::new();
        for k in ["object_name", "object_id"] {
            if let Some(s) = o.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()) {
                m.insert(k.into(), json!(s));
            }
        }
        for k in [
            "total_size",
            "start_time",
            "current_time",
            "total_downloaded",
        ] {
            m.insert(k.into(), json!(int(o, k)));
        }
        Value::Object(m)
    };
    let dl = v.get("downloads").cloned().unwrap_or(Value::Null);
    let objects = match dl.get("objects").and_then(Value::as_array) {
        Some(a) => Value::Array(a.iter().map(obj).collect()),
        None => Value::Null,
    };
    let mut out = json!({
        "progress": int(v, "progress"),
        "downloads": {"total": obj(dl.get("total").unwrap_or(&Value::Null)), "objects": objects},
        "status-msg": text(v, "status-msg"),
        "status": text(v, "status"),
        "log": text(v, "log"),
    });
    if let Some(d) = v.get("data").filter(|d| !d.is_null()) {
        out["data"] = d.clone();
    }
    out
}

/// Does `status` match a `progress.status` query value (a literal, or a JSON
/// operator object)?
fn status_matches(filter: &str, status: &str) -> bool {
    match serde_json::from_str::<Value>(filter) {
        Ok(Value::Object(op)) => op.iter().all(|(k, v)| match (k.as_str(), v) {
            ("$in", Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(status)),
            ("$nin", Value::Array(a)) => !a.iter().any(|x| x.as_str() == Some(status)),
            ("$ne", Value::String(s)) => s != status,
            ("$eq", Value::String(s)) => s == status,
            _ => false,
        }),
        Ok(Value::String(s)) => s == status,
        _ => filter == status,
    }
}

fn trails(sh: &Shared, req: &Request, rest: &str) -> Response {
    let mut st = sh.lock();
    let s = match session(&st, req) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let segs: Vec<&str> = rest.split('/').collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", [""]) => {
            let list: Vec<Value> = st
                .trails
                .iter()
                .filter_map(|(id, t)| {
                    let d = st.devices.get(id)?;
                    may_read(&s, d).then(|| trail_json(id, d, t))
                })
                .collect();
            trails_ok(200, &Value::Array(list))
        }
        ("POST", [""]) => {
            if !s.device {
                return rest_error(403, "only devices create trails");
            }
            if s.owner.is_empty() {
                return rest_error(
                    403,
                    "the session has no owner: log in again after the claim",
                );
            }
            let state = match body_json(req) {
                Ok(Value::Null) => json!({}),
                Ok(v) => v,
                Err(e) => return e,
            };
            if let Err(why) = check_state(&st, &s.owner, &state) {
                return rest_error(
                    500,
                    &format!("Error processing trail objects in factory-state: {why}"),
                );
            }
            let id = s.prn.trim_start_matches("prn:::devices:/").to_owned();
            if st.trails.contains_key(&id) {
                return rest_error(500, "Error inserting trail: duplicate key");
            }
            let Some(d) = st.devices.get(&id).cloned() else {
                return rest_error(500, "device missing");
            };
            let t0 = stamp();
            let step = Step {
                rev: 0,
                commit_msg: "Factory State (rev 0)".into(),
                state: state.clone(),
                meta: json!({}),
                progress: json!({"status": "DONE", "status-msg": "Factory revision", "progress": 100}),
                step_time: t0.clone(),
                progress_time: t0.clone(),
            };
            let t = Trail {
                factory_state: state,
                steps: BTreeMap::from([(0, step)]),
                created: t0.clone(),
                touched: t0,
            };
            let v = trail_json(&id, &d, &t);
            st.trails.insert(id, t);
            trails_ok(200, &v)
        }
        (m, [id, tail @ ..]) => {
            let id = id.to_string();
            let Some(d) = st.devices.get(&id).cloned() else {
                return rest_error(500, "No access");
            };
            if !st.trails.contains_key(&id) || !may_read(&s, &d) {
                return rest_error(500, "No access");
            }
            trail_item(sh, &mut st, &s, req, m, &id, &d, tail)
        }
        _ => not_found(),
    }
}

#[allow(clippy::too_many_arguments)]
fn trail_item(
    sh: &Shared,
    st: &mut State,
    s: &Session,
    req: &Request,
    method: &str,
    id: &str,
    d: &Device,
    tail: &[&str],
) -> Response {
    let Some(trail) = st.trails.get(id).cloned() else {
        return rest_error(500, "No access");
    };
    let rev_of = |r: &str| {
        r.parse::<i64>()
            .ok()
            .filter(|r| trail.steps.contains_key(r))
    };
    match (method, tail) {
        ("GET", []) => trails_ok(200, &trail_json(id, d, &trail)),
        ("GET", ["steps"]) => {
            let filter = req.param("progress.status");
            let mut list: Vec<Value> = trail
                .steps
                .values()
                .filter(|step| {
                    let status = step.progress["status"].as_str().unwrap_or("");
                    match &filter {
                        Some(f) => status_matches(f, status),
                        None if s.device => status == "NEW",
                        None => status != "DONE",
                    }
                })
                .map(|step| step_json(id, d, step))
                .collect();
            if filter.is_none() && s.device {
                list.truncate(1);
            }
            if let Some(n) = req.param("page[size]").and_then(|n| n.parse().ok()) {
                list.truncate(n);
            }
            trails_ok(200, &Value::Array(list))
        }
        ("POST", ["steps"]) => {
            if s.owner != d.owner || d.owner.is_empty() {
                return rest_error(403, "only the owner posts steps");
            }
            let body = match body_json(req) {
                Ok(v) => v,
                Err(e) => return e,
            };
            let last = trail.steps.keys().next_back().copied().unwrap_or(0);
            let rev = body.get("rev").and_then(Value::as_i64).unwrap_or(-1);
            let rev = if rev < 0 { last + 1 } else { rev };
            if !trail.steps.contains_key(&(rev - 1)) || trail.steps.contains_key(&rev) {
                return rest_error(500, "step rev-1 missing or rev taken");
            }
            let state = body.get("state").cloned().unwrap_or(json!({}));
            if let Err(why) = check_state(st, &d.owner, &state) {
                return rest_error(500, &format!("Error processing step objects: {why}"));
            }
            let step = Step {
                rev,
                commit_msg: body
                    .get("commit-msg")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .into(),
                state,
                meta: body.get("meta").cloned().unwrap_or(json!({})),
                progress: json!({"status": "NEW"}),
                step_time: stamp(),
                progress_time: rfc3339(0),
            };
            let v = step_json(id, d, &step);
            if let Some(t) = st.trails.get_mut(id) {
                t.steps.insert(rev, step);
            }
            trails_ok(200, &v)
        }
        ("GET", ["steps", r]) => match rev_of(r) {
            Some(rev) => trails_ok(200, &step_json(id, d, &trail.steps[&rev])),
            None => rest_error(500, "No access"),
        },
        ("GET", ["steps", r, "state"]) => match rev_of(r) {
            Some(rev) => trails_ok(200, &trail.steps[&rev].state),
            None => rest_error(500, "No access"),
        },
        ("GET", ["steps", r, "objects"]) => {
            let Some(rev) = rev_of(r) else {
                return rest_error(500, "No access");
            };
            let mut out = Vec::new();
            if let Some(m) = trail.steps[&rev].state.as_object() {
                for (k, v) in m {
                    if k == "#spec" || k.ends_with(".json") {
                        continue;
                    }
                    let Some(sha) = v.as_str().filter(|x| is_sha(x)) else {
                        return rest_error(400, "bad object id in state");
                    };
                    match object_json(sh, st, &d.owner, sha, s.prn == d.owner) {
                        Some(mut o) => {
                            o["objectname"] = json!(k);
                            out.push(o);
                        }
                        None => return rest_error(403, "No Access"),
                    }
                }
            }
            trails_ok(200, &Value::Array(out))
        }
        ("PUT", ["steps", r, "progress"]) => {
            if !s.device {
                return rest_error(403, "only devices report progress");
            }
            let Some(rev) = r.parse::<i64>().ok() else {
                return rest_error(500, "bad rev");
            };
            if !trail.steps.contains_key(&rev) || d.prn != s.prn {
                return rest_error(400, "not found");
            }
            let body = match body_json(req) {
                Ok(v) => v,
                Err(e) => return e,
            };
            let p = step_progress(&body);
            st.history
                .entry((id.to_owned(), rev))
                .or_default()
                .push(body.clone());
            let t = stamp();
            if let Some(tr) = st.trails.get_mut(id) {
                tr.touched = t.clone();
                if let Some(step) = tr.steps.get_mut(&rev) {
                    step.progress = p.clone();
                    step.progress_time = t;
                }
            }
            trails_ok(200, &p)
        }
        ("PUT", ["steps", r, action @ ("cancel" | "wontgo")]) => {
            if s.device {
                return rest_error(403, "only users cancel");
            }
            let Some(rev) = rev_of(r) else {
                return rest_error(500, "No access");
            };
            let status = trail.steps[&rev].progress["status"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let (allowed, new, msg) = if *action == "cancel" {
                (
                    sh.cfg.cancel_from.contains(&status),
                    "CANCEL",
                    "Cancel as requested by owner",
                )
            } else {
                (
                    status == "INPROGRESS",
                    "WONTGO",
                    "Mark as WONTGO as requested by owner",
                )
            };
            if !allowed {
                return rest_error(400, &format!("cannot {action} a step in status {status}"));
            }
            let p = json!({"status": new, "status-msg": msg, "progress": 0});
            if let Some(step) = st.trails.get_mut(id).and_then(|t| t.steps.get_mut(&rev)) {
                step.progress = step_progress(&p);
                step.progress_time = stamp();
                return trails_ok(200, &step_json(id, d, step));
            }
            rest_error(500, "No access")
        }
        _ => not_found(),
    }
}

// --- objects --------------------------------------------------------------------

fn sign(
    sh: &Shared,
    st: &mut State,
    method: &'static str,
    owner: &str,
    sha: &str,
    o: &Obj,
) -> String {
    let token = format!(
        "{}.{}.{}",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(
            json!({"Method": method, "Sha": sha, "Size": o.size})
                .to_string()
                .as_bytes()
        ),
        b64url(&random(st, 24))
    );
    st.signed.insert(
        token.clone(),
        Signed {
            method,
            storage_id: storage_id(owner, sha),
            sha: sha.to_owned(),
            size: o.size,
            name: o.name.clone(),
            exp: now() + 86_400,
        },
    );
    format!("{}/local-s3/{token}", sh.objects_base)
}

fn object_json(sh: &Shared, st: &mut State, owner: &str, sha: &str, put: bool) -> Option<Value> {
    let o = st.objects.get(&(owner.to_owned(), sha.to_owned()))?.clone();
    let mut v = json!({
        "id": sha, "storage-id": storage_id(owner, sha), "owner": owner,
        "objectname": o.name, "sha256sum": sha, "size": o.size.to_string(), "sizeint": o.size,
        "mime-type": "", "time-created": o.created, "time-modified": o.created,
        "signed-geturl": sign(sh, st, "GET", owner, sha, &o),
        "now": now().to_string(), "expire-time": "15",
    });
    if put {
        v["signed-puturl"] = json!(sign(sh, st, "PUT", owner, sha, &o));
    }
    Some(v)
}

fn objects(sh: &Shared, req: &Request, rest: &str) -> Response {
    let mut st = sh.lock();
    let s = match session(&st, req) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let owner = if s.device {
        s.owner.clone()
    } else {
        s.prn.clone()
    };
    match (req.method.as_str(), rest) {
        ("POST", "") => {
            if owner.is_empty() {
                return rest_error(
                    403,
                    "the session has no owner: log in again after the claim",
                );
            }
            let body = match body_json(req) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return rest_error(400, "body must be a JSON object"),
                Err(e) => return e,
            };
            let sha = body.get("sha256sum").and_then(Value::as_str).unwrap_or("");
            if !is_sha(sha) {
                return rest_error(400, "Post New Object sha256sum is invalid");
            }
            if body
                .get("id")
                .and_then(Value::as_str)
                .is_some_and(|i| i != sha)
            {
                return rest_error(400, "id must equal sha256sum");
            }
            let sizeint = body.get("sizeint").and_then(Value::as_u64).unwrap_or(0);
            let size = if sizeint > 0 {
                sizeint
            } else {
                match body
                    .get("size")
                    .and_then(Value::as_str)
                    .map(str::parse::<u64>)
                {
                    Some(Ok(n)) => n,
                    _ => return rest_error(400, "size must be a decimal string"),
                }
            };
            let name = body
                .get("objectname")
                .and_then(Value::as_str)
                .unwrap_or(sha)
                .to_owned();
            let key = (owner.clone(), sha.to_owned());
            let exists =
                st.objects.contains_key(&key) && st.blobs.contains_key(&storage_id(&owner, sha));
            if !exists {
                st.objects.insert(
                    key,
                    Obj {
                        name,
                        size,
                        created: stamp(),
                    },
                );
            }
            let v = object_json(sh, &mut st, &owner, sha, true).unwrap_or(Value::Null);
            Response::json(if exists { 409 } else { 200 }, indent(&v))
                .header("Pantahub-Object-Type", "object")
        }
        ("GET", sha) if !sha.contains('/') && !sha.is_empty() => {
            if !is_sha(sha) {
                return rest_error(400, "invalid sha");
            }
            if owner.is_empty() {
                return rest_error(403, "No Access");
            }
            let put = !s.device;
            match object_json(sh, &mut st, &owner, sha, put) {
                Some(v) => ok(&v).header("Pantahub-Object-Type", "object"),
                None => rest_error(403, "No Access"),
            }
        }
        _ => not_found(),
    }
}

fn blob(sh: &Shared, req: &Request, token: &str) -> Reply {
    let mut st = sh.lock();
    let Some(sig) = st.signed.get(token).filter(|s| s.exp > now()).cloned() else {
        return Reply::Plain(Response::new(403));
    };
    match req.method.as_str() {
        "PUT" if sig.method == "PUT" => {
            if req.body.len() as u64 != sig.size {
                return Reply::Plain(rest_error(400, "size mismatch"));
            }
            if hex(&Sha256::digest(&req.body)) != sig.sha {
                return Reply::Plain(rest_error(400, "sha mismatch"));
            }
            st.blobs.insert(sig.storage_id, Arc::new(req.body.clone()));
            Reply::Plain(Response::new(200))
        }
        "GET" if sig.method == "GET" => {
            let Some(data) = st.blobs.get(&sig.storage_id).cloned() else {
                return Reply::Plain(Response::new(404));
            };
            let len = data.len();
            let mut resp = Response::new(200)
                .header("Content-Type", "application/octet-stream")
                .header("Accept-Ranges", "bytes")
                .header(
                    "Content-Disposition",
                    format!("attachment; filename=\"{}\"", sig.name),
                );
            let start = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok());
            match start {
                Some(s) if s >= len && len > 0 => Reply::Plain(
                    Response::new(416).header("Content-Range", format!("bytes */{len}")),
                ),
                Some(s) if s > 0 => {
                    resp.status = 206;
                    resp = resp.header("Content-Range", format!("bytes {s}-{}/{len}", len - 1));
                    Reply::Blob {
                        resp,
                        data,
                        start: s,
                    }
                }
                _ => Reply::Blob {
                    resp,
                    data,
                    start: 0,
                },
            }
        }
        _ => Reply::Plain(Response::new(403)),
    }
}

// --- logs -----------------------------------------------------------------------

fn logs(_sh: &Shared, req: &Request, rest: &str) -> Response {
    let mut st = _sh.lock();
    let s = match session(&st, req) {
        Ok(s) => s,
        Err(e) => return e,
    };
    match (req.method.as_str(), rest) {
        ("POST", "") => {
            if !s.device || s.owner.is_empty() {
                return rest_error(403, "only claimed devices post logs");
            }
            let entries = match serde_json::from_slice::<Value>(&req.body) {
                Ok(Value::Array(a)) => a,
                Ok(v @ Value::Object(_)) => vec![v],
                _ => return rest_error(400, "body must be a log entry or an array of them"),
            };
            if let Some(p) = &st.log_poison
                && entries
                    .iter()
                    .any(|e| e["msg"].as_str().is_some_and(|m| m.contains(p.as_str())))
            {
                return rest_error(400, "cannot store a log entry");
            }
            let mut parsed = Vec::with_capacity(entries.len());
            for e in entries {
                let Value::Object(mut m) = e else {
                    return rest_error(400, "log entries must be objects");
                };
                for k in ["src", "msg", "rev", "plat"] {
                    if m.get(k).is_some_and(|v| !v.is_string()) {
                        return rest_error(400, &format!("{k} must be a string"));
                    }
                }
                for k in ["tsec", "tnano"] {
                    if m.get(k).is_some_and(|v| !v.is_i64()) {
                        return rest_error(400, &format!("{k} must be an integer"));
                    }
                }
                if m.get("lvl")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    m.insert("lvl".into(), json!("INFO"));
                }
                m.insert("dev".into(), json!(s.prn));
                m.insert("own".into(), json!(s.owner));
                m.insert("time-created".into(), json!(stamp()));
                parsed.push(Value::Object(m));
            }
            st.logs.extend(parsed);
            ok(&json!({"status": "ok"}))
        }
        ("GET", "") => {
            let keep = |e: &Value| {
                ["dev", "rev", "plat", "src", "lvl"].iter().all(|k| {
                    req.param(k)
                        .is_none_or(|want| e.get(*k).and_then(Value::as_str) == Some(want.as_str()))
                }) && (s.device && e["dev"] == json!(s.prn)
                    || !s.device && e["own"] == json!(s.prn))
            };
            let entries: Vec<Value> = st.logs.iter().filter(|e| keep(e)).cloned().collect();
            ok(
                &json!({"start": 0, "page": entries.len(), "count": entries.len(), "entries": entries}),
            )
        }
        _ => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_and_drops_white_space() {
        let v: Value = serde_json::from_str(r#"{"b": [1, {"z":1,"a":"x"}], "a": null}"#).unwrap();
        assert_eq!(canonical(&v), r#"{"a":null,"b":[1,{"a":"x","z":1}]}"#);
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_700_000_000_123_000_000),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn status_filters_follow_the_hub() {
        let pending = r#"{"$in":["NEW","DOWNLOADING","INPROGRESS","TESTING","QUEUED"]}"#;
        assert!(status_matches(pending, "TESTING"));
        assert!(!status_matches(pending, "DONE"));
        assert!(status_matches("QUEUED", "QUEUED"));
        assert!(!status_matches("QUEUED", "NEW"));
        assert!(status_matches(r#"{"$ne":"DONE"}"#, "NEW"));
    }

    #[test]
    fn progress_keeps_only_the_hub_fields() {
        let p = step_progress(&json!({
            "status": "DOWNLOADING", "status-msg": "x", "progress": 25, "retries": 2,
            "logs": "dropped", "downloads": {"total": {"object_name": "total", "total_size": 10,
            "total_downloaded": 5, "total_resumes": 1}}
        }));
        assert_eq!(p["status"], "DOWNLOADING");
        assert!(p.get("retries").is_none() && p.get("logs").is_none());
        assert_eq!(p["downloads"]["total"]["total_downloaded"], 5);
        assert!(p["downloads"]["total"].get("total_resumes").is_none());
        assert_eq!(p["downloads"]["objects"], Value::Null);
        let bad = step_progress(&json!({"status": 3, "progress": "x"}));
        assert_eq!(
            (bad["status"].as_str(), bad["progress"].as_i64()),
            (Some(""), Some(0))
        );
    }
}
