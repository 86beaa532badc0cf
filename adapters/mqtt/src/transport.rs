//! One face over rumqttc's MQTT 3.1.1 and MQTT 5 clients, and the TLS set-up.
//!
//! The adapter speaks to [`Client`] and polls [`Connection`]; which protocol runs
//! underneath is a setting. On MQTT 5 an inbound message keeps its Response Topic
//! and Correlation Data so a command's answer can go where the caller asked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Protocol {
    #[serde(rename = "v311")]
    V311,
    #[serde(rename = "v5")]
    V5,
}

/// Everything needed to open one connection.
pub struct Settings {
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    pub credentials: Option<(String, String)>,
    /// Topic and payload of the last will (QoS 1, retained).
    pub will: Option<(String, Vec<u8>)>,
    /// Start without a stored session (operator tools); devices keep theirs.
    pub clean: bool,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Largest packet accepted from the broker.
    pub max_incoming: usize,
    /// Largest packet the bridge sends.
    pub max_outgoing: usize,
}

/// A message from the broker.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5: where the sender wants the answer, and what to echo with it.
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

/// What polling the connection produced.
#[derive(Debug)]
pub enum Polled {
    /// The broker accepted the connection.
    Connected,
    Message(Message),
    /// The bridge's DISCONNECT went out.
    Disconnected,
    Other,
}

/// The sending half; cheap to clone.
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop; poll it continuously.
pub enum Connection {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The send failed: the connection is gone.
#[derive(Debug)]
pub struct Gone;

fn q5() -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
}

impl Client {
    /// Publishes at QoS 1.
    pub async fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), Gone> {
        match self {
            Client::V4(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .await
                .map_err(|_| Gone),
            Client::V5(c) => c
                .publish(topic, q5(), retain, payload)
                .await
                .map_err(|_| Gone),
        }
    }

    /// Publishes an answer, echoing MQTT 5 Correlation Data when there is some.
    pub async fn reply(
        &self,
        topic: String,
        correlation: Option<Bytes>,
        payload: Vec<u8>,
    ) -> Result<(), Gone> {
        match (self, correlation) {
            (Client::V5(c), Some(data)) => {
                let props = p5::PublishProperties {
                    correlation_data: Some(data),
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                c.publish_with_properties(topic, q5(), false, payload, props)
                    .await
                    .map_err(|_| Gone)
            }
            _ => self.publish(topic, false, payload).await,
        }
    }

    /// Publishes a request carrying an MQTT 5 Response Topic and Correlation Data
    /// (plain publish on 3.1.1, where those do not exist).
    pub async fn request(
        &self,
        topic: String,
        response_topic: String,
        correlation: Bytes,
        payload: Vec<u8>,
    ) -> Result<(), Gone> {
        match self {
            Client::V5(c) => {
                let props = p5::PublishProperties {
                    response_topic: Some(response_topic),
                    correlation_data: Some(correlation),
                    ..Default::default()
                };
                c.publish_with_properties(topic, q5(), false, payload, props)
                    .await
                    .map_err(|_| Gone)
            }
            Client::V4(_) => self.publish(topic, false, payload).await,
        }
    }

    /// Queues a publish without waiting; false when the queue is full or closed.
    pub fn try_publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .is_ok(),
            Client::V5(c) => c.try_publish(topic, q5(), retain, payload).is_ok(),
        }
    }

    pub fn try_subscribe(&self, filter: String) -> bool {
        match self {
            Client::V4(c) => c.try_subscribe(filter, rumqttc::QoS::AtLeastOnce).is_ok(),
            Client::V5(c) => c.try_subscribe(filter, q5()).is_ok(),
        }
    }

    /// Subscribes to `filters` in SUBSCRIBE packets of at most 64 filters, so
    /// a fleet of any size needs few requests (the request queue holds 64).
    /// False when a request could not be queued.
    pub fn try_subscribe_all(&self, filters: &[String]) -> bool {
        filters.chunks(64).all(|chunk| match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    chunk.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .is_ok(),
            Client::V5(c) => c
                .try_subscribe_many(chunk.iter().map(|f| p5::Filter::new(f.clone(), q5())))
                .is_ok(),
        })
    }

    pub fn try_disconnect(&self) {
        match self {
            Client::V4(c) => {
                let _ = c.try_disconnect();
            }
            Client::V5(c) => {
                let _ = c.try_disconnect();
            }
        }
    }
}

