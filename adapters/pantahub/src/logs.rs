//! Logs: `POST /logs/` in batches.

use std::time::Duration;

use pv_adapter_api::LogRecord;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::Hub;
use crate::client::{Method, status_error};

impl Hub {
    pub(crate) async fn logs(self) {
        const MAX_ENTRIES: usize = 200;
        const MAX_BYTES: usize = 256 * 1024;
        let mut dropped_total = 0u64;
        loop {
            // Leave room for the JSON around each message.
            let Some(batch) = self.link.next_logs(MAX_ENTRIES, MAX_BYTES / 2).await else {
                return;
            };
            if batch.dropped > 0 {
                warn!(backend = %self.link.backend(), dropped = batch.dropped, "log lines were dropped before reaching this backend");
            }
            // Each line under the revision whose log directory it came from (a
            // failed try revision's lines stay under it after the rollback), in
            // the hub's numbering when it is one of the hub's.
            let running = self.link.view().borrow().running.clone();
            let hub_name = |r: &str| {
                self.hub_rev(r)
                    .map_or_else(|| r.to_owned(), |n| n.to_string())
            };
            let fallback = running.as_deref().map(hub_name).unwrap_or_default();
            let entries: Vec<Value> = batch
                .records
                .iter()
                .map(|r| {
                    if r.rev.is_empty() {
                        entry(r, &fallback)
                    } else {
                        entry(r, &hub_name(&r.rev))
                    }
                })
                .collect();
            for chunk in chunks(&entries, MAX_ENTRIES, MAX_BYTES) {
                dropped_total += self.post_logs(chunk).await;
            }
            if dropped_total > 0 {
                debug!(dropped_total, "log entries refused by the hub so far");
            }
            self.link.ack_logs(batch.next);
        }
    }

    /// Posts one batch until the hub takes it; a batch it refuses is sent entry by
    /// entry and the refused entries are dropped. Returns how many were dropped.
    pub(crate) async fn post_logs(&self, chunk: &[Value]) -> u64 {
        let mut wait = Duration::from_secs(1);
        loop {
            let body = Value::Array(chunk.to_vec()).to_string().into_bytes();
            match self.client.call(Method::POST, "/logs/", Some(body)).await {
                Ok(r) if r.status == 200 => return 0,
                Ok(r) if matches!(r.status, 401 | 403 | 408 | 429) || r.status >= 500 => {
                    debug!(status = r.status, retry_in = ?wait, "log batch not taken; backing off");
                }
                Ok(r) => {
                    warn!(backend = %self.link.backend(), error = %status_error("POST /logs/", &r), entries = chunk.len(), "the hub refused a log batch; sending its entries one by one");
                    let mut dropped = 0;
                    for e in chunk {
                        if chunk.len() == 1 {
                            dropped += 1;
                            break;
                        }
                        dropped += Box::pin(self.post_logs(std::slice::from_ref(e))).await;
                    }
                    if chunk.len() == 1 {
                        warn!(backend = %self.link.backend(), "dropping a log entry the hub refuses");
                    }
                    return dropped;
                }
                Err(e) => debug!(error = %e, retry_in = ?wait, "cannot post logs; backing off"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }
}

/// One hub log entry.
fn entry(r: &LogRecord, rev: &str) -> Value {
    json!({
        "tsec": r.tsec, "tnano": r.tnano, "lvl": r.lvl, "src": r.src,
        "plat": r.plat, "rev": rev, "msg": r.msg,
    })
}

/// Splits entries into batches of at most `max_entries` and `max_bytes` of JSON.
fn chunks(entries: &[Value], max_entries: usize, max_bytes: usize) -> Vec<&[Value]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 2;
    for (i, e) in entries.iter().enumerate() {
        let n = e.to_string().len() + 1;
        if i > start && (i - start >= max_entries || bytes + n > max_bytes) {
            out.push(&entries[start..i]);
            start = i;
            bytes = 2;
        }
        bytes += n;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_batches_respect_both_limits() {
        let small: Vec<Value> = (0..450).map(|i| json!({"msg": i})).collect();
        let c = chunks(&small, 200, 256 * 1024);
        assert_eq!(
            c.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![200, 200, 50]
        );
        let big: Vec<Value> = (0..10)
            .map(|_| json!({"msg": "x".repeat(100 * 1024)}))
            .collect();
        for c in chunks(&big, 200, 256 * 1024) {
            assert!(Value::Array(c.to_vec()).to_string().len() <= 256 * 1024);
            assert!(!c.is_empty());
        }
    }
}
