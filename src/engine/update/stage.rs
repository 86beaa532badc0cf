//! Everything up to an accepted LOCAL_RUN: the state (inline or by URL), the
//! preflight, the objects, the step, and the point of no return.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use pv_adapter_api::{Offer, UpdateStatus};
use tracing::{error, info, warn};

use super::plan::{Check, Fetch, Src, plan};
use super::trail::{Trail, label};
use super::transfer::Sources;
use super::{Coordinator, Refusal, progress};
use crate::engine::journal::{Current, Phase};
use crate::pvctrl::{Generation, Meta};
use crate::state::{Revision, State};

impl Coordinator {
    /// Downloads a state given by URL: at most `max_state_bytes`, hashed to the
    /// sha256 the offer names.
    pub(super) async fn fetch_state(
        &self,
        s: &pv_adapter_api::StateUrl,
    ) -> Result<Vec<u8>, Refusal> {
        if !pv_adapter_api::is_sha256_hex(&s.sha256) {
            return Err(Refusal::wontgo(format!(
                "the state's sha256 {:?} is not 64 lower-case hex digits",
                s.sha256.chars().take(80).collect::<String>()
            )));
        }
        let dl = self.downloader.as_ref().ok_or_else(|| {
            Refusal::wontgo(format!(
                "no HTTP client is available for the state at {}",
                pv_http::redact(&s.url)
            ))
        })?;
        let budget = crate::engine::fetch::Budget {
            limit: self.opts.max_state_bytes as u64,
            used: AtomicU64::new(0),
        };
        let path = dl
            .fetch(&s.url, &s.sha256, None, &AtomicU64::new(0), None, &budget)
            .await
            .map_err(|e| {
                if e.contains("byte budget") {
                    Refusal::wontgo(format!(
                        "the state at {} is larger than max_state_bytes ({} bytes)",
                        pv_http::redact(&s.url),
                        self.opts.max_state_bytes
                    ))
                } else {
                    Refusal::wontgo(format!("state: {e}"))
                }
            })?;
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| Refusal::wontgo(format!("state: cannot read the download: {e}")))?;
        let _ = tokio::fs::remove_file(&path).await;
        Ok(bytes)
    }

    /// Everything up to an accepted LOCAL_RUN: `Trail::Free` then. `Finished` when
    /// the device shows this offer already ran (the journal forgot it).
    pub(super) async fn stage_and_run(
        &mut self,
        backend: &str,
        offer: &Offer,
        rev: &str,
    ) -> Result<Trail, Refusal> {
        let id = &offer.id;
        self.report(
            backend,
            progress(id, rev, UpdateStatus::Queued, "Validating the state"),
        );
        let fetched;
        let state_bytes: &[u8] = match &offer.state_url {
            Some(s) => {
                fetched = self.fetch_state(s).await?;
                &fetched
            }
            None => &offer.state,
        };
        let state = State::parse_for_staging(state_bytes, self.opts.max_state_bytes)
            .map_err(|e| Refusal::wontgo(e.to_string()))?;
        let revision: Revision = rev
            .parse()
            .map_err(|e: crate::state::RevisionError| Refusal::wontgo(e.to_string()))?;
        let have: BTreeMap<String, u64> = self
            .device_objects(backend, id, rev)
            .await
            .map_err(|e| Refusal::wontgo(format!("cannot list the device's objects: {e}")))?;
        if let done @ Trail::Finished { .. } = self.check_trail(backend, id, rev).await? {
            return Ok(done);
        }
        let running = self.running_objects().await;
        let plan = plan(&state, offer, &have, &running)?;
        let mut todo = plan.fetch;
        for c in plan.check {
            if let Some(f) = self.check_listed(c).await? {
                todo.push(f);
            }
        }
        let gen1 = matches!(self.pv.probe().await, Ok(i) if i.generation == Generation::Gen1);
        let free = self.free_space().await;
        let bytes_total = self.preflight(&todo, gen1, free)?;
        self.journal
            .set_current(Current {
                backend: backend.to_owned(),
                id: id.clone(),
                rev: rev.to_owned(),
                phase: Phase::Accepted,
            })
            .map_err(Self::journal_err)?;
        if !todo.is_empty() {
            // Downloads of unknown size are bounded by what the device can store.
            let limit = match (self.opts.max_update_bytes, free) {
                (0, Some(free)) => free,
                (max, Some(free)) => max.min(free),
                (max, None) => max,
            };
            let sources = Sources {
                fetcher: offer.fetcher.clone(),
                downloader: self.downloader.clone(),
                budget: Arc::new(crate::engine::fetch::Budget {
                    limit,
                    used: AtomicU64::new(0),
                }),
                stage_streams: gen1,
            };
            self.fetch_all(backend, id, rev, sources, todo, bytes_total)
                .await?;
        }
        self.pv
            .put_step(&revision, state_bytes)
            .await
            .map_err(|e| Refusal::wontgo(format!("Pantavisor refused the state: {e}")))?;
        // The trail's owner, on the device itself (see `trail`).
        if let Err(e) = self.pv.put_commitmsg(rev, &label(backend, id)).await {
            warn!(rev = %rev, error = %e, "cannot label the staged revision with its owner");
        }
        self.set_phase(backend, id, rev, Phase::Staged)?;
        // The point of no return: after this, only Pantavisor decides.
        {
            let mut s = self.slot.lock();
            if let Some(a) = s.active.as_mut() {
                if let Some(why) = &a.cancelled {
                    return Err(Refusal {
                        status: UpdateStatus::Cancelled,
                        msg: why.clone(),
                    });
                }
                a.committed = true;
            }
        }
        self.send_local_run(&revision).await?;
        // LOCAL_RUN is Pantavisor's now: a journal that cannot be written must not
        // turn into a status of the update. The journal still says Staged, so a
        // restart asks Pantavisor before sending LOCAL_RUN again.
        if let Err(e) = self.set_phase(backend, id, rev, Phase::Running) {
            error!(backend = %backend, id = %id, reason = %e.msg,
                "the update journal could not record LOCAL_RUN; following the update anyway");
        }
        Ok(Trail::Free)
    }

    /// The device's objects (sha → size). While pv-ctrl is unreachable (the device
    /// is booting or rebooting) the update stays QUEUED and this waits.
    pub(super) async fn device_objects(
        &self,
        backend: &str,
        id: &str,
        rev: &str,
    ) -> Result<BTreeMap<String, u64>, crate::pvctrl::Error> {
        let mut wait = Duration::from_millis(250);
        let mut told = false;
        loop {
            match self.pv.objects().await {
                Ok(list) => return Ok(list.into_iter().map(|o| (o.sha256, o.size)).collect()),
                Err(e) if e.is_unreachable() => {
                    if !told {
                        info!(rev = %rev, error = %e, "waiting for pv-ctrl before staging");
                        self.report(
                            backend,
                            progress(id, rev, UpdateStatus::Queued, "Waiting for pv-ctrl"),
                        );
                        told = true;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks the objects fit on the device and returns their total size (the
    /// sizes the offer gives). A copy of a URL object (and, on gen-1, of an
    /// adapter's stream) sits in the bridge's cache while it is uploaded, on the
    /// same storage in the usual layout: the largest `fetch_concurrency` of those
    /// are counted twice.
    fn preflight(&self, todo: &[Fetch], gen1: bool, free: Option<u64>) -> Result<u64, Refusal> {
        let total = todo
            .iter()
            .filter_map(|f| f.size)
            .try_fold(0u64, u64::checked_add)
            .ok_or_else(|| {
                Refusal::wontgo("the offer's object sizes add up to more than 2^64 bytes")
            })?;
        let Some(free) = free else {
            return Ok(total);
        };
        let mut cached: Vec<u64> = todo
            .iter()
            .filter(|f| matches!(f.source, Src::Url(_)) || gen1)
            .filter_map(|f| f.size)
            .collect();
        cached.sort_unstable_by(|a, b| b.cmp(a));
        let at_once: u64 = cached
            .iter()
            .take(self.opts.fetch_concurrency.max(1))
            .fold(0u64, |a, b| a.saturating_add(*b));
        let required = total.saturating_add(at_once);
        if required > free {
            info!(
                objects = total,
                cached_at_once = at_once,
                free,
                "not enough space for the update"
            );
            return Err(Refusal::wontgo(format!(
                "Space required {required} B, available {free} B"
            )));
        }
        Ok(total)
    }

    /// The objects of the running revision: Pantavisor checked them when it booted
    /// or started it, so they are whole. Empty when the state cannot be read (then
    /// nothing is trusted by this rule).
    async fn running_objects(&self) -> BTreeSet<String> {
        match self.pv.step("current").await.map(|b| State::parse(&b)) {
            Ok(Ok(s)) => s.objects().map(|(_, sha)| sha.to_owned()).collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Hashes a listed object of unknown size on the device (`GET /objects/<sha>`).
    /// Whole: nothing to do. Partial (a broken upload's leftover): its fallback
    /// fetch, or a refusal when the offer gives no source.
    async fn check_listed(&self, c: Check) -> Result<Option<Fetch>, Refusal> {
        match self.pv.get_object(&c.sha, &mut tokio::io::sink()).await {
            Ok(_) => return Ok(None),
            Err(e) => info!(object = %c.sha, listed = c.listed, error = %e,
                "an object on the device is not whole (a broken upload?); it is sent again"),
        }
        c.fallback.map(Some).ok_or_else(|| {
            Refusal::wontgo(format!(
                "object {} ({}) is on the device but not whole ({} bytes) and the offer gives no source for it",
                c.sha, c.path, c.listed
            ))
        })
    }

    pub(super) async fn free_space(&self) -> Option<u64> {
        let dm = self.pv.meta(Meta::Device).await.ok()?;
        dm.get("storage")?.get("real_free")?.as_u64()
    }
}
