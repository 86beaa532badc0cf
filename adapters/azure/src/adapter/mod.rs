//! The IoT Hub connection: one rumqttc event loop under pv-bridge's own policy.
//!
//! Every connection reads the identity again (connection string, keys,
//! certificates, DPS cache), signs a fresh SAS token, subscribes to twin
//! responses, desired patches, methods and C2D (4 of the hub's 5 subscriptions)
//! and GETs the whole twin. Before the token expires (80 % of its lifetime, less
//! up to 5 % jitter) the bridge disconnects cleanly and connects again with a new
//! one. Failures back off 1 s doubling to 5 min, jittered.
//!
//! The poll task never waits on a publish: the reporter, the log sender and
//! method calls run in their own tasks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pv_adapter_api::{Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::adu::agent::Agent;
use crate::identity::{self, Auth, Identity};
use crate::report::Extra;
use crate::topics::{self, Inbound, Topics};
use crate::twin::{self};
use crate::{AzureConfig, tls};

mod desired;
mod log_sender;
mod reporter;

use desired::{Desired, method};
use log_sender::{LogState, log_sender};
use reporter::reporter;

/// Largest packet either way (twin documents, 128 KiB methods, 256 KiB D2C).
const MAX_PACKET: usize = 300 * 1024;

pub struct AzureAdapter {
    name: String,
    cfg: AzureConfig,
    work: PathBuf,
    /// Acks and log counters, kept from one connection to the next.
    carry: Mutex<Extra>,
    /// Log counters and timing, kept from one connection to the next.
    log_state: Arc<Mutex<LogState>>,
    /// When the DPS assignment was last dropped after a refusal.
    reprovisioned: Mutex<Option<Instant>>,
    /// Pantavisor's log tree, for Device Update log uploads.
    log_dir: Option<PathBuf>,
}

impl AzureAdapter {
    pub fn new(name: &str, cfg: AzureConfig, work: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            cfg,
            work,
            carry: Mutex::new(Extra::default()),
            log_state: Arc::default(),
            reprovisioned: Mutex::new(None),
            log_dir: None,
        }
    }

    /// With Pantavisor's log tree (`[pantavisor] logs`), which Device Update
    /// log uploads read.
    pub fn with_log_dir(mut self, dir: PathBuf) -> Self {
        self.log_dir = Some(dir);
        self
    }

    /// Whether a refused identity may go through DPS again now: at most once an
    /// hour (each registration is billed, and DPS throttles a device that
    /// registers in a loop).
    fn may_reprovision(&self) -> bool {
        let mut last = self.reprovisioned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// A number of milliseconds below `max`.
fn jitter_ms(max: u64) -> u64 {
    pv_adapter_api::timing::random_u64() % max.max(1)
}

/// The wait after a failed connection: `previous` doubled, from 1 s up to 5 min.
fn next_backoff(previous: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// When to renew a token of `lifetime`: at 80 %, less up to 5 % jitter so a
/// fleet does not reconnect in step.
pub fn renew_after(lifetime: Duration) -> Duration {
    let at = lifetime.mul_f64(0.8);
    let spread = lifetime.as_millis() as u64 / 20;
    at.saturating_sub(Duration::from_millis(jitter_ms(spread)))
}

/// What the tasks of one adapter run share.
struct Shared {
    name: String,
    cfg: AzureConfig,
    topics: Topics,
    client: AsyncClient,
    link: EngineLink,
    extra: watch::Sender<Extra>,
    rid: AtomicU64,
    /// Twin requests waiting for their answer, by `$rid`.
    waiting: Mutex<HashMap<u64, oneshot::Sender<u16>>>,
    /// PUBACKs received (only log messages go at QoS 1).
    pubacks: watch::Sender<u64>,
    http: pv_http::Client,
    log_state: Arc<Mutex<LogState>>,
    /// The Device Update agent, when `device_update` is set.
    adu: Option<Arc<Agent>>,
}

impl Shared {
    fn next_rid(&self) -> u64 {
        self.rid.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends a twin request and waits up to `request_timeout_secs` for its status
    /// (`None`: no answer).
    async fn twin_request(&self, topic: impl FnOnce(u64) -> String, body: Vec<u8>) -> Option<u16> {
        let rid = self.next_rid();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(rid, tx);
        }
        if self
            .client
            .publish(topic(rid), QoS::AtMostOnce, false, body)
            .await
            .is_err()
        {
            return None;
        }
        let r = tokio::time::timeout(Duration::from_secs(self.cfg.request_timeout_secs), rx).await;
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&rid);
        }
        r.ok().and_then(Result::ok)
    }

    async fn respond(&self, rid: &str, status: u16, body: Value) {
        let topic = Topics::method_response(status, rid);
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtMostOnce, false, body.to_string())
            .await
        {
            debug!(backend = %self.name, error = %e, "method answer not sent (connection gone)");
        }
    }
}

