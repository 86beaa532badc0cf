//! The `pantahub` adapter: the device side of Pantacor Hub, as Pantavisor's
//! built-in client speaks it (`docs/pantahub.md`).
//!
//! - Identity: self-registration (`POST /devices/`, optional auto-claim token),
//!   credentials kept with mode 0600, the claim challenge shown in a log line, a
//!   file and device-meta, and a fresh login once claimed.
//! - Factory sync: the running revision's objects and state uploaded when the
//!   device has no trail yet.
//! - Steps: the lowest pending step becomes an engine offer `locals/<name>-<rev>`;
//!   progress goes back in Pantavisor's vocabulary; a hub-side cancel is honoured
//!   before INPROGRESS.
//! - Metadata: device-meta replaced when it changed (at most every 10 s), user-meta
//!   polled every 5 s into the engine's desired map.
//! - Logs: `POST /logs/` in batches of ≤ 200 entries and ≤ 256 KiB.
//!
//! ```toml
//! [[backend]]
//! type = "pantahub"
//! name = "hub"
//! url = "https://api.pantahub.com"
//! ca_file = "/etc/pv-bridge/hub-ca.pem"                   # optional
//! credentials_file = "/storage/pv-bridge/pantahub.creds"  # optional
//! autotok_file = "/etc/pv-bridge/autotok"                 # optional
//! ```

pub mod client;
pub mod creds;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, DeviceView, EngineLink,
    LogRecord, ObjectFetcher, ObjectReader, ObjectRef, ObjectSource, Offer, Progress, UpdateStatus,
    read_secret,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use client::{Client, ClientOptions, HubError, Method, status_error};
use creds::Creds;

/// Settings of a `pantahub` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PantahubConfig {
    /// The hub's API (`https://host[:port]`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Allow `http://` (tests, a hub on the same host).
    #[serde(default)]
    pub insecure: bool,
    /// Extra trust anchor (PEM), added to the system's.
    pub ca_file: Option<PathBuf>,
    /// The device's credentials (Pantavisor's `pantahub.config` format). Absent:
    /// register and keep them in the adapter's state directory.
    pub credentials_file: Option<PathBuf>,
    /// Auto-claim token sent at registration.
    pub autotok_file: Option<PathBuf>,
    /// HTTP proxy (`http://host:port`); default `HTTPS_PROXY`/`HTTP_PROXY`, with
    /// `NO_PROXY` honoured.
    pub proxy: Option<String>,
    /// Seconds between polls for steps (and while waiting for the claim).
    #[serde(default = "default_poll")]
    pub poll_interval_secs: f64,
    /// Seconds between user-meta polls.
    #[serde(default = "default_usermeta")]
    pub user_meta_interval_secs: f64,
    /// Least seconds between device-meta uploads.
    #[serde(default = "default_devmeta")]
    pub device_meta_interval_secs: f64,
    /// Least seconds between two progress reports of the same status.
    #[serde(default = "default_progress")]
    pub progress_interval_secs: f64,
    /// Seconds a call may take before it counts as unanswered.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: f64,
    /// Largest answer accepted from the hub (Pantavisor: 2 MiB).
    #[serde(default = "default_max_body")]
    pub max_response_bytes: usize,
}

fn default_url() -> String {
    "https://api.pantahub.com".into()
}
fn default_poll() -> f64 {
    5.0
}
fn default_usermeta() -> f64 {
    5.0
}
fn default_devmeta() -> f64 {
    10.0
}
fn default_progress() -> f64 {
    6.0
}
fn default_timeout() -> f64 {
    60.0
}
fn default_max_body() -> usize {
    2 * 1024 * 1024
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.05, 86_400.0))
}

impl PantahubConfig {
    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), String> {
        let u = self.url.as_str();
        let rest = if let Some(r) = u.strip_prefix("https://") {
            r
        } else if let Some(r) = u.strip_prefix("http://") {
            if !self.insecure {
                return Err(format!(
                    "url {u:?}: plain http needs insecure = true (Pantavisor only talks TLS to the hub)"
                ));
            }
            r
        } else {
            return Err(format!("url {u:?}: must start with https://"));
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "url {u:?}: give the scheme, host and optional port only"
            ));
        }
        for (k, v) in [
            ("poll_interval_secs", self.poll_interval_secs),
            ("user_meta_interval_secs", self.user_meta_interval_secs),
            ("device_meta_interval_secs", self.device_meta_interval_secs),
            ("progress_interval_secs", self.progress_interval_secs),
            ("request_timeout_secs", self.request_timeout_secs),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{k} must be a positive number of seconds"));
            }
        }
        if self.max_response_bytes < 64 * 1024 {
            return Err("max_response_bytes must be at least 65536".into());
        }
        if let Some(p) = &self.credentials_file
            && let Err(e) = Creds::load(p)
        {
            return Err(format!("credentials_file: {e}"));
        }
        if let Some(p) = &self.autotok_file {
            read_secret("autotok_file", p).map_err(|e| e.to_string())?;
        }
        if let Some(p) = &self.ca_file {
            std::fs::read(p).map_err(|e| format!("ca_file: cannot read {}: {e}", p.display()))?;
        }
        Ok(())
    }
}

