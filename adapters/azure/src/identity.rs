//! Who the device is to IoT Hub, read again before every connection: from a
//! connection string, from X.509 settings, or assigned by DPS (cached in the
//! adapter's directory; provisioned again when the hub refuses the identity).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pv_adapter_api::{AdapterError, read_secret};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::connstr::ConnectionString;
use crate::topics::{self, dps};
use crate::{AzureConfig, DpsConfig, sas, tls};

/// How the device proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// SAS tokens signed with this base64 key (and `skn` when it is a policy's).
    Key { key: String, policy: Option<String> },
    /// The TLS client certificate.
    X509(tls::ClientCert),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Key { policy, .. } => write!(f, "Key {{ policy: {policy:?} }}"),
            Auth::X509(c) => write!(f, "X509({})", c.cert_file.display()),
        }
    }
}

/// One device (or module) identity on one hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The hub's host name (user name, SAS `sr`, TLS name unless a gateway).
    pub host: String,
    /// An IoT Edge gateway the connection goes through.
    pub gateway: Option<String>,
    pub device_id: String,
    pub module_id: Option<String>,
    pub auth: Auth,
}

impl Identity {
    /// The name the server's certificate must carry.
    pub fn tls_name(&self) -> &str {
        self.gateway.as_deref().unwrap_or(&self.host)
    }

    /// A fresh SAS token valid for `lifetime`, or an empty password for X.509.
    pub fn password(&self, lifetime: Duration) -> Result<String, AdapterError> {
        match &self.auth {
            Auth::X509(_) => Ok(String::new()),
            Auth::Key { key, policy } => {
                let expiry = unix_now() + lifetime.as_secs();
                let resource =
                    sas::device_resource(&self.host, &self.device_id, self.module_id.as_deref());
                sas::token(key, &resource, expiry, policy.as_deref())
                    .map_err(|e| AdapterError::Config(format!("device key: {e}")))
            }
        }
    }
}

/// 2025-01-01T00:00:00Z: a clock before it is certainly wrong (this version did
/// not exist yet), as on a board without RTC before NTP set the time.
pub const PLAUSIBLE_SINCE: u64 = 1_735_689_600;