/// Why a connection ended.
enum End {
    Failed(String),
    /// The token is due: connect again at once.
    Renew,
    /// The bridge is stopping; the goodbye was said.
    Stopped,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AzureAdapter {
    fn options(&self, id: &Identity) -> Result<(MqttOptions, Duration), AdapterError> {
        let topics = Topics::new(&id.device_id, id.module_id.as_deref());
        let client_id = topics.client_id();
        if client_id.is_empty() || client_id.contains(char::is_whitespace) {
            return Err(AdapterError::Config(format!(
                "device id {client_id:?} is not usable"
            )));
        }
        let address = match &self.cfg.connect_address {
            Some(a) => a.clone(),
            None => id.tls_name().to_owned(),
        };
        let (host, port) = identity::split_address(&address).map_err(AdapterError::Config)?;
        let lifetime = Duration::from_secs(self.cfg.sas_lifetime_secs);
        let client_cert = match &id.auth {
            Auth::X509(c) => Some(c),
            Auth::Key { .. } => None,
        };
        let tls = tls::client_config(self.cfg.ca_file.as_deref(), id.tls_name(), client_cert)
            .map_err(AdapterError::Config)?;
        let mut o = MqttOptions::new(client_id, host, port);
        o.set_credentials(
            topics.username(&id.host, self.cfg.announced_model()),
            id.password(lifetime)?,
        );
        o.set_keep_alive(Duration::from_secs(self.cfg.keep_alive_secs));
        o.set_clean_session(false);
        o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        Ok((o, lifetime))
    }

    async fn connection(
        &self,
        link: &EngineLink,
        id: &Identity,
        desired: &mut Desired,
        http: &pv_http::Client,
        adu: Option<&Arc<Agent>>,
    ) -> Result<End, AdapterError> {
        let (opts, lifetime) = self.options(id)?;
        let renew = match id.auth {
            Auth::Key { .. } => Some(tokio::time::Instant::now() + renew_after(lifetime)),
            Auth::X509(_) => None,
        };
        let (client, mut ev) = AsyncClient::new(opts, 64);
        let topics = Topics::new(&id.device_id, id.module_id.as_deref());
        let (extra, _) = watch::channel(Extra::default());
        let sh = Arc::new(Shared {
            name: self.name.clone(),
            cfg: self.cfg.clone(),
            topics: topics.clone(),
            client: client.clone(),
            link: link.clone(),
            extra,
            rid: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            pubacks: watch::channel(0).0,
            http: http.clone(),
            log_state: self.log_state.clone(),
            adu: adu.cloned(),
        });
        if let Some(a) = adu {
            a.set_device_name(topics.client_id());
        }
        // Acks survive reconnects: carry them over.
        sh.extra
            .send_modify(|x| *x = self.carry.lock().map(|c| c.clone()).unwrap_or_default());
        let (baseline_tx, baseline_rx) = watch::channel(None);
        let mut tasks: Vec<AbortOnDrop> = Vec::new();
        let mut get_rid = 0u64;
        let mut get_backoff = Duration::from_secs(2);
        let renew_sleep = async {
            match renew {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(renew_sleep);
        let mut renewing = false;
        // When to send the twin GET (again): after a refusal's backoff, or when
        // the last one went unanswered.
        let mut get_at: Option<tokio::time::Instant> = None;
        let request_timeout = Duration::from_secs(self.cfg.request_timeout_secs);
        let end = loop {
            let get_due = get_at;
            let polled = tokio::select! {
                p = ev.poll() => p,
                _ = tokio::time::sleep_until(get_due.unwrap_or_else(tokio::time::Instant::now)), if get_due.is_some() => {
                    if get_rid != 0 {
                        warn!(backend = %self.name, "no answer to the twin GET; asking again");
                    }
                    get_rid = sh.next_rid();
                    let _ = client.try_publish(Topics::twin_get(get_rid), QoS::AtMostOnce, false, Vec::<u8>::new());
                    get_at = Some(tokio::time::Instant::now() + request_timeout);
                    continue;
                }
                _ = &mut renew_sleep, if !renewing => {
                    info!(backend = %self.name, "SAS token at 80 % of its lifetime: reconnecting with a new one");
                    renewing = true;
                    let _ = client.try_disconnect();
                    continue;
                }
                _ = link.stopping() => {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
                        while let Ok(e) = ev.poll().await {
                            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) { break; }
                        }
                    }).await;
                    info!(backend = %self.name, "disconnected (bridge stopping)");
                    self.keep(&sh);
                    return Ok(End::Stopped);
                }
            };
            let event = match polled {
                Ok(e) => e,
                Err(e) if renewing => {
                    debug!(backend = %self.name, error = %e, "closed for renewal");
                    break End::Renew;
                }
                Err(ConnectionError::ConnectionRefused(code)) => {
                    let why = match code {
                        ConnectReturnCode::BadUserNamePassword
                        | ConnectReturnCode::NotAuthorized => {
                            let now = identity::unix_now();
                            if !identity::clock_is_plausible(now) {
                                // A board without RTC before NTP: every token it signs
                                // is expired. Registering again would not help, and
                                // DPS bills and throttles each registration.
                                format!(
                                    "the hub refused the credentials (CONNACK: not authorized) and the device clock reads {now} s since 1970, before this version was built: SAS tokens are signed with an expiry in the past; waiting for the clock (NTP) and keeping the DPS assignment"
                                )
                            } else if self.cfg.dps.is_some() && self.may_reprovision() {
                                identity::forget_assignment(&self.work);
                                "the hub refused the credentials (CONNACK: not authorized); the identity may have been revoked or moved: provisioning through DPS again".to_owned()
                            } else {
                                "the hub refused the credentials (CONNACK: not authorized); check the key, certificate and clock".to_owned()
                            }
                        }
                        ConnectReturnCode::ServiceUnavailable => {
                            "the hub is unavailable (CONNACK 3)".to_owned()
                        }
                        _ => "the hub refused the connection".to_owned(),
                    };
                    break End::Failed(format!("{why} [{code:?}]"));
                }
                Err(e) => break End::Failed(e.to_string()),
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    info!(backend = %self.name, hub = %id.host, device = %topics.client_id(), "connected to IoT Hub");
                    let mut subs = vec![
                        (topics::TWIN_RES_FILTER.to_owned(), QoS::AtMostOnce),
                        (topics::DESIRED_FILTER.to_owned(), QoS::AtMostOnce),
                        (topics::METHODS_FILTER.to_owned(), QoS::AtMostOnce),
                    ];
                    if let Some(c2d) = topics.c2d_filter() {
                        subs.push((c2d, QoS::AtLeastOnce));
                    }
                    for (t, q) in subs {
                        let _ = client.try_subscribe(t, q);
                    }
                    // The GET is queued after the subscriptions, on the next turn.
                    get_rid = 0;
                    get_at = Some(tokio::time::Instant::now());
                    tasks.clear();
                    tasks.push(AbortOnDrop(tokio::spawn(reporter(
                        sh.clone(),
                        baseline_rx.clone(),
                    ))));
                    tasks.push(AbortOnDrop(tokio::spawn(log_sender(
                        sh.clone(),
                        self.work.clone(),
                    ))));
                    link.send(BackendEvent::Connected).await?;
                }
                Event::Incoming(Packet::PubAck(_)) => {
                    sh.pubacks.send_modify(|n| *n += 1);
                }
                Event::Incoming(Packet::Publish(p)) => match topics.classify(&p.topic) {
                    Inbound::TwinResponse { status, rid, .. } if rid == get_rid.to_string() => {
                        match status {
                            200 => match serde_json::from_slice::<Value>(&p.payload) {
                                Ok(twin) => {
                                    get_at = None;
                                    let d =
                                        twin.get("desired").cloned().unwrap_or_else(|| json!({}));
                                    desired.version =
                                        d.get("$version").and_then(Value::as_u64).unwrap_or(0);
                                    desired.doc = Some(d);
                                    desired.process(&sh);
                                    let mut r =
                                        twin.get("reported").cloned().unwrap_or_else(|| json!({}));
                                    if let Some(o) = r.as_object_mut() {
                                        o.remove("$version");
                                        o.remove("$metadata");
                                    }
                                    let _ = baseline_tx.send(Some(r));
                                }
                                Err(e) => break End::Failed(format!("the twin is not JSON: {e}")),
                            },
                            429 | 500..=599 => {
                                warn!(backend = %self.name, status, retry_in = ?get_backoff, "twin GET refused; asking again");
                                get_rid = 0;
                                get_at = Some(tokio::time::Instant::now() + get_backoff);
                                get_backoff = (get_backoff * 2).min(Duration::from_secs(60));
                            }
                            other => {
                                break End::Failed(format!(
                                    "the hub answered the twin GET with {other}"
                                ));
                            }
                        }
                    }
                    Inbound::TwinResponse { status, rid, .. } => {
                        let tx = rid
                            .parse::<u64>()
                            .ok()
                            .and_then(|r| sh.waiting.lock().ok().and_then(|mut w| w.remove(&r)));
                        match tx {
                            Some(tx) => {
                                let _ = tx.send(status);
                            }
                            None => {
                                debug!(backend = %self.name, rid = %rid, "a twin answer nobody waits for")
                            }
                        }
                    }
                    Inbound::Desired { version } => {
                        let Some(doc) = desired.doc.as_mut() else {
                            debug!(backend = %self.name, "desired patch before the twin GET answer; the GET has it");
                            continue;
                        };
                        let v = version.unwrap_or(0);
                        if v <= desired.version {
                            debug!(backend = %self.name, version = v, have = desired.version, "old or repeated desired patch ignored");
                            continue;
                        }
                        match serde_json::from_slice::<Value>(&p.payload) {
                            Ok(patch @ Value::Object(_)) => {
                                twin::merge_patch(doc, &patch);
                                desired.version = v;
                                desired.process(&sh);
                            }
                            _ => {
                                warn!(backend = %self.name, version = v, "a desired patch that is not a JSON object; ignored")
                            }
                        }
                    }
                    Inbound::Method { name, rid } => {
                        tokio::spawn(method(sh.clone(), name, rid, p.payload.to_vec()));
                    }
                    Inbound::C2d { properties } => {
                        // Over MQTT a device can only complete (PUBACK) a C2D message:
                        // it cannot reject or abandon it, so it is gone either way.
                        // Say what came, never its body (it may carry anything).
                        let prop = |k: &str| {
                            properties
                                .iter()
                                .find(|(n, _)| n == k)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        let names: Vec<&str> = properties.iter().map(|(n, _)| n.as_str()).collect();
                        warn!(backend = %self.name, message_id = %prop("$.mid"),
                            content_type = %prop("$.ct"), bytes = p.payload.len(),
                            properties = ?names,
                            "a cloud-to-device message arrived and was completed, but pv-bridge does not act on C2D messages: send commands as direct methods and updates through the desired `revision` property");
                    }
                    Inbound::Other => {
                        debug!(backend = %self.name, topic = %p.topic, "unexpected topic")
                    }
                },
                _ => {}
            }
        };
        self.keep(&sh);
        Ok(end)
    }

