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

/// The spool as adapters see it.
pub struct Feed {
    spool: Mutex<spool::Spool>,
    fresh: Notify,
}

impl Feed {
    fn spool(&self) -> std::sync::MutexGuard<'_, spool::Spool> {
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
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
                match self.spool().read(&backend, max_records, max_bytes) {
                    Ok(b) if !b.records.is_empty() || b.dropped > 0 => return b,
                    Ok(_) => {}
                    Err(e) => warn!(backend = %backend, error = %e, "cannot read the log spool"),
                }
                fresh.await;
            }
        })
    }

    fn ack(&self, backend: &str, next: u64) {
        self.spool().ack(backend, next);
    }
}

/// Opens the spool for `backends` and returns the feed and the tailing task.
pub fn start(
    logs_root: &Path,
    state_dir: &Path,
    backends: &[String],
    opts: LogOptions,
) -> std::io::Result<(Arc<Feed>, impl std::future::Future<Output = ()> + use<>)> {
    let spool = spool::Spool::open(&state_dir.join("spool"), opts.spool.clone(), backends)?;
    let feed = Arc::new(Feed {
        spool: Mutex::new(spool),
        fresh: Notify::new(),
    });
    let cursors: PathBuf = state_dir.join("logs/cursors.json");
    let mut tailer = tail::Tailer::new(logs_root, &cursors, opts.rate);
    let f = feed.clone();
    let task = async move {
        let mut tick = tokio::time::interval(opts.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            let poll = tailer.poll();
            if poll.records.is_empty() && poll.dropped == 0 {
                continue;
            }
            if poll.dropped > 0 {
                info!(
                    dropped = poll.dropped,
                    "log lines over the rate limit were dropped"
                );
            }
            let stored = {
                let mut s = f.spool();
                s.note_dropped(poll.dropped);
                s.append(poll.records).and_then(|_| s.flush())
            };
            match stored {
                // Cursors move only once the records are durable: at-least-once.
                Ok(()) => {
                    if let Err(e) = tailer.save() {
                        warn!(error = %e, "cannot save log cursors");
                    }
                    warned = false;
                }
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
