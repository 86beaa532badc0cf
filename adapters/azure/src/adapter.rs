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

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, CommandStatus, EngineLink,
    ObjectRef, ObjectSource, Offer, StateUrl,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::identity::{self, Auth, Identity};
use crate::methods::{self, Action};
use crate::report::{self, Extra, RevisionAck, UserMetaAck};
use crate::topics::{self, Inbound, Topics};
use crate::twin::{self, DesiredRevision};
use crate::{AzureConfig, logs, tls};

/// Largest packet either way (twin documents, 128 KiB methods, 256 KiB D2C).
const MAX_PACKET: usize = 300 * 1024;

pub struct AzureAdapter {
    name: String,
    cfg: AzureConfig,
    work: PathBuf,
    /// Acks and log counters, kept from one connection to the next.
    carry: Mutex<Extra>,
}

impl AzureAdapter {
    pub fn new(name: &str, cfg: AzureConfig, work: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            cfg,
            work,
            carry: Mutex::new(Extra::default()),
        }
    }
}

fn jitter_ms(max: u64) -> u64 {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    u64::from(n ^ std::process::id()) % max.max(1)
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

/// Builds the offer of a desired revision. With `objectUrlTemplate` the state is
/// fetched here (its objects must be known); otherwise the engine fetches it.
async fn build_offer(
    http: &pv_http::Client,
    r: &DesiredRevision,
    max_state: usize,
) -> Result<Offer, String> {
    let mut objects: BTreeMap<String, ObjectRef> = r
        .objects
        .iter()
        .map(|(sha, url)| {
            (
                sha.clone(),
                ObjectRef {
                    sha256: sha.clone(),
                    size: None,
                    source: ObjectSource::Url { url: url.clone() },
                },
            )
        })
        .collect();
    let Some(template) = &r.object_url_template else {
        return Ok(Offer {
            id: r.id.clone(),
            state: Vec::new(),
            state_url: Some(StateUrl {
                url: r.state_url.clone(),
                sha256: r.state_sha256.clone(),
            }),
            objects,
            fetcher: None,
        });
    };
    // SAS query strings are credentials: never in logs or acks.
    let shown = pv_http::redact(&r.state_url);
    let resp = http
        .get(&r.state_url)
        .send()
        .await
        .map_err(|e| format!("state {shown}: {e}"))?;
    if resp.status != 200 {
        return Err(format!("state {shown}: HTTP {}", resp.status));
    }
    let state = resp.bytes(max_state).await.map_err(|e| match e.kind {
        pv_http::client::ErrorKind::TooLarge => {
            format!("state {shown} is larger than max_state_bytes ({max_state})")
        }
        _ => format!("state {shown}: {e}"),
    })?;
    let got = pv_adapter_api::hex(&sha2::Sha256::digest(&state));
    if got != r.state_sha256 {
        return Err(format!(
            "state {shown} hashes to {got}, not stateSha256 {}",
            r.state_sha256
        ));
    }
    let parsed: serde_json::Map<String, Value> = serde_json::from_slice(&state)
        .map_err(|e| format!("state {shown} is not a JSON object: {e}"))?;
    pv_adapter_api::objects_from_template(&parsed, template, &mut objects);
    Ok(Offer {
        id: r.id.clone(),
        state,
        state_url: None,
        objects,
        fetcher: None,
    })
}

/// The desired section as the bridge last saw it.
#[derive(Default)]
struct Desired {
    doc: Option<Value>,
    version: u64,
    user_meta: Option<Value>,
    revision: Option<Value>,
}

impl Desired {
    /// Acts on what changed in the desired section.
    fn process(&mut self, sh: &Arc<Shared>) {
        let Some(doc) = &self.doc else { return };
        let av = self.version;
        let um = doc.get("userMeta").cloned();
        if um != self.user_meta {
            self.user_meta = um.clone();
            let (ack, data) = match um.as_ref() {
                None => (None, Ok(BTreeMap::new())),
                Some(v) => match twin::user_meta(v) {
                    Ok(d) => (Some(UserMetaAck::Sent { av }), Ok(d)),
                    Err(e) => (
                        Some(UserMetaAck::Rejected {
                            av,
                            reason: e.clone(),
                        }),
                        Err(e),
                    ),
                },
            };
            match data {
                Ok(data) => {
                    info!(backend = %sh.name, version = av, keys = data.len(), "desired userMeta");
                    let link = sh.link.clone();
                    tokio::spawn(async move {
                        let _ = link
                            .send(BackendEvent::UserMeta { version: av, data })
                            .await;
                    });
                }
                Err(e) => {
                    warn!(backend = %sh.name, version = av, reason = %e, "desired userMeta rejected")
                }
            }
            sh.extra.send_modify(|x| x.user_meta = ack);
        }
        let rev = doc.get("revision").cloned().filter(|v| !v.is_null());
        if rev != self.revision {
            self.revision = rev.clone();
            let Some(v) = rev else { return };
            match DesiredRevision::parse(&v) {
                Err(reason) => {
                    warn!(backend = %sh.name, version = av, reason = %reason, "desired revision rejected");
                    let id = v.get("id").and_then(Value::as_str).map(str::to_owned);
                    sh.extra.send_modify(|x| {
                        x.revision = Some(RevisionAck::Rejected { av, id, reason })
                    });
                }
                Ok(r) => {
                    let done = sh
                        .link
                        .view()
                        .borrow()
                        .update
                        .as_ref()
                        .is_some_and(|p| p.id == r.id && p.status.is_final());
                    sh.extra.send_modify(|x| {
                        x.revision = Some(RevisionAck::Offered {
                            av,
                            id: r.id.clone(),
                        })
                    });
                    if done {
                        debug!(backend = %sh.name, id = %r.id, "desired revision already finished");
                        return;
                    }
                    info!(backend = %sh.name, id = %r.id, version = av, "desired revision");
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        match build_offer(&sh.http, &r, sh.cfg.max_state_bytes).await {
                            Ok(offer) => {
                                let _ = sh.link.send(BackendEvent::Offer(offer)).await;
                            }
                            Err(reason) => {
                                warn!(backend = %sh.name, id = %r.id, reason = %reason, "desired revision not offered");
                                sh.extra.send_modify(|x| {
                                    x.revision = Some(RevisionAck::Rejected {
                                        av,
                                        id: Some(r.id.clone()),
                                        reason,
                                    })
                                });
                            }
                        }
                    });
                }
            }
        }
    }
}