    /// Keeps the acks for the next connection.
    fn keep(&self, sh: &Shared) {
        if let Ok(mut c) = self.carry.lock() {
            *c = sh.extra.borrow().clone();
        }
    }

    async fn serve(self: Box<Self>, link: EngineLink) -> Result<(), AdapterError> {
        self.cfg.validate().map_err(AdapterError::Config)?;
        let mut desired = Desired::default();
        // One HTTP client (system roots read once, connections pooled) for every
        // connection of this run.
        let http = http_client(&self.cfg)?;
        let adu = match &self.cfg.device_update {
            Some(du) => Some(
                Agent::new(
                    &self.name,
                    du.clone(),
                    self.work.clone(),
                    http.clone(),
                    link.clone(),
                    self.log_dir.clone(),
                )
                .map_err(AdapterError::Config)?,
            ),
            None => None,
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let id = tokio::select! {
                r = identity::resolve(&self.cfg, &self.work) => r,
                _ = link.stopping() => return Ok(()),
            };
            let end = match id {
                Ok(id) => {
                    self.connection(&link, &id, &mut desired, &http, adu.as_ref())
                        .await
                }
                // Unreachable DPS, unreadable or bad files: retried with the
                // backoff (a fixed file or a network coming back is picked up).
                Err(e) => Ok(End::Failed(e.to_string())),
            };
            match end? {
                End::Renew => {
                    backoff = Duration::from_secs(1);
                    continue;
                }
                End::Stopped => return Ok(()),
                End::Failed(reason) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    let wait = backoff
                        + Duration::from_millis(jitter_ms(backoff.as_millis() as u64 / 4 + 1));
                    warn!(backend = %self.name, reason = %reason, retry_in = ?wait, "IoT Hub connection lost");
                    link.send(BackendEvent::Disconnected { reason }).await?;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = link.stopping() => return Ok(()),
                    }
                    backoff = next_backoff(backoff);
                }
            }
        }
    }
}

