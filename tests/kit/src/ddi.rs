//! A fake Eclipse hawkBit DDI server, written from
//! `shared/reference/hawkbit-ddi.md` for what goosebit does not do: per
//! assignment action ids, cancel requests and their feedback, `skip` and
//! maintenance windows, sha256/sha1/md5 hashes, `download-http` links (the
//! default of hawkBit), target and gateway tokens, configData requests and
//! limits, 410 for feedback on closed actions and 429 past the status quota.
//! Artifacts are served under the controller with Range and authentication.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use sha2::Digest;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::hub::http::{self, Request, Response};

/// Where an action stands (hawkBit's action statuses that matter here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    Canceling,
    Canceled,
    CancelRejected,
    Finished,
    Error,
}

impl Status {
    pub fn closed(self) -> bool {
        matches!(self, Status::Canceled | Status::Finished | Status::Error)
    }
}

/// An artifact of a deployment.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub filename: String,
    pub data: Vec<u8>,
    /// Which hashes the server gives (hawkBit omits sha256 for old data).
    pub sha256: bool,
    pub sha1: bool,
    pub md5: bool,
}

impl Artifact {
    pub fn new(filename: &str, data: Vec<u8>) -> Self {
        Self {
            filename: filename.to_owned(),
            data,
            sha256: true,
            sha1: true,
            md5: true,
        }
    }
}

/// A deployment to assign.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub version: String,
    pub artifacts: Vec<Artifact>,
    /// `skip`, `attempt` or `forced`.
    pub download: String,
    pub update: String,
    /// `Some(false)`: a maintenance window that is not open.
    pub window: Option<bool>,
}

impl Deployment {
    pub fn forced(version: &str, artifacts: Vec<Artifact>) -> Self {
        Self {
            version: version.to_owned(),
            artifacts,
            download: "forced".into(),
            update: "forced".into(),
            window: None,
        }
    }
}

/// What the server knows of an action.
#[derive(Debug, Clone)]
pub struct Action {
    pub id: u64,
    pub target: String,
    pub status: Status,
    pub deployment: Deployment,
    /// Feedback bodies on the deployment, in order.
    pub feedback: Vec<Value>,
    /// Feedback bodies on the cancel request, in order.
    pub cancel_feedback: Vec<Value>,
}

impl Action {
    /// The `execution` of each deployment feedback, in order.
    pub fn executions(&self) -> Vec<String> {
        self.feedback
            .iter()
            .map(|f| {
                let e = f["status"]["execution"].as_str().unwrap_or("?");
                match f["status"]["result"]["finished"].as_str() {
                    Some("none") | None => e.to_owned(),
                    Some(r) => format!("{e}:{r}"),
                }
            })
            .collect()
    }

