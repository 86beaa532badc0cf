//! The device listener: IoT Hub's MQTT dialect and DPS, per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{Conn, D2c, Inner, MAX_PACKET, Out, device_twin, merge, now, sas, twin_problem};
use crate::sim::hex;

pub(crate) async fn accept(l: TcpListener, tls: tokio_rustls::TlsAcceptor, inner: Arc<Inner>) {
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let refusing = inner
            .lock()
            .refuse_until
            .is_some_and(|t| Instant::now() < t);
        if refusing {
            drop(tcp);
            continue;
        }
        let (tls, inner) = (tls.clone(), inner.clone());
        tokio::spawn(async move {
            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let thumb = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| hex(&Sha256::digest(c.as_ref())));
            serve(s, thumb, inner).await;
        });
    }
}

/// Reads one packet; `Err` ends the connection with the reason.
async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(CodecError::PayloadSizeLimitExceeded(n)) => {
                return Err(format!("packet of {n} bytes over the limit"));
            }
            Err(e) => return Err(format!("malformed packet: {e:?}")),
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed by the device".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write_packet<S: AsyncWrite + Unpin>(s: &mut S, p: Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX)
        .map_err(|e| format!("{e:?}"))?;
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())
}

/// Who connected.
enum Who {
    Device {
        id: String,
        expires: Option<u64>,
    },
    Dps {
        registration: String,
        key: Option<String>,
    },
}

fn query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                sas::decode(k).unwrap_or_default(),
                sas::decode(v).unwrap_or_default(),
            )
        })
        .collect()
}

fn get<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

/// Checks a CONNECT; the error is the CONNACK code and why.
fn authenticate(
    inner: &Inner,
    c: &rumqttc::mqttbytes::v4::Connect,
    thumb: Option<&str>,
) -> Result<(Who, Option<String>), (ConnectReturnCode, String)> {
    let refuse = |m: String| Err((ConnectReturnCode::NotAuthorized, m));
    let bad = |m: String| Err((ConnectReturnCode::BadUserNamePassword, m));
    let Some(login) = &c.login else {
        return bad("no user name".into());
    };
    let user = login.username.as_str();
    let now = now();
    // DPS: {scope}/registrations/{id}/api-version=…
    if let Some((scope, rest)) = user.split_once("/registrations/") {
        let st = inner.lock();
        let Some(dps) = &st.dps else {
            return refuse("no DPS here".into());
        };
        let Some((reg, q)) = rest.split_once("/api-version=") else {
            return bad(format!("DPS user name {user:?} lacks api-version"));
        };
        if scope != dps.id_scope || reg != c.client_id {
            return refuse(format!(
                "DPS scope {scope:?} or registration {reg:?} mismatch"
            ));
        }
        let _ = q;
        if login.password.is_empty() {
            return match (dps.x509.get(reg), thumb) {
                (Some(want), Some(got)) if want.eq_ignore_ascii_case(got) => Ok((
                    Who::Dps {
                        registration: reg.to_owned(),
                        key: None,
                    },
                    None,
                )),
                _ => refuse(format!("DPS X.509 registration {reg:?} not enrolled")),
            };
        }
        let key = match (dps.individual.get(reg), &dps.group_key) {
            (Some(k), _) => k.clone(),
            (None, Some(g)) => sas::derive(g, reg).unwrap_or_default(),
            _ => return refuse(format!("registration {reg:?} is not enrolled")),
        };
        let Some(t) = sas::parse(&login.password) else {
            return bad("the password is not a SAS token".into());
        };
        if t.skn.as_deref() != Some("registration") {
            return refuse("DPS tokens need skn=registration".into());
        }
        sas::check(&t, &key, &format!("{scope}/registrations/{reg}"), now)
            .map_err(|e| (ConnectReturnCode::NotAuthorized, e))?;
        return Ok((
            Who::Dps {
                registration: reg.to_owned(),
                key: Some(key),
            },
            None,
        ));
    }
    // IoT Hub: {host}/{device}[/{module}]/?api-version=…[&model-id=…]
    let Some((path, q)) = user.split_once("/?") else {
        return bad(format!("user name {user:?} lacks /?api-version="));
    };
    let q = query(q);
    if get(&q, "api-version").is_none() {
        return bad(format!("user name {user:?} lacks api-version"));
    }
    let Some((host, client)) = path.split_once('/') else {
        return bad(format!("user name {user:?} lacks the device id"));
    };
    if !host.eq_ignore_ascii_case(&inner.host) {
        return refuse(format!("host {host:?} is not this hub ({})", inner.host));
    }
    if client != c.client_id {
        return refuse(format!("client id {:?} is not {client:?}", c.client_id));
    }
    // A module is its own identity (`{device}/{module}`), with its own key and twin.
    let device = client;
    let model = get(&q, "model-id").map(str::to_owned);
    let st = inner.lock();
    let Some(d) = st.devices.get(device) else {
        return refuse(format!("no device {device:?}"));
    };
    if d.disabled {
        return refuse(format!("device {device:?} is disabled"));
    }
    if login.password.is_empty() {
        return match (&d.thumbprint, thumb) {
            (Some(want), Some(got)) if want.eq_ignore_ascii_case(got) => Ok((
                Who::Device {
                    id: device.to_owned(),
                    expires: None,
                },
                model,
            )),
            _ => refuse(format!("no registered certificate for {device:?}")),
        };
    }
    let Some(t) = sas::parse(&login.password) else {
        return bad("the password is not a SAS token".into());
    };
    let (key, resource) = match &t.skn {
        None => (
            d.key
                .clone()
                .ok_or((ConnectReturnCode::NotAuthorized, "no device key".to_owned()))?,
            match client.split_once('/') {
                Some((d, m)) => format!("{}/devices/{d}/modules/{m}", inner.host),
                None => format!("{}/devices/{client}", inner.host),
            },
        ),
        Some(p) if p == super::SERVICE_POLICY => (
            inner.service_key.clone(),
            match client.split_once('/') {
                Some((d, m)) => format!("{}/devices/{d}/modules/{m}", inner.host),
                None => format!("{}/devices/{client}", inner.host),
            },
        ),
        Some(p) => return refuse(format!("unknown policy {p:?}")),
    };
    sas::check(&t, &key, &resource, now).map_err(|e| (ConnectReturnCode::NotAuthorized, e))?;
    Ok((
        Who::Device {
            id: device.to_owned(),
            expires: Some(t.se),
        },
        model,
    ))
}