/// Answers one direct method call.
async fn method(sh: Arc<Shared>, name: String, rid: String, payload: Vec<u8>) {
    let action = match methods::parse(&name, &payload) {
        Ok(a) => a,
        Err((status, msg)) => {
            warn!(backend = %sh.name, method = %name, status, reason = %msg, "method refused");
            return sh.respond(&rid, status, methods::error_body(&msg)).await;
        }
    };
    match action {
        Action::Update(r) => match build_offer(&sh.http, &r, sh.cfg.max_state_bytes).await {
            Ok(offer) => {
                let id = offer.id.clone();
                if sh.link.send(BackendEvent::Offer(offer)).await.is_err() {
                    return sh
                        .respond(&rid, 503, methods::error_body("the bridge is stopping"))
                        .await;
                }
                info!(backend = %sh.name, id = %id, "update method: revision offered");
                let body = json!({"id": id, "rev": format!("locals/{id}"), "status": "accepted"});
                sh.respond(&rid, 202, body).await;
            }
            Err(e) => sh.respond(&rid, 400, methods::error_body(&e)).await,
        },
        Action::Command(kind) => {
            let ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let id = format!("m{ms}-{}", sh.next_rid());
            let mut view = sh.link.view();
            let ev = BackendEvent::Command {
                id: id.clone(),
                kind: kind.clone(),
                expires_at: None,
            };
            if sh.link.send(ev).await.is_err() {
                return sh
                    .respond(&rid, 503, methods::error_body("the bridge is stopping"))
                    .await;
            }
            info!(backend = %sh.name, method = %name, id = %id, "method: command sent to the engine");
            if methods::answers_at_once(&kind) {
                return sh
                    .respond(&rid, 202, json!({"id": id, "status": "accepted"}))
                    .await;
            }
            let wait = Duration::from_secs(sh.cfg.method_wait_secs);
            let done = tokio::time::timeout(
                wait,
                view.wait_for(|v| {
                    v.commands
                        .get(&id)
                        .is_some_and(|c| c.status != CommandStatus::Accepted)
                }),
            )
            .await
            .map(|r| r.is_ok());
            let result = view.borrow().commands.get(&id).cloned();
            let (status, body) = match (done, result) {
                (Ok(true), Some(c)) => {
                    let code = match c.status {
                        CommandStatus::Successful => 200,
                        CommandStatus::Rejected => 400,
                        _ => 500,
                    };
                    (
                        code,
                        json!({"id": id, "status": c.status, "detail": c.reason}),
                    )
                }
                _ => (202, json!({"id": id, "status": "accepted"})),
            };
            sh.respond(&rid, status, body).await;
        }
    }
}

