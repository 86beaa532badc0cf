//! pv-bridge's Azure IoT Hub adapter: the IoT Hub MQTT device protocol spoken
//! directly on rumqttc (ADR 0010), with SAS tokens renewed before they expire,
//! X.509 client certificates and DPS provisioning. See `docs/azure.md`.
//!
//! The protocol is kept in pure modules ([`connstr`], [`sas`], [`topics`],
//! [`twin`], [`report`], [`logs`]) that are tested without sockets; [`adapter`]
//! drives one rumqttc event loop with them.

pub mod adapter;
pub mod adu;
pub mod connstr;
pub mod identity;
pub mod logs;
pub mod methods;
pub mod report;
pub mod sas;
pub mod tls;
pub mod topics;
pub mod twin;

use std::path::PathBuf;

use serde::Deserialize;

pub use adapter::AzureAdapter;
pub use tls::ClientCert;

/// DPS provisioning settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpsConfig {
    pub id_scope: String,
    pub registration_id: String,
    /// The device's own key (individual enrollment) or its derived key (group).
    #[serde(default)]
    pub symmetric_key_file: Option<PathBuf>,
    /// A group enrollment's key, from which the device key is derived. Keep group
    /// keys off devices in production: derive in the factory instead.
    #[serde(default)]
    pub group_key_file: Option<PathBuf>,
    #[serde(default = "default_dps_endpoint")]
    pub global_endpoint: String,
    /// Socket address when it differs from `global_endpoint` (tests, proxies).
    #[serde(default)]
    pub connect_address: Option<String>,
}

fn default_dps_endpoint() -> String {
    "global.azure-devices-provisioning.net".into()
}

/// Settings of an `azure` backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// `HostName=…;DeviceId=…;SharedAccessKey=…` (read on every connection).
    #[serde(default)]
    pub connection_string_file: Option<PathBuf>,
    #[serde(default)]
    pub dps: Option<DpsConfig>,
    /// X.509 client certificate (with `host_name` and `device_id`, with a
    /// connection string that says `x509=true`, or for DPS X.509 attestation).
    #[serde(default)]
    pub x509: Option<ClientCert>,
    #[serde(default)]
    pub host_name: Option<String>,
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub module_id: Option<String>,
    /// Extra trust anchor (PEM) besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `host:port` the socket goes to when it differs from the hub's name.
    #[serde(default)]
    pub connect_address: Option<String>,
    /// Lifetime of each SAS token; a new one is used at 80 % of it.
    #[serde(default = "default_lifetime")]
    pub sas_lifetime_secs: u64,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// IoT Plug and Play model announced at CONNECT.
    #[serde(default)]
    pub model_id: Option<String>,
    /// Shortest time between two reported-property patches carrying only
    /// download progress (status changes go at once).
    #[serde(default = "default_report")]
    pub report_interval_secs: u64,
    /// Device-meta keys (prefixes) mirrored into the twin; empty means all.
    #[serde(default)]
    pub device_meta_keys: Vec<String>,
    /// Daily log allowance in KiB, counted as the hub meters (4 KiB units); 0 is
    /// no limit.
    #[serde(default)]
    pub log_budget_kib_per_day: u64,
    /// Compress log messages (saves quota; routing cannot read the bodies).
    #[serde(default)]
    pub log_gzip: bool,
    /// Target size of one log message (the hub's limit is 256 KiB).
    #[serde(default = "default_log_batch")]
    pub log_batch_bytes: usize,
    /// Least seconds between two log messages, unless one is half full: lines
    /// that trickle in travel together (every message is billed).
    #[serde(default = "default_log_interval")]
    pub log_interval_secs: u64,
    /// Largest state JSON fetched for an `objectUrlTemplate` revision.
    #[serde(default = "default_state")]
    pub max_state_bytes: usize,
    /// How long a twin request (GET, reported patch) may go unanswered before it
    /// is sent again.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// How long a direct method waits for the engine before answering 202.
    #[serde(default = "default_method_wait")]
    pub method_wait_secs: u64,
    /// Device Update for IoT Hub: `{ manufacturer, model }` turns the
    /// `deviceUpdate` component on (see `docs/azure.md`).
    #[serde(default)]
    pub device_update: Option<adu::config::DeviceUpdateConfig>,
}

fn default_lifetime() -> u64 {
    3600
}
fn default_keep_alive() -> u64 {
    120
}
fn default_report() -> u64 {
    5
}
fn default_log_interval() -> u64 {
    600
}
fn default_log_batch() -> usize {
    64 * 1024
}
fn default_state() -> usize {
    4 * 1024 * 1024
}
fn default_request_timeout() -> u64 {
    30
}
fn default_method_wait() -> u64 {
    10
}

