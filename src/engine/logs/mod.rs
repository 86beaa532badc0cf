//! The log pipeline (architecture.md §4): Pantavisor's log tree → records → a
//! bounded on-disk spool → each backend, acknowledged (at-least-once).

pub mod parse;
pub mod spool;
pub mod tail;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pv_adapter_api::{BoxFuture, LogBatch, LogFeed};
use tokio::sync::Notify;
use tracing::{info, warn};

/// Revisions whose logs the tailer reads once more besides the running one: the
/// update coordinator adds one that failed, whose try boot wrote logs the bridge
/// may never have read before the rollback.
pub type LogRequests = Arc<Mutex<std::collections::BTreeSet<String>>>;

/// Settings of the log pipeline.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub poll_interval: Duration,
    pub rate: tail::Rate,
    pub spool: spool::SpoolOptions,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            rate: tail::Rate {
                per_sec: 200.0,
                burst: 1000.0,
            },
            spool: spool::SpoolOptions::default(),
        }
    }
}

/// The spool as adapters see it. Every touch of the spool's files (reads,
/// appends, fsyncs) runs on tokio's blocking pool, never on the reactor thread that
/// moves update bytes: on slow flash an fsync can take longer than gen-1 pv-ctrl
/// waits for the next piece of an upload (1 s).
pub struct Feed {
    spool: Arc<Mutex<spool::Spool>>,
    /// Acknowledgements not yet applied to the spool: `ack` is called on the
    /// reactor and must not wait for a lock held across file I/O. Held only to
    /// push or take.
    acks: Mutex<Vec<(String, u64)>>,
    fresh: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Feed {
    fn take_acks(&self) -> Vec<(String, u64)> {
        std::mem::take(&mut *lock(&self.acks))
    }
}

impl LogFeed for Feed {
    fn next(&self, backend: &str, max_records: usize, max_bytes: usize) -> BoxFuture<'_, LogBatch> {
        let backend = backend.to_owned();
        Box::pin(async move {
            loop {
                let fresh = self.fresh.notified();
                tokio::pin!(fresh);
                fresh.as_mut().enable();
                let (spool, acks, b) = (self.spool.clone(), self.take_acks(), backend.clone());
                let read = tokio::task::spawn_blocking(move || {
                    let mut s = lock(&spool);
                    for (backend, next) in acks {
                        s.ack(&backend, next);
                    }
                    s.read(&b, max_records, max_bytes)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(mut b) if !b.records.is_empty() || b.dropped > 0 => {
                        // A secret the bridge showed in its own console (a claim
                        // challenge) never leaves the device through a backend.
                        for r in &mut b.records {
                            if let std::borrow::Cow::Owned(m) =
                                pv_adapter_api::secrets::scrub(&r.msg)
                            {
                                r.msg = m;
                            }
                        }
                        return b;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(backend = %backend, error = %e, "cannot read the log spool"),
                }
                fresh.await;
            }
        })
    }

    fn ack(&self, backend: &str, next: u64) {
        lock(&self.acks).push((backend.to_owned(), next));
    }
}

/// Opens the spool for `backends` and returns the feed and the tailing task.
pub fn start(
    logs_root: &Path,
    state_dir: &Path,
    backends: &[String],
    opts: LogOptions,
    requests: LogRequests,
) -> std::io::Result<(Arc<Feed>, impl std::future::Future<Output = ()> + use<>)> {
    let spool = spool::Spool::open(&state_dir.join("spool"), opts.spool.clone(), backends)?;
    let feed = Arc::new(Feed {
        spool: Arc::new(Mutex::new(spool)),
        acks: Mutex::new(Vec::new()),
        fresh: Notify::new(),
    });
    let cursors: PathBuf = state_dir.join("logs/cursors.json");
    let tailer = tail::Tailer::new(logs_root, &cursors, opts.rate).with_requests(requests);
    let f = feed.clone();
    let task = async move {
        let mut tick = tokio::time::interval(opts.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        let mut tailer = Some(tailer);
        loop {
            tick.tick().await;
            let Some(mut t) = tailer.take() else { return };
            let feed = f.clone();
            let turn = tokio::task::spawn_blocking(move || {
                let out = tail_once(&mut t, &feed);
                (t, out)
            })
            .await;
            let (t, out) = match turn {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "the log tailer stopped");
                    return;
                }
            };
            tailer = Some(t);
            match out {
                Ok(0) => continue,
                Ok(_) => warned = false,
                Err(e) if !warned => {
                    warn!(error = %e, "cannot write the log spool");
                    warned = true;
                }
                Err(_) => {}
            }
            f.fresh.notify_waiters();
        }
    };
    Ok((feed, task))
}

/// One turn of the tailer, on the blocking pool: new lines into the spool (made
/// durable), then the cursors, and the acknowledgements gathered since the last
/// turn. Returns how many records and drops were spooled.
fn tail_once(tailer: &mut tail::Tailer, feed: &Feed) -> std::io::Result<u64> {
    let poll = tailer.poll();
    let mut s = lock(&feed.spool);
    for (backend, next) in feed.take_acks() {
        s.ack(&backend, next);
    }
    if let Err(e) = s.save_ledger() {
        warn!(error = %e, "cannot save the log spool ledger");
    }
    let n = poll.records.len() as u64 + poll.dropped;
    if n == 0 {
        return Ok(0);
    }
    if poll.dropped > 0 {
        info!(
            dropped = poll.dropped,
            "log lines over the rate limit were dropped"
        );
    }
    s.note_dropped(poll.dropped);
    s.append(poll.records)?;
    s.flush()?;
    drop(s);
    // Cursors move only once the records are durable: at-least-once.
    if let Err(e) = tailer.save() {
        warn!(error = %e, "cannot save log cursors");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Instant;

    /// While the spool is busy with file work on another thread (an fsync on slow
    /// flash, simulated by holding its lock), the reactor thread keeps running:
    /// `ack` returns at once and `next` waits off the reactor.
    #[tokio::test(flavor = "current_thread")]
    async fn spool_work_never_blocks_the_reactor() {
        let dir = tempfile::tempdir().unwrap();
        let backends = vec!["b".to_owned()];
        let spool = spool::Spool::open(dir.path(), Default::default(), &backends).unwrap();
        let feed = Arc::new(Feed {
            spool: Arc::new(Mutex::new(spool)),
            acks: Mutex::new(Vec::new()),
            fresh: Notify::new(),
        });
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let busy = {
            let spool = feed.spool.clone();
            std::thread::spawn(move || {
                let _g = lock(&spool);
                held_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
            })
        };
        held_rx.recv().unwrap();
        // A task that must keep ticking, like an upload feeding pv-ctrl.
        let ticker = tokio::spawn(async {
            let mut worst = Duration::ZERO;
            let mut last = Instant::now();
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                worst = worst.max(last.elapsed());
                last = Instant::now();
            }
            worst
        });
        let t = Instant::now();
        feed.ack("b", 0);
        assert!(t.elapsed() < Duration::from_millis(100), "ack waited");
        let next = tokio::time::timeout(Duration::from_millis(1000), feed.next("b", 10, 1 << 20));
        assert!(next.await.is_err(), "nothing to read yet");
        let worst = ticker.await.unwrap();
        assert!(
            worst < Duration::from_millis(500),
            "the reactor stalled for {worst:?}"
        );
        busy.join().unwrap();
    }
}
