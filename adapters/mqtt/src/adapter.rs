//! The MQTT connection: rumqttc under pv-bridge's own reconnect policy.
//!
//! One task polls the event loop and handles what arrives; another publishes what
//! the engine reports (progress, revision, device-meta, command results, status)
//! and the log batches. The polling task never waits on a publish, so a full
//! request queue cannot stall the connection. After a connection failure the
//! client is rebuilt (credentials are read again) after a jittered exponential
//! backoff, 1 s doubling to 5 min: never a tight loop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use pv_adapter_api::{
    Adapter, AdapterError, BackendEvent, BoxFuture, Capabilities, CommandKind, EngineLink,
    read_secret,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde::Deserialize;
use tracing::{info, warn};

use crate::protocol::{self, Inbound, RevisionSet, Topics};

/// Settings of an `mqtt` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (port 1883 by default).
    pub broker: String,
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
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
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

impl MqttConfig {
    /// Host and port of the broker, or why the settings are wrong.
    pub fn check(&self) -> Result<(String, u16), String> {
        Topics::new(&self.topic_root, &self.device_id)?;
        if self.broker.starts_with("mqtts://") {
            return Err("broker: mqtts:// (TLS) is not supported by this build yet".into());
        }
        let rest = self
            .broker
            .strip_prefix("mqtt://")
            .ok_or_else(|| format!("broker URL scheme must be mqtt, got {:?}", self.broker))?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("broker: bad port in {:?}", self.broker))?,
            ),
            None => (rest, 1883),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("broker: bad host in {:?}", self.broker));
        }
        if self.keep_alive_secs < 5 {
            return Err("keep_alive_secs must be at least 5".into());
        }
        Ok((host.to_owned(), port))
    }
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

fn command_name(k: &CommandKind) -> &'static str {
    match k {
        CommandKind::Reboot => "reboot",
        CommandKind::Poweroff => "poweroff",
        CommandKind::Gc => "gc",
        CommandKind::SshOn | CommandKind::SshOff => "ssh",
        CommandKind::Resync => "resync",
        CommandKind::Cancel => "cancel",
        CommandKind::Ping => "ping",
    }
}

fn jitter(d: Duration) -> Duration {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + Duration::from_millis(u64::from(n) % (d.as_millis() as u64 / 4 + 1))
}

