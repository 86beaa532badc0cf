//! A fake Azure IoT Hub (with a DPS endpoint) for tests and `pv-fake-iothub`:
//! the device side of IoT Hub's MQTT 3.1.1 dialect over TLS, and the service REST
//! calls Microsoft's `azure-iot-hub` SDK makes for twins and direct methods. It
//! follows `azure-iot-hub.md` §1, §2 and §7.2.
//!
//! Device side: CONNECT checks (3.1.1, client id = device id, user name
//! `{host}/{device}/?api-version=…[&model-id=…]`, SAS signature, scope and expiry,
//! or an X.509 client certificate registered by SHA-256 thumbprint; CONNACK 5 when
//! refused, 4 for a malformed user name); one connection per device (a new one
//! closes the old); the connection is cut when its token expires and when no
//! packet arrives for 1.5 × keep-alive; QoS 2 publishes, unknown topics, more
//! than 5 subscriptions and packets over 256 KiB close it; a QoS 2 subscription
//! is granted QoS 1. Twin GET and reported PATCH with `$rid`/`$version`,
//! RFC 7396 merge and the twin limits (400 when broken); desired patches go only
//! to connected, subscribed devices (none are queued); direct methods with a
//! timeout (404 when the device is offline, 504 when it does not answer); C2D at
//! QoS 1, redelivered until PUBACK; D2C captured with its property bag.
//!
//! DPS: the same listener answers user names `{scope}/registrations/{id}/…` with
//! `skn=registration` tokens (individual keys, group keys derived, or X.509), a 202
//! `assigning` with `retry-after`, then the assignment, and registers the device
//! on the hub with the same key, as DPS does.
//!
//! Test controls: [`FakeIotHub::fail_twin`] (status bursts such as 429),
//! [`FakeIotHub::drop_twin_responses`], [`FakeIotHub::duplicate_desired`],
//! [`FakeIotHub::outage`] (a restart: every connection dropped and new ones
//! refused for a while).

pub mod adu;
mod mqtt;
pub mod sas;
mod service;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The policy name the service connection string uses.
pub const SERVICE_POLICY: &str = "iothubowner";
/// Largest packet accepted (a D2C message is at most 256 KiB with its properties).
pub const MAX_PACKET: usize = 256 * 1024 + 512;
/// Twin limits.
pub const MAX_SECTION: usize = 32 * 1024;
pub const MAX_STRING: usize = 4 * 1024;
pub const MAX_DEPTH: usize = 10;

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// DPS behaviour.
#[derive(Debug, Clone, Default)]
pub struct DpsSetup {
    pub id_scope: String,
    /// Individual enrollments: registration id → key.
    pub individual: BTreeMap<String, String>,
    /// A group enrollment's key (device keys are derived from it).
    pub group_key: Option<String>,
    /// X.509 enrollments: registration id → SHA-256 thumbprint (hex).
    pub x509: BTreeMap<String, String>,
    /// Set to answer `failed` (with this message) instead of assigning.
    pub fail: Option<String>,
    /// The `retry-after` (seconds) of a 202 "assigning" answer; 1 when `None`.
    /// DPS asks for long waits under load, and drops a client that stops
    /// pinging meanwhile.
    pub retry_after: Option<u64>,
}

/// A message a device sent (D2C).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct D2c {
    pub topic: String,
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl D2c {
    pub fn property(&self, k: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) enum Out {
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
    },
    Close(String),
}

pub(crate) struct Conn {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Out>,
    pub subs: Vec<String>,
}

pub(crate) struct DeviceRec {
    pub key: Option<String>,
    pub thumbprint: Option<String>,
    pub disabled: bool,
    pub desired: Map<String, Value>,
    pub desired_version: u64,
    pub reported: Map<String, Value>,
    pub reported_version: u64,
    pub conn: Option<Conn>,
    pub connects: u32,
    pub model_id: Option<String>,
    pub c2d: VecDeque<(String, Vec<u8>)>,
    pub d2c: Vec<D2c>,
    /// Reported patches accepted, in order.
    pub patches: Vec<Value>,
    pub methods: HashMap<String, oneshot::Sender<(u16, Value)>>,
    /// What the hub bills for this device.
    pub meter: Meter,
    /// The twin's tags: set by the back end only, never seen by the device.
    pub tags: Map<String, Value>,
}