    /// Every detail line sent on the deployment.
    pub fn details(&self) -> String {
        self.feedback
            .iter()
            .flat_map(|f| {
                f["status"]["details"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|d| d.as_str().map(str::to_owned))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One artifact download request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub file: String,
    pub range_start: Option<u64>,
    pub status: u16,
}

#[derive(Default)]
struct Target {
    token: Option<String>,
    attributes: BTreeMap<String, String>,
    /// The configData link is shown (registration, after a success, or an
    /// operator's request).
    request_attributes: bool,
    polls: u32,
    refused: u32,
    /// configData requests taken.
    attribute_puts: u32,
}

#[derive(Default)]
struct State {
    tenant: String,
    sleep: String,
    gateway_token: Option<String>,
    anonymous: bool,
    /// `download` (https-style) or `download-http` (hawkBit's default).
    link_rel: String,
    max_status_entries: usize,
    targets: BTreeMap<String, Target>,
    actions: Vec<Action>,
    next_id: u64,
    downloads: Vec<Download>,
    /// Statuses answered to the next feedbacks, in order (faults).
    feedback_faults: Vec<u16>,
    /// Statuses answered to the next deploymentBase reads.
    deployment_faults: Vec<u16>,
    deployment_reads: u32,
}

/// The fake server.
pub struct FakeHawkbit {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl FakeHawkbit {
    /// A server for tenant `DEFAULT` polling every second, `download-http`
    /// links, at most 1000 status entries per action, no anonymous access.
    pub async fn start() -> io::Result<FakeHawkbit> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            tenant: "DEFAULT".into(),
            sleep: "00:00:01".into(),
            link_rel: "download-http".into(),
            max_status_entries: 1000,
            next_id: 100,
            ..State::default()
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move { serve(s, st, addr).await });
            }
        });
        Ok(FakeHawkbit { addr, state })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A target with its own token (`None`: only the gateway token or
    /// anonymous access gets in). New targets are asked for attributes.
    pub fn add_target(&self, id: &str, token: Option<&str>) {
        let mut s = self.lock();
        let t = s.targets.entry(id.to_owned()).or_default();
        t.token = token.map(str::to_owned);
        t.request_attributes = true;
    }

    pub fn set_gateway_token(&self, token: Option<&str>) {
        self.lock().gateway_token = token.map(str::to_owned);
    }

    pub fn set_anonymous(&self, on: bool) {
        self.lock().anonymous = on;
    }

    pub fn set_sleep(&self, sleep: &str) {
        self.lock().sleep = sleep.to_owned();
    }

    pub fn set_link_rel(&self, rel: &str) {
        self.lock().link_rel = rel.to_owned();
    }

    pub fn set_max_status_entries(&self, n: usize) {
        self.lock().max_status_entries = n;
    }

    /// The next feedback POSTs are answered with these statuses (and not
    /// stored), whatever their body.
    pub fn fail_feedback(&self, statuses: &[u16]) {
        self.lock().feedback_faults.extend_from_slice(statuses);
    }

    /// The next deploymentBase reads are answered with these statuses.
    pub fn fail_deployment(&self, statuses: &[u16]) {
        self.lock().deployment_faults.extend_from_slice(statuses);
    }

    /// deploymentBase reads so far.
    pub fn deployment_reads(&self) -> u32 {
        self.lock().deployment_reads
    }

    /// Assigns `d` to `target`; returns the action id.
    pub fn deploy(&self, target: &str, d: Deployment) -> u64 {
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.actions.push(Action {
            id,
            target: target.to_owned(),
            status: Status::Running,
            deployment: d,
            feedback: Vec::new(),
            cancel_feedback: Vec::new(),
        });
        id
    }

    fn with_action<T>(&self, id: u64, f: impl FnOnce(&mut Action) -> T) -> Option<T> {
        let mut s = self.lock();
        s.actions.iter_mut().find(|a| a.id == id).map(f)
    }

    /// Opens or closes the action's maintenance window.
    pub fn set_window(&self, id: u64, open: Option<bool>) {
        self.with_action(id, |a| a.deployment.window = open);
    }

    pub fn set_handling(&self, id: u64, download: &str, update: &str) {
        self.with_action(id, |a| {
            a.deployment.download = download.to_owned();
            a.deployment.update = update.to_owned();
        });
    }

    /// The operator cancels the action (it becomes CANCELING while open).
    pub fn cancel(&self, id: u64) {
        self.with_action(id, |a| {
            if !a.status.closed() {
                a.status = Status::Canceling;
            }
        });
    }

    /// Closes the action from the server's side (an operator's force quit).
    pub fn force_quit(&self, id: u64) {
        self.with_action(id, |a| a.status = Status::Canceled);
    }

    pub fn action(&self, id: u64) -> Option<Action> {
        self.lock().actions.iter().find(|a| a.id == id).cloned()
    }

    pub fn attributes(&self, target: &str) -> BTreeMap<String, String> {
        self.lock()
            .targets
            .get(target)
            .map(|t| t.attributes.clone())
            .unwrap_or_default()
    }

    /// Asks the target for its attributes again.
    pub fn request_attributes(&self, target: &str) {
        if let Some(t) = self.lock().targets.get_mut(target) {
            t.request_attributes = true;
        }
    }

    pub fn polls(&self, target: &str) -> u32 {
        self.lock().targets.get(target).map_or(0, |t| t.polls)
    }

    /// configData requests the target made that were taken.
    pub fn attribute_puts(&self, target: &str) -> u32 {
        self.lock()
            .targets
            .get(target)
            .map_or(0, |t| t.attribute_puts)
    }

    /// Requests refused for authentication.
    pub fn refused(&self, target: &str) -> u32 {
        self.lock().targets.get(target).map_or(0, |t| t.refused)
    }

    pub fn downloads(&self) -> Vec<Download> {
        self.lock().downloads.clone()
    }
}

/// The active action of `target`: the oldest one not closed.
fn active<'a>(s: &'a mut State, target: &str) -> Option<&'a mut Action> {
    s.actions
        .iter_mut()
        .find(|a| a.target == target && !a.status.closed())
}

