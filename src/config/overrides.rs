//! Non-secret settings changed from the device's user-meta: keys
//! `pv-bridge.config.<section>.<key>` (and `pv-bridge.config.backend.<name>.<key>`),
//! read once at start. A fleet operator can tune log rates or switch a backend's
//! logs off from the cloud without a new revision; secrets, endpoints and paths
//! can only come from the configuration file.

use super::Config;

/// The user-meta prefix of configuration overrides.
pub const PREFIX: &str = "pv-bridge.config.";

/// The settings user-meta may change.
pub const ALLOWED: &[&str] = &[
    "updates.concurrency",
    "updates.bandwidth_limit",
    "updates.max_update_bytes",
    "updates.poll_interval_ms",
    "logs.enabled",
    "logs.poll_interval_ms",
    "logs.rate_per_sec",
    "logs.burst",
    "metadata.device_meta_interval_ms",
    "metadata.user_meta_interval_ms",
    "backend.<name>.priority",
    "backend.<name>.updates",
    "backend.<name>.user_meta",
    "backend.<name>.device_meta",
    "backend.<name>.logs",
];

fn whole(key: &str, v: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = v
        .parse()
        .map_err(|_| format!("{key}: {v:?} is not a whole number"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("{key}: {n} is not within {min}..={max}"));
    }
    Ok(n)
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{key}: {v:?} is not true or false")),
    }
}

fn positive(key: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("{key}: {v:?} is not a positive number")),
    }
}

impl Config {
    /// Applies one override (`key` without the prefix). On error nothing changes.
    pub fn apply_override(&mut self, key: &str, value: &str) -> Result<(), String> {
        let v = value.trim();
        match key {
            "updates.concurrency" => self.updates.concurrency = whole(key, v, 1, 64)? as usize,
            "updates.bandwidth_limit" => self.updates.bandwidth_limit = whole(key, v, 0, u64::MAX)?,
            "updates.max_update_bytes" => {
                self.updates.max_update_bytes = whole(key, v, 0, u64::MAX)?
            }
            "updates.poll_interval_ms" => {
                self.updates.poll_interval_ms = whole(key, v, 50, 3_600_000)?
            }
            "logs.enabled" => self.logs.enabled = boolean(key, v)?,
            "logs.poll_interval_ms" => self.logs.poll_interval_ms = whole(key, v, 50, 3_600_000)?,
            "logs.rate_per_sec" => self.logs.rate_per_sec = positive(key, v)?,
            "logs.burst" => self.logs.burst = positive(key, v)?,
            "metadata.device_meta_interval_ms" => {
                self.metadata.device_meta_interval_ms = whole(key, v, 100, 86_400_000)?
            }
            "metadata.user_meta_interval_ms" => {
                self.metadata.user_meta_interval_ms = whole(key, v, 100, 86_400_000)?
            }
            _ => {
                let Some(rest) = key.strip_prefix("backend.") else {
                    return Err(not_allowed(key));
                };
                let Some((name, setting)) = rest.rsplit_once('.') else {
                    return Err(not_allowed(key));
                };
                let Some(b) = self.backends.iter_mut().find(|b| b.name.get_ref() == name) else {
                    return Err(format!("{key}: no backend named {name:?}"));
                };
                match setting {
                    "priority" => {
                        b.priority = v
                            .parse()
                            .map_err(|_| format!("{key}: {v:?} is not a whole number"))?
                    }
                    "updates" => b.updates = boolean(key, v)?,
                    "user_meta" => b.user_meta = boolean(key, v)?,
                    "device_meta" => b.device_meta = boolean(key, v)?,
                    "logs" => b.logs = boolean(key, v)?,
                    _ => return Err(not_allowed(key)),
                }
            }
        }
        Ok(())
    }

    /// Applies every `pv-bridge.config.*` key of a user-meta map. Returns what was
    /// applied (`key = value`) and what was refused (with the reason); a refused
    /// override changes nothing.
    pub fn apply_user_meta<'a>(
        &mut self,
        meta: impl IntoIterator<Item = (&'a String, &'a serde_json::Value)>,
    ) -> (Vec<String>, Vec<String>) {
        let mut applied = Vec::new();
        let mut refused = Vec::new();
        for (k, v) in meta {
            let Some(key) = k.strip_prefix(PREFIX) else {
                continue;
            };
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match self.apply_override(key, &text) {
                Ok(()) => applied.push(format!("{key} = {}", text.trim())),
                Err(e) => refused.push(e),
            }
        }
        (applied, refused)
    }
}

fn not_allowed(key: &str) -> String {
    format!(
        "{key}: not a setting user-meta may change (only: {})",
        ALLOWED.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overrides_change_only_non_secret_settings_and_refuse_bad_values() {
        let mut c = Config::parse(
            std::path::Path::new("c.toml"),
            "[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"/m\"\n",
        )
        .unwrap();
        let meta: std::collections::BTreeMap<String, serde_json::Value> = [
            ("pv-bridge.config.logs.rate_per_sec", json!("50")),
            ("pv-bridge.config.updates.concurrency", json!(2)),
            ("pv-bridge.config.backend.usb.logs", json!("false")),
            ("pv-bridge.config.updates.concurrency2", json!("1")),
            ("pv-bridge.config.logs.burst", json!("-1")),
            ("pv-bridge.config.backend.cloud.logs", json!("false")),
            ("pv-bridge.config.bridge.state_dir", json!("/tmp")),
            ("some.other.key", json!("x")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let (applied, refused) = c.apply_user_meta(&meta);
        assert_eq!(
            applied,
            vec![
                "backend.usb.logs = false",
                "logs.rate_per_sec = 50",
                "updates.concurrency = 2"
            ]
        );
        assert_eq!(c.logs.rate_per_sec, 50.0);
        assert_eq!(c.updates.concurrency, 2);
        assert!(!c.backends[0].logs);
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(
            refused
                .iter()
                .any(|r| r.starts_with("bridge.state_dir: not a setting"))
        );
        assert!(
            refused
                .iter()
                .any(|r| r == "backend.cloud.logs: no backend named \"cloud\"")
        );
        assert!(
            refused
                .iter()
                .any(|r| r == "logs.burst: \"-1\" is not a positive number")
        );
        assert_eq!(
            c.logs.burst,
            Config::parse(std::path::Path::new("c"), "")
                .unwrap()
                .logs
                .burst
        );
    }
}
