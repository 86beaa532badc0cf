//! Settings of a `hawkbit` backend.
//!
//! ```toml
//! [[backend]]
//! type = "hawkbit"
//! name = "hawkbit"
//! url = "https://hawkbit.example.com"
//! tenant = "DEFAULT"
//! controller_id = "gw-0042"            # default: /etc/machine-id, else the host name
//! target_token_file = "/etc/pv-bridge/hawkbit.token"
//! hw_boardname = "imx8mm-evk"          # attributes servers match software by
//! hw_revision = "1.0"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Settings of a `hawkbit` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HawkbitConfig {
    /// The server, e.g. `https://hawkbit.example.com` (DDI lives under
    /// `<url>/<tenant>/controller/v1/<controller_id>`). `http://` only with
    /// `insecure = true` or on a loopback address.
    pub url: String,
    /// hawkBit's tenant (single-tenant servers and goosebit: `DEFAULT`).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// The device's id on the server. Default: `/etc/machine-id`, else the
    /// host name.
    #[serde(default)]
    pub controller_id: Option<String>,
    /// The device's own token (`Authorization: TargetToken …`), read on every
    /// request so a rotated token needs no restart.
    #[serde(default)]
    pub target_token_file: Option<PathBuf>,
    /// The tenant's gateway token (`Authorization: GatewayToken …`): for
    /// gateways and tests; one token that acts for every device.
    #[serde(default)]
    pub gateway_token_file: Option<PathBuf>,
    /// PEM trust anchors besides the system's, for the API and artifacts.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `http://host:port` (CONNECT); default `HTTPS_PROXY`/`HTTP_PROXY` with
    /// `NO_PROXY`.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Allows a plain `http://` server that is not on this host.
    #[serde(default)]
    pub insecure: bool,
    /// `hw_boardname` and `hw_revision` attributes (goosebit matches software
    /// to devices by them; hawkBit target filters can use them).
    #[serde(default)]
    pub hw_boardname: Option<String>,
    #[serde(default)]
    pub hw_revision: Option<String>,
    /// Device-meta keys sent as attributes (names, or prefixes ending in `*`).
    #[serde(default = "default_attributes")]
    pub attributes: Vec<String>,
    /// Poll interval until the server says (`config.polling.sleep`), and the
    /// longest wait between polls after errors.
    #[serde(default = "default_poll")]
    pub poll_interval_secs: u64,
    /// The shortest poll interval taken from a server.
    #[serde(default = "default_min_poll")]
    pub min_poll_interval_secs: u64,
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
    /// Largest API answer read (a deployment with many artifacts is a few KiB).
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
}

fn default_tenant() -> String {
    "DEFAULT".into()
}

fn default_attributes() -> Vec<String> {
    vec!["pantavisor.*".into()]
}

fn default_poll() -> u64 {
    300
}

fn default_min_poll() -> u64 {
    5
}

fn default_timeout() -> u64 {
    60
}

fn default_max_response() -> usize {
    1024 * 1024
}

/// How the device authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Target(PathBuf),
    Gateway(PathBuf),
    /// Anonymous: servers that do not check devices (goosebit's default,
    /// hawkBit with anonymous access).
    None,
}