fn authorised(s: &State, target: &str, req: &Request) -> bool {
    let given = req.header("authorization").unwrap_or("");
    let (scheme, token) = given.split_once(' ').unwrap_or(("", ""));
    let t = s.targets.get(target);
    match scheme {
        "TargetToken" => t.and_then(|t| t.token.as_deref()) == Some(token.trim()),
        "GatewayToken" => s.gateway_token.as_deref() == Some(token.trim()),
        _ => s.anonymous,
    }
}

fn deployment_json(s: &State, a: &Action, base: &str) -> Value {
    let d = &a.deployment;
    let artifacts: Vec<Value> = d
        .artifacts
        .iter()
        .map(|f| {
            let mut hashes = Map::new();
            if f.sha256 {
                hashes.insert("sha256".into(), json!(hex(&sha2::Sha256::digest(&f.data))));
            }
            if f.sha1 {
                hashes.insert("sha1".into(), json!(hex(&sha1::Sha1::digest(&f.data))));
            }
            if f.md5 {
                hashes.insert("md5".into(), json!(hex(&md5::Md5::digest(&f.data))));
            }
            let href = format!("{base}/softwaremodules/{}/artifacts/{}", a.id, f.filename);
            json!({"filename": f.filename, "size": f.data.len(), "hashes": hashes,
                   "_links": {s.link_rel.clone(): {"href": href},
                              format!("md5sum{}", s.link_rel.strip_prefix("download").unwrap_or("")): {"href": format!("{href}.MD5SUM")}}})
        })
        .collect();
    let mut dep = json!({"download": d.download, "update": d.update,
        "chunks": [{"part": "os", "version": d.version, "name": "pantavisor revision",
                    "artifacts": artifacts}]});
    match d.window {
        Some(true) => dep["maintenanceWindow"] = json!("available"),
        Some(false) => dep["maintenanceWindow"] = json!("unavailable"),
        None => {}
    }
    json!({"id": a.id.to_string(), "deployment": dep})
}

