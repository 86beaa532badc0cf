//! The MQTT connection: rumqttc under pv-bridge's own reconnect policy.
//!
//! One task polls the event loop and handles what arrives; another publishes what
//! the engine reports (progress, revision, device-meta, command results, status)
//! and the log batches. The polling task never waits on a publish, so a full
//! request queue cannot stall the connection. After a connection failure the
//! client is rebuilt (credentials are read again) after a jittered exponential
//! backoff, 1 s doubling to 5 min: never a tight loop.
//!
//! A command's answer goes to the MQTT 5 Response Topic (with the Correlation
//! Data) when the command carried one, else to `cmd/<name>/res/<id>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, EngineLink, read_secret,
};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

use crate::blob::{Pull, PullOptions};
use crate::protocol::{self, Inbound, RevisionSet, Topics};
use crate::transport::{self, Client, Message, Polled, Protocol, Settings, TlsFiles};

/// Settings of an `mqtt` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (port 1883) or `mqtts://host[:port]` (TLS, port 8883).
    pub broker: String,
    /// `"v311"` (default) or `"v5"`.
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Extra trust anchors (PEM) for `mqtts://`, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for brokers that authenticate by certificate.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    pub device_id: String,
    /// Topic root; `<device_id>` is replaced.
    #[serde(default = "default_root")]
    pub topic_root: String,
    /// MQTT client id; default `pv-bridge-<device_id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password, read on every connection.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Largest inbound payload accepted (offers carry the state inline).
    #[serde(default = "default_cap")]
    pub max_payload_bytes: usize,
    /// Largest packet read from the broker. A message between `max_payload_bytes`
    /// and this is read and refused visibly; one above it costs a reconnect (the
    /// MQTT client cannot skip it), and is refused visibly after it.
    #[serde(default = "default_read")]
    pub max_read_bytes: usize,
    /// MQTT 5 Response Topics a command may name: only topics under this prefix
    /// are answered (else the device would answer anywhere its ACL lets it).
    /// Default `<topic root>/replies/`.
    #[serde(default)]
    pub response_topic_prefix: Option<String>,
    /// Allow a password over plain `mqtt://` to a broker that is not on this
    /// host (anyone on the path can read it). Off: such a configuration is refused.
    #[serde(default)]
    pub allow_insecure_password: bool,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Bytes asked for in one `blob/get` (objects pulled over MQTT).
    #[serde(default = "default_chunk")]
    pub chunk_bytes: u64,
    /// Seconds a `blob/get` may go unanswered before it is asked again.
    #[serde(default = "default_chunk_timeout")]
    pub chunk_timeout_secs: u64,
}

fn default_protocol() -> Protocol {
    Protocol::V311
}
fn default_root() -> String {
    "pv/<device_id>".into()
}
fn default_cap() -> usize {
    1024 * 1024
}
fn default_keep_alive() -> u64 {
    60
}
fn default_read() -> usize {
    16 * 1024 * 1024
}
fn default_chunk() -> u64 {
    64 * 1024
}
fn default_chunk_timeout() -> u64 {
    30
}