/// What the adapter remembers between runs (`hub.json` in its state directory).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Memory {
    /// The device revision uploaded as the hub's revision 0.
    factory_rev: Option<String>,
    /// Final progress sent for hub revisions: sent again while the hub still lists
    /// the step as pending.
    #[serde(default)]
    finals: BTreeMap<i64, Value>,
}

impl Memory {
    fn load(path: &Path) -> Memory {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Path) {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        if let Err(e) = pv_adapter_api::durable::write_durable(path, &bytes) {
            warn!(file = %path.display(), error = %e, "cannot save the adapter's memory");
        }
    }
}

/// The Pantacor Hub adapter.
pub struct PantahubAdapter {
    name: String,
    cfg: PantahubConfig,
    work_dir: PathBuf,
}

impl PantahubAdapter {
    /// `work_dir` keeps self-registered credentials, the claim challenge and what
    /// the adapter must remember across restarts.
    pub fn new(name: &str, cfg: PantahubConfig, work_dir: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            cfg,
            work_dir,
        }
    }
}

impl Adapter for PantahubAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            updates: true,
            user_meta: true,
            device_meta: true,
            logs: true,
            commands: false,
        }
    }

    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            self.cfg.validate().map_err(AdapterError::Config)?;
            let client = Client::new(ClientOptions {
                base: self.cfg.url.clone(),
                ca_file: self.cfg.ca_file.as_deref(),
                proxy: self.cfg.proxy.clone(),
                timeout: secs(self.cfg.request_timeout_secs),
                max_body: self.cfg.max_response_bytes,
            })
            .map_err(AdapterError::Config)?;
            let memory = Memory::load(&self.work_dir.join("hub.json"));
            let hub = Hub {
                prefix: wire::id_prefix(&self.name),
                client: Arc::new(client),
                cfg: self.cfg,
                work: self.work_dir,
                link: link.clone(),
                memory: Arc::new(std::sync::Mutex::new(memory)),
            };
            tokio::select! {
                r = hub.run() => r,
                _ = link.stopping() => Ok(()),
            }
        })
    }
}

/// Aborts a spawned task when dropped (background loops end with the adapter).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Clone)]
struct Hub {
    prefix: String,
    client: Arc<Client>,
    cfg: PantahubConfig,
    work: PathBuf,
    link: EngineLink,
    /// `hub.json`, read once; written through on every change.
    memory: Arc<std::sync::Mutex<Memory>>,
}

/// The device record fields the adapter reads.
#[derive(Debug, Deserialize)]
struct DeviceRecord {
    #[serde(default)]
    owner: String,
    #[serde(default)]
    challenge: String,
}

/// The hub step the engine is working on.
struct Active {
    rev: i64,
    id: String,
    /// Status and message last sent to the hub.
    sent: Option<(UpdateStatus, String)>,
    last_put: Option<Instant>,
    /// Progress to send, one entry per status (a report of the same status
    /// replaces the queued one): no status is skipped however fast they change.
    queue: std::collections::VecDeque<Progress>,
    download_started: u64,
    owner_cancel: bool,
    /// The last report failed: wait the interval before the next attempt.
    failed: bool,
}

impl Hub {
    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes what the adapter remembers and saves it.
    fn remember(&self, change: impl FnOnce(&mut Memory)) {
        let mut mem = self.memory();
        change(&mut mem);
        mem.save(&self.work.join("hub.json"));
    }

    /// The hub revision of the device's running revision, if it is one.
    fn hub_rev(&self, running: &str) -> Option<i64> {
        let mem = self.memory();
        wire::hub_rev_of_running(&self.prefix, mem.factory_rev.as_deref(), running)
    }

    fn poll(&self) -> Duration {
        secs(self.cfg.poll_interval_secs)
    }

    async fn run(self) -> Result<(), AdapterError> {
        let creds = self.identity().await?;
        let device_id = creds.id.clone();
        let _ = self.link.send(BackendEvent::Connected).await;
        self.factory_sync(&device_id).await?;
        let meta = AbortOnDrop(tokio::spawn(self.clone().metadata(device_id.clone())));
        let logs = AbortOnDrop(tokio::spawn(self.clone().logs()));
        let r = self.steps(&device_id).await;
        drop((meta, logs));
        r
    }

    // --- identity ----------------------------------------------------------------

