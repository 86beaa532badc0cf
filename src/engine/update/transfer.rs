//! Object bytes from their source into Pantavisor: hashed and counted as they
//! stream, within the bandwidth cap, retried when pv-ctrl goes away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pv_adapter_api::{ObjectFetcher, ObjectReader, UpdateStatus};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::plan::{Fetch, Src};
use super::{Coordinator, Refusal, progress};
use crate::engine::fetch::Throttle;
use crate::pvctrl::{PvCtrl, hex};

/// Hashes and counts the bytes that stream through it, within the bandwidth cap.
struct Hashing {
    inner: ObjectReader,
    hasher: Sha256,
    counter: Arc<AtomicU64>,
    throttle: Option<Arc<Throttle>>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Hashing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let this = &mut *self;
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.counter.fetch_add(new.len() as u64, Ordering::Relaxed);
            let wait = this.throttle.as_ref().map(|t| t.take(new.len()));
            if let Some(wait) = wait.filter(|w| !w.is_zero()) {
                this.pause = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
        r
    }
}

/// What `upload` needs besides the object.
#[derive(Clone)]
pub(super) struct Sources {
    pub(super) fetcher: Option<Arc<dyn ObjectFetcher>>,
    pub(super) downloader: Option<Arc<crate::engine::fetch::Downloader>>,
    pub(super) budget: Arc<crate::engine::fetch::Budget>,
    /// Copy adapter streams into the cache before uploading them: gen-1 pv-ctrl
    /// gives up on a body that stalls for 1 s (`pv_ctrl_wait_recv`), and an
    /// adapter's source (chunks pulled over a broker) can be that slow.
    pub(super) stage_streams: bool,
}

/// Where one upload attempt reads from.
enum Local {
    /// A verified copy in the cache (a URL download, or a staged stream).
    File(std::path::PathBuf),
    /// The adapter's stream, opened again for each attempt.
    Stream(String),
}

/// Brings one object from its source into Pantavisor and checks it landed: the
/// device lists it with its whole size (gen-2 answers 200 to an upload that a full
/// disk cut short). The cached copy, if any, is deleted then, so the bridge never
/// keeps a second copy of what the device stores. Returns its length.
pub(super) async fn upload(
    pv: PvCtrl,
    sources: Sources,
    f: Fetch,
    counter: Arc<AtomicU64>,
    throttle: Option<Arc<Throttle>>,
) -> Result<u64, Refusal> {
    let sha = &f.sha;
    let local = local_copy(&sources, &f, &counter, throttle.as_ref()).await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Streams are counted (and throttled) as they go to Pantavisor; cached
        // copies were counted while they were fetched.
        let (reader, len, count, stream_throttle): (ObjectReader, u64, Arc<AtomicU64>, _) =
            match &local {
                Local::Stream(key) => {
                    let fetcher = sources.fetcher.as_ref().ok_or_else(|| {
                        Refusal::wontgo(format!("object {sha}: the offer has no fetcher"))
                    })?;
                    let (r, len) = fetcher.open(key).await.map_err(|e| {
                        Refusal::wontgo(format!("object {sha}: cannot read its source: {e}"))
                    })?;
                    (r, len, counter.clone(), throttle.clone())
                }
                Local::File(path) => {
                    let file = tokio::fs::File::open(path).await.map_err(|e| {
                        Refusal::wontgo(format!("object {sha}: cannot read the cached copy: {e}"))
                    })?;
                    let len = file
                        .metadata()
                        .await
                        .map_err(|e| Refusal::wontgo(format!("object {sha}: {e}")))?
                        .len();
                    (
                        Box::new(file) as ObjectReader,
                        len,
                        Arc::new(AtomicU64::new(0)),
                        None,
                    )
                }
            };
        if let Some(expected) = f.size.filter(|e| *e != len) {
            return Err(Refusal::wontgo(format!(
                "object {sha}: its source has {len} bytes but the offer says {expected}"
            )));
        }
        let start = count.load(Ordering::Relaxed);
        let mut hashing = Hashing {
            inner: reader,
            hasher: Sha256::new(),
            counter: count.clone(),
            throttle: stream_throttle,
            pause: None,
        };
        let retry = match pv.put_object(sha, &mut hashing, len).await {
            Ok(()) => {
                let got = hex(&hashing.hasher.finalize());
                if &got != sha {
                    return Err(Refusal::wontgo(format!(
                        "object {sha}: its bytes hash to {got}"
                    )));
                }
                landed(&pv, sha, len).await?;
                if let Local::File(path) = &local {
                    let _ = tokio::fs::remove_file(path).await;
                }
                return Ok(len);
            }
            Err(e) if e.status() == Some(422) => {
                let got = hex(&hashing.hasher.finalize());
                return Err(Refusal::wontgo(format!(
                    "object {sha}: its bytes hash to {got}; refusing the update"
                )));
            }
            Err(e) if e.status() == Some(507) => {
                return Err(Refusal::wontgo(format!(
                    "object {sha}: the device is out of space: {e}"
                )));
            }
            Err(e) if e.is_unreachable() && attempt < 5 => e,
            // gen-1 answers 500 "Cannot read from socket" to a body that stalled
            // for 1 s, and deletes the file: once more, from the start.
            Err(e) if e.status() == Some(500) && attempt < 2 => e,
            Err(e) => return Err(Refusal::wontgo(format!("object {sha}: upload failed: {e}"))),
        };
        // Give back the bytes counted for this attempt and try again.
        let counted = count.load(Ordering::Relaxed).saturating_sub(start);
        count.fetch_sub(counted, Ordering::Relaxed);
        warn!(object = %sha, attempt, error = %retry, "upload interrupted; retrying");
        tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
    }
}