/// Keeps the reported section equal to [`report::reported`], starting from what
/// the hub holds (`baseline`, from the twin GET).
async fn reporter(sh: Arc<Shared>, mut baseline: watch::Receiver<Option<Value>>) {
    let Ok(mut have) = baseline
        .wait_for(Option::is_some)
        .await
        .map(|b| b.clone().unwrap_or_else(|| json!({})))
    else {
        return;
    };
    let mut view = sh.link.view();
    let mut extra = sh.extra.subscribe();
    let interval = Duration::from_secs(sh.cfg.report_interval_secs);
    let mut last_urgent: Option<Value> = None;
    let mut last_sent = Instant::now() - interval;
    let mut backoff = Duration::from_secs(5);
    let mut last_error: Option<String> = None;
    loop {
        let doc = {
            let v = view.borrow_and_update();
            let x = extra.borrow_and_update();
            report::reported(&sh.name, &v, &x, &sh.cfg.device_meta_keys)
        };
        let mut sleep_for = None;
        if let Some(patch) = twin::diff(&have, &doc) {
            let urgent = last_urgent.as_ref() != Some(&report::urgency(&doc));
            if urgent || last_sent.elapsed() >= interval {
                if let Err(e) = twin::validate(&patch) {
                    warn!(backend = %sh.name, reason = %e, "reported patch breaks a twin rule; sending it anyway");
                }
                let body = serde_json::to_vec(&patch).unwrap_or_default();
                match sh.twin_request(Topics::twin_patch, body).await {
                    Some(204) | Some(200) => {
                        have = doc.clone();
                        last_urgent = Some(report::urgency(&doc));
                        last_sent = Instant::now();
                        backoff = Duration::from_secs(5);
                        last_error = None;
                        continue;
                    }
                    Some(429) | Some(500..=599) => {
                        warn!(backend = %sh.name, retry_in = ?backoff, "the hub throttles reported properties");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                    Some(status) => {
                        let e = format!("the hub refused a reported patch: HTTP {status}");
                        if last_error.as_deref() != Some(&e) {
                            warn!(backend = %sh.name, status, "{e}");
                        }
                        last_error = Some(e);
                        // Sent again only when something changes.
                        have = doc.clone();
                        last_urgent = Some(report::urgency(&doc));
                        last_sent = Instant::now();
                        continue;
                    }
                    None => {
                        // Lost on the way (the task ends anyway if the connection
                        // is gone): the same difference goes again.
                        warn!(backend = %sh.name, "no answer to a reported patch; sending it again");
                        continue;
                    }
                }
            }
            sleep_for = Some(interval.saturating_sub(last_sent.elapsed()));
        }
        let sleep = async {
            match sleep_for {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            r = extra.changed() => if r.is_err() { return },
            _ = sleep => {}
        }
    }
}

/// Splits records into message bodies below the hub's limit.
fn bodies(records: &[pv_adapter_api::LogRecord], rev: Option<&str>) -> Vec<(usize, Vec<u8>)> {
    let b = logs::body(records, rev);
    if b.len() <= logs::MAX_MESSAGE - 1024 || records.len() <= 1 {
        if b.len() > logs::MAX_MESSAGE - 1024 {
            // One record larger than a message: cut its text.
            let mut r = records[0].clone();
            let keep = (logs::MAX_MESSAGE - 4096).min(r.msg.len());
            let mut end = keep;
            while !r.msg.is_char_boundary(end) {
                end -= 1;
            }
            r.msg.truncate(end);
            r.msg.push_str(" …[cut]");
            return vec![(1, logs::body(&[r], rev))];
        }
        return vec![(records.len(), b)];
    }
    let (a, z) = records.split_at(records.len() / 2);
    let mut out = bodies(a, rev);
    out.extend(bodies(z, rev));
    out
}

/// Sends the engine's log records as D2C messages, one at a time, each acked
/// to the engine only after the hub's PUBACK.
async fn log_sender(sh: Arc<Shared>, work: PathBuf) {
    let mut budget = logs::Budget::load(&work.join("log-budget.json"));
    let mut carried_drop = 0u64;
    let mut warned_day = None;
    let mut pubacks = sh.pubacks.subscribe();
    while let Some(batch) = sh.link.next_logs(4000, sh.cfg.log_batch_bytes).await {
        let rev = sh.link.view().borrow().running.clone();
        carried_drop += batch.dropped;
        for (n, body) in bodies(&batch.records, rev.as_deref()) {
            let payload = if sh.cfg.log_gzip {
                logs::gzip(&body)
            } else {
                body
            };
            let now = identity::unix_now();
            if !budget.allows(payload.len(), sh.cfg.log_budget_kib_per_day, now) {
                if warned_day != Some(budget.day) {
                    warn!(backend = %sh.name, budget_kib = sh.cfg.log_budget_kib_per_day,
                        "daily log budget spent: log records are dropped until midnight UTC");
                    warned_day = Some(budget.day);
                }
                carried_drop += n as u64;
                sh.extra.send_modify(|x| x.logs.1 += n as u64);
                continue;
            }
            let props = logs::properties(sh.cfg.log_gzip, carried_drop);
            let props: Vec<(&str, &str)> = props.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let topic = sh.topics.d2c(&props);
            let before = *pubacks.borrow_and_update();
            let len = payload.len();
            if sh
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
            let acked =
                tokio::time::timeout(Duration::from_secs(60), pubacks.wait_for(|n| *n > before))
                    .await;
            if !matches!(acked, Ok(Ok(_))) {
                debug!(backend = %sh.name, "no PUBACK for a log message; sent again after reconnecting");
                return;
            }
            budget.spend(len, now);
            carried_drop = 0;
            let used = budget.used_kib();
            sh.extra.send_modify(|x| {
                x.logs.0 += 1;
                x.logs.2 = used;
            });
        }
        sh.link.ack_logs(batch.next);
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
            topics.username(&id.host, self.cfg.model_id.as_deref()),
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
        });
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
                            if self.cfg.dps.is_some() {
                                identity::forget_assignment(&self.work);
                            }
                            "the hub refused the credentials (CONNACK: not authorized); check the key, certificate and clock"
                        }
                        ConnectReturnCode::ServiceUnavailable => {
                            "the hub is unavailable (CONNACK 3)"
                        }
                        _ => "the hub refused the connection",
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
                        info!(backend = %self.name, bytes = p.payload.len(), properties = properties.len(),
                            "cloud-to-device message received and completed (the bridge takes commands as direct methods)");
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
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            let id = tokio::select! {
                r = identity::resolve(&self.cfg, &self.work) => r,
                _ = link.stopping() => return Ok(()),
            };
            let end = match id {
                Ok(id) => self.connection(&link, &id, &mut desired, &http).await,
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
    use super::*;

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