    /// Registers if needed, waits for the claim, and logs in with an owner.
    async fn identity(&self) -> Result<Creds, AdapterError> {
        let own_file = self.work.join("pantahub.creds");
        let configured = self.cfg.credentials_file.is_some();
        let mut said = String::new();
        loop {
            let creds = match &self.cfg.credentials_file {
                Some(p) => Creds::load(p).map_err(AdapterError::Config)?,
                None => match Creds::load(&own_file) {
                    Ok(c) => c,
                    Err(_) => match self.register(&own_file).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "cannot register with the hub; retrying");
                            self.disconnected(&e).await;
                            tokio::time::sleep(self.poll()).await;
                            continue;
                        }
                    },
                },
            };
            self.client.set_creds(creds.clone());
            let _ = pv_adapter_api::durable::write_durable(
                &self.work.join("device-id"),
                creds.id.as_bytes(),
            );
            let path = format!("/devices/{}", creds.id);
            let rec: Result<DeviceRecord, HubError> =
                self.client.json(Method::GET, &path, None).await;
            match rec {
                Ok(d) if !d.owner.is_empty() => {
                    if !said.is_empty() {
                        info!(backend = %self.link.backend(), device = %creds.id, "device claimed");
                    }
                    self.show_challenge("").await;
                    // The token was minted before the claim: its owner is stale.
                    self.client.drop_token().await;
                    match self.client.login().await {
                        Ok(()) => {
                            info!(backend = %self.link.backend(), device = %creds.id, hub = %self.client.base(), "logged in to Pantacor Hub");
                            return Ok(creds);
                        }
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "cannot log in");
                            self.disconnected(&e).await;
                        }
                    }
                }
                Ok(d) => {
                    if d.challenge != said {
                        info!(
                            backend = %self.link.backend(),
                            device = %creds.id,
                            challenge = %d.challenge,
                            "waiting to be claimed: claim this device on Pantacor Hub with its id and challenge"
                        );
                        self.show_challenge(&d.challenge).await;
                        said = d.challenge.clone();
                    }
                    let _ = self
                        .client
                        .call(
                            Method::PUT,
                            &format!("/devices/{}/device-meta", creds.id),
                            Some(
                                json!({"pantahub.state": "claim", "pantahub.claimed": "0"})
                                    .to_string()
                                    .into_bytes(),
                            ),
                        )
                        .await;
                }
                Err(e) if !configured && matches!(e.status(), Some(401 | 403 | 404)) => {
                    // Unclaimed and unknown to the hub (deleted there): register again,
                    // as Pantavisor does while unclaimed.
                    warn!(backend = %self.link.backend(), error = %e, "the hub does not know this device; registering again");
                    let _ = std::fs::remove_file(&own_file);
                    self.client.drop_token().await;
                }
                Err(e) => {
                    warn!(backend = %self.link.backend(), error = %e, "cannot read the device record");
                    self.disconnected(&e).await;
                }
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    async fn register(&self, file: &Path) -> Result<Creds, HubError> {
        let mut headers = Vec::new();
        if let Some(p) = &self.cfg.autotok_file {
            let tok = read_secret("autotok_file", p).map_err(|e| HubError::Json {
                what: "autotok_file".into(),
                detail: e.to_string(),
            })?;
            headers.push(("Pantahub-Devices-Auto-Token-V1", tok));
        }
        let r = self
            .client
            .anonymous(Method::POST, "/devices/", &headers, None)
            .await?;
        if r.status != 200 {
            let e = status_error("POST /devices/", &r);
            if r.status == 400 && !headers.is_empty() {
                warn!(backend = %self.link.backend(), "the hub refused the auto-claim token");
            }
            return Err(e);
        }
        #[derive(Deserialize)]
        struct Registered {
            id: String,
            prn: String,
            secret: String,
        }
        let reg: Registered = serde_json::from_slice(&r.body).map_err(|e| HubError::Json {
            what: "POST /devices/".into(),
            detail: format!("unexpected answer: {e}"),
        })?;
        let creds = Creds {
            id: reg.id,
            prn: reg.prn,
            secret: reg.secret,
        };
        if !creds::is_device_id(&creds.id) {
            return Err(HubError::Json {
                what: "POST /devices/".into(),
                detail: format!("device id {:?} is not 24 hex digits", creds.id),
            });
        }
        creds.save(file).map_err(|e| HubError::Json {
            what: "saving credentials".into(),
            detail: e,
        })?;
        info!(backend = %self.link.backend(), device = %creds.id, file = %file.display(), "registered with Pantacor Hub");
        Ok(creds)
    }

    /// The claim challenge in `challenge` (state dir) and device-meta; empty once
    /// claimed.
    async fn show_challenge(&self, challenge: &str) {
        let _ = std::fs::create_dir_all(&self.work);
        let _ = pv_adapter_api::durable::write_durable(
            &self.work.join("challenge"),
            challenge.as_bytes(),
        );
        if let Some(store) = self.link.device() {
            let claimed = if challenge.is_empty() { "1" } else { "0" };
            let value = (!challenge.is_empty()).then_some(challenge);
            for (k, v) in [
                ("pantahub.challenge", value),
                ("pantahub.claimed", Some(claimed)),
            ] {
                if let Err(e) = store.set_device_meta(k, v).await {
                    debug!(key = k, error = %e, "cannot set device-meta");
                }
            }
        }
    }

    async fn disconnected(&self, e: &HubError) {
        if e.is_transient() {
            let _ = self
                .link
                .send(BackendEvent::Disconnected {
                    reason: e.to_string(),
                })
                .await;
        }
    }

    // --- factory sync ------------------------------------------------------------

    async fn factory_sync(&self, device: &str) -> Result<(), AdapterError> {
        loop {
            match self.try_sync(device).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(backend = %self.link.backend(), error = %e, "factory sync failed; retrying");
                    tokio::time::sleep(self.poll()).await;
                }
            }
        }
    }

    async fn try_sync(&self, device: &str) -> Result<(), String> {
        let trails: Vec<Value> = self
            .client
            .json(Method::GET, "/trails/", None)
            .await
            .map_err(|e| e.to_string())?;
        if !trails.is_empty() {
            return Ok(());
        }
        let mut view = self.link.view();
        let running = loop {
            if let Some(r) = view.borrow().running.clone() {
                break r;
            }
            if view.changed().await.is_err() {
                return Err("the engine stopped".into());
            }
        };
        let store = self
            .link
            .device()
            .ok_or("the engine gives no access to the device's store")?;
        let state = store.state(&running).await.map_err(|e| e.to_string())?;
        let parsed: Value = serde_json::from_slice(&state)
            .map_err(|e| format!("the state of {running} is not JSON: {e}"))?;
        let objects = wire::state_objects(&parsed)?;
        info!(backend = %self.link.backend(), device, revision = %running, objects = objects.len(), "uploading the running revision as the factory state");
        let mut uploaded = 0u64;
        let mut seen = std::collections::BTreeSet::new();
        for (name, sha) in &objects {
            if !seen.insert(sha.clone()) {
                continue;
            }
            uploaded += self.upload_object(&*store, name, sha).await?;
        }
        let r = self
            .client
            .call(Method::POST, "/trails/", Some(state))
            .await
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(status_error("POST /trails/", &r).to_string());
        }
        self.remember(|m| m.factory_rev = Some(running.clone()));
        info!(backend = %self.link.backend(), revision = %running, bytes = uploaded, "factory state synced to the hub");
        Ok(())
    }

    /// `POST /objects/` and, unless the hub has it (409), a streamed `PUT` of the
    /// bytes to the signed URL. Returns the bytes sent.
    async fn upload_object(
        &self,
        store: &dyn pv_adapter_api::DeviceStore,
        name: &str,
        sha: &str,
    ) -> Result<u64, String> {
        let (reader, len) = store.object(sha).await.map_err(|e| e.to_string())?;
        let body = json!({"objectname": name, "size": len.to_string(), "sha256sum": sha});
        let r = self
            .client
            .call(
                Method::POST,
                "/objects/",
                Some(body.to_string().into_bytes()),
            )
            .await
            .map_err(|e| e.to_string())?;
        match r.status {
            409 => {
                debug!(object = %sha, "the hub has it already");
                return Ok(0);
            }
            200 => {}
            _ => return Err(status_error("POST /objects/", &r).to_string()),
        }
        let obj: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("POST /objects/: unexpected answer: {e}"))?;
        let put = obj
            .get("signed-puturl")
            .and_then(Value::as_str)
            .ok_or("POST /objects/: no signed-puturl in the answer")?;
        let url = self.client.upload_url(put);
        let resp = self
            .client
            .http()
            .request("PUT", &url)
            .header("Content-Type", "application/json")
            .body(pv_http::Body::Reader(reader, len))
            .send()
            .await
            .map_err(|e| format!("PUT object {sha}: {e}"))?;
        let status = resp.status;
        let _ = resp.bytes(64 * 1024).await;
        if status != 200 {
            // A writable object whose bytes changed since it was installed no longer
            // matches its name: Pantavisor skips those too.
            warn!(backend = %self.link.backend(), object = %sha, name, status, "the hub refused the object's bytes; skipping it");
            return Ok(0);
        }
        info!(backend = %self.link.backend(), object = %sha, name, bytes = len, "object uploaded");
        Ok(len)
    }

    // --- steps and progress ------------------------------------------------------

    async fn steps(&self, device: &str) -> Result<(), AdapterError> {
        let mut view = self.link.view();
        let mut poll = tokio::time::interval(self.poll());
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(Duration::from_millis(500));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut active: Option<Active> = None;
        let mut online = true;
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    match self.poll_steps(device, &mut active).await {
                        Ok(()) => {
                            if !online {
                                info!(backend = %self.link.backend(), "hub reachable again");
                                let _ = self.link.send(BackendEvent::Connected).await;
                                online = true;
                            }
                        }
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "polling steps failed");
                            if e.is_transient() && online {
                                online = false;
                                self.disconnected(&e).await;
                            }
                        }
                    }
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        return Err(AdapterError::EngineGone);
                    }
                    let v = view.borrow_and_update().clone();
                    self.note_progress(&v, &mut active);
                    self.flush(device, &mut active).await;
                }
                _ = flush.tick() => self.flush(device, &mut active).await,
            }
        }
    }

    /// Takes the engine's latest progress for the active step.
    fn note_progress(&self, v: &DeviceView, active: &mut Option<Active>) {
        let Some(p) = v.update.as_ref() else { return };
        let Some(rev) = wire::rev_of_id(&self.prefix, &p.id) else {
            return;
        };
        let a = active.get_or_insert_with(|| Active {
            rev,
            id: p.id.clone(),
            sent: None,
            last_put: None,
            queue: Default::default(),
            download_started: 0,
            owner_cancel: false,
            failed: false,
        });
        if a.rev != rev {
            return;
        }
        if p.status == UpdateStatus::Downloading && a.download_started == 0 {
            a.download_started = unix_now();
        }
        // The engine passes through Pantavisor's QUEUED after its own download;
        // the hub, like Pantavisor's client, only ever moves forward.
        let stage = |st: UpdateStatus| match st {
            UpdateStatus::Queued => 0,
            UpdateStatus::Downloading => 1,
            UpdateStatus::Inprogress => 2,
            UpdateStatus::Testing => 3,
            _ => 4,
        };
        let latest = a
            .queue
            .back()
            .map(|q| q.status)
            .or(a.sent.as_ref().map(|(s, _)| *s));
        if latest.is_some_and(|l| stage(l) > stage(p.status)) {
            return;
        }
        let reported = a.queue.is_empty()
            && p.status != UpdateStatus::Downloading
            && a.sent
                .as_ref()
                .is_some_and(|(s, m)| *s == p.status && *m == p.status_msg);
        match a.queue.back_mut() {
            Some(last) if last.status == p.status => *last = p.clone(),
            _ if reported => {}
            _ => a.queue.push_back(p.clone()),
        }
    }

    /// Sends the active step's progress when it changed status, or when the
    /// interval passed; checks for a hub-side cancel first while it can still be
    /// honoured.
    async fn flush(&self, device: &str, active: &mut Option<Active>) {
        while self.flush_one(device, active).await {}
    }

    /// Sends the oldest queued report if it may go now; true if another may follow.
    async fn flush_one(&self, device: &str, active: &mut Option<Active>) -> bool {
        let Some(a) = active.as_mut() else {
            return false;
        };
        let Some(p) = a.queue.front().cloned() else {
            return false;
        };
        let changed = a.sent.as_ref() != Some(&(p.status, p.status_msg.clone()));
        let due = a
            .last_put
            .is_none_or(|t| t.elapsed() >= secs(self.cfg.progress_interval_secs));
        if !due && (!changed || a.failed) {
            return false;
        }
        if matches!(p.status, UpdateStatus::Queued | UpdateStatus::Downloading) && !a.owner_cancel {
            // Pantavisor re-reads its step before each report: a PUT would
            // overwrite a cancel the owner just made.
            if self.cancelled_on_hub(device, a.rev).await {
                info!(backend = %self.link.backend(), rev = a.rev, "the owner cancelled this revision on the hub");
                a.owner_cancel = true;
                let _ = self
                    .link
                    .send(BackendEvent::Cancel { id: a.id.clone() })
                    .await;
                return false;
            }
        }
        let body = wire::progress_body(&p, a.owner_cancel, a.download_started, unix_now());
        let path = format!("/trails/{device}/steps/{}/progress", a.rev);
        if p.status.is_final() {
            // Remember it first: it is sent again while the hub lists the step.
            self.remember(|m| {
                m.finals.insert(a.rev, body.clone());
            });
        }
        a.last_put = Some(Instant::now());
        match self
            .client
            .call(Method::PUT, &path, Some(body.to_string().into_bytes()))
            .await
        {
            Ok(r) if r.status == 200 => {
                debug!(rev = a.rev, status = %p.status, "progress reported");
                a.sent = Some((p.status, p.status_msg.clone()));
                a.failed = false;
                a.queue.pop_front();
                if p.status.is_final() {
                    info!(backend = %self.link.backend(), rev = a.rev, status = %p.status, "final status reported to the hub");
                    *active = None;
                    return false;
                }
                true
            }
            Ok(r) => {
                warn!(backend = %self.link.backend(), error = %status_error(&format!("PUT {path}"), &r), "progress not accepted");
                a.failed = true;
                false
            }
            Err(e) => {
                warn!(backend = %self.link.backend(), error = %e, "cannot report progress");
                a.failed = true;
                false
            }
        }
    }

    async fn cancelled_on_hub(&self, device: &str, rev: i64) -> bool {
        let path = format!("/trails/{device}/steps/{rev}");
        match self
            .client
            .json::<wire::Step>(Method::GET, &path, None)
            .await
        {
            Ok(s) => s.status() == "CANCEL",
            Err(e) => {
                debug!(error = %e, "cannot re-read the step");
                false
            }
        }
    }

    async fn poll_steps(&self, device: &str, active: &mut Option<Active>) -> Result<(), HubError> {
        let path = format!("/trails/{device}/steps{}", wire::PENDING_QUERY);
        let r = self.client.call(Method::GET, &path, None).await?;
        if r.status != 200 {
            return Err(status_error("GET /trails/<id>/steps", &r));
        }
        let steps: Vec<Value> = serde_json::from_slice(&r.body).map_err(|e| HubError::Json {
            what: "GET /trails/<id>/steps".into(),
            detail: format!("not a JSON array of steps: {e}"),
        })?;
        let Some(first) = steps.into_iter().next() else {
            return Ok(());
        };
        let rev = first.get("rev").and_then(Value::as_i64);
        let step: wire::Step = match serde_json::from_value(first) {
            Ok(s) => s,
            Err(e) => {
                warn!(backend = %self.link.backend(), error = %e, "the hub sent a malformed step");
                if let Some(rev) = rev {
                    self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                        .await;
                }
                return Ok(());
            }
        };
        let known = self.memory().finals.get(&step.rev).cloned();
        if let Some(body) = known {
            // The hub still lists it: our final report was lost or overwritten.
            info!(backend = %self.link.backend(), rev = step.rev, "sending the final status again");
            let p = format!("/trails/{device}/steps/{}/progress", step.rev);
            let _ = self
                .client
                .call(Method::PUT, &p, Some(body.to_string().into_bytes()))
                .await?;
            return Ok(());
        }
        if let Some(a) = active.as_ref() {
            if a.rev == step.rev || !a.sent.as_ref().is_some_and(|(s, _)| s.is_final()) {
                return Ok(());
            }
        }
        if step.status() == "CANCEL" {
            return Ok(());
        }
        self.offer(device, step, active).await
    }

    /// Reports a final WONTGO for a step the engine never got.
    async fn refuse(&self, device: &str, rev: i64, why: &str) {
        warn!(backend = %self.link.backend(), rev, reason = %why, "refusing the revision");
        let body = wire::final_body("WONTGO", why);
        self.remember(|m| {
            m.finals.insert(rev, body.clone());
        });
        let p = format!("/trails/{device}/steps/{rev}/progress");
        if let Err(e) = self
            .client
            .call(Method::PUT, &p, Some(body.to_string().into_bytes()))
            .await
        {
            warn!(backend = %self.link.backend(), error = %e, "cannot report WONTGO");
        }
    }

    async fn offer(
        &self,
        device: &str,
        step: wire::Step,
        active: &mut Option<Active>,
    ) -> Result<(), HubError> {
        let rev = step.rev;
        let state: Value = match serde_json::from_str(step.state.get()) {
            Ok(v) => v,
            Err(e) => {
                self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                    .await;
                return Ok(());
            }
        };
        let objects = match wire::state_objects(&state) {
            Ok(o) => o,
            Err(e) => {
                self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                    .await;
                return Ok(());
            }
        };
        let fetcher = Arc::new(HubObjects {
            client: self.client.clone(),
            urls: std::sync::Mutex::new(HashMap::new()),
        });
        let mut refs = BTreeMap::new();
        for (name, sha) in objects {
            if refs.contains_key(&sha) {
                continue;
            }
            match fetcher.meta(&sha).await {
                Ok((size, _)) => {
                    refs.insert(
                        sha.clone(),
                        ObjectRef {
                            sha256: sha.clone(),
                            size: Some(size),
                            source: ObjectSource::Adapter { key: sha },
                        },
                    );
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    self.refuse(
                        device,
                        rev,
                        &format!("object {name} ({sha}) is not available on the hub: {e}"),
                    )
                    .await;
                    return Ok(());
                }
            }
        }
        let id = wire::offer_id(&self.prefix, rev);
        info!(backend = %self.link.backend(), rev, id = %id, msg = %step.commit_msg, objects = refs.len(), "new revision from the hub");
        // Like Pantavisor, say QUEUED as soon as the step is taken: the engine's
        // own QUEUED may pass before this adapter sees it.
        let queued = Progress {
            id: id.clone(),
            rev: format!("locals/{id}"),
            status: UpdateStatus::Queued,
            status_msg: "Update queued".into(),
            progress: 5,
            bytes_done: 0,
            bytes_total: refs.values().filter_map(|r| r.size).sum(),
            objects_done: 0,
            objects_total: refs.len() as u32,
            logs: None,
        };
        *active = Some(Active {
            rev,
            id: id.clone(),
            sent: None,
            last_put: None,
            queue: [queued].into(),
            download_started: 0,
            owner_cancel: false,
            failed: false,
        });
        let offer = Offer {
            id,
            state: step.state.get().as_bytes().to_vec(),
            state_url: None,
            objects: refs,
            fetcher: Some(fetcher as Arc<dyn ObjectFetcher>),
        };
        self.link
            .send(BackendEvent::Offer(offer))
            .await
            .map_err(|_| HubError::Transport {
                what: "engine".into(),
                detail: "the engine stopped".into(),
            })
    }

    // --- metadata ------------------------------------------------------------------

    async fn metadata(self, device: String) {
        let mut view = self.link.view();
        let mut user = tokio::time::interval(secs(self.cfg.user_meta_interval_secs));
        user.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut devmeta = tokio::time::interval(secs(self.cfg.device_meta_interval_secs));
        devmeta.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_user: Option<BTreeMap<String, Value>> = None;
        let mut version = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let mut sent_dev: Option<Map<String, Value>> = None;
        loop {
            tokio::select! {
                _ = user.tick() => {
                    let path = format!("/devices/{device}/user-meta");
                    match self.client.json::<Map<String, Value>>(Method::GET, &path, None).await {
                        Ok(m) => {
                            // The answer is the whole set; null values are ignored.
                            let data: BTreeMap<String, Value> =
                                m.into_iter().filter(|(_, v)| !v.is_null()).collect();
                            if last_user.as_ref() != Some(&data) {
                                version += 1;
                                debug!(keys = data.len(), version, "user-meta changed on the hub");
                                if self.link.send(BackendEvent::UserMeta { version, data: data.clone() }).await.is_err() {
                                    return;
                                }
                                last_user = Some(data);
                            }
                        }
                        Err(e) => debug!(error = %e, "cannot read user-meta"),
                    }
                }
                _ = devmeta.tick() => {
                    let v = view.borrow_and_update().clone();
                    let map = self.device_meta(&v);
                    if sent_dev.as_ref() == Some(&map) {
                        continue;
                    }
                    let path = format!("/devices/{device}/device-meta");
                    let body = Value::Object(map.clone()).to_string().into_bytes();
                    match self.client.call(Method::PUT, &path, Some(body)).await {
                        Ok(r) if r.status == 200 => sent_dev = Some(map),
                        Ok(r) => warn!(backend = %self.link.backend(), error = %status_error(&format!("PUT {path}"), &r), "device-meta not accepted"),
                        Err(e) => debug!(error = %e, "cannot send device-meta"),
                    }
                }
            }
        }
    }

    /// The device-meta the hub gets: Pantavisor's, with `pantavisor.revision` as
    /// the hub's revision number when the running revision is one of the hub's
    /// (the device's own name in `pv-bridge.revision`), and the hub client's keys.
    fn device_meta(&self, v: &DeviceView) -> Map<String, Value> {
        let mut m: Map<String, Value> = v
            .device_meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(running) = &v.running {
            m.insert("pv-bridge.revision".into(), json!(running));
            if let Some(rev) = self.hub_rev(running) {
                m.insert("pantavisor.revision".into(), json!(rev.to_string()));
            }
        }
        m.insert("pantahub.claimed".into(), json!("1"));
        m.insert("pantahub.online".into(), json!("1"));
        m.insert("pantahub.state".into(), json!("idle"));
        m.remove("pantahub.challenge");
        m.insert("pv-bridge.version".into(), json!(env!("CARGO_PKG_VERSION")));
        m
    }

    // --- logs ----------------------------------------------------------------------

    async fn logs(self) {
        const MAX_ENTRIES: usize = 200;
        const MAX_BYTES: usize = 256 * 1024;
        let mut dropped_total = 0u64;
        loop {
            // Leave room for the JSON around each message.
            let Some(batch) = self.link.next_logs(MAX_ENTRIES, MAX_BYTES / 2).await else {
                return;
            };
            if batch.dropped > 0 {
                warn!(backend = %self.link.backend(), dropped = batch.dropped, "log lines were dropped before reaching this backend");
            }
            let running = self.link.view().borrow().running.clone();
            let rev = running
                .map(|r| self.hub_rev(&r).map_or(r, |n| n.to_string()))
                .unwrap_or_default();
            let entries: Vec<Value> = batch.records.iter().map(|r| entry(r, &rev)).collect();
            for chunk in chunks(&entries, MAX_ENTRIES, MAX_BYTES) {
                dropped_total += self.post_logs(chunk).await;
            }
            if dropped_total > 0 {
                debug!(dropped_total, "log entries refused by the hub so far");
            }
            self.link.ack_logs(batch.next);
        }
    }

    /// Posts one batch until the hub takes it; a batch it refuses is sent entry by
    /// entry and the refused entries are dropped. Returns how many were dropped.
    async fn post_logs(&self, chunk: &[Value]) -> u64 {
        let mut wait = Duration::from_secs(1);
        loop {
            let body = Value::Array(chunk.to_vec()).to_string().into_bytes();
            match self.client.call(Method::POST, "/logs/", Some(body)).await {
                Ok(r) if r.status == 200 => return 0,
                Ok(r) if matches!(r.status, 401 | 403 | 408 | 429) || r.status >= 500 => {
                    debug!(status = r.status, retry_in = ?wait, "log batch not taken; backing off");
                }
                Ok(r) => {
                    warn!(backend = %self.link.backend(), error = %status_error("POST /logs/", &r), entries = chunk.len(), "the hub refused a log batch; sending its entries one by one");
                    let mut dropped = 0;
                    for e in chunk {
                        if chunk.len() == 1 {
                            dropped += 1;
                            break;
                        }
                        dropped += Box::pin(self.post_logs(std::slice::from_ref(e))).await;
                    }
                    if chunk.len() == 1 {
                        warn!(backend = %self.link.backend(), "dropping a log entry the hub refuses");
                    }
                    return dropped;
                }
                Err(e) => debug!(error = %e, retry_in = ?wait, "cannot post logs; backing off"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }
}

/// One hub log entry.
fn entry(r: &LogRecord, rev: &str) -> Value {
    json!({
        "tsec": r.tsec, "tnano": r.tnano, "lvl": r.lvl, "src": r.src,
        "plat": r.plat, "rev": rev, "msg": r.msg,
    })
}

/// Splits entries into batches of at most `max_entries` and `max_bytes` of JSON.
fn chunks(entries: &[Value], max_entries: usize, max_bytes: usize) -> Vec<&[Value]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 2;
    for (i, e) in entries.iter().enumerate() {
        let n = e.to_string().len() + 1;
        if i > start && (i - start >= max_entries || bytes + n > max_bytes) {
            out.push(&entries[start..i]);
            start = i;
            bytes = 2;
        }
        bytes += n;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

/// Objects of a step: signed URLs from `GET /objects/<sha>`, asked for again when
/// older than an hour (they last a day).
struct HubObjects {
    client: Arc<Client>,
    urls: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

impl HubObjects {
    /// Size and signed download URL of an object.
    async fn meta(&self, sha: &str) -> Result<(u64, String), HubError> {
        #[derive(Deserialize)]
        struct Meta {
            #[serde(default)]
            size: Option<String>,
            #[serde(default)]
            sizeint: Option<u64>,
            #[serde(rename = "signed-geturl")]
            url: String,
        }
        let what = format!("GET /objects/{sha}");
        let m: Meta = self
            .client
            .json(Method::GET, &format!("/objects/{sha}"), None)
            .await?;
        let size = match (m.sizeint.filter(|n| *n > 0), m.size.as_deref()) {
            (Some(n), _) => n,
            (None, Some(s)) => s.trim().parse().map_err(|_| HubError::Json {
                what: what.clone(),
                detail: format!("size {s:?} is not a number"),
            })?,
            (None, None) => {
                return Err(HubError::Json {
                    what,
                    detail: "no size".into(),
                });
            }
        };
        self.urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.to_owned(), (m.url.clone(), Instant::now()));
        Ok((size, m.url))
    }
}

impl ObjectFetcher for HubObjects {
    fn open(&self, key: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>> {
        let key = key.to_owned();
        Box::pin(async move {
            Err(AdapterError::Object {
                key,
                reason: "hub objects are downloaded from their signed URL".into(),
            })
        })
    }

    fn url(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, AdapterError>> {
        let key = key.to_owned();
        Box::pin(async move {
            let fresh = self
                .urls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .filter(|(_, at)| at.elapsed() < Duration::from_secs(3600))
                .map(|(u, _)| u.clone());
            if let Some(u) = fresh {
                return Ok(Some(u));
            }
            let mut wait = Duration::from_secs(1);
            for attempt in 1.. {
                match self.meta(&key).await {
                    Ok((_, url)) => return Ok(Some(url)),
                    Err(e) if e.is_transient() && attempt < 6 => {
                        debug!(object = %key, error = %e, "retrying the object's metadata");
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    Err(e) => {
                        return Err(AdapterError::Object {
                            key,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            unreachable!("the loop returns")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> PantahubConfig {
        let v: toml_crate::Table = toml_text.parse().unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn log_batches_respect_both_limits() {
        let small: Vec<Value> = (0..450).map(|i| json!({"msg": i})).collect();
        let c = chunks(&small, 200, 256 * 1024);
        assert_eq!(
            c.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![200, 200, 50]
        );
        let big: Vec<Value> = (0..10)
            .map(|_| json!({"msg": "x".repeat(100 * 1024)}))
            .collect();
        for c in chunks(&big, 200, 256 * 1024) {
            assert!(Value::Array(c.to_vec()).to_string().len() <= 256 * 1024);
            assert!(!c.is_empty());
        }
    }

    #[test]
    fn config_needs_tls_unless_insecure() {
        let c = cfg("url = \"http://127.0.0.1:1\"\n");
        assert!(c.validate().unwrap_err().contains("insecure = true"));
        let c = cfg("url = \"http://127.0.0.1:1\"\ninsecure = true\n");
        c.validate().unwrap();
        let c = cfg("url = \"ftp://x\"\n");
        assert!(
            c.validate()
                .unwrap_err()
                .contains("must start with https://")
        );
        let c = cfg("url = \"https://h/api\"\n");
        assert!(
            c.validate()
                .unwrap_err()
                .contains("host and optional port only")
        );
        assert_eq!(cfg("").url, "https://api.pantahub.com");
    }
}
