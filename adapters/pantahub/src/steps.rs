//! Steps and progress: hub revisions become engine offers, and the engine's
//! progress goes back to the hub.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use pv_adapter_api::timing::jittered;

/// When to send a remembered final status again, per hub revision (in memory:
/// after a restart every final is sent once more, as Pantavisor does).
#[derive(Default)]
pub(crate) struct Resend {
    next: BTreeMap<i64, (Instant, u32)>,
}

impl Resend {
    /// Whether `rev`'s final may be sent now.
    fn due(&self, rev: i64) -> bool {
        self.next
            .get(&rev)
            .is_none_or(|(at, _)| Instant::now() >= *at)
    }

    /// Records an attempt: the next waits twice as long, from `base` up to 10 min.
    fn attempted(&mut self, rev: i64, base: Duration) {
        let n = self.next.get(&rev).map_or(0, |(_, n)| *n);
        let wait = (base * 2u32.saturating_pow(n.min(16))).min(Duration::from_secs(600));
        self.next.insert(rev, (Instant::now() + wait, n + 1));
    }

    fn forget(&mut self, rev: i64) {
        self.next.remove(&rev);
    }
}

/// The order of statuses on the hub: progress never moves backwards there.
fn stage(st: UpdateStatus) -> u8 {
    match st {
        UpdateStatus::Queued => 0,
        UpdateStatus::Downloading => 1,
        UpdateStatus::Inprogress => 2,
        UpdateStatus::Testing => 3,
        _ => 4,
    }
}

