//! Logs as D2C messages: batched, acked to the engine after the PUBACK, counted
//! for the twin at most hourly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tracing::{debug, warn};

use super::Shared;
use crate::{identity, logs};

/// The log sender's counters, published to the twin at most hourly.
#[derive(Debug, Default)]
pub(super) struct LogState {
    /// Messages delivered, records dropped, KiB used today.
    counters: (u64, u64, u64),
    published: (u64, u64, u64),
    published_at: Option<Instant>,
    /// When the last log message was delivered.
    sent_at: Option<Instant>,
}

impl Shared {
    fn log_state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.log_state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the log counters; they reach the twin at most every
    /// [`LOG_COUNTERS_EVERY`], except the first drop since the last publication,
    /// which goes at once (an operator wants to know logs are being lost).
    fn log_counters(&self, change: impl FnOnce(&mut (u64, u64, u64))) {
        let publish = {
            let mut st = self.log_state();
            change(&mut st.counters);
            let first_drop = st.counters.1 > st.published.1 && st.published.1 == 0;
            let due = st
                .published_at
                .is_none_or(|t| t.elapsed() >= LOG_COUNTERS_EVERY);
            (first_drop || due) && st.counters != st.published
        };
        if publish {
            self.publish_log_counters();
        }
    }

    fn publish_log_counters(&self) {
        let counters = {
            let mut st = self.log_state();
            st.published = st.counters;
            st.published_at = Some(Instant::now());
            st.counters
        };
        self.extra.send_if_modified(|x| {
            let changed = x.logs != counters;
            x.logs = counters;
            changed
        });
    }
}

/// Splits records into message bodies below the hub's limit.
pub(super) fn bodies(
    records: &[pv_adapter_api::LogRecord],
    rev: Option<&str>,
) -> Vec<(usize, Vec<u8>)> {
    let b = logs::body(records, rev);
    if b.len() <= logs::MAX_MESSAGE - 1024 || records.len() <= 1 {
        if b.len() > logs::MAX_MESSAGE - 1024 {
            // One record larger than a message: cut its text.
            let mut r = records[0].clone();
            let keep = (logs::MAX_MESSAGE - 4096).min(r.msg.len());
            let mut end = keep;
            while !r.msg.is_char_boundary(end) {
                end -= 1;
            }
            r.msg.truncate(end);
            r.msg.push_str(" …[cut]");
            return vec![(1, logs::body(&[r], rev))];
        }
        return vec![(records.len(), b)];
    }
    let (a, z) = records.split_at(records.len() / 2);
    let mut out = bodies(a, rev);
    out.extend(bodies(z, rev));
    out
}

/// How often the log counters in the reported twin move (each reported patch is
/// billed): hourly, or at once for the first dropped record of a day.
const LOG_COUNTERS_EVERY: Duration = Duration::from_secs(3600);

/// Sends the engine's log records as D2C messages, one at a time, each acked
/// to the engine only after the hub's PUBACK. Lines that trickle in are held
/// until `log_interval_secs` passed since the last message or a message is full:
/// every message is billed, a line a minute would otherwise cost 1 440 a day.
pub(super) async fn log_sender(sh: Arc<Shared>, work: PathBuf) {
    let mut budget = logs::Budget::load(&work.join("log-budget.json"));
    let mut carried_drop = 0u64;
    let mut warned_day = None;
    let mut pubacks = sh.pubacks.subscribe();
    let hold = Duration::from_secs(sh.cfg.log_interval_secs);
    loop {
        let next = sh.link.next_logs(4000, sh.cfg.log_batch_bytes);
        let batch = match tokio::time::timeout(LOG_COUNTERS_EVERY, next).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(_) => {
                // Quiet for an hour: counters held back reach the twin now.
                let held = {
                    let st = sh.log_state();
                    st.counters != st.published
                };
                if held {
                    sh.publish_log_counters();
                }
                continue;
            }
        };
        let bytes: usize = batch.records.iter().map(|r| r.msg.len() + 96).sum();
        let since = sh
            .log_state()
            .sent_at
            .map_or(Duration::MAX, |t| t.elapsed());
        if bytes < sh.cfg.log_batch_bytes / 2 && since < hold {
            // Not acked: the same records, and more, come back after the wait.
            tokio::time::sleep(hold - since).await;
            continue;
        }
        let rev = sh.link.view().borrow().running.clone();
        carried_drop += batch.dropped;
        for (n, body) in bodies(&batch.records, rev.as_deref()) {
            let payload = if sh.cfg.log_gzip {
                logs::gzip(&body)
            } else {
                body
            };
            let now = identity::unix_now();
            if !budget.allows(payload.len(), sh.cfg.log_budget_kib_per_day, now) {
                if warned_day != Some(budget.day) {
                    warn!(backend = %sh.name, budget_kib = sh.cfg.log_budget_kib_per_day,
                        "daily log budget spent: log records are dropped until midnight UTC");
                    warned_day = Some(budget.day);
                }
                carried_drop += n as u64;
                sh.log_counters(|c| c.1 += n as u64);
                continue;
            }
            let props = logs::properties(sh.cfg.log_gzip, carried_drop);
            let props: Vec<(&str, &str)> = props.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let topic = sh.topics.d2c(&props);
            let before = *pubacks.borrow_and_update();
            let len = payload.len();
            if sh
                .client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
            let acked =
                tokio::time::timeout(Duration::from_secs(60), pubacks.wait_for(|n| *n > before))
                    .await;
            if !matches!(acked, Ok(Ok(_))) {
                debug!(backend = %sh.name, "no PUBACK for a log message; sent again after reconnecting");
                return;
            }
            budget.spend(len, now);
            carried_drop = 0;
            sh.log_state().sent_at = Some(Instant::now());
            let used = budget.used_kib();
            sh.log_counters(|c| {
                c.0 += 1;
                c.2 = used;
            });
        }
        sh.link.ack_logs(batch.next);
    }
}
