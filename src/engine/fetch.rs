//! Downloading objects from http/https URLs into the bridge's cache.
//!
//! An object is downloaded to `<cache>/<sha>.part` and renamed to `<cache>/<sha>`
//! once its sha256 checks out. An interrupted download resumes with `Range` and
//! `If-Range` (the ETag or Last-Modified the server gave), so verified bytes are
//! never fetched twice, across restarts too; a changed object makes the server send
//! it whole. Connection failures, timeouts, 408, 429 and 5xx are retried with
//! jittered exponential backoff; any other 4xx is final. Memory stays flat: bytes
//! go from the socket to the file in the chunks they arrive in.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use crate::pvctrl::hex;

/// Attempts per object before giving up.
const ATTEMPTS: u32 = 8;

/// Bytes an update may download, shared by its objects.
pub struct Budget {
    pub limit: u64,
    pub used: AtomicU64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Validator {
    url: String,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// Downloads objects into a cache directory.
pub struct Downloader {
    client: pv_http::Client,
    cache: PathBuf,
}

/// How a download attempt failed.
enum Failure {
    Retry(String, Option<Duration>),
    Fatal(String),
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500) * 2u32.pow(attempt.min(6));
    let jitter =
        Duration::from_millis(u64::from(std::process::id().wrapping_mul(attempt + 7)) % 400);
    base.min(Duration::from_secs(30)) + jitter
}

impl Downloader {
    /// A downloader caching in `cache`. TLS trusts the system's certificates, plus
    /// those in the `ca_files` (PEM). Downloads go through `proxy` when given, else
    /// through the environment's `HTTPS_PROXY`/`HTTP_PROXY` (`NO_PROXY` honoured).
    pub fn new(cache: &Path, ca_files: &[&Path], proxy: Option<&str>) -> Result<Self, String> {
        let mut builder = pv_http::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60));
        for path in ca_files {
            builder = builder.ca_file(path).map_err(|e| e.to_string())?;
        }
        if let Some(p) = proxy {
            builder = builder.proxy(p);
        }
        let client = builder
            .proxy_from_env()
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Self {
            client,
            cache: cache.to_owned(),
        })
    }

    /// Checks `sha` can name a file in the cache (64 lower-case hex digits: never a
    /// path) and makes the cache directory.
    async fn prepare(&self, sha: &str) -> Result<(), String> {
        if !pv_adapter_api::is_sha256_hex(sha) {
            return Err(format!(
                "{sha:?} is not a sha256 (64 lower-case hex digits)"
            ));
        }
        tokio::fs::create_dir_all(&self.cache).await.map_err(|e| {
            format!(
                "cannot create the object cache {}: {e}",
                self.cache.display()
            )
        })
    }

    /// The cache file of a verified object.
    pub fn cached(&self, sha: &str) -> PathBuf {
        self.cache.join(sha)
    }

    /// Copies `src` into the cache as object `sha`, checking its sha256 over the
    /// bytes; returns the cached file. For sources too slow to stream into a
    /// device that gives up on a stalled body.
    pub async fn stage<R: tokio::io::AsyncRead + Unpin>(
        &self,
        mut src: R,
        sha: &str,
    ) -> Result<PathBuf, String> {
        self.prepare(sha).await?;
        let done = self.cached(sha);
        let part = self.cache.join(format!("{sha}.stage"));
        let mut f = tokio::fs::File::create(&part)
            .await
            .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = src
                .read(&mut buf)
                .await
                .map_err(|e| format!("object {sha}: cannot read its source: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n])
                .await
                .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        }
        f.flush()
            .await
            .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        drop(f);
        let got = hex(&hasher.finalize());
        if got != sha {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(format!("object {sha}: its bytes hash to {got}"));
        }
        tokio::fs::rename(&part, &done)
            .await
            .map_err(|e| format!("cannot keep object {sha}: {e}"))?;
        Ok(done)
    }

    /// Empties the cache (after an update ended).
    pub async fn clear(&self) {
        if let Ok(mut rd) = tokio::fs::read_dir(&self.cache).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
    }

    /// Downloads `url` until its bytes hash to `sha`; returns the cached file.
    pub async fn fetch(
        &self,
        url: &str,
        sha: &str,
        size: Option<u64>,
        counter: &AtomicU64,
        throttle: Option<&Arc<Throttle>>,
        budget: &Budget,
    ) -> Result<PathBuf, String> {
        self.prepare(sha).await?;
        let done = self.cached(sha);
        if hash_file(&done).await.as_deref() == Some(sha) {
            counter.fetch_add(size.unwrap_or(0), Ordering::Relaxed);
            return Ok(done);
        }
        let part = self.cache.join(format!("{sha}.part"));
        let meta = self.cache.join(format!("{sha}.part.json"));
        let mut validator: Validator = tokio::fs::read(&meta)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|v: &Validator| v.url == url)
            .unwrap_or_default();
        let mut have = tokio::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        // Objects are named by their sha256, which is checked at the end: bytes
        // kept from an earlier attempt (even from another URL for the same object,
        // such as a fresh signed URL) are resumed with Range.
        if size.is_some_and(|s| have > s) {
            have = 0;
        }
        counter.fetch_add(have, Ordering::Relaxed);
        let mut resumed = false;
        let mut fresh_retry = false;
        loop {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self
                    .attempt(
                        url,
                        &part,
                        &meta,
                        &mut validator,
                        &mut have,
                        &mut resumed,
                        size,
                        counter,
                        throttle,
                        budget,
                    )
                    .await
                {
                    Ok(()) => break,
                    Err(Failure::Fatal(why)) => return Err(why),
                    Err(Failure::Retry(why, after)) if attempt < ATTEMPTS => {
                        let wait = after
                            .unwrap_or_else(|| backoff(attempt))
                            .min(Duration::from_secs(60));
                        warn!(url = %pv_http::redact(url), attempt, retry_in = ?wait, reason = %why, "download interrupted");
                        tokio::time::sleep(wait).await;
                    }
                    Err(Failure::Retry(why, _)) => {
                        return Err(format!(
                            "{}: giving up after {ATTEMPTS} attempts: {why}",
                            pv_http::redact(url)
                        ));
                    }
                }
            }
            let got = hash_file(&part).await.unwrap_or_default();
            if got == sha {
                break;
            }
            let _ = tokio::fs::remove_file(&part).await;
            let _ = tokio::fs::remove_file(&meta).await;
            if resumed && !fresh_retry {
                // The kept bytes may not belong to what the server sends now: once,
                // download the whole object again.
                warn!(url = %pv_http::redact(url), object = %sha, "a resumed download does not match its sha256; downloading it whole");
                fresh_retry = true;
                resumed = false;
                counter.fetch_sub(have, Ordering::Relaxed);
                have = 0;
                validator = Validator::default();
                continue;
            }
            return Err(format!(
                "object {sha}: the bytes from {} hash to {got}",
                pv_http::redact(url)
            ));
        }
        tokio::fs::rename(&part, &done)
            .await
            .map_err(|e| format!("cannot keep object {sha}: {e}"))?;
        let _ = tokio::fs::remove_file(&meta).await;
        Ok(done)
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        url: &str,
        part: &Path,
        meta: &Path,
        validator: &mut Validator,
        have: &mut u64,
        resumed: &mut bool,
        size: Option<u64>,
        counter: &AtomicU64,
        throttle: Option<&Arc<Throttle>>,
        budget: &Budget,
    ) -> Result<(), Failure> {
        if size.is_some_and(|s| *have == s) && *have > 0 {
            return Ok(());
        }
        let mut req = self.client.get(url);
        let resume = *have > 0;
        if resume {
            req = req.header("Range", &format!("bytes={}-", *have));
            // If-Range only for the same URL: another one has other validators.
            let same = validator.url == url;
            if let Some(v) = validator
                .etag
                .as_ref()
                .or(validator.last_modified.as_ref())
                .filter(|_| same)
            {
                req = req.header("If-Range", v);
            }
        }
        let mut resp = req.send().await.map_err(|e| {
            // A certificate the bridge does not trust will not become trusted by
            // retrying: fail now, with the reason.
            if e.is_tls() {
                Failure::Fatal(format!("{}: {e}", pv_http::redact(url)))
            } else {
                Failure::Retry(e.to_string(), None)
            }
        })?;
        let status = resp.status;
        let retry_after = resp
            .header("retry-after")
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_secs);
        let append = match status {
            206 if resume => {
                let start = resp
                    .header("content-range")
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(*have) {
                    return Err(Failure::Retry(
                        format!("unexpected Content-Range {start:?}"),
                        None,
                    ));
                }
                *resumed = true;
                true
            }
            200 => false,
            416 if resume => {
                // Nothing after what we have: the part may be whole.
                *resumed = true;
                return Ok(());
            }
            408 | 429 | 500..=599 => {
                return Err(Failure::Retry(
                    format!("{} answered {status}", pv_http::redact(url)),
                    retry_after,
                ));
            }
            _ => {
                return Err(Failure::Fatal(format!(
                    "{} answered {status}",
                    pv_http::redact(url)
                )));
            }
        };
        if !append {
            counter.fetch_sub(*have, Ordering::Relaxed);
            *have = 0;
            *validator = Validator {
                url: url.to_owned(),
                etag: resp.header("etag").map(str::to_owned),
                last_modified: resp.header("last-modified").map(str::to_owned),
            };
            if let Ok(b) = serde_json::to_vec(validator) {
                let _ = tokio::fs::write(meta, b).await;
            }
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .await
            .map_err(|e| Failure::Fatal(format!("cannot write {}: {e}", part.display())))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let chunk = match resp.chunk(&mut buf).await {
                Ok(0) => break,
                Ok(n) => &buf[..n],
                Err(e) => {
                    let _ = f.flush().await;
                    return Err(Failure::Retry(
                        format!("download broke after {} bytes: {e}", *have),
                        None,
                    ));
                }
            };
            let n = chunk.len() as u64;
            let used = budget.used.fetch_add(n, Ordering::Relaxed) + n;
            if budget.limit > 0 && used > budget.limit {
                return Err(Failure::Fatal(format!(
                    "the byte budget of {} bytes for this update is exhausted",
                    budget.limit
                )));
            }
            if size.is_some_and(|s| *have + n > s) {
                return Err(Failure::Fatal(format!(
                    "{} sends more than the {} bytes offered",
                    pv_http::redact(url),
                    size.unwrap_or(0)
                )));
            }
            f.write_all(chunk)
                .await
                .map_err(|e| Failure::Fatal(format!("cannot write {}: {e}", part.display())))?;
            *have += n;
            counter.fetch_add(n, Ordering::Relaxed);
            if let Some(wait) = throttle
                .map(|t| t.take(chunk.len()))
                .filter(|w| !w.is_zero())
            {
                tokio::time::sleep(wait).await;
            }
        }
        f.flush().await.map_err(|e| Failure::Fatal(e.to_string()))?;
        f.sync_data()
            .await
            .map_err(|e| Failure::Fatal(e.to_string()))?;
        debug!(url = %pv_http::redact(url), bytes = *have, "download complete");
        Ok(())
    }
}