fn loopback(url: &str) -> bool {
    pv_http::Url::parse(url)
        .map(|u| {
            u.host == "localhost"
                || u.host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
        .unwrap_or(false)
}

fn segment(what: &str, v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > 256
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        || v == "."
        || v == ".."
    {
        return Err(format!(
            "{what} must be 1 to 256 of A-Z a-z 0-9 - _ . :, got {v:?}"
        ));
    }
    Ok(())
}

impl HawkbitConfig {
    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), String> {
        let u = pv_http::Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if !u.https && !self.insecure && !loopback(&self.url) {
            return Err(format!(
                "url {:?} is plain http: the target token would cross the network in the clear; use https, or set insecure = true",
                self.url
            ));
        }
        segment("tenant", &self.tenant)?;
        if let Some(c) = &self.controller_id {
            segment("controller_id", c)?;
        }
        if self.target_token_file.is_some() && self.gateway_token_file.is_some() {
            return Err("set target_token_file or gateway_token_file, not both".into());
        }
        for (k, v) in [
            ("hw_boardname", &self.hw_boardname),
            ("hw_revision", &self.hw_revision),
        ] {
            if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > 128) {
                return Err(format!("{k} must be 1 to 128 characters"));
            }
        }
        if self.min_poll_interval_secs == 0 || self.poll_interval_secs == 0 {
            return Err("poll_interval_secs and min_poll_interval_secs must be 1 or more".into());
        }
        if self.request_timeout_secs == 0 {
            return Err("request_timeout_secs must be 1 or more".into());
        }
        if let Some(p) = &self.proxy {
            pv_http::Url::parse(p).map_err(|e| format!("proxy: {e}"))?;
        }
        Ok(())
    }

    pub fn auth(&self) -> Auth {
        match (&self.target_token_file, &self.gateway_token_file) {
            (Some(t), _) => Auth::Target(t.clone()),
            (None, Some(g)) => Auth::Gateway(g.clone()),
            (None, None) => Auth::None,
        }
    }

    /// The controller id: configured, else `/etc/machine-id`, else the host
    /// name.
    pub fn controller(&self) -> Result<String, String> {
        if let Some(c) = &self.controller_id {
            return Ok(c.clone());
        }
        controller_from(
            Path::new("/etc/machine-id"),
            Path::new("/proc/sys/kernel/hostname"),
        )
    }
}

fn controller_from(machine_id: &Path, hostname: &Path) -> Result<String, String> {
    for p in [machine_id, hostname] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if segment("controller id", s).is_ok() {
                return Ok(s.to_owned());
            }
        }
    }
    Err(format!(
        "no controller_id set, and neither {} nor {} gives one",
        machine_id.display(),
        hostname.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> HawkbitConfig {
        toml_like(url, "")
    }

    fn toml_like(url: &str, more: &str) -> HawkbitConfig {
        let v: serde_json::Value =
            serde_json::from_str(&format!("{{\"url\": \"{url}\"{more}}}")).unwrap();
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_checks() {
        let c = cfg("https://hawkbit.example.com");
        c.validate().unwrap();
        assert_eq!(c.tenant, "DEFAULT");
        assert_eq!(c.auth(), Auth::None);
        assert_eq!(c.attributes, ["pantavisor.*"]);
        cfg("http://127.0.0.1:60053").validate().unwrap();
        cfg("http://[::1]:60053").validate().unwrap();
        let e = cfg("http://hawkbit.lan").validate().unwrap_err();
        assert!(e.contains("insecure = true"), "{e}");
        toml_like("http://hawkbit.lan", ", \"insecure\": true")
            .validate()
            .unwrap();
        let both = toml_like(
            "https://h",
            ", \"target_token_file\": \"/t\", \"gateway_token_file\": \"/g\"",
        );
        assert!(both.validate().unwrap_err().contains("not both"));
        let bad = toml_like("https://h", ", \"controller_id\": \"a/b\"");
        assert!(bad.validate().unwrap_err().contains("controller_id"));
        assert!(
            toml_like("https://h", ", \"tenant\": \"\"")
                .validate()
                .unwrap_err()
                .contains("tenant")
        );
        assert!(cfg("ftp://h").validate().is_err());
    }

    #[test]
    fn the_controller_id_defaults_to_the_machine_id_then_the_host_name() {
        let d = tempfile::tempdir().unwrap();
        let (m, h) = (d.path().join("machine-id"), d.path().join("hostname"));
        assert!(
            controller_from(&m, &h)
                .unwrap_err()
                .contains("no controller_id")
        );
        std::fs::write(&h, "gw-7\n").unwrap();
        assert_eq!(controller_from(&m, &h).unwrap(), "gw-7");
        std::fs::write(&m, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(
            controller_from(&m, &h).unwrap(),
            "0123456789abcdef0123456789abcdef"
        );
        let c = toml_like("https://h", ", \"controller_id\": \"dev-1\"");
        assert_eq!(c.controller().unwrap(), "dev-1");
    }
}
