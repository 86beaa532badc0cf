//! The desired side: a desired `revision` or `userMeta` becomes an engine event
//! with its writable-property ack, and direct methods are answered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pv_adapter_api::{BackendEvent, CommandStatus, ObjectRef, ObjectSource, Offer, StateUrl};
use serde_json::{Value, json};
use sha2::Digest;
use tracing::{debug, info, warn};

use super::Shared;
use crate::methods::{self, Action};
use crate::report::{RevisionAck, UserMetaAck};
use crate::twin::{self, DesiredRevision};

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
        .map(|(sha, (url, size))| {
            (
                sha.clone(),
                ObjectRef {
                    sha256: sha.clone(),
                    size: *size,
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
pub(super) struct Desired {
    pub(super) doc: Option<Value>,
    pub(super) version: u64,
    pub(super) user_meta: Option<Value>,
    pub(super) revision: Option<Value>,
    /// `deviceUpdate.service` and `diagnosticInformation.service` as last seen.
    pub(super) adu_service: Option<Value>,
    pub(super) diag_service: Option<Value>,
}

/// The non-null value at `pointer` when it differs from `seen` (which takes it).
fn changed(seen: &mut Option<Value>, doc: &Value, pointer: &str) -> Option<Value> {
    let now = doc.pointer(pointer).filter(|v| !v.is_null());
    if now == seen.as_ref() {
        return None;
    }
    *seen = now.cloned();
    now.cloned()
}

impl Desired {
    /// Acts on what changed in the desired section.
    pub(super) fn process(&mut self, sh: &Arc<Shared>) {
        let Some(doc) = &self.doc else { return };
        let av = self.version;
        if let Some(agent) = &sh.adu {
            // Each component's `service`, acted on when it changed (a reconnect's
            // GET brings the same value again: the record decides what it means).
            if let Some(s) = changed(&mut self.adu_service, doc, "/deviceUpdate/service") {
                agent.service(av, &s);
            }
            if let Some(s) = changed(
                &mut self.diag_service,
                doc,
                "/diagnosticInformation/service",
            ) {
                agent.diagnostics(av, &s);
            }
        }
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
pub(super) async fn method(sh: Arc<Shared>, name: String, rid: String, payload: Vec<u8>) {
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