/// Reads a PEM bundle of trust anchors.
pub fn load_ca(path: &Path) -> Result<(), String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    pv_http::client::load_pem_certs(&pem)
        .map(drop)
        .map_err(|e| format!("CA file {}: {e}", path.display()))
}

async fn hash_file(path: &Path) -> Option<String> {
    let mut f = tokio::fs::File::open(path).await.ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await.ok()?;
        if n == 0 {
            return Some(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// A token bucket shared by every fetch of an update: at most `rate` bytes per
/// second on average, with bursts of one second's worth.
pub struct Throttle {
    rate: f64,
    state: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec as f64;
        Self {
            rate,
            state: std::sync::Mutex::new((rate, tokio::time::Instant::now())),
        }
    }

    /// Takes `n` bytes' worth of tokens; returns how long to wait before the next
    /// read to stay under the rate.
    pub fn take(&self, n: usize) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.rate) - n as f64;
        st.1 = now;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_name_that_is_not_a_sha256_never_becomes_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let dl = Downloader::new(&dir.path().join("cache"), &[], None).unwrap();
        for bad in ["../../escape", "/etc/passwd", &"A".repeat(64), ""] {
            let e = dl.stage(&b"x"[..], bad).await.unwrap_err();
            assert!(e.contains("is not a sha256"), "{e}");
            let e = dl
                .fetch(
                    "http://127.0.0.1:9/x",
                    bad,
                    None,
                    &AtomicU64::new(0),
                    None,
                    &Budget {
                        limit: 0,
                        used: AtomicU64::new(0),
                    },
                )
                .await
                .unwrap_err();
            assert!(e.contains("is not a sha256"), "{e}");
        }
        assert!(!dir.path().join("escape").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_keeps_the_average_rate() {
        let t = Throttle::new(1000);
        // One second of burst is free, then every 500 bytes cost half a second.
        assert_eq!(t.take(1000), Duration::ZERO);
        assert_eq!(t.take(500), Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(t.take(500), Duration::from_millis(500));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            t.take(1000),
            Duration::ZERO,
            "idle time refills up to one second's worth"
        );
        assert_eq!(t.take(1), Duration::from_millis(1));
    }
}