fn allowed_filter(f: &str, device: &str) -> bool {
    matches!(
        f,
        "$iothub/twin/res/#" | "$iothub/twin/PATCH/properties/desired/#" | "$iothub/methods/POST/#"
    ) || f == format!("devices/{device}/messages/devicebound/#")
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    thumb: Option<String>,
    inner: Arc<Inner>,
) {
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut s, &mut buf)).await;
    let Ok(Ok(Packet::Connect(c))) = first else {
        return;
    };
    if c.protocol != rumqttc::mqttbytes::Protocol::V4 {
        let _ = write_packet(
            &mut s,
            Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::RefusedProtocolVersion,
                false,
            )),
        )
        .await;
        return;
    }
    let keep_alive = Duration::from_secs(u64::from(c.keep_alive.max(1))).mul_f64(1.5);
    let (who, model) = match authenticate(&inner, &c, thumb.as_deref()) {
        Ok(w) => w,
        Err((code, why)) => {
            inner
                .lock()
                .refusals
                .push(format!("{}: {why}", c.client_id));
            let _ = write_packet(&mut s, Packet::ConnAck(ConnAck::new(code, false))).await;
            return;
        }
    };
    match who {
        Who::Dps { registration, key } => dps(s, buf, inner, registration, key, keep_alive).await,
        Who::Device { id, expires } => device(s, buf, inner, id, expires, model, keep_alive).await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn device<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    mut buf: BytesMut,
    inner: Arc<Inner>,
    id: String,
    expires: Option<u64>,
    model: Option<String>,
    keep_alive: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn_id = {
        let mut st = inner.lock();
        st.next_conn += 1;
        let n = st.next_conn;
        let d = st.devices.entry(id.clone()).or_default();
        if let Some(old) = d.conn.take() {
            let _ = old.tx.send(Out::Close(
                "400027 ConnectionForcefullyClosedOnNewConnection".into(),
            ));
        }
        d.conn = Some(Conn {
            id: n,
            tx: tx.clone(),
            subs: Vec::new(),
        });
        d.connects += 1;
        d.model_id = model;
        n
    };
    let why: Result<(), String> = async {
        write_packet(&mut s, Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;
        let expiry = async {
            match expires {
                Some(se) => tokio::time::sleep(Duration::from_secs(se.saturating_sub(now()))).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let mut pkid: u16 = 0;
        let mut inflight: Vec<(u16, String)> = Vec::new();
        loop {
            tokio::select! {
                p = tokio::time::timeout(keep_alive, read_packet(&mut s, &mut buf)) => {
                    let p = match p {
                        Err(_) => return Err("keep-alive expired (404104 DeviceConnectionClosedRemotely)".to_owned()),
                        Ok(p) => p?,
                    };
                    if let Some(reply) = handle(&inner, &id, p, &tx, &mut inflight)? {
                        write_packet(&mut s, reply).await?;
                    }
                }
                o = rx.recv() => match o {
                    Some(Out::Publish { topic, payload, qos1 }) => {
                        let mut p = Publish::new(topic.clone(), if qos1 { QoS::AtLeastOnce } else { QoS::AtMostOnce }, payload);
                        if qos1 {
                            pkid = pkid.wrapping_add(1).max(1);
                            p.pkid = pkid;
                            inflight.push((pkid, topic));
                        }
                        write_packet(&mut s, Packet::Publish(p)).await?;
                    }
                    Some(Out::Close(why)) => return Err(why),
                    None => return Err("hub stopped".into()),
                },
                _ = &mut expiry => return Err("SAS token expired".to_owned()),
            }
        }
    }
    .await;
    let mut st = inner.lock();
    if let Err(why) = &why {
        st.refusals.push(format!("{id}: closed: {why}"));
    }
    if let Some(d) = st.devices.get_mut(&id) {
        if d.conn.as_ref().is_some_and(|c| c.id == conn_id) {
            d.conn = None;
            d.methods.clear();
        }
    }
}

/// Handles one packet from a device; `Err` closes the connection.
fn handle(
    inner: &Inner,
    id: &str,
    p: Packet,
    tx: &mpsc::UnboundedSender<Out>,
    inflight: &mut Vec<(u16, String)>,
) -> Result<Option<Packet>, String> {
    match p {
        Packet::PingReq => Ok(Some(Packet::PingResp)),
        Packet::Disconnect => Err("DISCONNECT".into()),
        Packet::Subscribe(sub) => {
            let mut st = inner.lock();
            let d = st.devices.entry(id.to_owned()).or_default();
            let Some(c) = d.conn.as_mut() else {
                return Err("no session".into());
            };
            let mut codes = Vec::new();
            for f in &sub.filters {
                if !allowed_filter(&f.path, id) {
                    return Err(format!("subscription to {:?} is not allowed", f.path));
                }
                if !c.subs.contains(&f.path) {
                    c.subs.push(f.path.clone());
                }
                let q = if f.qos == QoS::ExactlyOnce {
                    QoS::AtLeastOnce
                } else {
                    f.qos
                };
                codes.push(SubscribeReasonCode::Success(q));
            }
            if c.subs.len() > 5 {
                return Err("more than 5 subscriptions".into());
            }
            // C2D waiting for this device goes out now.
            if sub.filters.iter().any(|f| f.path.starts_with("devices/")) {
                for (topic, body) in d.c2d.iter() {
                    let _ = tx.send(Out::Publish {
                        topic: topic.clone(),
                        payload: body.clone(),
                        qos1: true,
                    });
                }
            }
            Ok(Some(Packet::SubAck(SubAck::new(sub.pkid, codes))))
        }
        Packet::Unsubscribe(u) => {
            let mut st = inner.lock();
            if let Some(c) = st.devices.get_mut(id).and_then(|d| d.conn.as_mut()) {
                c.subs.retain(|s| !u.topics.contains(s));
            }
            Ok(Some(Packet::UnsubAck(
                rumqttc::mqttbytes::v4::UnsubAck::new(u.pkid),
            )))
        }
        Packet::PubAck(a) => {
            if let Some(i) = inflight.iter().position(|(p, _)| *p == a.pkid) {
                let (_, topic) = inflight.remove(i);
                let mut st = inner.lock();
                if let Some(d) = st.devices.get_mut(id) {
                    if let Some(j) = d.c2d.iter().position(|(t, _)| *t == topic) {
                        d.c2d.remove(j);
                    }
                }
            }
            Ok(None)
        }
        Packet::Publish(p) => publish(inner, id, p, tx),
        other => Err(format!("unexpected packet {other:?}")),
    }
}

fn reply(tx: &mpsc::UnboundedSender<Out>, topic: String, body: Vec<u8>) {
    let _ = tx.send(Out::Publish {
        topic,
        payload: body,
        qos1: false,
    });
}

/// Applies a queued twin fault (a lost answer, or an error status) to the request
/// `rid`; true when it did.
fn injected_fault(st: &mut super::State, tx: &mpsc::UnboundedSender<Out>, rid: &str) -> bool {
    if st.drop_twin > 0 {
        st.drop_twin -= 1;
        return true;
    }
    match st.twin_faults.pop_front() {
        Some(status) => {
            reply(
                tx,
                format!("$iothub/twin/res/{status}/?$rid={rid}"),
                b"{}".to_vec(),
            );
            true
        }
        None => false,
    }
}

fn publish(
    inner: &Inner,
    id: &str,
    p: Publish,
    tx: &mpsc::UnboundedSender<Out>,
) -> Result<Option<Packet>, String> {
    if p.qos == QoS::ExactlyOnce {
        return Err("QoS 2 publish".into());
    }
    let ack = (p.qos == QoS::AtLeastOnce).then(|| Packet::PubAck(PubAck::new(p.pkid)));
    let topic = p.topic.as_str();
    let twin_q = |rest: &str| query(rest.split_once('?').map_or("", |(_, q)| q));
    if let Some(rest) = topic.strip_prefix("$iothub/twin/GET/") {
        let q = twin_q(rest);
        let rid = get(&q, "$rid").unwrap_or("").to_owned();
        let mut st = inner.lock();
        if injected_fault(&mut st, tx, &rid) {
            return Ok(ack);
        }
        let body = st.devices.get(id).map(device_twin).unwrap_or(Value::Null);
        let body = serde_json::to_vec(&body).unwrap_or_default();
        if let Some(d) = st.devices.get_mut(id) {
            d.meter.bill("twin.get", body.len());
        }
        reply(tx, format!("$iothub/twin/res/200/?$rid={rid}"), body);
        return Ok(ack);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/twin/PATCH/properties/reported/") {
        let q = twin_q(rest);
        let rid = get(&q, "$rid").unwrap_or("").to_owned();
        let mut st = inner.lock();
        if injected_fault(&mut st, tx, &rid) {
            return Ok(ack);
        }
        let patch: Result<Map<String, Value>, _> = serde_json::from_slice(&p.payload);
        let d = st.devices.entry(id.to_owned()).or_default();
        d.meter.bill("twin.reported", p.payload.len());
        let status = match patch {
            Err(_) => 400,
            Ok(patch) => {
                let mut next = d.reported.clone();
                merge(&mut next, &patch);
                let patch = Value::Object(patch);
                match twin_problem(&patch).or_else(|| twin_problem(&Value::Object(next.clone()))) {
                    Some(_) => 400,
                    None => {
                        d.patches.push(patch);
                        d.reported = next;
                        d.reported_version += 1;
                        204
                    }
                }
            }
        };
        let topic = if status == 204 {
            format!(
                "$iothub/twin/res/204/?$rid={rid}&$version={}",
                d.reported_version
            )
        } else {
            format!("$iothub/twin/res/{status}/?$rid={rid}")
        };
        reply(tx, topic, Vec::new());
        return Ok(ack);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/res/") {
        let (status, q) = rest.split_once("/?").unwrap_or((rest, ""));
        let q = query(q);
        let status: u16 = status
            .parse()
            .map_err(|_| format!("bad method status in {topic:?}"))?;
        let rid = get(&q, "$rid").unwrap_or("");
        let payload: Value = if p.payload.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&p.payload)
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&p.payload)))
        };
        let mut st = inner.lock();
        if let Some(d) = st.devices.get_mut(id)
            && let Some(w) = d.methods.remove(rid)
        {
            d.meter.bill("method.response", p.payload.len());
            let _ = w.send((status, payload));
        }
        return Ok(ack);
    }
    let events = match id.split_once('/') {
        Some((d, m)) => format!("devices/{d}/modules/{m}/messages/events/"),
        None => format!("devices/{id}/messages/events/"),
    };
    if topic.starts_with(&events) {
        let bag = topic.split_once("/messages/events/").map_or("", |(_, b)| b);
        let mut properties = query(bag);
        if p.retain {
            properties.push(("mqtt-retain".into(), "true".into()));
        }
        let m = D2c {
            topic: topic.to_owned(),
            properties,
            body: p.payload.to_vec(),
        };
        let mut st = inner.lock();
        let d = st.devices.entry(id.to_owned()).or_default();
        d.meter.bill("d2c", p.payload.len() + bag.len());
        d.d2c.push(m);
        return Ok(ack);
    }
    Err(format!("publish to {topic:?} is not allowed"))
}

