//! The engine: runs the configured adapters under supervision and carries out what
//! they ask of the device through pv-ctrl (architecture.md §2–§4).

pub mod arbiter;
pub mod commands;
#[cfg(feature = "dbus")]
pub mod dbus;
pub mod devmeta;
pub mod fetch;
pub mod journal;
pub mod logs;
pub mod meta;
pub mod store;
pub mod update;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pv_adapter_api::{Adapter, BackendEvent, DeviceView, EngineLink, Envelope, UpdateStatus};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::pvctrl::PvCtrl;
pub use update::UpdateOptions;

/// The views of every adapter, by backend name.
pub type Views = Arc<BTreeMap<String, watch::Sender<DeviceView>>>;

/// What each backend asks of a person at the device ([`BackendEvent::Notice`]).
pub type Notices = Arc<watch::Sender<BTreeMap<String, String>>>;

/// Builds a fresh adapter instance; the supervisor calls it again to restart one.
pub type AdapterFactory = Arc<dyn Fn() -> Box<dyn Adapter> + Send + Sync>;

/// Errors that stop the engine from starting.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot open the update journal in {dir}: {source}")]
    Journal { dir: String, source: std::io::Error },
    #[error("{0}")]
    Config(String),
}

/// Builds the adapters the configuration asks for.
pub fn adapters(cfg: &Config) -> Result<Vec<(String, AdapterFactory)>, EngineError> {
    cfg.backends
        .iter()
        .map(|b| {
            let name = b.name.get_ref().clone();
            let work = cfg.bridge.state_dir.join("adapters").join(&name);
            let logs = cfg.pantavisor.logs.clone();
            factory(&name, b.kind.get_ref(), &b.settings, work, logs).map(|f| (name, f))
        })
        .collect()
}

#[cfg_attr(
    not(any(
        feature = "local",
        feature = "mqtt",
        feature = "pantahub",
        feature = "azure",
        feature = "hawkbit"
    )),
    allow(unused_variables)
)]
fn factory(
    name: &str,
    kind: &str,
    settings: &toml::Table,
    work_dir: std::path::PathBuf,
    pv_logs: std::path::PathBuf,
) -> Result<AdapterFactory, EngineError> {
    #[cfg(not(feature = "azure"))]
    let _ = pv_logs;
    match kind {
        #[cfg(feature = "local")]
        "local" => {
            let lc: pv_adapter_local::LocalConfig =
                settings.clone().try_into().map_err(|e: toml::de::Error| {
                    EngineError::Config(format!("backend {name:?}: {}", e.message().trim()))
                })?;
            let name = name.to_owned();
            Ok(Arc::new(move || {
                Box::new(pv_adapter_local::LocalAdapter::new(
                    &name,
                    lc.clone(),
                    work_dir.clone(),
                )) as Box<dyn Adapter>
            }))
        }
        #[cfg(feature = "mqtt")]
        "mqtt" => {
            let mc: pv_adapter_mqtt::MqttConfig =
                settings.clone().try_into().map_err(|e: toml::de::Error| {
                    EngineError::Config(format!("backend {name:?}: {}", e.message().trim()))
                })?;
            let name = name.to_owned();
            let _ = work_dir;
            Ok(Arc::new(move || {
                Box::new(pv_adapter_mqtt::MqttAdapter::new(&name, mc.clone())) as Box<dyn Adapter>
            }))
        }
        #[cfg(feature = "pantahub")]
        "pantahub" => {
            let pc: pv_adapter_pantahub::PantahubConfig =
                settings.clone().try_into().map_err(|e: toml::de::Error| {
                    EngineError::Config(format!("backend {name:?}: {}", e.message().trim()))
                })?;
            let name = name.to_owned();
            Ok(Arc::new(move || {
                Box::new(pv_adapter_pantahub::PantahubAdapter::new(
                    &name,
                    pc.clone(),
                    work_dir.clone(),
                )) as Box<dyn Adapter>
            }))
        }
        #[cfg(feature = "azure")]
        "azure" => {
            let ac: pv_adapter_azure::AzureConfig =
                settings.clone().try_into().map_err(|e: toml::de::Error| {
                    EngineError::Config(format!("backend {name:?}: {}", e.message().trim()))
                })?;
            let name = name.to_owned();
            Ok(Arc::new(move || {
                Box::new(
                    pv_adapter_azure::AzureAdapter::new(&name, ac.clone(), work_dir.clone())
                        .with_log_dir(pv_logs.clone()),
                ) as Box<dyn Adapter>
            }))
        }
        #[cfg(feature = "hawkbit")]
        "hawkbit" => {
            let hc: pv_adapter_hawkbit::HawkbitConfig =
                settings.clone().try_into().map_err(|e: toml::de::Error| {
                    EngineError::Config(format!("backend {name:?}: {}", e.message().trim()))
                })?;
            let name = name.to_owned();
            Ok(Arc::new(move || {
                Box::new(pv_adapter_hawkbit::HawkbitAdapter::new(
                    &name,
                    hc.clone(),
                    work_dir.clone(),
                )) as Box<dyn Adapter>
            }))
        }
        other => Err(EngineError::Config(format!(
            "backend {name:?}: type {other:?} is not available in this build"
        ))),
    }
}