impl AzureConfig {
    /// Checks what can be checked without the network (files are read later, on
    /// every connection).
    pub fn validate(&self) -> Result<(), String> {
        let ways = [
            self.connection_string_file.is_some(),
            self.dps.is_some(),
            self.x509.is_some() && self.dps.is_none() && self.connection_string_file.is_none(),
        ];
        match ways.iter().filter(|w| **w).count() {
            0 => {
                return Err(
                    "set one of connection_string_file, dps, or x509 with host_name and device_id"
                        .into(),
                );
            }
            1 => {}
            _ => return Err("connection_string_file and dps exclude each other".into()),
        }
        if self.connection_string_file.is_none() && self.dps.is_none() {
            if self.host_name.is_none() || self.device_id.is_none() {
                return Err(
                    "x509 without a connection string needs host_name and device_id".into(),
                );
            }
        } else if self.host_name.is_some() || self.device_id.is_some() || self.module_id.is_some() {
            return Err(
                "host_name, device_id and module_id come from the connection string or DPS here"
                    .into(),
            );
        }
        if let Some(d) = &self.dps {
            if d.symmetric_key_file.is_some() && d.group_key_file.is_some() {
                return Err("dps: symmetric_key_file and group_key_file exclude each other".into());
            }
            if d.symmetric_key_file.is_none() && d.group_key_file.is_none() && self.x509.is_none() {
                return Err("dps needs symmetric_key_file, group_key_file or x509".into());
            }
            if d.id_scope.is_empty() || d.registration_id.is_empty() {
                return Err("dps: id_scope and registration_id must not be empty".into());
            }
            if let Some(a) = &d.connect_address {
                identity::split_address(a).map_err(|e| format!("dps.connect_address: {e}"))?;
            }
        }
        if let Some(a) = &self.connect_address {
            identity::split_address(a).map_err(|e| format!("connect_address: {e}"))?;
        }
        if self.sas_lifetime_secs < 10 {
            return Err("sas_lifetime_secs must be at least 10".into());
        }
        if !(5..=1177).contains(&self.keep_alive_secs) {
            return Err("keep_alive_secs must be from 5 to 1177 (the hub's limit)".into());
        }
        if !(1024..=255 * 1024).contains(&self.log_batch_bytes) {
            return Err("log_batch_bytes must be from 1024 to 261120".into());
        }
        if self.request_timeout_secs == 0 {
            return Err("request_timeout_secs must be at least 1".into());
        }
        if self.max_state_bytes < 1024 {
            return Err("max_state_bytes must be at least 1024".into());
        }
        if let Some(ca) = &self.ca_file {
            tls::client_config(Some(ca), "check.invalid", None)?;
        }
        if let Some(du) = &self.device_update {
            du.validate()?;
            if self
                .model_id
                .as_deref()
                .is_some_and(|m| m != adu::wire::MODEL_ID)
            {
                return Err(format!(
                    "device_update announces the model {}; model_id must be unset or the same",
                    adu::wire::MODEL_ID
                ));
            }
        }
        Ok(())
    }

    /// The model id announced at CONNECT.
    pub fn announced_model(&self) -> Option<&str> {
        match &self.device_update {
            Some(_) => Some(adu::wire::MODEL_ID),
            None => self.model_id.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AzureConfig, String> {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
        let c: AzureConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
        c.validate().map(|_| c)
    }

    #[test]
    fn configuration_ways_exclude_each_other() {
        assert!(parse(r#"{"connection_string_file": "/c"}"#).is_ok());
        assert!(parse(r#"{"dps": {"id_scope": "0ne1", "registration_id": "r", "symmetric_key_file": "/k"}}"#).is_ok());
        assert!(parse(r#"{"x509": {"cert_file": "/c", "key_file": "/k"}, "host_name": "h", "device_id": "d"}"#).is_ok());
        for (bad, want) in [
            ("{}", "set one of"),
            (
                r#"{"connection_string_file": "/c", "dps": {"id_scope": "s", "registration_id": "r", "symmetric_key_file": "/k"}}"#,
                "exclude each other",
            ),
            (
                r#"{"x509": {"cert_file": "/c", "key_file": "/k"}}"#,
                "needs host_name and device_id",
            ),
            (
                r#"{"connection_string_file": "/c", "device_id": "d"}"#,
                "come from the connection string",
            ),
            (
                r#"{"dps": {"id_scope": "s", "registration_id": "r"}}"#,
                "dps needs",
            ),
            (
                r#"{"dps": {"id_scope": "s", "registration_id": "r", "symmetric_key_file": "/a", "group_key_file": "/b"}}"#,
                "exclude each other",
            ),
            (
                r#"{"connection_string_file": "/c", "connect_address": "h:x"}"#,
                "connect_address",
            ),
            (
                r#"{"connection_string_file": "/c", "keep_alive_secs": 2000}"#,
                "1177",
            ),
            (
                r#"{"connection_string_file": "/c", "sas_lifetime_secs": 1}"#,
                "at least 10",
            ),
            (
                r#"{"connection_string_file": "/c", "colour": 1}"#,
                "unknown field",
            ),
            (
                r#"{"connection_string_file": "/c", "ca_file": "/nonexistent/ca.pem"}"#,
                "cannot read",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