/// The `c` value of a deploymentBase link: changes with the action's state.
fn state_hash(a: &Action) -> u64 {
    let d = &a.deployment;
    let text = format!("{}{}{:?}", d.download, d.update, d.window);
    text.bytes()
        .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

const EXECUTIONS: [&str; 8] = [
    "closed",
    "proceeding",
    "canceled",
    "scheduled",
    "rejected",
    "resumed",
    "downloaded",
    "download",
];

/// Checks a feedback body as hawkBit's models do; `Err` is a 400.
fn feedback_problem(b: &Value) -> Option<String> {
    let st = b.get("status")?;
    let e = st.get("execution").and_then(Value::as_str)?;
    if !EXECUTIONS.contains(&e) {
        return Some(format!("unknown execution {e}"));
    }
    let f = st
        .get("result")
        .and_then(|r| r.get("finished"))
        .and_then(Value::as_str)?;
    if !["success", "failure", "none"].contains(&f) {
        return Some(format!("unknown finished {f}"));
    }
    if let Some(p) = st.get("result").and_then(|r| r.get("progress")) {
        p.get("cnt").and_then(Value::as_u64)?;
    }
    None
}

fn route(s: &mut State, req: &Request, host: SocketAddr) -> (Response, Option<Vec<u8>>) {
    let prefix = format!("/{}/controller/v1/", s.tenant);
    let Some(rest) = req.path.strip_prefix(&prefix) else {
        return (Response::new(404), None);
    };
    let mut parts = rest.split('/');
    let target = parts.next().unwrap_or("").to_owned();
    let tail: Vec<&str> = parts.collect();
    if !s.targets.contains_key(&target) {
        return (Response::new(404), None);
    }
    if !authorised(s, &target, req) {
        if let Some(t) = s.targets.get_mut(&target) {
            t.refused += 1;
        }
        return (Response::new(401), None);
    }
    // Links name the host the request came by, as hawkBit does.
    let authority = req
        .header("host")
        .map(str::to_owned)
        .unwrap_or_else(|| host.to_string());
    let base = format!("http://{authority}{prefix}{target}");
    let json = |v: Value| (Response::json(200, v.to_string()), None);
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    match (req.method.as_str(), tail.as_slice()) {
        ("GET", []) => {
            let sleep = s.sleep.clone();
            let t = s.targets.get_mut(&target).map(|t| {
                t.polls += 1;
                t.request_attributes
            });
            let mut links = Map::new();
            if t == Some(true) {
                links.insert(
                    "configData".into(),
                    json!({"href": format!("{base}/configData")}),
                );
            }
            if let Some(a) = active(s, &target) {
                if a.status == Status::Canceling {
                    links.insert(
                        "cancelAction".into(),
                        json!({"href": format!("{base}/cancelAction/{}", a.id)}),
                    );
                } else {
                    links.insert(
                        "deploymentBase".into(),
                        json!({"href": format!("{base}/deploymentBase/{}?c={}", a.id, state_hash(a))}),
                    );
                }
            }
            json(json!({"config": {"polling": {"sleep": sleep}}, "_links": links}))
        }
        ("GET", ["deploymentBase", id]) => {
            s.deployment_reads += 1;
            if !s.deployment_faults.is_empty() {
                let code = s.deployment_faults.remove(0);
                return (Response::new(code), None);
            }
            let found = s.actions.iter().find(|a| {
                a.target == target
                    && a.id.to_string() == *id
                    && !a.status.closed()
                    && a.status != Status::Canceling
            });
            match found {
                Some(a) => json(deployment_json(s, a, &base)),
                None => (Response::new(404), None),
            }
        }
        ("POST", ["deploymentBase" | "cancelAction", id, "feedback"]) => {
            if !s.feedback_faults.is_empty() {
                let code = s.feedback_faults.remove(0);
                return (Response::new(code), None);
            }
            let cancel = tail[0] == "cancelAction";
            if let Some(p) = feedback_problem(&body) {
                return (Response::json(400, json!({"message": p}).to_string()), None);
            }
            let max = s.max_status_entries;
            let Some(a) = s
                .actions
                .iter_mut()
                .find(|a| a.target == target && a.id.to_string() == *id)
            else {
                return (Response::new(404), None);
            };
            if a.status.closed() {
                return (Response::new(410), None);
            }
            if cancel && a.status != Status::Canceling {
                return (Response::new(404), None);
            }
            if a.feedback.len() + a.cancel_feedback.len() >= max {
                return (Response::new(429), None);
            }
            let e = body["status"]["execution"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let f = body["status"]["result"]["finished"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let mut success = false;
            if cancel {
                a.cancel_feedback.push(body);
                a.status = match (e.as_str(), f.as_str()) {
                    ("closed", "failure") => Status::Error,
                    ("closed", _) => Status::Canceled,
                    ("rejected", _) => Status::CancelRejected,
                    _ => a.status,
                };
            } else {
                a.feedback.push(body);
                match (e.as_str(), f.as_str()) {
                    ("closed", "failure") => a.status = Status::Error,
                    ("closed", _) => {
                        a.status = Status::Finished;
                        success = true;
                    }
                    ("canceled", _) => a.status = Status::Canceled,
                    _ => {}
                }
            }
            if success {
                if let Some(t) = s.targets.get_mut(&target) {
                    t.request_attributes = true;
                }
            }
            (Response::new(200), None)
        }
        ("GET", ["cancelAction", id]) => {
            let found = s.actions.iter().any(|a| {
                a.target == target && a.id.to_string() == *id && a.status == Status::Canceling
            });
            if found {
                json(json!({"id": id, "cancelAction": {"stopId": id}}))
            } else {
                (Response::new(404), None)
            }
        }
        ("PUT", ["configData"]) => {
            let Some(data) = body
                .get("data")
                .and_then(Value::as_object)
                .filter(|d| !d.is_empty())
            else {
                return (
                    Response::json(400, r#"{"message":"data must not be empty"}"#),
                    None,
                );
            };
            let mut map = BTreeMap::new();
            for (k, v) in data {
                let Some(v) = v.as_str() else {
                    return (
                        Response::json(400, r#"{"message":"values are strings"}"#),
                        None,
                    );
                };
                if k.chars().count() > 128 || v.chars().count() > 128 {
                    return (
                        Response::json(400, r#"{"message":"128 characters at most"}"#),
                        None,
                    );
                }
                map.insert(k.clone(), v.to_owned());
            }
            let Some(t) = s.targets.get_mut(&target) else {
                return (Response::new(404), None);
            };
            let mode = body.get("mode").and_then(Value::as_str).unwrap_or("merge");
            let mut next = t.attributes.clone();
            match mode {
                "merge" => next.extend(map),
                "replace" => next = map,
                "remove" => next.retain(|k, _| !map.contains_key(k)),
                _ => return (Response::json(400, r#"{"message":"unknown mode"}"#), None),
            }
            if next.len() > 100 {
                return (Response::new(429), None);
            }
            t.attributes = next;
            t.request_attributes = false;
            t.attribute_puts += 1;
            (Response::new(200), None)
        }
        ("GET", ["softwaremodules", sm, "artifacts", file]) => {
            let data = s
                .actions
                .iter()
                .find(|a| a.id.to_string() == *sm)
                .and_then(|a| a.deployment.artifacts.iter().find(|f| f.filename == *file))
                .map(|f| f.data.clone());
            let Some(data) = data else {
                return (Response::new(404), None);
            };
            let start = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<u64>().ok());
            let (status, body) = match start {
                Some(st) if st < data.len() as u64 => (206, data[st as usize..].to_vec()),
                Some(_) => (416, Vec::new()),
                None => (200, data),
            };
            s.downloads.push(Download {
                file: (*file).to_owned(),
                range_start: start,
                status,
            });
            (Response::new(status), Some(body))
        }
        _ => (Response::new(405), None),
    }
}

async fn serve(s: tokio::net::TcpStream, st: Arc<Mutex<State>>, host: SocketAddr) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    while let Ok(req) = http::read_request(&mut r).await {
        let (resp, raw) = {
            let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
            route(&mut s, &req, host)
        };
        let body = raw.unwrap_or_else(|| resp.body.clone());
        if http::write_head(&mut w, &resp, body.len() as u64, req.wants_close())
            .await
            .is_err()
            || w.write_all(&body).await.is_err()
        {
            return;
        }
        let _ = w.flush().await;
        if req.wants_close() {
            return;
        }
    }
}