/// Runs one adapter, restarting it with jittered exponential backoff whenever it
/// returns an error or panics.
async fn supervise(name: String, factory: AdapterFactory, link: EngineLink) {
    let mut delay = Duration::from_millis(500);
    loop {
        let adapter = factory();
        let started = std::time::Instant::now();
        match tokio::spawn(adapter.run(link.clone())).await {
            Ok(Ok(())) => {
                info!(backend = %name, "adapter stopped");
                return;
            }
            Ok(Err(pv_adapter_api::AdapterError::EngineGone)) => return,
            Ok(Err(e)) => warn!(backend = %name, error = %e, "adapter failed; restarting"),
            Err(e) if e.is_panic() => warn!(backend = %name, "adapter panicked; restarting"),
            Err(_) => return,
        }
        let _ = link
            .send(BackendEvent::Disconnected {
                reason: "adapter restarting".into(),
            })
            .await;
        if started.elapsed() > Duration::from_secs(60) {
            delay = Duration::from_millis(500);
        }
        let jitter = Duration::from_millis(
            u64::from(std::process::id() ^ started.elapsed().subsec_nanos()) % 250,
        );
        tokio::time::sleep(delay + jitter).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}

/// Keeps the container's status goal met: signals READY once the backend that owns
/// updates is connected (`ready` set), and again whenever pv-ctrl's socket
/// is made anew (Pantavisor restarted: a reboot the bridge survived, as under a
/// simulator). The socket is watched with `stat`, not requests: an idle bridge
/// sends pv-ctrl nothing for this. A 500 (this container's goal is not READY) is
/// not final either: the next revision may give it that goal.
async fn keep_ready(pv: PvCtrl, ready: Arc<AtomicBool>, mut connected: watch::Receiver<bool>) {
    use std::os::unix::fs::MetadataExt;
    // Inode numbers can be reused at once; with the change time they cannot.
    let socket = || {
        std::fs::metadata(pv.socket())
            .ok()
            .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
    };
    if connected.wait_for(|c| *c).await.is_err() {
        return;
    }
    ready.store(true, Ordering::Relaxed);
    // The socket the last signal (or its refusal) went to.
    let mut signalled = None;
    let mut wait = Duration::from_millis(200);
    loop {
        let now = socket();
        if now.is_some() && signalled != Some(now) {
            match pv.signal_ready().await {
                Ok(()) => {
                    info!("signalled READY to Pantavisor");
                    signalled = Some(now);
                    wait = Duration::from_millis(200);
                }
                Err(e) if e.status() == Some(500) => {
                    info!(reason = %e, "Pantavisor does not expect a ready signal from this container");
                    signalled = Some(now);
                }
                Err(e) => {
                    debug!(error = %e, retry_in = ?wait, "cannot signal ready yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the engine with the configured adapters until `shutdown` completes.
pub async fn run(
    cfg: Config,
    opts: UpdateOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    let adapters = adapters(&cfg)?;
    run_with(cfg, adapters, opts, shutdown).await
}

/// Runs the engine with the given adapters (tests and embedders supply their own).
pub async fn run_with(
    cfg: Config,
    adapters: Vec<(String, AdapterFactory)>,
    opts: UpdateOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EngineError> {
    let pv = PvCtrl::new(&cfg.pantavisor.socket);
    let journal_path = cfg.bridge.state_dir.join("journal/updates.json");
    let journal = journal::Journal::open(&journal_path).map_err(|source| EngineError::Journal {
        dir: cfg.bridge.state_dir.display().to_string(),
        source,
    })?;
    let (events_tx, mut events) = mpsc::channel::<Envelope>(64);
    let mut views = BTreeMap::new();
    let mut receivers = Vec::new();
    for (name, factory) in adapters {
        let (tx, rx) = watch::channel(DeviceView::default());
        views.insert(name.clone(), tx);
        receivers.push((name, factory, rx));
    }
    let views: Views = Arc::new(views);
    let policies: meta::Policies = cfg
        .backends
        .iter()
        .map(|b| {
            (
                b.name.get_ref().clone(),
                meta::Policy {
                    priority: b.priority,
                    updates: b.updates,
                    user_meta: b.user_meta,
                    device_meta: b.device_meta,
                    logs: b.logs,
                    device_meta_rate: devmeta::Policy {
                        min_interval: Duration::from_secs(
                            b.device_meta_min_interval_secs
                                .unwrap_or(cfg.metadata.device_meta_min_interval_secs),
                        ),
                        volatile_interval: Duration::from_secs(
                            b.device_meta_volatile_interval_secs
                                .or(cfg.metadata.device_meta_volatile_interval_secs)
                                .unwrap_or_else(|| {
                                    crate::config::default_volatile_interval_secs(b.kind.get_ref())
                                }),
                        ),
                        volatile_keys: cfg.metadata.device_meta_volatile_keys.clone(),
                    },
                },
            )
        })
        .collect();
    let slot = arbiter::Shared::default();
    let log_requests = logs::LogRequests::default();
    let (desired_tx, desired_rx) = mpsc::channel(16);
    let meta_opts = meta::MetaOptions {
        device_meta_interval: Duration::from_millis(cfg.metadata.device_meta_interval_ms),
        user_meta_interval: Duration::from_millis(cfg.metadata.user_meta_interval_ms),
    };
    let metasync = meta::MetaSync::new(
        pv.clone(),
        views.clone(),
        policies.clone(),
        meta_opts,
        &cfg.bridge.state_dir,
    );
    let (resync_tx, resync_rx) = mpsc::channel(4);
    // Backends' notices for a person at the device (local only: D-Bus).
    let notices: Notices = Arc::new(watch::channel(BTreeMap::new()).0);
    let dbus_task: Option<tokio::task::JoinHandle<()>> = match cfg.dbus.bus.clone() {
        #[cfg(feature = "dbus")]
        Some(bus) => Some(tokio::spawn(dbus::serve(
            bus,
            views.clone(),
            resync_tx.clone(),
            slot.clone(),
            notices.clone(),
        ))),
        #[cfg(not(feature = "dbus"))]
        Some(bus) => {
            warn!(bus = %bus, "this pv-bridge was built without the `dbus` feature; no D-Bus API");
            None
        }
        None => None,
    };
    let metasync = tokio::spawn(metasync.run(desired_rx, resync_rx));
    let (commands_tx, commands_rx) = mpsc::channel(32);
    let executor = commands::Commands::new(
        pv.clone(),
        views.clone(),
        resync_tx,
        &cfg.bridge.state_dir,
        slot.clone(),
    );
    let executor = tokio::spawn(executor.run(commands_rx));
    let ready = Arc::new(AtomicBool::new(false));
    let (connected_tx, connected_rx) = watch::channel(false);
    let readiness = tokio::spawn(keep_ready(pv.clone(), ready.clone(), connected_rx));
    let mut opts = opts;
    // Network settings the operator gave a backend serve its downloads too.
    for b in &cfg.backends {
        if let Some(ca) = b.settings.get("ca_file").and_then(|v| v.as_str()) {
            opts.backend_ca_files.push(ca.into());
        }
        if opts.proxy.is_none() {
            opts.proxy = b
                .settings
                .get("proxy")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
        }
    }
    if opts.cache_dir.is_none() {
        opts.cache_dir = Some(cfg.bridge.state_dir.join("cache"));
    }
    let coordinator = update::Coordinator::new(
        pv.clone(),
        journal,
        views.clone(),
        opts,
        ready,
        slot.clone(),
    )
    .with_log_requests(log_requests.clone());
    let coordinator = tokio::spawn(coordinator.run());
    let log_backends: Vec<String> = receivers
        .iter()
        .map(|(n, _, _)| n.clone())
        .filter(|n| policies.get(n).is_none_or(|p| p.logs))
        .collect();
    let mut logs_task = None;
    let feed = if cfg.logs.enabled && !log_backends.is_empty() {
        match logs::start(
            &cfg.pantavisor.logs,
            &cfg.bridge.state_dir,
            &log_backends,
            cfg.logs.options(),
            log_requests,
        ) {
            Ok((feed, task)) => {
                logs_task = Some(tokio::spawn(task));
                Some(feed)
            }
            Err(e) => {
                warn!(error = %e, "cannot open the log spool; logs will not be forwarded");
                None
            }
        }
    } else {
        None
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let device_store: Arc<dyn pv_adapter_api::DeviceStore> =
        Arc::new(store::PvStore::new(pv.clone()));
    let mut supervisors = Vec::new();
    for (name, factory, rx) in receivers {
        let mut link = EngineLink::new(&name, events_tx.clone(), rx)
            .with_stop(stop_rx.clone())
            .with_device(device_store.clone());
        if let Some(f) = feed.as_ref().filter(|_| log_backends.contains(&name)) {
            link = link.with_logs(f.clone() as Arc<dyn pv_adapter_api::LogFeed>);
        }
        supervisors.push(tokio::spawn(supervise(name, factory, link)));
    }
    drop(events_tx);
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = &mut shutdown => break,
        };
        let Some(Envelope { backend, event }) = ev else {
            // No adapter is left to send anything (or none is configured): keep the
            // coordinator finishing its work until asked to stop.
            shutdown.as_mut().await;
            break;
        };
        match event {
            BackendEvent::Offer(offer) => {
                if !policies.get(&backend).is_none_or(|p| p.updates) {
                    warn!(backend = %backend, id = %offer.id, "updates are switched off for this backend; refusing");
                    if let Some(v) = views.get(&backend) {
                        let mut p = update::progress(
                            &offer.id,
                            &format!("locals/{}", offer.id),
                            pv_adapter_api::UpdateStatus::Wontgo,
                            &format!(
                                "updates from backend {backend:?} are switched off (updates = false)"
                            ),
                        );
                        p.progress = 100;
                        v.send_replace({
                            let mut view = v.borrow().clone();
                            view.update = Some(p);
                            view
                        });
                    }
                    continue;
                }
                let priority = policies.get(&backend).map_or(0, |p| p.priority);
                offer_update(&slot, &views, arbiter::Job { backend, offer }, priority);
            }
            BackendEvent::Cancel { id } => {
                let reason = format!("cancelled by backend {backend}");
                match arbiter::cancel(&slot, &backend, Some(&id), &reason) {
                    Ok((id, Some(job))) => {
                        report_final(&views, &job.backend, &id, UpdateStatus::Cancelled, &reason)
                    }
                    Ok((id, None)) => {
                        info!(backend = %backend, id = %id, "update cancel requested")
                    }
                    Err(why) => warn!(backend = %backend, id = %id, reason = %why, "cannot cancel"),
                }
            }
            BackendEvent::UserMeta { version, data } => {
                let _ = desired_tx
                    .send(meta::Desired {
                        backend,
                        version,
                        data,
                    })
                    .await;
            }
            BackendEvent::Command {
                id,
                kind,
                expires_at,
            } => {
                let _ = commands_tx
                    .send(commands::Request {
                        backend,
                        id,
                        kind,
                        expires_at,
                    })
                    .await;
            }
            BackendEvent::Connected => {
                set_health(&views, &backend, true, None);
                connected_tx.send_replace(true);
            }
            BackendEvent::Disconnected { reason } => {
                set_health(&views, &backend, false, Some(reason))
            }
            BackendEvent::Notice { text } => {
                notices.send_if_modified(|n| match text {
                    Some(t) => n.insert(backend, t.clone()).as_ref() != Some(&t),
                    None => n.remove(&backend).is_some(),
                });
            }
        }
    }
    info!("engine stopping");
    // Let adapters say goodbye (e.g. MQTT's `offline` status), briefly.
    stop_tx.send_replace(true);
    let grace = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(grace);
    for s in supervisors.iter_mut() {
        tokio::select! {
            _ = &mut *s => {}
            _ = &mut grace => break,
        }
    }
    for s in supervisors {
        s.abort();
    }
    coordinator.abort();
    metasync.abort();
    executor.abort();
    readiness.abort();
    if let Some(t) = dbus_task {
        t.abort();
    }
    if let Some(t) = logs_task {
        t.abort();
    }
    Ok(())
}

/// Reports a final status for an offer that never reached the coordinator.
pub(crate) fn report_final(
    views: &Views,
    backend: &str,
    id: &str,
    status: UpdateStatus,
    msg: &str,
) {
    if let Some(v) = views.get(backend) {
        let p = update::progress(id, &format!("locals/{id}"), status, msg);
        v.send_modify(|view| view.update = Some(p));
    }
}

/// Applies the arbitration rules to a new offer.
fn offer_update(slot: &arbiter::Shared, views: &Views, job: arbiter::Job, priority: i64) {
    let (backend, id) = (job.backend.clone(), job.offer.id.clone());
    let mut s = slot.lock();
    match arbiter::decide(&s, &backend, &id, priority) {
        arbiter::Decision::Duplicate => {
            info!(backend = %backend, id = %id, "offer already running or waiting");
        }
        arbiter::Decision::Busy(why) => {
            drop(s);
            warn!(backend = %backend, id = %id, reason = %why, "offer refused");
            report_final(views, &backend, &id, UpdateStatus::Wontgo, &why);
        }
        arbiter::Decision::Start | arbiter::Decision::Supersede { .. } => {
            let why = format!("superseded by update {id} from backend {backend}");
            if let Some(a) = s.active.as_mut().filter(|a| a.cancelled.is_none()) {
                info!(backend = %a.backend, id = %a.id, "superseding the running update");
                a.cancelled = Some(why.clone());
                a.cancel.notify_one();
            }
            let old = s.next.replace(arbiter::Pending { job, priority });
            drop(s);
            if let Some(old) = old {
                report_final(
                    views,
                    &old.job.backend,
                    &old.job.offer.id,
                    UpdateStatus::Cancelled,
                    &why,
                );
            }
            slot.wake.notify_one();
        }
    }
}

fn set_health(views: &Views, backend: &str, connected: bool, error: Option<String>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .ok();
    for v in views.values() {
        v.send_modify(|view| {
            let h = view.health.entry(backend.to_owned()).or_default();
            h.connected = connected;
            if connected {
                h.last_success = now;
            }
            if error.is_some() {
                h.last_error = error.clone();
            }
        });
    }
}
