//! How often device-meta reaches each backend (`[metadata]` in
//! `docs/configuration.md`, the cost figures in `docs/performance.md`).
//!
//! Every message to a cloud is billed or metered somewhere, and Pantavisor's
//! device-meta changes on every read: `sysinfo` (uptime, free memory, loads),
//! `time` and `storage` move all the time. So a backend gets device-meta
//!
//! - when a key that matters changed (anything but the volatile keys), at most
//!   once per `device_meta_min_interval_secs` (changes in between are coalesced
//!   and sent together when the interval has passed);
//! - when only volatile keys changed, at most once per
//!   `device_meta_volatile_interval_secs`;
//!
//! always as the whole current map, so the volatile values a backend sees are at
//! most one volatile interval old.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The policy of one backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min_interval: Duration,
    pub volatile_interval: Duration,
    /// Key names, or prefixes ending in `*`.
    pub volatile_keys: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(10),
            volatile_interval: Duration::from_secs(600),
            volatile_keys: default_volatile_keys(),
        }
    }
}

/// Pantavisor's keys whose values change on every read (`metadata.c`).
pub fn default_volatile_keys() -> Vec<String> {
    ["sysinfo", "time", "storage"].map(String::from).to_vec()
}

impl Policy {
    fn is_volatile(&self, key: &str) -> bool {
        self.volatile_keys
            .iter()
            .any(|v| match v.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => key == v,
            })
    }

    /// Whether `a` and `b` differ in a key that is not volatile.
    fn differs_in_what_matters(
        &self,
        a: &BTreeMap<String, Value>,
        b: &BTreeMap<String, Value>,
    ) -> bool {
        let changed = |x: &BTreeMap<String, Value>, y: &BTreeMap<String, Value>| {
            x.iter()
                .any(|(k, v)| !self.is_volatile(k) && y.get(k) != Some(v))
        };
        changed(a, b) || changed(b, a)
    }
}

/// What one backend was last given.
#[derive(Debug, Default)]
pub struct Forwarder {
    sent: Option<BTreeMap<String, Value>>,
    sent_at: Option<Instant>,
}

impl Forwarder {
    /// Whether `current` goes to the backend now; if so, it is recorded as sent.
    pub fn offer(
        &mut self,
        policy: &Policy,
        current: &BTreeMap<String, Value>,
        now: Instant,
    ) -> bool {
        let Some(sent) = &self.sent else {
            return self.record(current, now);
        };
        if sent == current {
            return false;
        }
        let since = self
            .sent_at
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        let due = if policy.differs_in_what_matters(sent, current) {
            since >= policy.min_interval
        } else {
            since >= policy.volatile_interval
        };
        due && self.record(current, now)
    }

    fn record(&mut self, current: &BTreeMap<String, Value>, now: Instant) -> bool {
        self.sent = Some(current.clone());
        self.sent_at = Some(now);
        true
    }

    /// Forgets what was sent: the next offer goes (a resync).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(rev: &str, uptime: u64) -> BTreeMap<String, Value> {
        [
            ("pantavisor.revision", json!(rev)),
            ("sysinfo", json!(format!("{{\"uptime\":{uptime}}}"))),
            ("time", json!(uptime)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    #[test]
    fn volatile_changes_wait_their_interval_and_real_ones_go_soon() {
        let p = Policy::default();
        let mut f = Forwarder::default();
        let t0 = Instant::now();
        assert!(f.offer(&p, &meta("1", 0), t0), "the first map goes at once");
        // An idle hour of 10 s reads: only the volatile keys move.
        let sent: usize = (1..=360)
            .filter(|i| f.offer(&p, &meta("1", i * 10), t0 + Duration::from_secs(i * 10)))
            .count();
        assert_eq!(sent, 6, "one volatile update per 10 minutes");
        // A new revision goes within the minimum interval, with fresh volatile values.
        let t = t0 + Duration::from_secs(3605);
        assert!(
            !f.offer(&p, &meta("2", 3605), t),
            "less than 10 s after the last"
        );
        assert!(f.offer(&p, &meta("2", 3610), t + Duration::from_secs(5)));
        assert!(
            !f.offer(&p, &meta("2", 3610), t + Duration::from_secs(60)),
            "nothing new"
        );
        f.reset();
        assert!(
            f.offer(&p, &meta("2", 3610), t + Duration::from_secs(61)),
            "a resync sends"
        );
    }

    #[test]
    fn keys_added_or_removed_matter_and_prefixes_match() {
        let p = Policy {
            volatile_keys: vec!["net.*".into()],
            ..Policy::default()
        };
        let mut f = Forwarder::default();
        let t0 = Instant::now();
        let mut m = BTreeMap::new();
        m.insert("a".to_owned(), json!(1));
        assert!(f.offer(&p, &m, t0));
        m.insert("net.rx".to_owned(), json!(5));
        assert!(
            !f.offer(&p, &m, t0 + Duration::from_secs(60)),
            "a volatile key appeared"
        );
        m.remove("a");
        assert!(
            f.offer(&p, &m, t0 + Duration::from_secs(61)),
            "a key that matters went away"
        );
    }
}