/// What IoT Hub bills a device's traffic against the daily message quota: every
/// D2C message, twin read, reported patch, desired notification, method request
/// and response, and C2D message, each in 4 KB units (a 9 KB message is 3).
/// Connections and keep-alives are free (reference §1.13; Free tier's 0.5 KB
/// unit not modelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meter {
    /// Operations billed.
    pub messages: u64,
    /// 4 KB units billed: what counts against the quota.
    pub units: u64,
    /// (operations, units) by kind: `d2c`, `twin.get`, `twin.reported`,
    /// `twin.desired`, `method.request`, `method.response`, `c2d`.
    pub by_kind: BTreeMap<String, (u64, u64)>,
}

impl Meter {
    pub(crate) fn bill(&mut self, kind: &str, bytes: usize) {
        let units = bytes.div_ceil(4096).max(1) as u64;
        self.messages += 1;
        self.units += units;
        let e = self.by_kind.entry(kind.to_owned()).or_default();
        e.0 += 1;
        e.1 += units;
    }
}

impl Default for DeviceRec {
    /// A new device's twin: both sections at `$version` 1, as the hub starts them.
    fn default() -> Self {
        DeviceRec {
            key: None,
            thumbprint: None,
            disabled: false,
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
            conn: None,
            connects: 0,
            model_id: None,
            c2d: VecDeque::new(),
            d2c: Vec::new(),
            patches: Vec::new(),
            methods: HashMap::new(),
            meter: Meter::default(),
            tags: Map::new(),
        }
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub devices: BTreeMap<String, DeviceRec>,
    pub dps: Option<DpsSetup>,
    pub registrations: u32,
    pub next_conn: u64,
    pub next_rid: u64,
    pub refuse_until: Option<Instant>,
    pub twin_faults: VecDeque<u16>,
    pub drop_twin: u32,
    pub duplicate_desired: bool,
    pub refusals: Vec<String>,
}

pub(crate) struct Inner {
    pub host: String,
    pub service_key: String,
    pub state: Mutex<State>,
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a twin document breaks the hub's rules.
pub fn twin_problem(v: &Value) -> Option<String> {
    fn walk(v: &Value, depth: usize) -> Result<usize, String> {
        Ok(match v {
            Value::Object(o) => {
                if depth > MAX_DEPTH {
                    return Err(format!("nesting deeper than {MAX_DEPTH}"));
                }
                let mut n = 0;
                for (k, v) in o {
                    if depth == 1 && k.starts_with('$') {
                        continue;
                    }
                    if k.is_empty()
                        || k.len() > 1024
                        || k.chars()
                            .any(|c| matches!(c, '.' | '$' | ' ') || c.is_control())
                    {
                        return Err(format!("illegal key {k:?}"));
                    }
                    n += k.len() + walk(v, depth + 1)?;
                }
                n
            }
            Value::Array(a) => a
                .iter()
                .map(|v| walk(v, depth + 1))
                .sum::<Result<usize, _>>()?,
            Value::String(s) if s.len() > MAX_STRING => {
                return Err(format!(
                    "a string of {} bytes (limit {MAX_STRING})",
                    s.len()
                ));
            }
            Value::String(s) => s.len(),
            Value::Number(_) => 8,
            _ => 4,
        })
    }
    if !v.is_object() {
        return Some("not a JSON object".into());
    }
    match walk(v, 1) {
        Ok(n) if n > MAX_SECTION => Some(format!("{n} bytes (limit {MAX_SECTION})")),
        Ok(_) => None,
        Err(e) => Some(e),
    }
}

/// RFC 7396 merge patch.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let e = target.entry(k.clone()).or_insert_with(|| json!({}));
                if !e.is_object() {
                    *e = json!({});
                }
                if let Value::Object(t) = e {
                    merge(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// What a method invocation produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Invoked {
    Answered {
        status: u16,
        payload: Value,
    },
    /// 404: the device is not connected (or not subscribed to methods).
    Offline,
    /// 504: no answer within the timeout.
    Timeout,
}

/// A running fake IoT Hub.
pub struct FakeIotHub {
    inner: Arc<Inner>,
    mqtt: SocketAddr,
    service: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeIotHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for d in self.inner.lock().devices.values() {
            if let Some(c) = &d.conn {
                let _ = c.tx.send(Out::Close("hub stopped".into()));
            }
        }
    }
}

fn tls_acceptor(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> io::Result<tokio_rustls::TlsAcceptor> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_chain)
        .map_err(|e| invalid(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| invalid(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| invalid(e.to_string()))? {
                roots
                    .add(c.map_err(|e| invalid(e.to_string()))?)
                    .map_err(|e| invalid(e.to_string()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| invalid(e.to_string()))?;
            builder.with_client_cert_verifier(v)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Where and how to run.
pub struct Setup<'a> {
    /// The hub's host name (user names and `sr` must carry it).
    pub host_name: String,
    pub cert_chain: &'a Path,
    pub key: &'a Path,
    /// Trust anchors for X.509 device certificates.
    pub client_ca: Option<&'a Path>,
    /// Device (MQTT) listener, e.g. `127.0.0.1:0`.
    pub mqtt: SocketAddr,
    /// Service REST listener.
    pub service: SocketAddr,
}

impl FakeIotHub {
    pub async fn start(s: Setup<'_>) -> io::Result<FakeIotHub> {
        let tls = tls_acceptor(s.cert_chain, s.key, s.client_ca)?;
        let service_tls = tls_acceptor(s.cert_chain, s.key, None)?;
        let mqtt_l = TcpListener::bind(s.mqtt).await?;
        let service_l = TcpListener::bind(s.service).await?;
        let inner = Arc::new(Inner {
            host: s.host_name,
            service_key: "c2VydmljZS1wb2xpY3kta2V5LWZvci10ZXN0cw==".into(),
            state: Mutex::new(State::default()),
        });
        let mqtt = mqtt_l.local_addr()?;
        let service = service_l.local_addr()?;
        let tasks = vec![
            tokio::spawn(mqtt::accept(mqtt_l, tls, inner.clone())),
            tokio::spawn(service::accept(service_l, service_tls, inner.clone())),
        ];
        Ok(FakeIotHub {
            inner,
            mqtt,
            service,
            tasks,
        })
    }

    /// A loopback hub named `host_name` on free ports.
    pub async fn local(
        host_name: &str,
        cert_chain: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> io::Result<FakeIotHub> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Self::start(Setup {
            host_name: host_name.to_owned(),
            cert_chain,
            key,
            client_ca,
            mqtt: any,
            service: any,
        })
        .await
    }

    pub fn host_name(&self) -> &str {
        &self.inner.host
    }

    /// The device listener (`connect_address`).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt
    }

    pub fn service_addr(&self) -> SocketAddr {
        self.service
    }

    /// The service connection string (`iothubowner`), with `HostName` as given.
    pub fn service_connection_string(&self, host_name: &str) -> String {
        format!(
            "HostName={host_name};SharedAccessKeyName={SERVICE_POLICY};SharedAccessKey={}",
            self.inner.service_key
        )
    }

    /// Registers a device with a symmetric key; returns its connection string.
    pub fn add_device(&self, id: &str, key: &str) -> String {
        self.inner
            .lock()
            .devices
            .entry(id.to_owned())
            .or_default()
            .key = Some(key.to_owned());
        format!(
            "HostName={};DeviceId={id};SharedAccessKey={key}",
            self.inner.host
        )
    }

    /// Registers a module identity of a device with its own key (its twin is its
    /// own; `id` for the other calls is `{device}/{module}`); returns its
    /// connection string.
    pub fn add_module(&self, device: &str, module: &str, key: &str) -> String {
        self.inner
            .lock()
            .devices
            .entry(format!("{device}/{module}"))
            .or_default()
            .key = Some(key.to_owned());
        format!(
            "HostName={};DeviceId={device};ModuleId={module};SharedAccessKey={key}",
            self.inner.host
        )
    }

    /// Registers a device that authenticates with a certificate (by the SHA-256
    /// thumbprint of its DER bytes, hex).
    pub fn add_x509_device(&self, id: &str, thumbprint: &str) {
        self.inner
            .lock()
            .devices
            .entry(id.to_owned())
            .or_default()
            .thumbprint = Some(thumbprint.to_ascii_lowercase());
    }

    /// Changes a device's key (its current connection stays).
    pub fn set_key(&self, id: &str, key: &str) {
        self.inner
            .lock()
            .devices
            .entry(id.to_owned())
            .or_default()
            .key = Some(key.to_owned());
    }

    pub fn set_disabled(&self, id: &str, disabled: bool) {
        self.inner
            .lock()
            .devices
            .entry(id.to_owned())
            .or_default()
            .disabled = disabled;
    }

    pub fn set_dps(&self, dps: DpsSetup) {
        self.inner.lock().dps = Some(dps);
    }

    /// Registrations DPS answered with an assignment.
    pub fn registrations(&self) -> u32 {
        self.inner.lock().registrations
    }

    /// Whether the device is connected now.
    pub fn connected(&self, id: &str) -> bool {
        self.inner
            .lock()
            .devices
            .get(id)
            .is_some_and(|d| d.conn.is_some())
    }

    /// Successful CONNECTs of a device so far.
    pub fn connects(&self, id: &str) -> u32 {
        self.inner.lock().devices.get(id).map_or(0, |d| d.connects)
    }

    pub fn model_id(&self, id: &str) -> Option<String> {
        self.inner
            .lock()
            .devices
            .get(id)
            .and_then(|d| d.model_id.clone())
    }

    /// Why connections were refused or closed, in order.
    pub fn refusals(&self) -> Vec<String> {
        self.inner.lock().refusals.clone()
    }

    /// The twin as the device sees it: `{desired, reported}` with `$version`s.
    pub fn twin(&self, id: &str) -> Value {
        let st = self.inner.lock();
        match st.devices.get(id) {
            Some(d) => device_twin(d),
            None => Value::Null,
        }
    }

    pub fn reported(&self, id: &str) -> Value {
        self.twin(id)["reported"].clone()
    }

    /// Merges `patch` into a device's twin tags (a back-end twin update; the
    /// device is not told: tags are not part of the device's twin view).
    pub fn update_tags(&self, id: &str, patch: Value) -> Result<(), String> {
        let Value::Object(p) = &patch else {
            return Err("the tags patch must be a JSON object".into());
        };
        let mut st = self.inner.lock();
        let d = st
            .devices
            .get_mut(id)
            .ok_or_else(|| format!("no device {id:?}"))?;
        merge(&mut d.tags, p);
        Ok(())
    }

    /// A device's twin tags.
    pub fn tags(&self, id: &str) -> Value {
        self.inner
            .lock()
            .devices
            .get(id)
            .map_or(Value::Null, |d| Value::Object(d.tags.clone()))
    }

    /// Every registered identity (devices and `{device}/{module}`).
    pub fn device_ids(&self) -> Vec<String> {
        self.inner.lock().devices.keys().cloned().collect()
    }

    /// A back-end desired update: merged, versioned, and pushed to the device
    /// when it is connected and subscribed. Returns the new version.
    pub fn update_desired(&self, id: &str, patch: Value) -> Result<u64, String> {
        update_desired(&self.inner, id, patch)
    }

    /// Invokes a direct method and waits for the answer.
    pub async fn invoke(
        &self,
        id: &str,
        method: &str,
        payload: Value,
        timeout: Duration,
    ) -> Invoked {
        invoke(&self.inner, id, method, payload, timeout).await
    }

    /// Queues a cloud-to-device message (delivered now if connected).
    pub fn send_c2d(&self, id: &str, body: &[u8], properties: &[(&str, &str)]) {
        let bag = properties
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        let topic = format!("devices/{id}/messages/devicebound/{bag}");
        let mut st = self.inner.lock();
        let d = st.devices.entry(id.to_owned()).or_default();
        while d.c2d.len() >= 50 {
            d.c2d.pop_front();
        }
        d.c2d.push_back((topic.clone(), body.to_vec()));
        d.meter.bill("c2d", body.len());
        if let Some(c) = &d.conn {
            if c.subs
                .iter()
                .any(|s| s.starts_with(&format!("devices/{id}/messages/devicebound")))
            {
                let _ = c.tx.send(Out::Publish {
                    topic,
                    payload: body.to_vec(),
                    qos1: true,
                });
            }
        }
    }

    /// Writes reported properties as another client of the same identity would
    /// (an earlier agent, a module), merged like a device's patch.
    pub fn set_reported(&self, id: &str, patch: Value) {
        let mut st = self.inner.lock();
        let d = st.devices.entry(id.to_owned()).or_default();
        if let Value::Object(p) = patch {
            merge(&mut d.reported, &p);
            d.reported_version += 1;
        }
    }

    /// What the hub has billed for a device so far.
    pub fn meter(&self, id: &str) -> Meter {
        self.inner
            .lock()
            .devices
            .get(id)
            .map(|d| d.meter.clone())
            .unwrap_or_default()
    }

    /// Starts a device's meter again from zero.
    pub fn reset_meter(&self, id: &str) {
        if let Some(d) = self.inner.lock().devices.get_mut(id) {
            d.meter = Meter::default();
        }
    }

    /// C2D messages not yet completed (PUBACKed).
    pub fn c2d_pending(&self, id: &str) -> usize {
        self.inner.lock().devices.get(id).map_or(0, |d| d.c2d.len())
    }

    /// Every reported patch the hub accepted from the device, in order.
    pub fn reported_patches(&self, id: &str) -> Vec<Value> {
        self.inner
            .lock()
            .devices
            .get(id)
            .map(|d| d.patches.clone())
            .unwrap_or_default()
    }

    /// Device-to-cloud messages received.
    pub fn d2c(&self, id: &str) -> Vec<D2c> {
        self.inner
            .lock()
            .devices
            .get(id)
            .map(|d| d.d2c.clone())
            .unwrap_or_default()
    }

    /// The next `n` twin requests (GET or PATCH) are answered with `status`.
    pub fn fail_twin(&self, status: u16, n: usize) {
        let mut st = self.inner.lock();
        st.twin_faults.extend(std::iter::repeat_n(status, n));
    }

    /// The next `n` twin requests get no answer at all.
    pub fn drop_twin_responses(&self, n: u32) {
        self.inner.lock().drop_twin += n;
    }

    /// Desired notifications are sent twice.
    pub fn duplicate_desired(&self, on: bool) {
        self.inner.lock().duplicate_desired = on;
    }

    /// Closes a device's connection, as the hub does on its own.
    pub fn kick(&self, id: &str, why: &str) {
        if let Some(c) = self
            .inner
            .lock()
            .devices
            .get(id)
            .and_then(|d| d.conn.as_ref())
        {
            let _ = c.tx.send(Out::Close(why.to_owned()));
        }
    }

    /// A restart: every connection is dropped and new ones are refused for `d`.
    pub fn outage(&self, d: Duration) {
        let mut st = self.inner.lock();
        st.refuse_until = Some(Instant::now() + d);
        for dev in st.devices.values() {
            if let Some(c) = &dev.conn {
                let _ = c.tx.send(Out::Close("hub restarting".into()));
            }
        }
    }
}

pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn device_twin(d: &DeviceRec) -> Value {
    let mut desired = d.desired.clone();
    desired.insert("$version".into(), json!(d.desired_version));
    let mut reported = d.reported.clone();
    reported.insert("$version".into(), json!(d.reported_version));
    json!({"desired": desired, "reported": reported})
}

pub(crate) fn update_desired(inner: &Inner, id: &str, patch: Value) -> Result<u64, String> {
    let Value::Object(p) = &patch else {
        return Err("the patch must be a JSON object".into());
    };
    if let Some(e) = twin_problem(&patch) {
        return Err(e);
    }
    let mut st = inner.lock();
    let dup = st.duplicate_desired;
    let d = st
        .devices
        .get_mut(id)
        .ok_or_else(|| format!("no device {id:?}"))?;
    let mut next = d.desired.clone();
    merge(&mut next, p);
    if let Some(e) = twin_problem(&Value::Object(next.clone())) {
        return Err(format!("desired would be {e}"));
    }
    d.desired = next;
    d.desired_version += 1;
    let v = d.desired_version;
    if let Some(c) = &d.conn {
        if c.subs
            .iter()
            .any(|s| s == "$iothub/twin/PATCH/properties/desired/#")
        {
            let mut body = p.clone();
            body.insert("$version".into(), json!(v));
            let payload = serde_json::to_vec(&body).unwrap_or_default();
            let topic = format!("$iothub/twin/PATCH/properties/desired/?$version={v}");
            d.meter.bill("twin.desired", payload.len());
            for _ in 0..if dup { 2 } else { 1 } {
                let _ = c.tx.send(Out::Publish {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    qos1: false,
                });
            }
        }
    }
    Ok(v)
}

pub(crate) async fn invoke(
    inner: &Inner,
    id: &str,
    method: &str,
    payload: Value,
    timeout: Duration,
) -> Invoked {
    let rx = {
        let mut st = inner.lock();
        st.next_rid += 1;
        let rid = format!("{}", st.next_rid);
        let Some(d) = st.devices.get_mut(id) else {
            return Invoked::Offline;
        };
        let Some(c) = &d.conn else {
            return Invoked::Offline;
        };
        if !c.subs.iter().any(|s| s == "$iothub/methods/POST/#") {
            return Invoked::Offline;
        }
        let (tx, rx) = oneshot::channel();
        let body = serde_json::to_vec(&payload).unwrap_or_default();
        let len = body.len();
        let _ = c.tx.send(Out::Publish {
            topic: format!("$iothub/methods/POST/{method}/?$rid={rid}"),
            payload: body,
            qos1: false,
        });
        d.methods.insert(rid, tx);
        d.meter.bill("method.request", len);
        rx
    };
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok((status, payload))) => Invoked::Answered { status, payload },
        Ok(Err(_)) => Invoked::Timeout,
        Err(_) => Invoked::Timeout,
    }
}