impl MqttConfig {
    /// Host, port and TLS of the broker, or why the settings are wrong.
    pub fn check(&self) -> Result<(String, u16, Option<TlsFiles>), String> {
        Topics::new(&self.topic_root, &self.device_id)?;
        let (host, port, tls) = transport::parse_broker(&self.broker)?;
        if self.keep_alive_secs < 5 {
            return Err("keep_alive_secs must be at least 5".into());
        }
        if !(1024..=1024 * 1024).contains(&self.chunk_bytes) {
            return Err("chunk_bytes must be from 1024 to 1048576".into());
        }
        if self.chunk_timeout_secs == 0 {
            return Err("chunk_timeout_secs must be at least 1".into());
        }
        let least = self.max_payload_bytes.max(self.chunk_bytes as usize) + 1024;
        if self.max_read_bytes < least || self.max_read_bytes > 256 * 1024 * 1024 {
            return Err(format!(
                "max_read_bytes must be from {least} (max_payload_bytes or chunk_bytes, plus 1024) to 268435456"
            ));
        }
        if let Some(p) = &self.response_topic_prefix {
            if p.is_empty() || p.contains(['+', '#']) || p.starts_with('$') {
                return Err(format!(
                    "response_topic_prefix {p:?} must be a topic prefix without wildcards"
                ));
            }
        }
        let client_cert = match (&self.client_cert_file, &self.client_key_file) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err("client_cert_file and client_key_file must be given together".into());
            }
        };
        let files = TlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert,
        };
        if !tls && (files.ca_file.is_some() || files.client_cert.is_some()) {
            return Err("ca_file and client certificates need a TLS broker URL (mqtts://)".into());
        }
        if tls {
            // Every file is read now, so a bad one is a configuration error.
            transport::tls_config(&files)?;
        }
        if !tls && self.password_file.is_some() && !self.allow_insecure_password && !is_local(&host)
        {
            return Err(format!(
                "a password over plain mqtt:// to {host} can be read by anyone on the path: use mqtts://, or set allow_insecure_password = true"
            ));
        }
        Ok((host, port, tls.then_some(files)))
    }

    /// Where command answers may go (MQTT 5 Response Topics).
    pub fn reply_prefix(&self, topics: &Topics) -> String {
        self.response_topic_prefix
            .clone()
            .unwrap_or_else(|| format!("{}/replies/", topics.root()))
    }
}