impl Hub {
    pub(crate) async fn steps(&self, device: &str) -> Result<(), AdapterError> {
        let mut view = self.link.view();
        let mut flush = tokio::time::interval(Duration::from_millis(500));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut active: Option<Active> = None;
        let mut resend = Resend::default();
        let mut online = true;
        // Polls are jittered: a fleet powered on together does not poll in lockstep.
        let mut next_poll = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_poll) => {
                    match self.poll_steps(device, &mut active, &mut resend).await {
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
                    next_poll = tokio::time::Instant::now() + jittered(self.poll(), 0.2);
                }
                changed = view.changed() => {
                    if changed.is_err() {
                        return Err(AdapterError::EngineGone);
                    }
                    let v = view.borrow_and_update().clone();
                    self.note_progress(&v, &mut active);
                    self.flush(device, &mut active, &mut resend).await;
                }
                _ = flush.tick() => self.flush(device, &mut active, &mut resend).await,
            }
        }
    }

    /// Takes the engine's latest progress for the active step. Progress of a hub
    /// revision whose final status is decided is never taken again: the view keeps
    /// the last progress, and every device-meta refresh changes the view.
    pub(crate) fn note_progress(&self, v: &DeviceView, active: &mut Option<Active>) {
        let Some(p) = v.update.as_ref() else { return };
        let Some(rev) = wire::rev_of_id(&self.prefix, &p.id) else {
            return;
        };
        if active.as_ref().is_none_or(|a| a.rev != rev) && self.memory().closed.contains(&rev) {
            return;
        }
        let a = active.get_or_insert_with(|| Active {
            rev,
            id: p.id.clone(),
            sent: None,
            last_put: None,
            queue: Default::default(),
            download_started: 0,
            owner_cancel: false,
            failed: false,
            retries: self.memory().retries.get(&rev).copied().unwrap_or(1),
        });
        if a.rev != rev {
            return;
        }
        if p.status == UpdateStatus::Downloading && a.download_started == 0 {
            a.download_started = unix_now();
        }
        // The engine passes through Pantavisor's QUEUED after its own download;
        // the hub, like Pantavisor's client, only ever moves forward.
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
        if p.status.is_final() && !self.memory().finals.contains_key(&rev) {
            // Decided: remembered before it is sent, so that it reaches the hub
            // even if the bridge stops first.
            let body =
                wire::progress_body(p, a.owner_cancel, a.download_started, unix_now(), a.retries);
            self.remember(|m| m.close(rev, body));
        }
        match a.queue.back_mut() {
            Some(last) if last.status == p.status => *last = p.clone(),
            _ if reported => {}
            _ => a.queue.push_back(p.clone()),
        }
    }

    /// Sends the active step's progress when it changed status, or when the
    /// interval passed; checks for a hub-side cancel first while it can still be
    /// honoured.
    pub(crate) async fn flush(
        &self,
        device: &str,
        active: &mut Option<Active>,
        resend: &mut Resend,
    ) {
        while self.flush_one(device, active, resend).await {}
    }

    /// Sends the oldest queued report if it may go now; true if another may follow.
    pub(crate) async fn flush_one(
        &self,
        device: &str,
        active: &mut Option<Active>,
        resend: &mut Resend,
    ) -> bool {
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
        // A final goes with the body remembered when it was decided, as it was.
        let known = if p.status.is_final() {
            self.memory().finals.get(&a.rev).cloned()
        } else {
            None
        };
        let body = known.unwrap_or_else(|| {
            wire::progress_body(
                &p,
                a.owner_cancel,
                a.download_started,
                unix_now(),
                a.retries,
            )
        });
        let path = format!("/trails/{device}/steps/{}/progress", a.rev);
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
                    resend.attempted(a.rev, self.poll());
                    *active = None;
                    return false;
                }
                true
            }
            Ok(r) => {
                warn!(backend = %self.link.backend(), error = %status_error(&format!("PUT {path}"), &r), "progress not accepted");
                self.progress_failed(active, resend);
                false
            }
            Err(e) => {
                warn!(backend = %self.link.backend(), error = %e, "cannot report progress");
                self.progress_failed(active, resend);
                false
            }
        }
    }

    /// A progress PUT failed: a status in flight is tried again after the
    /// interval unless a newer one waits; a final one is left to the poll, which sends remembered finals
    /// with a growing wait, so that a final the hub keeps refusing never holds
    /// back the steps after it.
    fn progress_failed(&self, active: &mut Option<Active>, resend: &mut Resend) {
        let Some(a) = active.as_mut() else { return };
        a.failed = true;
        if a.queue.len() > 1 {
            // A newer status is waiting: the one the hub refused is out of date
            // (Pantavisor keeps one report queued, the newest).
            a.queue.pop_front();
        }
        if a.queue.front().is_some_and(|p| p.status.is_final()) {
            resend.attempted(a.rev, self.poll());
            *active = None;
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

    /// Reads the pending steps (lowest revision first, as the hub sorts them).
    /// Remembered finals are sent again while the hub lists their step, with a
    /// growing wait, and forgotten once it does not; the first step with no final
    /// becomes an offer when the engine is free.
    pub(crate) async fn poll_steps(
        &self,
        device: &str,
        active: &mut Option<Active>,
        resend: &mut Resend,
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
        let listed: BTreeSet<i64> = steps
            .iter()
            .filter_map(|s| s.get("rev").and_then(Value::as_i64))
            .collect();
        let delivered: Vec<i64> = self
            .memory()
            .finals
            .keys()
            .filter(|r| !listed.contains(r) && active.as_ref().is_none_or(|a| a.rev != **r))
            .copied()
            .collect();
        if !delivered.is_empty() {
            debug!(revs = ?delivered, "the hub has these final statuses");
            self.remember(|m| {
                for r in &delivered {
                    m.finals.remove(r);
                }
            });
            for r in delivered {
                resend.forget(r);
            }
        }
        for first in steps {
            let Some(rev) = first.get("rev").and_then(Value::as_i64) else {
                warn!(backend = %self.link.backend(), "the hub listed a step without a revision number; skipping it");
                continue;
            };
            if active.as_ref().is_some_and(|a| a.rev == rev) {
                return Ok(());
            }
            let known = self.memory().finals.get(&rev).cloned();
            if let Some(body) = known {
                if resend.due(rev) {
                    // The hub still lists it: our final report was lost or overwritten.
                    info!(backend = %self.link.backend(), rev, "sending the final status again");
                    resend.attempted(rev, self.poll());
                    self.put_final(device, rev, &body, "later steps go on")
                        .await;
                }
                continue;
            }
            if self.memory().closed.contains(&rev) {
                // Decided and delivered long ago, listed again: nothing to redo.
                continue;
            }
            if active.is_some() {
                // One update at a time: the engine is busy with another revision.
                return Ok(());
            }
            let step: wire::Step = match serde_json::from_value(first) {
                Ok(s) => s,
                Err(e) => {
                    warn!(backend = %self.link.backend(), error = %e, "the hub sent a malformed step");
                    self.refuse(device, rev, &format!("State JSON has bad format: {e}"))
                        .await;
                    continue;
                }
            };
            if step.status() == "CANCEL" {
                continue;
            }
            return self.offer(device, step, active).await;
        }
        Ok(())
    }

    /// Reports a final WONTGO for a step the engine never got.
    pub(crate) async fn refuse(&self, device: &str, rev: i64, why: &str) {
        warn!(backend = %self.link.backend(), rev, reason = %why, "refusing the revision");
        let retries = self.memory().retries.get(&rev).copied().unwrap_or(0);
        let body = wire::final_body("WONTGO", why, retries);
        self.remember(|m| m.close(rev, body.clone()));
        self.put_final(
            device,
            rev,
            &body,
            "it is sent again while the hub lists the step",
        )
        .await;
    }

    /// PUTs a remembered final status; a failure is logged with what happens next.
    async fn put_final(&self, device: &str, rev: i64, body: &Value, next: &str) {
        let p = format!("/trails/{device}/steps/{rev}/progress");
        match self
            .client
            .call(Method::PUT, &p, Some(body.to_string().into_bytes()))
            .await
        {
            Ok(r) if r.status == 200 => {}
            Ok(r) => {
                warn!(backend = %self.link.backend(), rev, error = %status_error(&format!("PUT {p}"), &r), "the hub did not take the final status; {next}")
            }
            Err(e) => {
                warn!(backend = %self.link.backend(), rev, error = %e, "cannot send the final status; {next}")
            }
        }
    }

    /// Takes a step: counts the take (Pantavisor's `retries`; the hub's own count
    /// is the floor after a reinstall), reads every object's size and signed URL,
    /// and hands the engine an offer. A step whose objects the hub will not give
    /// (401, 403, 404: "not found or not allowed" on this hub) is tried again on
    /// the next polls until the takes run out, as Pantavisor does.
    pub(crate) async fn offer(
        &self,
        device: &str,
        step: wire::Step,
        active: &mut Option<Active>,
    ) -> Result<(), HubError> {
        let rev = step.rev;
        let max = self.cfg.revision_retries;
        let on_hub = step
            .progress
            .get("retries")
            .and_then(Value::as_u64)
            .map_or(0, |n| n.min(u64::from(u32::MAX)) as u32);
        let retries = self
            .memory()
            .retries
            .get(&rev)
            .copied()
            .unwrap_or(0)
            .max(on_hub)
            + 1;
        if retries >= max {
            let last = self.memory_last_failure(rev);
            let why = match last {
                Some(l) => format!("Max update processing retries reached: {l}"),
                None => "Max update processing retries reached".to_owned(),
            };
            self.refuse(device, rev, &why).await;
            return Ok(());
        }
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
                    let why = format!("object {name} ({sha}) is not available on the hub: {e}");
                    warn!(backend = %self.link.backend(), rev, retry = retries, of = max, reason = %why, "cannot take the revision yet; trying again on the next poll");
                    self.remember(|m| {
                        m.retries.insert(rev, retries);
                    });
                    self.note_failure(rev, why);
                    return Ok(());
                }
            }
        }
        self.remember(|m| {
            m.retries.insert(rev, retries);
        });
        let id = wire::offer_id(&self.prefix, rev);
        info!(backend = %self.link.backend(), rev, id = %id, msg = %step.commit_msg, objects = refs.len(), retry = retries, "new revision from the hub");
        // A step the device took before a restart stays where the hub has it:
        // QUEUED over INPROGRESS or TESTING would move it backwards.
        let on_hub_status = step.status().parse::<UpdateStatus>().ok();
        let resumed =
            on_hub_status.filter(|s| !s.is_final() && stage(*s) > stage(UpdateStatus::Queued));
        let queue = if resumed.is_some() {
            Default::default()
        } else {
            // Like Pantavisor, say QUEUED as soon as the step is taken: the engine's
            // own QUEUED may pass before this adapter sees it.
            [Progress {
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
            }]
            .into()
        };
        let hub_msg = step
            .progress
            .get("status-msg")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        *active = Some(Active {
            rev,
            id: id.clone(),
            sent: resumed.map(|s| (s, hub_msg)),
            last_put: None,
            queue,
            download_started: 0,
            owner_cancel: false,
            failed: false,
            retries,
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

    /// The last reason a take of `rev` failed (kept in memory for the WONTGO).
    fn memory_last_failure(&self, rev: i64) -> Option<String> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rev)
            .cloned()
    }

    fn note_failure(&self, rev: i64, why: String) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rev, why);
    }
}
