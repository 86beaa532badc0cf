//! The service REST API, as far as Microsoft's `azure-iot-hub` SDK uses it for
//! twins and direct methods: `GET`/`PATCH`/`PUT /twins/{id}` and
//! `POST /twins/{id}/methods`, authorised by a `SharedAccessSignature … skn=…`
//! header signed with the service policy's key.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::{Inner, Invoked, SERVICE_POLICY, device_twin, invoke, now, sas, update_desired};
use crate::hub::http::{self, Request, Response};

pub(crate) async fn accept(l: TcpListener, tls: tokio_rustls::TlsAcceptor, inner: Arc<Inner>) {
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let (tls, inner) = (tls.clone(), inner.clone());
        tokio::spawn(async move {
            if let Ok(s) = tls.accept(tcp).await {
                serve(s, inner).await;
            }
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S, inner: Arc<Inner>) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    while let Ok(req) = http::read_request(&mut rd).await {
        let resp = handle(&inner, &req).await;
        let close = req.wants_close();
        if http::write_head(&mut wr, &resp, resp.body.len() as u64, close)
            .await
            .is_err()
            || wr.write_all(&resp.body).await.is_err()
            || close
        {
            return;
        }
        let _ = wr.flush().await;
    }
}

/// IoT Hub's error body: `Message` holds a JSON text with the error code.
fn error(status: u16, code: u32, message: &str) -> Response {
    let inner =
        json!({"errorCode": code, "trackingId": "fake", "message": message, "timestampUtc": ""});
    Response::json(
        status,
        serde_json::to_vec(&json!({"Message": inner.to_string(), "ExceptionMessage": ""}))
            .unwrap_or_default(),
    )
}

fn authorised(inner: &Inner, req: &Request) -> Result<(), String> {
    let h = req
        .header("authorization")
        .ok_or("no Authorization header")?;
    let t = sas::parse(h).ok_or("Authorization is not a SAS token")?;
    if t.skn.as_deref() != Some(SERVICE_POLICY) {
        return Err(format!("policy {:?} unknown", t.skn));
    }
    // The SDK signs the host name it was given (with the port, when it has one).
    let host = t.resource.split(':').next().unwrap_or("");
    if !host.eq_ignore_ascii_case(&inner.host) && !host.starts_with("127.") {
        return Err(format!("sr {:?} is not this hub", t.resource));
    }
    sas::check(&t, &inner.service_key, &t.resource.clone(), now())
}

fn twin_body(inner: &Inner, id: &str) -> Option<Value> {
    let st = inner.lock();
    let d = st.devices.get(id)?;
    let t = device_twin(d);
    let (device, module) = match id.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (id, None),
    };
    Some(json!({
        "deviceId": device,
        "moduleId": module,
        "etag": format!("AAAAAAAAAA{}=", d.desired_version),
        "version": d.desired_version + d.reported_version + 1,
        "status": if d.disabled { "disabled" } else { "enabled" },
        "connectionState": if d.conn.is_some() { "Connected" } else { "Disconnected" },
        "modelId": d.model_id.clone().unwrap_or_default(),
        "properties": {"desired": t["desired"], "reported": t["reported"]},
    }))
}

async fn handle(inner: &Inner, req: &Request) -> Response {
    if let Err(why) = authorised(inner, req) {
        return error(401, 401002, &format!("IotHubUnauthorizedAccess: {why}"));
    }
    if req.param("api-version").is_none() {
        return error(400, 400001, "api-version is missing");
    }
    let path = http::percent_decode(&req.path);
    let mut parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Module twins and methods (`/twins/{d}/modules/{m}[/methods]`) address the
    // identity `{d}/{m}`.
    let module_id;
    if parts.len() >= 4 && parts[0] == "twins" && parts[2] == "modules" {
        module_id = format!("{}/{}", parts[1], parts[3]);
        let rest: Vec<&str> = parts[4..].to_vec();
        parts = vec!["twins", module_id.as_str()];
        parts.extend(rest);
    }
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["twins", id]) => match twin_body(inner, id) {
            Some(t) => Response::json(200, t.to_string()),
            None => error(404, 404001, &format!("DeviceNotFound: {id}")),
        },
        ("PATCH", ["twins", id]) | ("PUT", ["twins", id]) => {
            let body: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return error(400, 400004, &format!("ArgumentInvalid: {e}")),
            };
            let Some(desired) = body
                .pointer("/properties/desired")
                .and_then(Value::as_object)
            else {
                return error(400, 400004, "ArgumentInvalid: properties.desired missing");
            };
            let mut patch: Map<String, Value> = desired.clone();
            patch.retain(|k, _| !k.starts_with('$'));
            if req.method == "PUT" {
                // Replace: everything not given is deleted.
                let old: Vec<String> = inner
                    .lock()
                    .devices
                    .get(*id)
                    .map(|d| d.desired.keys().cloned().collect())
                    .unwrap_or_default();
                for k in old {
                    patch.entry(k).or_insert(Value::Null);
                }
            }
            match update_desired(inner, id, Value::Object(patch)) {
                Ok(_) => match twin_body(inner, id) {
                    Some(t) => Response::json(200, t.to_string()),
                    None => error(404, 404001, "DeviceNotFound"),
                },
                Err(e) if e.starts_with("no device") => {
                    error(404, 404001, &format!("DeviceNotFound: {id}"))
                }
                Err(e) => error(400, 400004, &format!("ArgumentInvalid: {e}")),
            }
        }
        ("POST", ["twins", id, "methods"]) => {
            let body: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => return error(400, 400004, &format!("ArgumentInvalid: {e}")),
            };
            let Some(name) = body.get("methodName").and_then(Value::as_str) else {
                return error(400, 400004, "ArgumentInvalid: methodName missing");
            };
            let timeout = body
                .get("responseTimeoutInSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30)
                .clamp(5, 300);
            let payload = body.get("payload").cloned().unwrap_or(Value::Null);
            match invoke(inner, id, name, payload, Duration::from_secs(timeout)).await {
                Invoked::Answered { status, payload } => Response::json(
                    200,
                    json!({"status": status, "payload": payload}).to_string(),
                ),
                Invoked::Offline => error(404, 404103, "DeviceNotOnline"),
                Invoked::Timeout => error(
                    504,
                    504101,
                    "GatewayTimeout: the device did not answer in time",
                ),
            }
        }
        _ => error(
            404,
            404000,
            &format!("no route {} {}", req.method, req.path),
        ),
    }
}