fn http_client(cfg: &AzureConfig) -> Result<pv_http::Client, AdapterError> {
    let mut b = pv_http::Client::builder()
        .user_agent(concat!("pv-bridge/", env!("CARGO_PKG_VERSION")))
        .proxy_from_env();
    if let Some(ca) = &cfg.ca_file {
        b = b
            .ca_file(ca)
            .map_err(|e| AdapterError::Config(e.to_string()))?;
    }
    b.build().map_err(|e| AdapterError::Config(e.to_string()))
}

impl Adapter for AzureAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(self.serve(link))
    }
}

#[cfg(test)]
mod tests {
    use super::log_sender::bodies;
    use super::*;
    use crate::logs;

    #[test]
    fn tokens_are_renewed_at_80_percent_with_jitter() {
        for _ in 0..50 {
            let r = renew_after(Duration::from_secs(3600));
            assert!(
                r <= Duration::from_secs(2880) && r >= Duration::from_secs(2700),
                "{r:?}"
            );
        }
        let r = renew_after(Duration::from_secs(10));
        assert!(
            r <= Duration::from_secs(8) && r >= Duration::from_millis(7500),
            "{r:?}"
        );
    }

    #[test]
    fn log_bodies_stay_below_the_message_limit() {
        let rec = |n: usize| pv_adapter_api::LogRecord {
            seq: 0,
            tsec: 1,
            tnano: 0,
            lvl: "INFO".into(),
            plat: "p".into(),
            src: "s".into(),
            msg: "x".repeat(n),
            rev: String::new(),
        };
        let many: Vec<_> = (0..600).map(|_| rec(1000)).collect();
        let out = bodies(&many, None);
        assert!(out.len() >= 3, "{}", out.len());
        assert_eq!(out.iter().map(|(n, _)| n).sum::<usize>(), 600);
        assert!(out.iter().all(|(_, b)| b.len() <= logs::MAX_MESSAGE));
        let huge = bodies(&[rec(400 * 1024)], None);
        assert_eq!(huge.len(), 1);
        assert!(huge[0].1.len() <= logs::MAX_MESSAGE);
    }
}
