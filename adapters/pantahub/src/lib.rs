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
mod config;
pub mod creds;
mod identity;
mod logs;
mod metadata;
mod objects;
mod steps;
mod sync;
pub mod wire;

pub use config::PantahubConfig;
use config::secs;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink, Progress,
    UpdateStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;

use client::{Client, ClientOptions};

/// What the adapter remembers between runs (`hub.json` in its state directory).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Memory {
    /// The device revision uploaded as the hub's revision 0.
    factory_rev: Option<String>,
    /// Final progress the hub may not have yet, by hub revision: sent again while
    /// the hub lists the step as pending (how Pantavisor delivers results across
    /// reboots), forgotten once it no longer does. At most [`MAX_FINALS`].
    #[serde(default)]
    finals: BTreeMap<i64, Value>,
    /// Hub revisions whose final status is decided (the newest [`MAX_CLOSED`]):
    /// the engine's progress for them is never sent again.
    #[serde(default)]
    closed: BTreeSet<i64>,
    /// How many times each open hub revision was taken: Pantavisor's `retries`.
    #[serde(default)]
    retries: BTreeMap<i64, u32>,
    /// Objects the factory sync found on the hub or uploaded, or skipped because
    /// their bytes no longer match their name: a sync that failed later does not
    /// read them again.
    #[serde(default)]
    synced: BTreeSet<String>,
}

/// Bounds of `hub.json`, whatever the hub does.
const MAX_FINALS: usize = 16;
const MAX_CLOSED: usize = 64;

impl Memory {
    /// Records a final status for `rev`: sent until the hub stops listing it.
    fn close(&mut self, rev: i64, body: Value) {
        self.finals.insert(rev, body);
        self.closed.insert(rev);
        self.retries.remove(&rev);
        while self.finals.len() > MAX_FINALS {
            self.finals.pop_first();
        }
        while self.closed.len() > MAX_CLOSED {
            self.closed.pop_first();
        }
    }
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
                failures: Default::default(),
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
    /// Why the last take of a hub revision failed, for its WONTGO.
    failures: Arc<std::sync::Mutex<std::collections::HashMap<i64, String>>>,
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
    /// How many times this revision was taken (Pantavisor's `retries`).
    retries: u32,
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
}