/// A broker on this host: a password to it does not cross a network.
fn is_local(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

pub struct MqttAdapter {
    name: String,
    cfg: MqttConfig,
}

impl MqttAdapter {
    pub fn new(name: &str, cfg: MqttConfig) -> Self {
        Self {
            name: name.to_owned(),
            cfg,
        }
    }
}

/// `d` plus up to a quarter of it.
fn jitter(d: Duration) -> Duration {
    d + pv_adapter_api::timing::jittered(d / 8, 1.0)
}

/// The wait after a failed connection: `previous` doubled, from 1 s up to 5 min.
fn next_backoff(previous: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

fn json(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Where the answers to commands go: MQTT 5 Response Topic and Correlation Data
/// by command id, for commands that carried them.
#[derive(Clone, Default)]
struct Replies(Arc<Mutex<BTreeMap<String, Route>>>);

/// A Response Topic and the Correlation Data to echo.
type Route = (String, Option<Bytes>);

impl Replies {
    fn remember(&self, id: &str, topic: String, correlation: Option<Bytes>) {
        if let Ok(mut m) = self.0.lock() {
            // Bounded: the engine keeps the last 64 commands; so do we.
            while m.len() >= 64 {
                m.pop_first();
            }
            m.insert(id.to_owned(), (topic, correlation));
        }
    }

    fn route(&self, id: &str) -> Option<Route> {
        self.0.lock().ok().and_then(|m| m.get(id).cloned())
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one bridge run keeps from one connection to the next.
#[derive(Clone)]
struct RunState {
    /// The run's start (ms since the epoch): `run` in log batches.
    run: u64,
    /// Log batch numbers per platform, across reconnects.
    seq: Arc<tokio::sync::Mutex<BTreeMap<String, u64>>>,
    /// Command answers already published: not published again after a reconnect.
    answered: Arc<Mutex<BTreeMap<String, pv_adapter_api::CommandStatus>>>,
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Publishes what the engine reports, until the connection ends.
async fn outbound(
    client: Client,
    link: EngineLink,
    topics: Topics,
    replies: Replies,
    state: RunState,
    session: u64,
) {
    let (seq, run) = (state.seq.clone(), state.run);
    // Aborted with this task (on reconnect), so one log reader runs at a time.
    let _logs = AbortOnDrop(tokio::spawn({
        let (client, link, topics) = (client.clone(), link.clone(), topics.clone());
        async move {
            // Batch numbers run on across reconnects, for the whole bridge run.
            let mut seq = seq.lock().await;
            while let Some(b) = link.next_logs(1000, 256 * 1024).await {
                for (plat, payload) in protocol::log_batches(&b.records, b.dropped, &mut seq, run) {
                    if client
                        .publish(topics.logs(&plat), false, payload)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                link.ack_logs(b.next);
            }
        }
    }));
    let mut view = link.view();
    let mut last_progress = None;
    let mut last_meta = None;
    let mut last_user = None;
    let mut last_status = None;
    loop {
        let v = view.borrow_and_update().clone();
        let now = SystemTime::now();
        // (topic, payload, retained, correlation data)
        let mut out: Vec<(String, Vec<u8>, bool, Option<Bytes>)> = Vec::new();
        if v.update.is_some() && v.update != last_progress {
            if let Some(p) = &v.update {
                out.push((
                    topics.revision_progress(),
                    json(&protocol::progress(p, now)),
                    true,
                    None,
                ));
                if p.status.is_success() {
                    out.push((
                        topics.revision_current(),
                        json(&protocol::current(&p.rev, p.status.as_str(), now)),
                        true,
                        None,
                    ));
                }
            }
            last_progress = v.update.clone();
        }
        if !v.device_meta.is_empty() && Some(&v.device_meta) != last_meta.as_ref() {
            out.push((
                topics.meta_device(),
                json(&protocol::device_meta(&v.device_meta)),
                true,
                None,
            ));
            last_meta = Some(v.device_meta.clone());
        }
        if v.user_meta.is_some() && v.user_meta != last_user {
            if let Some(u) = &v.user_meta {
                out.push((
                    topics.meta_user(),
                    json(&protocol::user_meta(u.version, &u.data)),
                    true,
                    None,
                ));
            }
            last_user = v.user_meta.clone();
        }
        {
            // Answers are events: each goes once per bridge run, not again after
            // a reconnect (the view still holds the last 64 commands).
            let mut answered = state.answered.lock().unwrap_or_else(|p| p.into_inner());
            for (id, r) in &v.commands {
                if answered.get(id) != Some(&r.status) {
                    let (t, corr) = replies
                        .route(id)
                        .unwrap_or_else(|| (topics.cmd_response(r.kind.name(), id), None));
                    out.push((t, json(&protocol::command_response(r)), false, corr));
                    answered.insert(id.clone(), r.status);
                }
            }
            while answered.len() > 128 {
                answered.pop_first();
            }
        }
        let updating = v.update.as_ref().is_some_and(|p| !p.status.is_final());
        let status = (updating, v.running.clone());
        if last_status.as_ref() != Some(&status) {
            let state_name = if updating { "updating" } else { "ready" };
            let payload = protocol::status(
                true,
                state_name,
                v.running.as_deref(),
                env!("CARGO_PKG_VERSION"),
                now,
                session,
            );
            out.push((topics.status(), json(&payload), true, None));
            last_status = Some(status);
        }
        for (topic, payload, retain, corr) in out {
            let sent = if retain {
                client.publish(topic, true, payload).await
            } else {
                client.reply(topic, corr, payload).await
            };
            if sent.is_err() {
                return;
            }
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

impl MqttAdapter {
    fn settings(
        &self,
        host: &str,
        port: u16,
        tls: Option<&TlsFiles>,
        topics: &Topics,
        session: u64,
        clean: bool,
    ) -> Result<Settings, AdapterError> {
        let client_id = self
            .cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("pv-bridge-{}", self.cfg.device_id));
        let credentials = match &self.cfg.username {
            Some(user) => {
                let pass = match &self.cfg.password_file {
                    Some(f) => read_secret("password_file", f)?,
                    None => String::new(),
                };
                Some((user.clone(), pass))
            }
            None => None,
        };
        // Certificates are read again on every connection: renewed files apply.
        let tls = match tls {
            Some(files) => Some(transport::tls_config(files).map_err(AdapterError::Config)?),
            None => None,
        };
        Ok(Settings {
            protocol: self.cfg.protocol,
            host: host.to_owned(),
            port,
            client_id,
            keep_alive: Duration::from_secs(self.cfg.keep_alive_secs),
            credentials,
            will: Some((topics.status(), json(&protocol::last_will(session)))),
            clean,
            tls,
            // Read beyond max_payload_bytes, so that an oversize message is refused
            // visibly instead of breaking the connection (MQTT 5 brokers drop what
            // exceeds this without telling anyone).
            max_incoming: self.cfg.max_read_bytes,
            max_outgoing: 256 * 1024,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn inbound(
        &self,
        client: &Client,
        topics: &Topics,
        replies: &Replies,
        pull: &Pull,
        m: &Message,
        offered: &mut Option<String>,
    ) -> Option<BackendEvent> {
        let cap = self.cfg.max_payload_bytes;
        let topic = m.topic.as_str();
        let payload = &m.payload[..];
        let inbound = topics.classify(topic);
        let is_offer = matches!(inbound, Inbound::RevisionSet);
        let parsed = match inbound {
            Inbound::RevisionSet => {
                let fetcher: Arc<dyn pv_adapter_api::ObjectFetcher> = Arc::new(pull.clone());
                protocol::parse_revision_set(topic, payload, cap, Some(fetcher)).map(|r| match r {
                    RevisionSet::Offer(o) => {
                        *offered = Some(o.id.clone());
                        Some(BackendEvent::Offer(o))
                    }
                    // Withdrawn: cancelled while Pantavisor has not started it (the
                    // engine refuses later, with the reason in the progress).
                    RevisionSet::Withdrawn => offered.take().map(|id| {
                        info!(backend = %self.name, id = %id, "offer withdrawn (empty revision/set): cancelling it");
                        BackendEvent::Cancel { id }
                    }),
                })
            }
            Inbound::UserMetaSet => protocol::parse_user_meta_set(topic, payload, cap).map(Some),
            Inbound::Command(name) => {
                let parsed = protocol::parse_command(topic, name, payload, cap);
                let id = match &parsed {
                    Ok(BackendEvent::Command { id, .. }) => Some(id.clone()),
                    _ => protocol::command_id(payload),
                };
                let prefix = self.cfg.reply_prefix(topics);
                let parsed = match (&m.response_topic, parsed) {
                    // Answering anywhere the ACL allows would let any client that
                    // may command the device make it publish on any topic.
                    (Some(rt), Ok(_)) if !rt.starts_with(&prefix) => Err(protocol::Rejected {
                        topic: topic.to_owned(),
                        reason: format!(
                            "response topic {rt:?} is not under {prefix:?} (response_topic_prefix); the command was not carried out"
                        ),
                    }),
                    (_, p) => p,
                };
                if let (Some(id), Some(rt)) = (&id, &m.response_topic) {
                    if rt.starts_with(&prefix) {
                        replies.remember(id, rt.clone(), m.correlation.clone());
                    }
                }
                if let (Err(r), Some(id)) = (&parsed, &id) {
                    // The caller waits for an answer: it gets one.
                    let (t, corr) = replies
                        .route(id)
                        .unwrap_or_else(|| (topics.cmd_response(name, id), None));
                    let res = protocol::command_rejected(id, &r.reason);
                    let c = client.clone();
                    tokio::spawn(async move {
                        let _ = c.reply(t, corr, json(&res)).await;
                    });
                }
                parsed.map(Some)
            }
            Inbound::Chunk { sha, offset } => {
                if !pull.deliver(sha, offset, m.payload.clone()) {
                    debug!(backend = %self.name, topic, "a chunk nobody waits for (late or duplicate)");
                }
                Ok(None)
            }
            Inbound::Other => Ok(None),
        };
        match parsed {
            Ok(ev) => ev,
            Err(r) => {
                warn!(backend = %self.name, topic = %r.topic, reason = %r.reason, "rejected");
                let now = SystemTime::now();
                let ev = json(&protocol::rejected(&r, now));
                if !client.try_publish(topics.events(), false, ev) {
                    warn!(backend = %self.name, "publish queue full: rejection not sent");
                }
                if is_offer {
                    // Retained where operators look for an offer's fate.
                    let id = protocol::offer_id_of(payload);
                    let p = json(&protocol::offer_refused(id.as_deref(), &r.reason, now));
                    if !client.try_publish(topics.revision_progress(), true, p) {
                        warn!(backend = %self.name, "publish queue full: refusal not sent");
                    }
                }
                None
            }
        }
    }

    async fn serve(self: Box<Self>, link: EngineLink) -> Result<(), AdapterError> {
        let (host, port, tls) = self.cfg.check().map_err(AdapterError::Config)?;
        let topics =
            Topics::new(&self.cfg.topic_root, &self.cfg.device_id).map_err(AdapterError::Config)?;
        let replies = Replies::default();
        let state = RunState {
            run: now_ms(),
            seq: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
            answered: Arc::default(),
        };
        let mut session = 0u64;
        let mut offered: Option<String> = None;
        // Why the last connection broke on a message too big to read.
        let mut oversize: Option<String> = None;
        if self.cfg.password_file.is_some() && tls.is_none() {
            warn!(backend = %self.name, broker = %self.cfg.broker, "the MQTT password travels unencrypted (mqtt://); use mqtts:// beyond this host");
        }
        let pull = Pull::new(
            topics.clone(),
            PullOptions {
                chunk: self.cfg.chunk_bytes,
                timeout: Duration::from_secs(self.cfg.chunk_timeout_secs),
                ..PullOptions::default()
            },
        );
        let mut backoff = Duration::from_secs(1);
        loop {
            session = now_ms().max(session + 1);
            // After a message too big to read, start without the stored session:
            // a QoS 1 message the client never acknowledged is sent again with
            // the session forever, and cannot be read either time.
            let clean = oversize.is_some();
            let settings = self.settings(&host, port, tls.as_ref(), &topics, session, clean)?;
            let (client, mut conn) = transport::open(settings);
            let mut publisher: Option<tokio::task::JoinHandle<()>> = None;
            let mut connected_at = None;
            let reason = loop {
                let polled = tokio::select! {
                    p = conn.poll() => p,
                    _ = link.stopping() => {
                        // A graceful stop: `offline`, not the last will's `lost`.
                        let now = SystemTime::now();
                        let bye = protocol::status(false, "offline", None, env!("CARGO_PKG_VERSION"), now, session);
                        let _ = client.try_publish(topics.status(), true, json(&bye));
                        client.try_disconnect();
                        let deadline = tokio::time::sleep(Duration::from_millis(1500));
                        tokio::pin!(deadline);
                        loop {
                            tokio::select! {
                                p = conn.poll() => match p {
                                    Ok(Polled::Disconnected) | Err(_) => break,
                                    Ok(_) => {}
                                },
                                _ = &mut deadline => break,
                            }
                        }
                        if let Some(p) = publisher.take() {
                            p.abort();
                        }
                        info!(backend = %self.name, "disconnected (bridge stopping)");
                        return Ok(());
                    }
                };
                match polled {
                    Ok(Polled::Connected) => {
                        info!(backend = %self.name, broker = %self.cfg.broker, "connected");
                        connected_at = Some(Instant::now());
                        // The broker may have forgotten the session: subscribe again.
                        for t in [
                            topics.revision_set(),
                            topics.meta_user_set(),
                            topics.cmd_filter(),
                            topics.blob_filter(),
                        ] {
                            client.try_subscribe(t);
                        }
                        pull.set_client(Some(client.clone()));
                        if let Some(p) = publisher.take() {
                            p.abort();
                        }
                        let now = SystemTime::now();
                        let prefix = self.cfg.reply_prefix(&topics);
                        let caps = protocol::capabilities(
                            &protocol::Capabilities {
                                version: env!("CARGO_PKG_VERSION"),
                                max_payload_bytes: self.cfg.max_payload_bytes,
                                max_read_bytes: self.cfg.max_read_bytes,
                                chunk_bytes: self.cfg.chunk_bytes,
                                response_topic_prefix: &prefix,
                            },
                            now,
                        );
                        client.try_publish(topics.capabilities(), true, json(&caps));
                        if let Some(why) = oversize.take() {
                            let r = protocol::Rejected {
                                topic: format!("{}/#", topics.root()),
                                reason: why.clone(),
                            };
                            client.try_publish(
                                topics.events(),
                                false,
                                json(&protocol::rejected(&r, now)),
                            );
                            client.try_publish(
                                topics.revision_progress(),
                                true,
                                json(&protocol::offer_refused(None, &why, now)),
                            );
                        }
                        publisher = Some(tokio::spawn(outbound(
                            client.clone(),
                            link.clone(),
                            topics.clone(),
                            replies.clone(),
                            state.clone(),
                            session,
                        )));
                        link.send(BackendEvent::Connected).await?;
                    }
                    Ok(Polled::Message(m)) => {
                        if let Some(ev) =
                            self.inbound(&client, &topics, &replies, &pull, &m, &mut offered)
                        {
                            link.send(ev).await?;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if e.contains("payload size limit exceeded") {
                            // The client cannot skip a packet it will not read: the
                            // connection is lost, and the refusal goes out after the
                            // reconnect (the backoff keeps this from looping fast).
                            let why = format!(
                                "a message larger than max_read_bytes ({} bytes) arrived on one of this device's topics (revision/set, meta/user/set, cmd/+ or blob/+/+) and cannot be read; if it is retained, clear it with an empty retained message",
                                self.cfg.max_read_bytes
                            );
                            error!(backend = %self.name, "{why}");
                            oversize = Some(why);
                        }
                        break e;
                    }
                }
            };
            if let Some(p) = publisher.take() {
                p.abort();
            }
            pull.set_client(None);
            // A connection that held for a while starts the backoff afresh.
            if connected_at.is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
                backoff = Duration::from_secs(1);
            }
            warn!(backend = %self.name, reason = %reason, retry_in = ?backoff, "MQTT connection lost");
            link.send(BackendEvent::Disconnected { reason }).await?;
            tokio::time::sleep(jitter(backoff)).await;
            backoff = next_backoff(backoff);
        }
    }
}

impl Adapter for MqttAdapter {
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

    /// Attempts a failing broker sees in the first `window`, jitter at its least.
    fn attempts_within(window: Duration) -> u32 {
        let (mut t, mut wait, mut n) = (Duration::ZERO, Duration::from_secs(1), 0);
        while t <= window {
            n += 1;
            t += wait;
            wait = next_backoff(wait);
        }
        n
    }

    fn cfg(extra: &str) -> MqttConfig {
        let text = format!("device_id = \"d\"\n{extra}");
        let v: toml_crate::Table = text.parse().unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn a_password_over_plain_mqtt_to_another_host_is_refused_unless_allowed() {
        let pw = "username = \"u\"\npassword_file = \"/p\"\n";
        let e = cfg(&format!("broker = \"mqtt://broker.lan\"\n{pw}"))
            .check()
            .unwrap_err();
        assert!(e.contains("can be read by anyone on the path"), "{e}");
        cfg(&format!(
            "broker = \"mqtt://broker.lan\"\n{pw}allow_insecure_password = true\n"
        ))
        .check()
        .unwrap();
        cfg(&format!("broker = \"mqtt://127.0.0.1:1883\"\n{pw}"))
            .check()
            .unwrap();
        cfg(&format!("broker = \"mqtt://localhost\"\n{pw}"))
            .check()
            .unwrap();
        cfg(&format!("broker = \"mqtt://[::1]:1883\"\n{pw}"))
            .check()
            .unwrap();
    }

    #[test]
    fn read_limits_and_reply_prefixes_are_checked() {
        let b = "broker = \"mqtt://127.0.0.1\"\n";
        let e = cfg(&format!("{b}max_read_bytes = 1000\n"))
            .check()
            .unwrap_err();
        assert!(e.contains("max_read_bytes must be from"), "{e}");
        let e = cfg(&format!("{b}response_topic_prefix = \"ops/#\"\n"))
            .check()
            .unwrap_err();
        assert!(e.contains("without wildcards"), "{e}");
        let c = cfg(b);
        let t = Topics::new(&c.topic_root, &c.device_id).unwrap();
        assert_eq!(c.reply_prefix(&t), "pv/d/replies/");
    }

    #[test]
    fn reconnects_are_never_a_tight_loop() {
        // 0, 1, 3, 7, 15, 31 s: six attempts in the first minute; then 63, 127, 255
        // and 511 s; then one every 5 min (811 … 3511 s): 20 in the first hour.
        assert_eq!(attempts_within(Duration::from_secs(60)), 6);
        assert_eq!(attempts_within(Duration::from_secs(3600)), 6 + 4 + 10);
        let mut d = Duration::from_secs(1);
        for _ in 0..20 {
            d = next_backoff(d);
        }
        assert_eq!(d, Duration::from_secs(300));
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(8));
            assert!(
                j >= Duration::from_secs(8) && j <= Duration::from_secs(10),
                "{j:?}"
            );
        }
    }
}