/// Where the bytes of `f` will be read from for the upload: URLs are downloaded
/// into the cache (resumable, hashed); adapter streams are copied there too when
/// `stage_streams`, else read straight from the adapter.
async fn local_copy(
    sources: &Sources,
    f: &Fetch,
    counter: &Arc<AtomicU64>,
    throttle: Option<&Arc<Throttle>>,
) -> Result<Local, Refusal> {
    let sha = &f.sha;
    // An adapter may name a (signed, expiring) URL only now: download it like any URL.
    let mut source = f.source.clone();
    if let (Src::Adapter(key), Some(fetcher)) = (&f.source, sources.fetcher.as_ref()) {
        match fetcher.url(key).await {
            Ok(Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
                source = Src::Url(url)
            }
            Ok(Some(url)) => {
                return Err(Refusal::wontgo(format!(
                    "object {sha}: its source {} is not an http or https URL",
                    pv_http::redact(&url)
                )));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Refusal::wontgo(format!(
                    "object {sha}: cannot locate its source: {e}"
                )));
            }
        }
    }
    match (source, sources.downloader.as_ref()) {
        (Src::Url(url), Some(dl)) => dl
            .fetch(&url, sha, f.size, counter, throttle, &sources.budget)
            .await
            .map(Local::File)
            .map_err(Refusal::wontgo),
        (Src::Url(url), None) => Err(Refusal::wontgo(format!(
            "object {sha}: no HTTP client is available for {}",
            pv_http::redact(&url)
        ))),
        (Src::Adapter(key), Some(dl)) if sources.stage_streams => {
            let fetcher = sources.fetcher.as_ref().ok_or_else(|| {
                Refusal::wontgo(format!("object {sha}: the offer has no fetcher"))
            })?;
            let (reader, _) = fetcher.open(&key).await.map_err(|e| {
                Refusal::wontgo(format!("object {sha}: cannot read its source: {e}"))
            })?;
            let hashing = Hashing {
                inner: reader,
                hasher: Sha256::new(),
                counter: counter.clone(),
                throttle: throttle.cloned(),
                pause: None,
            };
            dl.stage(hashing, sha)
                .await
                .map(Local::File)
                .map_err(Refusal::wontgo)
        }
        (Src::Adapter(key), _) => Ok(Local::Stream(key)),
    }
}

/// Checks the device lists `sha` with all its `len` bytes.
async fn landed(pv: &PvCtrl, sha: &str, len: u64) -> Result<(), Refusal> {
    let listed = pv
        .objects()
        .await
        .map_err(|e| Refusal::wontgo(format!("cannot list the device's objects: {e}")))?
        .into_iter()
        .find(|o| o.sha256 == sha)
        .map(|o| o.size);
    if listed == Some(len) {
        return Ok(());
    }
    Err(Refusal::wontgo(format!(
        "object {sha} did not land on the device (listed as {listed:?} bytes, sent {len}; is its storage full?)"
    )))
}

impl Coordinator {
    pub(super) async fn fetch_all(
        &mut self,
        backend: &str,
        id: &str,
        rev: &str,
        sources: Sources,
        todo: Vec<Fetch>,
        bytes_total: u64,
    ) -> Result<(), Refusal> {
        let objects_total = todo.len() as u32;
        let counter = Arc::new(AtomicU64::new(0));
        let throttle = (self.opts.bandwidth_limit > 0)
            .then(|| Arc::new(Throttle::new(self.opts.bandwidth_limit)));
        // Smallest first: cheap objects finish early and progress moves.
        let mut queue: std::collections::VecDeque<Fetch> = {
            let mut v = todo;
            v.sort_by_key(|f| (f.size.unwrap_or(u64::MAX), f.sha.clone()));
            v.into()
        };
        let mut set = JoinSet::new();
        let limit = self.opts.fetch_concurrency.max(1);
        let mut uploaded = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let report = |objects_done: u32| {
            let mut p = progress(id, rev, UpdateStatus::Downloading, "Fetching objects");
            p.bytes_done = counter.load(Ordering::Relaxed);
            p.bytes_total = bytes_total.max(p.bytes_done);
            p.objects_done = objects_done;
            p.objects_total = objects_total;
            self.report(backend, p);
        };
        loop {
            while set.len() < limit {
                let Some(f) = queue.pop_front() else { break };
                let (pv, sources, counter, throttle) = (
                    self.pv.clone(),
                    sources.clone(),
                    counter.clone(),
                    throttle.clone(),
                );
                set.spawn(async move {
                    let sha = f.sha.clone();
                    upload(pv, sources, f, counter, throttle)
                        .await
                        .map(|len| (sha, len))
                });
            }
            tokio::select! {
                r = set.join_next() => match r {
                    None => break,
                    Some(Ok(Ok(done))) => {
                        uploaded.push(done);
                        report(uploaded.len() as u32);
                    }
                    Some(Ok(Err(refusal))) => {
                        set.abort_all();
                        return Err(refusal);
                    }
                    Some(Err(e)) => {
                        set.abort_all();
                        return Err(Refusal::wontgo(format!("object upload task failed: {e}")));
                    }
                },
                _ = tick.tick() => report(uploaded.len() as u32),
            }
        }
        debug!(objects = uploaded.len(), "objects uploaded and verified");
        Ok(())
    }
}