/// Whether the device clock can be right.
pub fn clock_is_plausible(now: u64) -> bool {
    now >= PLAUSIBLE_SINCE
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `host:port`, the port defaulting to 8883.
pub fn split_address(a: &str) -> Result<(String, u16), String> {
    let a = a.trim();
    if a.is_empty() {
        return Err("an empty address".into());
    }
    // [v6]:port, host:port or host
    if let Some(rest) = a.strip_prefix('[') {
        let (h, p) = rest
            .split_once(']')
            .ok_or_else(|| format!("{a:?}: unclosed '['"))?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{a:?}: bad port"))?,
            None if p.is_empty() => 8883,
            None => return Err(format!("{a:?}: junk after ']'")),
        };
        return Ok((h.to_owned(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port: u16 = p.parse().map_err(|_| format!("{a:?}: bad port {p:?}"))?;
            if port == 0 {
                return Err(format!("{a:?}: port 0"));
            }
            Ok((h.to_owned(), port))
        }
        Some(_) => Err(format!("{a:?}: write IPv6 addresses as [addr]:port")),
        None => Ok((a.to_owned(), 8883)),
    }
}

/// What DPS assigned, as cached in `dps.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    #[serde(rename = "assignedHub")]
    pub hub: String,
    #[serde(rename = "deviceId")]
    pub device_id: String,
    #[serde(rename = "registrationId")]
    pub registration_id: String,
}

fn dps_cache(work: &Path) -> PathBuf {
    work.join("dps.json")
}

/// Forgets the DPS assignment, so the next connection provisions again.
pub fn forget_assignment(work: &Path) {
    let _ = std::fs::remove_file(dps_cache(work));
}

fn dps_key(d: &DpsConfig) -> Result<Option<String>, AdapterError> {
    match (&d.symmetric_key_file, &d.group_key_file) {
        (Some(f), None) => Ok(Some(read_secret("dps.symmetric_key_file", f)?)),
        (None, Some(f)) => {
            let group = read_secret("dps.group_key_file", f)?;
            sas::derive_device_key(&group, &d.registration_id)
                .map(Some)
                .map_err(|e| AdapterError::Config(format!("dps.group_key_file: {e}")))
        }
        _ => Ok(None),
    }
}

/// Reads the identity: every file is read now (a rotated key or certificate
/// applies at the next connection). DPS runs when nothing is cached.
pub async fn resolve(cfg: &AzureConfig, work: &Path) -> Result<Identity, AdapterError> {
    let x509 = cfg.x509.clone().map(Auth::X509);
    if let Some(f) = &cfg.connection_string_file {
        let text = read_secret("connection_string_file", f)?;
        let c: ConnectionString = text.parse().map_err(|e| {
            AdapterError::Config(format!("connection_string_file {}: {e}", f.display()))
        })?;
        let auth = match (c.shared_access_key, c.x509, x509) {
            (Some(key), _, _) => Auth::Key {
                key,
                policy: c.shared_access_key_name,
            },
            (None, true, Some(x)) => x,
            _ => {
                return Err(AdapterError::Config(
                    "the connection string says x509=true: set x509 = { cert_file, key_file }"
                        .into(),
                ));
            }
        };
        return Ok(Identity {
            host: c.host_name,
            gateway: c.gateway_host_name,
            device_id: c.device_id,
            module_id: c.module_id,
            auth,
        });
    }
    if let Some(d) = &cfg.dps {
        let key = dps_key(d)?;
        let auth = match (&key, x509) {
            (Some(k), _) => Auth::Key {
                key: k.clone(),
                policy: None,
            },
            (None, Some(x)) => x,
            (None, None) => {
                return Err(AdapterError::Config(
                    "dps needs symmetric_key_file, group_key_file or x509".into(),
                ));
            }
        };
        let cached = std::fs::read(dps_cache(work))
            .ok()
            .and_then(|b| serde_json::from_slice::<Assignment>(&b).ok())
            .filter(|a| a.registration_id == d.registration_id);
        let a = match cached {
            Some(a) => a,
            None => {
                let a = register(cfg, d, &auth).await?;
                if let Err(e) = pv_adapter_api::durable::write_durable(
                    &dps_cache(work),
                    &serde_json::to_vec_pretty(&a).unwrap_or_default(),
                ) {
                    warn!(error = %e, "cannot cache the DPS assignment; it will be asked again");
                }
                a
            }
        };
        return Ok(Identity {
            host: a.hub,
            gateway: None,
            device_id: a.device_id,
            module_id: None,
            auth,
        });
    }
    match (&cfg.host_name, &cfg.device_id, x509) {
        (Some(h), Some(d), Some(x)) => Ok(Identity {
            host: h.clone(),
            gateway: None,
            device_id: d.clone(),
            module_id: cfg.module_id.clone(),
            auth: x,
        }),
        _ => Err(AdapterError::Config(
            "set connection_string_file, dps, or x509 with host_name and device_id".into(),
        )),
    }
}

/// Registers with DPS over MQTT and waits for the assignment.
/// The longest `retry-after` honoured (DPS asks for more under heavy load).
const MAX_RETRY_AFTER: u64 = 300;
/// How long one registration may take, waits included.
const REGISTRATION_LIMIT: Duration = Duration::from_secs(900);

async fn register(
    cfg: &AzureConfig,
    d: &DpsConfig,
    auth: &Auth,
) -> Result<Assignment, AdapterError> {
    let (host, port) = split_address(d.connect_address.as_deref().unwrap_or(&d.global_endpoint))
        .map_err(AdapterError::Config)?;
    let client_cert = match auth {
        Auth::X509(c) => Some(c),
        Auth::Key { .. } => None,
    };
    let tls = tls::client_config(cfg.ca_file.as_deref(), &d.global_endpoint, client_cert)
        .map_err(AdapterError::Config)?;
    let mut opts = MqttOptions::new(d.registration_id.clone(), host, port);
    let password = match auth {
        Auth::Key { key, .. } => sas::token(
            key,
            &dps::resource(&d.id_scope, &d.registration_id),
            unix_now() + 3600,
            Some("registration"),
        )
        .map_err(|e| AdapterError::Config(format!("dps key: {e}")))?,
        Auth::X509(_) => String::new(),
    };
    opts.set_credentials(dps::username(&d.id_scope, &d.registration_id), password);
    opts.set_clean_session(true);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.min(60)));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::clone(&tls),
    )));
    let (client, mut ev) = AsyncClient::new(opts, 8);
    let body = match cfg.announced_model() {
        Some(m) => {
            serde_json::json!({"registrationId": d.registration_id, "payload": {"modelId": m}})
        }
        None => serde_json::json!({"registrationId": d.registration_id}),
    };
    let send = |topic: String, body: String| {
        let client = client.clone();
        async move {
            client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
                .map_err(|e| AdapterError::Connection(format!("DPS: {e}")))
        }
    };
    // The next request and when it is due. Waits (DPS's `retry-after`, up to
    // minutes under load) run beside the event loop, never inside it: the loop
    // must keep sending PINGREQs, or DPS drops the connection mid-wait.
    let mut due: Option<(tokio::time::Instant, String, String)> = None;
    let fut = async {
        let mut rid = 0u64;
        loop {
            let timer = async {
                match &due {
                    Some((at, _, _)) => tokio::time::sleep_until(*at).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                e = ev.poll() => e.map_err(|e| AdapterError::Connection(format!("DPS: {e}")))?,
                _ = timer => {
                    if let Some((_, topic, body)) = due.take() {
                        send(topic, body).await?;
                    }
                    continue;
                }
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .subscribe(topics::DPS_RES_FILTER, QoS::AtLeastOnce)
                        .await
                        .map_err(|e| AdapterError::Connection(format!("DPS: {e}")))?;
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    rid += 1;
                    send(dps::register(rid), body.to_string()).await?;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let Some((status, _, retry)) = dps::parse_response(&p.topic) else {
                        continue;
                    };
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    match status {
                        200 | 202 => {
                            let state = v.get("registrationState").unwrap_or(&v);
                            let st = v.get("status").and_then(|s| s.as_str()).unwrap_or("");
                            match st {
                                "assigned" => {
                                    let field = |k: &str| {
                                        state.get(k).and_then(|s| s.as_str()).map(str::to_owned)
                                    };
                                    return match (field("assignedHub"), field("deviceId")) {
                                        (Some(hub), Some(device_id)) => Ok(Assignment {
                                            hub,
                                            device_id,
                                            registration_id: d.registration_id.clone(),
                                        }),
                                        _ => Err(AdapterError::Protocol(
                                            "DPS assigned without assignedHub/deviceId".into(),
                                        )),
                                    };
                                }
                                "assigning" => {
                                    let op = v
                                        .get("operationId")
                                        .and_then(|s| s.as_str())
                                        .ok_or_else(|| {
                                            AdapterError::Protocol("DPS: no operationId".into())
                                        })?
                                        .to_owned();
                                    let wait = retry.unwrap_or(3).clamp(1, MAX_RETRY_AFTER);
                                    rid += 1;
                                    due = Some((
                                        tokio::time::Instant::now() + Duration::from_secs(wait),
                                        dps::status(rid, &op),
                                        String::new(),
                                    ));
                                }
                                other => {
                                    let detail = state
                                        .get("errorMessage")
                                        .or_else(|| v.get("message"))
                                        .and_then(|s| s.as_str())
                                        .unwrap_or("");
                                    return Err(AdapterError::Config(format!(
                                        "DPS registration {other}: {detail}"
                                    )));
                                }
                            }
                        }
                        429 | 500..=599 => {
                            let wait = retry.unwrap_or(5).clamp(1, MAX_RETRY_AFTER);
                            warn!(status, wait, "DPS is busy; asking again");
                            rid += 1;
                            due = Some((
                                tokio::time::Instant::now() + Duration::from_secs(wait),
                                dps::register(rid),
                                body.to_string(),
                            ));
                        }
                        _ => {
                            let msg = v.get("message").and_then(|s| s.as_str()).unwrap_or("");
                            let code = v
                                .get("errorCode")
                                .map(|c| c.to_string())
                                .unwrap_or_default();
                            return Err(AdapterError::Config(format!(
                                "DPS refused the registration: HTTP {status} {code} {msg}"
                            )));
                        }
                    }
                }
                _ => {}
            }
        }
    };
    let r = tokio::time::timeout(REGISTRATION_LIMIT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(AdapterError::Connection(format!(
                "DPS: no assignment within {} s",
                REGISTRATION_LIMIT.as_secs()
            )))
        });
    let _ = client.try_disconnect();
    if let Ok(a) = &r {
        info!(hub = %a.hub, device = %a.device_id, "DPS assigned the device");
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_before_this_version_existed_is_wrong() {
        assert!(!clock_is_plausible(0), "1970: a board without RTC");
        assert!(!clock_is_plausible(PLAUSIBLE_SINCE - 1));
        assert!(clock_is_plausible(PLAUSIBLE_SINCE));
        assert!(clock_is_plausible(unix_now()), "this machine's clock");
    }

    #[test]
    fn addresses() {
        assert_eq!(split_address("h").unwrap(), ("h".into(), 8883));
        assert_eq!(
            split_address("127.0.0.1:9").unwrap(),
            ("127.0.0.1".into(), 9)
        );
        assert_eq!(split_address("[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(split_address("[::1]").unwrap(), ("::1".into(), 8883));
        assert!(split_address("::1:9").is_err());
        assert!(split_address("h:x").is_err());
        assert!(split_address("h:0").is_err());
    }
}
