//! The settings of a `pantahub` backend.

use std::path::PathBuf;
use std::time::Duration;

use pv_adapter_api::read_secret;
use serde::Deserialize;

use crate::creds::Creds;

/// Settings of a `pantahub` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PantahubConfig {
    /// The hub's API (`https://host[:port]`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Allow `http://` (tests, a hub on the same host).
    #[serde(default)]
    pub insecure: bool,
    /// Extra trust anchor (PEM), added to the system's.
    pub ca_file: Option<PathBuf>,
    /// The device's credentials (Pantavisor's `pantahub.config` format). Absent:
    /// register and keep them in the adapter's state directory.
    pub credentials_file: Option<PathBuf>,
    /// Auto-claim token sent at registration.
    pub autotok_file: Option<PathBuf>,
    /// HTTP proxy (`http://host:port`); default `HTTPS_PROXY`/`HTTP_PROXY`, with
    /// `NO_PROXY` honoured.
    pub proxy: Option<String>,
    /// Seconds between polls for steps (and while waiting for the claim).
    #[serde(default = "default_poll")]
    pub poll_interval_secs: f64,
    /// Seconds between user-meta polls.
    #[serde(default = "default_usermeta")]
    pub user_meta_interval_secs: f64,
    /// Least seconds between device-meta uploads.
    #[serde(default = "default_devmeta")]
    pub device_meta_interval_secs: f64,
    /// Least seconds between two progress reports of the same status.
    #[serde(default = "default_progress")]
    pub progress_interval_secs: f64,
    /// Seconds a call may take before it counts as unanswered.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: f64,
    /// Largest answer accepted from the hub (Pantavisor: 2 MiB).
    #[serde(default = "default_max_body")]
    pub max_response_bytes: usize,
    /// Takes of one hub revision before it is refused WONTGO "Max update
    /// processing retries reached" (Pantavisor's `PV_REVISION_RETRIES`).
    #[serde(default = "default_retries")]
    pub revision_retries: u32,
}

fn default_url() -> String {
    "https://api.pantahub.com".into()
}
fn default_poll() -> f64 {
    5.0
}
fn default_usermeta() -> f64 {
    5.0
}
fn default_devmeta() -> f64 {
    10.0
}
fn default_progress() -> f64 {
    6.0
}
fn default_timeout() -> f64 {
    60.0
}
fn default_retries() -> u32 {
    10
}
fn default_max_body() -> usize {
    2 * 1024 * 1024
}

pub(crate) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.05, 86_400.0))
}

impl PantahubConfig {
    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), String> {
        let u = self.url.as_str();
        let rest = if let Some(r) = u.strip_prefix("https://") {
            r
        } else if let Some(r) = u.strip_prefix("http://") {
            if !self.insecure {
                return Err(format!(
                    "url {u:?}: plain http needs insecure = true (Pantavisor only talks TLS to the hub)"
                ));
            }
            r
        } else {
            return Err(format!("url {u:?}: must start with https://"));
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!(
                "url {u:?}: give the scheme, host and optional port only"
            ));
        }
        for (k, v) in [
            ("poll_interval_secs", self.poll_interval_secs),
            ("user_meta_interval_secs", self.user_meta_interval_secs),
            ("device_meta_interval_secs", self.device_meta_interval_secs),
            ("progress_interval_secs", self.progress_interval_secs),
            ("request_timeout_secs", self.request_timeout_secs),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{k} must be a positive number of seconds"));
            }
        }
        if !(2..=1000).contains(&self.revision_retries) {
            return Err(format!(
                "revision_retries must be between 2 and 1000, got {}",
                self.revision_retries
            ));
        }
        if self.max_response_bytes < 64 * 1024 {
            return Err("max_response_bytes must be at least 65536".into());
        }
        if let Some(p) = &self.credentials_file
            && let Err(e) = Creds::load(p)
        {
            return Err(format!("credentials_file: {e}"));
        }
        if let Some(p) = &self.autotok_file {
            read_secret("autotok_file", p).map_err(|e| e.to_string())?;
        }
        if let Some(p) = &self.ca_file {
            std::fs::read(p).map_err(|e| format!("ca_file: cannot read {}: {e}", p.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> PantahubConfig {
        let v: toml_crate::Table = toml_text.parse().unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn config_needs_tls_unless_insecure() {
        let c = cfg("url = \"http://127.0.0.1:1\"\n");
        assert!(c.validate().unwrap_err().contains("insecure = true"));
        let c = cfg("url = \"http://127.0.0.1:1\"\ninsecure = true\n");
        c.validate().unwrap();
        let c = cfg("url = \"ftp://x\"\n");
        assert!(
            c.validate()
                .unwrap_err()
                .contains("must start with https://")
        );
        let c = cfg("url = \"https://h/api\"\n");
        assert!(
            c.validate()
                .unwrap_err()
                .contains("host and optional port only")
        );
        assert_eq!(cfg("").url, "https://api.pantahub.com");
    }
}