fn json(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Publishes what the engine reports, until the connection ends.
async fn outbound(client: AsyncClient, link: EngineLink, topics: Topics) {
    let logs = {
        let (client, link, topics) = (client.clone(), link.clone(), topics.clone());
        tokio::spawn(async move {
            let mut seq = BTreeMap::new();
            while let Some(b) = link.next_logs(1000, 256 * 1024).await {
                for (plat, payload) in protocol::log_batches(&b.records, b.dropped, &mut seq) {
                    if client
                        .publish(topics.logs(&plat), QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                link.ack_logs(b.next);
            }
        })
    };
    let mut view = link.view();
    let mut last_progress = None;
    let mut last_meta = None;
    let mut last_status = None;
    let mut sent: BTreeMap<String, pv_adapter_api::CommandStatus> = BTreeMap::new();
    loop {
        let v = view.borrow_and_update().clone();
        let now = SystemTime::now();
        let mut out: Vec<(String, Vec<u8>, bool)> = Vec::new();
        if v.update.is_some() && v.update != last_progress {
            if let Some(p) = &v.update {
                out.push((
                    topics.revision_progress(),
                    json(&protocol::progress(p, now)),
                    true,
                ));
                if p.status.is_success() {
                    out.push((
                        topics.revision_current(),
                        json(&protocol::current(&p.rev, p.status.as_str(), now)),
                        true,
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
            ));
            last_meta = Some(v.device_meta.clone());
        }
        for (id, r) in &v.commands {
            if sent.get(id) != Some(&r.status) {
                let t = topics.cmd_response(command_name(&r.kind), id);
                out.push((t, json(&protocol::command_response(r)), false));
                sent.insert(id.clone(), r.status);
            }
        }
        let updating = v.update.as_ref().is_some_and(|p| !p.status.is_final());
        let status = (updating, v.running.clone());
        if last_status.as_ref() != Some(&status) {
            let state = if updating { "updating" } else { "ready" };
            let payload = protocol::status(
                true,
                state,
                v.running.as_deref(),
                env!("CARGO_PKG_VERSION"),
                now,
            );
            out.push((topics.status(), json(&payload), true));
            last_status = Some(status);
        }
        for (topic, payload, retain) in out {
            if client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .is_err()
            {
                logs.abort();
                return;
            }
        }
        if view.changed().await.is_err() {
            logs.abort();
            return;
        }
    }
}

impl MqttAdapter {
    fn options(&self, host: &str, port: u16, topics: &Topics) -> Result<MqttOptions, AdapterError> {
        let id = self
            .cfg
            .client_id
            .clone()
            .unwrap_or_else(|| format!("pv-bridge-{}", self.cfg.device_id));
        let mut o = MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(self.cfg.keep_alive_secs));
        o.set_clean_session(false);
        o.set_inflight(16);
        o.set_max_packet_size(self.cfg.max_payload_bytes + 1024, 256 * 1024);
        o.set_last_will(LastWill::new(
            topics.status(),
            json(&protocol::last_will()),
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &self.cfg.username {
            let pass = match &self.cfg.password_file {
                Some(f) => read_secret("password_file", f)?,
                None => String::new(),
            };
            o.set_credentials(user.clone(), pass);
        }
        Ok(o)
    }

    fn inbound(
        &self,
        client: &AsyncClient,
        topics: &Topics,
        topic: &str,
        payload: &[u8],
    ) -> Option<BackendEvent> {
        let cap = self.cfg.max_payload_bytes;
        let parsed = match topics.classify(topic) {
            Inbound::RevisionSet => {
                protocol::parse_revision_set(topic, payload, cap, None).map(|r| match r {
                    RevisionSet::Offer(o) => Some(BackendEvent::Offer(o)),
                    RevisionSet::Withdrawn => None,
                })
            }
            Inbound::UserMetaSet => protocol::parse_user_meta_set(topic, payload, cap).map(Some),
            Inbound::Command(name) => protocol::parse_command(topic, name, payload, cap).map(Some),
            Inbound::Other => Ok(None),
        };
        match parsed {
            Ok(ev) => ev,
            Err(r) => {
                warn!(backend = %self.name, topic = %r.topic, reason = %r.reason, "rejected");
                let ev = json(&protocol::rejected(&r, SystemTime::now()));
                let _ = client.try_publish(topics.events(), QoS::AtLeastOnce, false, ev);
                None
            }
        }
    }

    async fn serve(self: Box<Self>, link: EngineLink) -> Result<(), AdapterError> {
        let (host, port) = self.cfg.check().map_err(AdapterError::Config)?;
        let topics =
            Topics::new(&self.cfg.topic_root, &self.cfg.device_id).map_err(AdapterError::Config)?;
        let mut backoff = Duration::from_secs(1);
        loop {
            let opts = self.options(&host, port, &topics)?;
            let (client, mut events) = AsyncClient::new(opts, 64);
            let mut publisher: Option<tokio::task::JoinHandle<()>> = None;
            let connected_at = Instant::now();
            let reason = loop {
                let polled = tokio::select! {
                    p = events.poll() => p,
                    _ = link.stopping() => {
                        // A graceful stop: `offline`, not the last will's `lost`.
                        let now = SystemTime::now();
                        let bye = protocol::status(false, "offline", None, env!("CARGO_PKG_VERSION"), now);
                        let _ = client.try_publish(topics.status(), QoS::AtLeastOnce, true, json(&bye));
                        let _ = client.try_disconnect();
                        let deadline = tokio::time::sleep(Duration::from_millis(1500));
                        tokio::pin!(deadline);
                        loop {
                            tokio::select! {
                                p = events.poll() => match p {
                                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
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
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        info!(backend = %self.name, broker = %self.cfg.broker, "connected");
                        // The broker may have forgotten the session: subscribe again.
                        for t in [
                            topics.revision_set(),
                            topics.meta_user_set(),
                            topics.cmd_filter(),
                        ] {
                            let _ = client.try_subscribe(t, QoS::AtLeastOnce);
                        }
                        if let Some(p) = publisher.take() {
                            p.abort();
                        }
                        publisher = Some(tokio::spawn(outbound(
                            client.clone(),
                            link.clone(),
                            topics.clone(),
                        )));
                        link.send(BackendEvent::Connected).await?;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some(ev) = self.inbound(&client, &topics, &p.topic, &p.payload) {
                            link.send(ev).await?;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                }
            };
            if let Some(p) = publisher.take() {
                p.abort();
            }
            warn!(backend = %self.name, reason = %reason, retry_in = ?backoff, "MQTT connection lost");
            link.send(BackendEvent::Disconnected { reason }).await?;
            if connected_at.elapsed() > Duration::from_secs(600) {
                backoff = Duration::from_secs(1);
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(300));
        }
    }
}

impl Adapter for MqttAdapter {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            updates: true,
            user_meta: true,
            device_meta: true,
            logs: true,
            commands: true,
        }
    }

    fn run(self: Box<Self>, link: EngineLink) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(self.serve(link))
    }
}
