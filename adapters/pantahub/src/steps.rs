//! Steps and progress: hub revisions become engine offers, and the engine's
//! progress goes back to the hub.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pv_adapter_api::{
    AdapterError, BackendEvent, DeviceView, ObjectFetcher, ObjectRef, ObjectSource, Offer,
    Progress, UpdateStatus,
};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::client::{HubError, Method, status_error};
use crate::objects::HubObjects;
use crate::{Active, Hub, secs, unix_now, wire};

impl Hub {
    pub(crate) async fn steps(&self, device: &str) -> Result<(), AdapterError> {
        let mut view = self.link.view();
        let mut poll = tokio::time::interval(self.poll());
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(Duration::from_millis(500));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut active: Option<Active> = None;
        let mut online = true;
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    match self.poll_steps(device, &mut active).await {
                        Ok(()) => {
                            if !online {
                                info!(backend = %self.link.backend(), "hub reachable again");
                                let _ = self.link.send(BackendEvent::Connected).await;
                                online = true;
                            }
                        }
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "polling steps failed");
                            if e.is_transient() && online {
                                online = false;
                                self.disconnected(&e).await;
                            }
                        }
                    }
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        return Err(AdapterError::EngineGone);
                    }
                    let v = view.borrow_and_update().clone();
                    self.note_progress(&v, &mut active);
                    self.flush(device, &mut active).await;
                }
                _ = flush.tick() => self.flush(device, &mut active).await,
            }
        }
    }

    /// Takes the engine's latest progress for the active step.
    pub(crate) fn note_progress(&self, v: &DeviceView, active: &mut Option<Active>) {
        let Some(p) = v.update.as_ref() else { return };
        let Some(rev) = wire::rev_of_id(&self.prefix, &p.id) else {
            return;
        };
        let a = active.get_or_insert_with(|| Active {
            rev,
            id: p.id.clone(),
            sent: None,
            last_put: None,
            queue: Default::default(),
            download_started: 0,
            owner_cancel: false,
            failed: false,
        });
        if a.rev != rev {
            return;
        }
        if p.status == UpdateStatus::Downloading && a.download_started == 0 {
            a.download_started = unix_now();
        }
        // The engine passes through Pantavisor's QUEUED after its own download;
        // the hub, like Pantavisor's client, only ever moves forward.
        let stage = |st: UpdateStatus| match st {
            UpdateStatus::Queued => 0,
            UpdateStatus::Downloading => 1,
            UpdateStatus::Inprogress => 2,
            UpdateStatus::Testing => 3,
            _ => 4,
        };
        let latest = a
            .queue
            .back()
            .map(|q| q.status)
            .or(a.sent.as_ref().map(|(s, _)| *s));
        if latest.is_some_and(|l| stage(l) > stage(p.status)) {
            return;
        }
        let reported = a.queue.is_empty()
            && p.status != UpdateStatus::Downloading
            && a.sent
                .as_ref()
                .is_some_and(|(s, m)| *s == p.status && *m == p.status_msg);
        match a.queue.back_mut() {
            Some(last) if last.status == p.status => *last = p.clone(),
            _ if reported => {}
            _ => a.queue.push_back(p.clone()),
        }
    }

    /// Sends the active step's progress when it changed status, or when the
    /// interval passed; checks for a hub-side cancel first while it can still be
    /// honoured.
    pub(crate) async fn flush(&self, device: &str, active: &mut Option<Active>) {
        while self.flush_one(device, active).await {}
    }

    /// Sends the oldest queued report if it may go now; true if another may follow.
    pub(crate) async fn flush_one(&self, device: &str, active: &mut Option<Active>) -> bool {
        let Some(a) = active.as_mut() else {
            return false;
        };
        let Some(p) = a.queue.front().cloned() else {
            return false;
        };
        let changed = a.sent.as_ref() != Some(&(p.status, p.status_msg.clone()));
        let due = a
            .last_put
            .is_none_or(|t| t.elapsed() >= secs(self.cfg.progress_interval_secs));
        if !due && (!changed || a.failed) {
            return false;
        }
        if matches!(p.status, UpdateStatus::Queued | UpdateStatus::Downloading) && !a.owner_cancel {
            // Pantavisor re-reads its step before each report: a PUT would
            // overwrite a cancel the owner just made.
            if self.cancelled_on_hub(device, a.rev).await {
                info!(backend = %self.link.backend(), rev = a.rev, "the owner cancelled this revision on the hub");
                a.owner_cancel = true;
                let _ = self
                    .link
                    .send(BackendEvent::Cancel { id: a.id.clone() })
                    .await;
                return false;
            }
        }
        let body = wire::progress_body(&p, a.owner_cancel, a.download_started, unix_now());
        let path = format!("/trails/{device}/steps/{}/progress", a.rev);
        if p.status.is_final() {
            // Remember it first: it is sent again while the hub lists the step.
            self.remember(|m| {
                m.finals.insert(a.rev, body.clone());
            });
        }
        a.last_put = Some(Instant::now());
        match self
            .client
            .call(Method::PUT, &path, Some(body.to_string().into_bytes()))
            .await
        {
            Ok(r) if r.status == 200 => {
                debug!(rev = a.rev, status = %p.status, "progress reported");
                a.sent = Some((p.status, p.status_msg.clone()));
                a.failed = false;
                a.queue.pop_front();
                if p.status.is_final() {
                    info!(backend = %self.link.backend(), rev = a.rev, status = %p.status, "final status reported to the hub");
                    *active = None;
                    return false;
                }
                true
            }
            Ok(r) => {
                warn!(backend = %self.link.backend(), error = %status_error(&format!("PUT {path}"), &r), "progress not accepted");
                a.failed = true;
                false
            }
            Err(e) => {
                warn!(backend = %self.link.backend(), error = %e, "cannot report progress");
                a.failed = true;
                false
            }
        }
    }

    pub(crate) async fn cancelled_on_hub(&self, device: &str, rev: i64) -> bool {
        let path = format!("/trails/{device}/steps/{rev}");
        match self
            .client
            .json::<wire::Step>(Method::GET, &path, None)
            .await
        {
            Ok(s) => s.status() == "CANCEL",
            Err(e) => {
                debug!(error = %e, "cannot re-read the step");
                false
            }
        }
    }

    pub(crate) async fn poll_steps(
        &self,
        device: &str,
        active: &mut Option<Active>,
    ) -> Result<(), HubError> {
        let path = format!("/trails/{device}/steps{}", wire::PENDING_QUERY);
        let r = self.client.call(Method::GET, &path, None).await?;
        if r.status != 200 {
            return Err(status_error("GET /trails/<id>/steps", &r));
        }
        let steps: Vec<Value> = serde_json::from_slice(&r.body).map_err(|e| HubError::Json {
            what: "GET /trails/<id>/steps".into(),
            detail: format!("not a JSON array of steps: {e}"),
        })?;
        let Some(first) = steps.into_iter().next() else {
            return Ok(());
        };
        let rev = first.get("rev").and_then(Value::as_i64);
        let step: wire::Step = match serde_json::from_value(first) {
            Ok(s) => s,
            Err(e) => {
                warn!(backend = %self.link.backend(), error = %e, "the hub sent a malformed step");
                if let Some(rev) = rev {
                    self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                        .await;
                }
                return Ok(());
            }
        };
        let known = self.memory().finals.get(&step.rev).cloned();
        if let Some(body) = known {
            // The hub still lists it: our final report was lost or overwritten.
            info!(backend = %self.link.backend(), rev = step.rev, "sending the final status again");
            let p = format!("/trails/{device}/steps/{}/progress", step.rev);
            let _ = self
                .client
                .call(Method::PUT, &p, Some(body.to_string().into_bytes()))
                .await?;
            return Ok(());
        }
        if let Some(a) = active.as_ref() {
            if a.rev == step.rev || !a.sent.as_ref().is_some_and(|(s, _)| s.is_final()) {
                return Ok(());
            }
        }
        if step.status() == "CANCEL" {
            return Ok(());
        }
        self.offer(device, step, active).await
    }

    /// Reports a final WONTGO for a step the engine never got.
    pub(crate) async fn refuse(&self, device: &str, rev: i64, why: &str) {
        warn!(backend = %self.link.backend(), rev, reason = %why, "refusing the revision");
        let body = wire::final_body("WONTGO", why);
        self.remember(|m| {
            m.finals.insert(rev, body.clone());
        });
        let p = format!("/trails/{device}/steps/{rev}/progress");
        if let Err(e) = self
            .client
            .call(Method::PUT, &p, Some(body.to_string().into_bytes()))
            .await
        {
            warn!(backend = %self.link.backend(), error = %e, "cannot report WONTGO");
        }
    }

    pub(crate) async fn offer(
        &self,
        device: &str,
        step: wire::Step,
        active: &mut Option<Active>,
    ) -> Result<(), HubError> {
        let rev = step.rev;
        let state: Value = match serde_json::from_str(step.state.get()) {
            Ok(v) => v,
            Err(e) => {
                self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                    .await;
                return Ok(());
            }
        };
        let objects = match wire::state_objects(&state) {
            Ok(o) => o,
            Err(e) => {
                self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                    .await;
                return Ok(());
            }
        };
        let fetcher = Arc::new(HubObjects {
            client: self.client.clone(),
            urls: std::sync::Mutex::new(HashMap::new()),
        });
        let mut refs = BTreeMap::new();
        for (name, sha) in objects {
            if refs.contains_key(&sha) {
                continue;
            }
            match fetcher.meta(&sha).await {
                Ok((size, _)) => {
                    refs.insert(
                        sha.clone(),
                        ObjectRef {
                            sha256: sha.clone(),
                            size: Some(size),
                            source: ObjectSource::Adapter { key: sha },
                        },
                    );
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    self.refuse(
                        device,
                        rev,
                        &format!("object {name} ({sha}) is not available on the hub: {e}"),
                    )
                    .await;
                    return Ok(());
                }
            }
        }
        let id = wire::offer_id(&self.prefix, rev);
        info!(backend = %self.link.backend(), rev, id = %id, msg = %step.commit_msg, objects = refs.len(), "new revision from the hub");
        // Like Pantavisor, say QUEUED as soon as the step is taken: the engine's
        // own QUEUED may pass before this adapter sees it.
        let queued = Progress {
            id: id.clone(),
            rev: format!("locals/{id}"),
            status: UpdateStatus::Queued,
            status_msg: "Update queued".into(),
            progress: 5,
            bytes_done: 0,
            bytes_total: refs.values().filter_map(|r| r.size).sum(),
            objects_done: 0,
            objects_total: refs.len() as u32,
            logs: None,
        };
        *active = Some(Active {
            rev,
            id: id.clone(),
            sent: None,
            last_put: None,
            queue: [queued].into(),
            download_started: 0,
            owner_cancel: false,
            failed: false,
        });
        let offer = Offer {
            id,
            state: step.state.get().as_bytes().to_vec(),
            state_url: None,
            objects: refs,
            fetcher: Some(fetcher as Arc<dyn ObjectFetcher>),
        };
        self.link
            .send(BackendEvent::Offer(offer))
            .await
            .map_err(|_| HubError::Transport {
                what: "engine".into(),
                detail: "the engine stopped".into(),
            })
    }
}