impl Connection {
    /// The next event, or why the connection ended.
    pub async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Connection::V4(l) => {
                use rumqttc::{Event, Outgoing, Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(Polled::Connected),
                    Event::Incoming(Packet::Publish(p)) => Ok(Polled::Message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        response_topic: None,
                        correlation: None,
                    })),
                    Event::Outgoing(Outgoing::Disconnect) => Ok(Polled::Disconnected),
                    _ => Ok(Polled::Other),
                }
            }
            Connection::V5(l) => {
                use rumqttc::v5::{Event, mqttbytes::v5::Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => Ok(Polled::Connected),
                    Event::Incoming(Packet::Publish(p)) => {
                        let Ok(topic) = String::from_utf8(p.topic.to_vec()) else {
                            return Ok(Polled::Other);
                        };
                        let (response_topic, correlation) = match p.properties {
                            Some(pr) => (pr.response_topic, pr.correlation_data),
                            None => (None, None),
                        };
                        Ok(Polled::Message(Message {
                            topic,
                            payload: p.payload,
                            response_topic,
                            correlation,
                        }))
                    }
                    Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Polled::Disconnected),
                    _ => Ok(Polled::Other),
                }
            }
        }
    }
}

/// Opens a client (the connection is made by the first poll). Unless `clean`, the
/// session is persistent: clean-session off on 3.1.1, a one-day session expiry on 5.
pub fn open(s: Settings) -> (Client, Connection) {
    let transport = match &s.tls {
        Some(cfg) => Transport::Tls(TlsConfiguration::Rustls(cfg.clone())),
        None => Transport::Tcp,
    };
    match s.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
            o.set_keep_alive(s.keep_alive);
            o.set_clean_session(s.clean);
            o.set_inflight(16);
            o.set_max_packet_size(s.max_incoming, s.max_outgoing);
            if let Some((topic, payload)) = s.will {
                o.set_last_will(rumqttc::LastWill::new(
                    topic,
                    payload,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            }
            if let Some((u, p)) = s.credentials {
                o.set_credentials(u, p);
            }
            o.set_transport(transport);
            let (c, l) = rumqttc::AsyncClient::new(o, 64);
            (Client::V4(c), Connection::V4(Box::new(l)))
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(s.client_id, s.host, s.port);
            o.set_keep_alive(s.keep_alive);
            o.set_clean_start(s.clean);
            if !s.clean {
                o.set_session_expiry_interval(Some(24 * 3600));
            }
            o.set_outgoing_inflight_upper_limit(16);
            o.set_max_packet_size(u32::try_from(s.max_incoming).ok());
            if let Some((topic, payload)) = s.will {
                o.set_last_will(p5::LastWill::new(topic, payload, q5(), true, None));
            }
            if let Some((u, p)) = s.credentials {
                o.set_credentials(u, p);
            }
            o.set_transport(transport);
            let (c, l) = rumqttc::v5::AsyncClient::new(o, 64);
            (Client::V5(c), Connection::V5(Box::new(l)))
        }
    }
}

/// Host, port and whether TLS is on, from `mqtt://host[:1883]` or
/// `mqtts://host[:8883]`.
pub fn parse_broker(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else {
        return Err(format!(
            "broker URL scheme must be mqtt or mqtts, got {url:?}"
        ));
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("broker: bad port in {url:?}"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("broker: bad host in {url:?}"));
    }
    Ok((host.to_owned(), port, tls))
}

/// TLS settings of a connection.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// Extra trust anchors (PEM), trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and private key (PEM), for brokers that
    /// authenticate devices by certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

fn certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// Builds the rustls configuration: the system's trust anchors plus `ca_file`,
/// and the client certificate when given. Every file problem is reported by name.
pub fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = &files.ca_file {
        for c in certs("ca_file", ca)? {
            roots
                .add(c)
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trust anchors: the system has no CA certificates and no ca_file is set".into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    let cfg = match &files.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs("client_cert_file", cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("client_key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
    };
    Ok(Arc::new(cfg))
}