async fn dps<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    mut buf: BytesMut,
    inner: Arc<Inner>,
    registration: String,
    key: Option<String>,
    keep_alive: Duration,
) {
    if write_packet(
        &mut s,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    )
    .await
    .is_err()
    {
        return;
    }
    let op = format!("4.{}.{registration}", now());
    loop {
        let Ok(Ok(p)) = tokio::time::timeout(keep_alive, read_packet(&mut s, &mut buf)).await
        else {
            return;
        };
        let out = match p {
            Packet::PingReq => Some(Packet::PingResp),
            Packet::Subscribe(sub) => {
                if sub
                    .filters
                    .iter()
                    .any(|f| f.path != "$dps/registrations/res/#")
                {
                    return;
                }
                let codes = sub
                    .filters
                    .iter()
                    .map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    .collect();
                Some(Packet::SubAck(SubAck::new(sub.pkid, codes)))
            }
            Packet::Publish(p) => {
                if p.qos == QoS::AtLeastOnce {
                    let _ = write_packet(&mut s, Packet::PubAck(PubAck::new(p.pkid))).await;
                }
                let (path, q) = p.topic.split_once('?').unwrap_or((&p.topic, ""));
                let q = query(q);
                let rid = get(&q, "$rid").unwrap_or("").to_owned();
                let (status, body) = if path == "$dps/registrations/PUT/iotdps-register/" {
                    let reg_ok = serde_json::from_slice::<Value>(&p.payload)
                        .ok()
                        .and_then(|v| {
                            v.get("registrationId")
                                .and_then(Value::as_str)
                                .map(|r| r == registration)
                        })
                        .unwrap_or(false);
                    if reg_ok {
                        (202, json!({"operationId": op, "status": "assigning"}))
                    } else {
                        (
                            400,
                            json!({"errorCode": 400004, "message": "registrationId missing or not the client's", "trackingId": "t"}),
                        )
                    }
                } else if path == "$dps/registrations/GET/iotdps-get-operationstatus/"
                    && get(&q, "operationId") == Some(op.as_str())
                {
                    let mut st = inner.lock();
                    let fail = st.dps.as_ref().and_then(|d| d.fail.clone());
                    match fail {
                        Some(msg) => (
                            200,
                            json!({"operationId": op, "status": "failed",
                            "registrationState": {"registrationId": registration, "status": "failed", "errorCode": 400209, "errorMessage": msg}}),
                        ),
                        None => {
                            st.registrations += 1;
                            let host = inner.host.clone();
                            let d = st.devices.entry(registration.clone()).or_default();
                            if let Some(k) = &key {
                                d.key = Some(k.clone());
                            }
                            if key.is_none() {
                                let thumb = st
                                    .dps
                                    .as_ref()
                                    .and_then(|d| d.x509.get(&registration).cloned());
                                st.devices
                                    .entry(registration.clone())
                                    .or_default()
                                    .thumbprint = thumb;
                            }
                            (
                                200,
                                json!({"operationId": op, "status": "assigned",
                                "registrationState": {"registrationId": registration, "assignedHub": host,
                                    "deviceId": registration, "status": "assigned", "substatus": "initialAssignment"}}),
                            )
                        }
                    }
                } else {
                    (
                        404,
                        json!({"errorCode": 404000, "message": "unknown operation"}),
                    )
                };
                let topic = if status == 202 {
                    let wait = inner
                        .lock()
                        .dps
                        .as_ref()
                        .and_then(|d| d.retry_after)
                        .unwrap_or(1);
                    format!("$dps/registrations/res/202/?$rid={rid}&retry-after={wait}")
                } else {
                    format!("$dps/registrations/res/{status}/?$rid={rid}")
                };
                Some(Packet::Publish(Publish::new(
                    topic,
                    QoS::AtMostOnce,
                    serde_json::to_vec(&body).unwrap_or_default(),
                )))
            }
            Packet::Disconnect => return,
            _ => None,
        };
        if let Some(o) = out {
            if write_packet(&mut s, o).await.is_err() {
                return;
            }
        }
    }
}
