//! The operator's MQTT connection: the bridge's own transport (3.1.1 or 5, TLS,
//! client certificates), a clean session, and every message handed to a channel.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use pv_adapter_mqtt::transport::{self, Client, Message, Polled, Protocol, Settings, TlsFiles};
use tokio::sync::{mpsc, oneshot};

/// How to reach the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL: mqtt://host[:1883] or mqtts://host[:8883].
    #[arg(long, env = "PV_FLEET_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// MQTT version: v311 or v5.
    #[arg(long, default_value = "v311", value_parser = ["v311", "v5"])]
    pub protocol: String,
    /// Topic root of each device; `<device_id>` is replaced.
    #[arg(long, default_value = "pv/<device_id>")]
    pub topic_root: String,
    #[arg(long, env = "PV_FLEET_USERNAME")]
    pub username: Option<String>,
    /// File holding the password.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Extra trust anchors (PEM) for mqtts://.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with --key-file.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// Topics of devices under a root template.
#[derive(Debug, Clone)]
pub struct Root {
    template: String,
}

impl Root {
    pub fn new(template: &str) -> Result<Root, String> {
        if template.matches("<device_id>").count() != 1 {
            return Err(format!(
                "--topic-root {template:?} must contain <device_id> once"
            ));
        }
        Ok(Root {
            template: template.to_owned(),
        })
    }

    /// `rest` under one device's root.
    pub fn topic(&self, device: &str, rest: &str) -> String {
        format!("{}/{rest}", self.template.replace("<device_id>", device))
    }

    /// `rest` under every device's root (`+` for the device).
    pub fn filter(&self, rest: &str) -> String {
        self.topic("+", rest)
    }

    /// The device a topic belongs to, if it is `rest` under some device's root.
    pub fn device_of(&self, topic: &str, rest: &str) -> Option<String> {
        let (pre, post) = self.template.split_once("<device_id>")?;
        let post = format!("{post}/{rest}");
        let dev = topic.strip_prefix(pre)?.strip_suffix(post.as_str())?;
        (!dev.is_empty() && !dev.contains('/')).then(|| dev.to_owned())
    }
}

/// A connection to the broker.
pub struct Fleet {
    pub client: Client,
    pub root: Root,
    pub rx: mpsc::Receiver<Message>,
    done: Option<oneshot::Receiver<()>>,
}

fn read_password(path: &PathBuf) -> Result<String, String> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("--password-file {}: {e}", path.display()))?;
    Ok(s.trim_end_matches(['\r', '\n']).to_owned())
}

impl Fleet {
    /// Connects and subscribes to `filters` (again after every reconnect).
    /// Fails with the broker's reason if the first connection fails.
    pub async fn connect(a: &BrokerArgs, filters: Vec<String>) -> Result<Fleet, String> {
        let root = Root::new(&a.topic_root)?;
        let (host, port, tls) = transport::parse_broker(&a.broker).map_err(|e| format!("--{e}"))?;
        let tls = if tls {
            let client_cert = match (&a.cert_file, &a.key_file) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => return Err("--cert-file and --key-file go together".into()),
            };
            Some(transport::tls_config(&TlsFiles {
                ca_file: a.ca_file.clone(),
                client_cert,
            })?)
        } else {
            None
        };
        let credentials = match &a.username {
            Some(u) => Some((
                u.clone(),
                match &a.password_file {
                    Some(p) => read_password(p)?,
                    None => String::new(),
                },
            )),
            None => None,
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let client_id = format!("pv-fleet-{}-{nanos:x}", std::process::id());
        let v5 = a.protocol == "v5";
        let (client, mut conn) = transport::open(Settings {
            protocol: if v5 { Protocol::V5 } else { Protocol::V311 },
            host,
            port,
            client_id,
            keep_alive: Duration::from_secs(30),
            credentials,
            will: None,
            clean: true,
            tls,
            max_incoming: 4 * 1024 * 1024,
            max_outgoing: 4 * 1024 * 1024,
        });
        let (tx, rx) = mpsc::channel(1024);
        let (first_tx, first_rx) = oneshot::channel::<Result<(), String>>();
        let (done_tx, done_rx) = oneshot::channel();
        let sub = client.clone();
        tokio::spawn(async move {
            let mut first = Some(first_tx);
            loop {
                match conn.poll().await {
                    Ok(Polled::Connected) => {
                        // One SUBSCRIBE per 64 filters: a subscription per
                        // device would overflow the client's request queue
                        // beyond 64 devices and silently miss the rest.
                        let subscribed = sub.try_subscribe_all(&filters);
                        if let Some(f) = first.take() {
                            let _ = f.send(if subscribed {
                                Ok(())
                            } else {
                                Err(format!("cannot subscribe to {} topics", filters.len()))
                            });
                        }
                    }
                    Ok(Polled::Message(m)) => {
                        if tx.send(m).await.is_err() {
                            break;
                        }
                    }
                    Ok(Polled::Disconnected) => break,
                    Ok(Polled::Other) => {}
                    Err(e) => match first.take() {
                        Some(f) => {
                            let _ = f.send(Err(e));
                            break;
                        }
                        None => {
                            eprintln!("pv-fleet: connection lost ({e}); reconnecting");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                }
            }
            let _ = done_tx.send(());
        });
        match tokio::time::timeout(Duration::from_secs(15), first_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(format!("cannot connect to {}: {e}", a.broker)),
            _ => return Err(format!("cannot connect to {}: no answer", a.broker)),
        }
        // Let the subscriptions settle so retained messages are not missed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Fleet {
            client,
            root,
            rx,
            done: Some(done_rx),
        })
    }

    pub async fn publish(
        &self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        self.client
            .publish(topic.clone(), retain, payload)
            .await
            .map_err(|_| format!("cannot publish on {topic}: the connection is gone"))
    }

    /// Publishes with MQTT 5 Response Topic and Correlation Data.
    pub async fn request(
        &self,
        topic: String,
        response_topic: String,
        correlation: Bytes,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        self.client
            .request(topic.clone(), response_topic, correlation, payload)
            .await
            .map_err(|_| format!("cannot publish on {topic}: the connection is gone"))
    }

    /// Sends what is queued, disconnects and waits (at most 5 s) for it.
    pub async fn close(mut self) {
        self.client.try_disconnect();
        if let Some(d) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_found_in_topics_under_any_root_template() {
        let r = Root::new("acme/<device_id>/pv").unwrap();
        assert_eq!(r.topic("d1", "status"), "acme/d1/pv/status");
        assert_eq!(r.filter("status"), "acme/+/pv/status");
        assert_eq!(
            r.device_of("acme/d1/pv/status", "status").as_deref(),
            Some("d1")
        );
        assert_eq!(r.device_of("acme/d1/x/pv/status", "status"), None);
        assert_eq!(r.device_of("other/d1/pv/status", "status"), None);
        assert!(Root::new("pv").is_err());
    }
}
