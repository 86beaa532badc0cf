//! pv-bridge configuration (TOML), as fixed in architecture.md §5.
//!
//! This is the skeleton the engine issue extends: the `[pantavisor]` and `[bridge]`
//! sections and the common keys of each `[[backend]]`. Errors carry the file, the
//! line and what is wrong, so `check-config` can print `config.toml:12: ...`.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub mod overrides;

/// Where `pv-bridge run` looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/pv-bridge/config.toml";
/// Environment variable that overrides the default path.
pub const ENV_PATH: &str = "PV_BRIDGE_CONFIG";
/// Backend types pv-bridge knows.
pub const BACKEND_TYPES: [&str; 5] = ["mqtt", "pantahub", "azure", "hawkbit", "local"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub pantavisor: Pantavisor,
    #[serde(default)]
    pub bridge: Bridge,
    #[serde(default)]
    pub updates: Updates,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub logs: Logs,
    #[serde(default)]
    pub dbus: Dbus,
    #[serde(default, rename = "backend")]
    pub backends: Vec<Backend>,
}

/// How to reach Pantavisor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pantavisor {
    /// The pv-ctrl socket.
    pub socket: PathBuf,
    /// The log tree.
    pub logs: PathBuf,
}

impl Default for Pantavisor {
    fn default() -> Self {
        Self {
            socket: crate::pvctrl::DEFAULT_SOCKET.into(),
            logs: "/pantavisor/logs".into(),
        }
    }
}

/// The bridge's own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bridge {
    /// Journal, spool and cursors; must be on a permanent volume.
    pub state_dir: PathBuf,
}

impl Default for Bridge {
    fn default() -> Self {
        Self {
            state_dir: "/storage/pv-bridge".into(),
        }
    }
}

/// How updates are fetched and followed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Updates {
    /// Objects fetched and uploaded at once (1 to 64).
    pub concurrency: usize,
    /// Cap on fetch bandwidth in bytes per second, across all objects; 0 = none.
    pub bandwidth_limit: u64,
    /// Largest state JSON accepted, in bytes.
    pub max_state_bytes: usize,
    /// How often Pantavisor's progress is read during an update, in milliseconds.
    pub poll_interval_ms: u64,
    /// Seconds a sent LOCAL_RUN may go without its revision starting before the
    /// bridge sends it again (once), and then gives up.
    pub lost_command_secs: u64,
    /// Bytes one update may download from URLs; 0 = no limit.
    pub max_update_bytes: u64,
    /// Extra trust anchors (PEM) for https object downloads.
    pub ca_file: Option<PathBuf>,
    /// HTTP proxy for object downloads; default: a backend's `proxy`, else the
    /// environment's.
    pub proxy: Option<String>,
}

impl Default for Updates {
    fn default() -> Self {
        let o = crate::engine::UpdateOptions::default();
        Self {
            concurrency: o.fetch_concurrency,
            bandwidth_limit: o.bandwidth_limit,
            max_state_bytes: o.max_state_bytes,
            poll_interval_ms: o.poll_interval.as_millis() as u64,
            lost_command_secs: o.lost_command_after.as_secs(),
            max_update_bytes: o.max_update_bytes,
            ca_file: None,
            proxy: None,
        }
    }
}

impl Updates {
    /// The engine's options for these settings.
    pub fn options(&self) -> crate::engine::UpdateOptions {
        crate::engine::UpdateOptions {
            fetch_concurrency: self.concurrency,
            bandwidth_limit: self.bandwidth_limit,
            max_state_bytes: self.max_state_bytes,
            poll_interval: std::time::Duration::from_millis(self.poll_interval_ms),
            lost_command_after: std::time::Duration::from_secs(self.lost_command_secs),
            max_update_bytes: self.max_update_bytes,
            cache_dir: None,
            ca_file: self.ca_file.clone(),
            backend_ca_files: Vec::new(),
            proxy: self.proxy.clone(),
        }
    }
}

/// How metadata is synchronised.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metadata {
    /// How often device-meta is read and changes sent to backends, in milliseconds.
    pub device_meta_interval_ms: u64,
    /// How often the desired user-meta is applied again (repairs drift), in
    /// milliseconds.
    pub user_meta_interval_ms: u64,
    /// Least seconds between two device-meta updates to a backend when a key
    /// that matters changed (per backend: `device_meta_min_interval_secs`).
    pub device_meta_min_interval_secs: u64,
    /// Least seconds between two device-meta updates to a backend when only
    /// volatile keys changed (per backend: `device_meta_volatile_interval_secs`).
    /// Unset: 600, or 1800 for `azure` backends (every reported patch is billed).
    pub device_meta_volatile_interval_secs: Option<u64>,
    /// Keys whose values change on every read (names, or prefixes ending in `*`).
    pub device_meta_volatile_keys: Vec<String>,
}

impl Default for Metadata {
    fn default() -> Self {
        Self {
            device_meta_interval_ms: 10_000,
            user_meta_interval_ms: 30_000,
            device_meta_min_interval_secs: 10,
            device_meta_volatile_interval_secs: None,
            device_meta_volatile_keys: crate::engine::devmeta::default_volatile_keys(),
        }
    }
}

/// The local D-Bus API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dbus {
    /// `system`, `session`, or a D-Bus address (`unix:path=/run/dbus/system_bus_socket`);
    /// absent: no D-Bus API.
    pub bus: Option<String>,
}

/// How logs are collected and kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logs {
    /// Collect and forward logs at all.
    pub enabled: bool,
    /// How often the log tree is read, in milliseconds.
    pub poll_interval_ms: u64,
    /// Lines per second allowed from one source, on average.
    pub rate_per_sec: f64,
    /// Lines one source may send in a burst.
    pub burst: f64,
    /// Size cap of the on-disk spool, in bytes.
    pub spool_max_bytes: u64,
    /// Age cap of spooled lines, in seconds.
    pub spool_max_age_secs: u64,
}

impl Default for Logs {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_ms: 500,
            rate_per_sec: 200.0,
            burst: 1000.0,
            spool_max_bytes: 16 * 1024 * 1024,
            spool_max_age_secs: 24 * 3600,
        }
    }
}

impl Logs {
    /// The engine's options for these settings.
    pub fn options(&self) -> crate::engine::logs::LogOptions {
        let spool = crate::engine::logs::spool::SpoolOptions {
            max_bytes: self.spool_max_bytes,
            max_age: std::time::Duration::from_secs(self.spool_max_age_secs),
            segment_bytes: (self.spool_max_bytes / 16).clamp(4096, 1024 * 1024),
        };
        crate::engine::logs::LogOptions {
            poll_interval: std::time::Duration::from_millis(self.poll_interval_ms),
            rate: crate::engine::logs::tail::Rate {
                per_sec: self.rate_per_sec,
                burst: self.burst,
            },
            spool,
        }
    }
}

fn yes() -> bool {
    true
}

/// One backend. `type`, `name`, `priority` and the switches are common; every other
/// key belongs to its adapter.
#[derive(Debug, Clone, Deserialize)]
pub struct Backend {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    pub name: Spanned<String>,
    /// Higher wins when backends disagree (user-meta keys, updates).
    #[serde(default)]
    pub priority: i64,
    /// Accept updates from this backend.
    #[serde(default = "yes")]
    pub updates: bool,
    /// Apply this backend's user-meta.
    #[serde(default = "yes")]
    pub user_meta: bool,
    /// Send device-meta to this backend.
    #[serde(default = "yes")]
    pub device_meta: bool,
    /// Forward logs to this backend.
    #[serde(default = "yes")]
    pub logs: bool,
    /// This backend's `[metadata] device_meta_min_interval_secs`.
    #[serde(default)]
    pub device_meta_min_interval_secs: Option<u64>,
    /// This backend's `[metadata] device_meta_volatile_interval_secs`.
    #[serde(default)]
    pub device_meta_volatile_interval_secs: Option<u64>,
    #[serde(flatten)]
    pub settings: toml::Table,
}

/// Least seconds between device-meta updates carrying only volatile keys, for a
/// backend of type `kind` with no setting of its own or in `[metadata]`: Azure
/// bills every reported patch, so its twin gets them half-hourly.
pub fn default_volatile_interval_secs(kind: &str) -> u64 {
    match kind {
        "azure" => 1800,
        _ => 600,
    }
}

/// Backend types this build carries an adapter for.
pub const AVAILABLE_TYPES: &[&str] = &[
    #[cfg(feature = "local")]
    "local",
    #[cfg(feature = "mqtt")]
    "mqtt",
    #[cfg(feature = "pantahub")]
    "pantahub",
    #[cfg(feature = "azure")]
    "azure",
    #[cfg(feature = "hawkbit")]
    "hawkbit",
];

/// Checks a backend's own settings by parsing them as its adapter does.
#[cfg_attr(
    not(any(
        feature = "local",
        feature = "mqtt",
        feature = "pantahub",
        feature = "azure",
        feature = "hawkbit"
    )),
    allow(unused_variables)
)]
fn check_settings(kind: &str, settings: &toml::Table) -> Result<(), String> {
    match kind {
        #[cfg(feature = "local")]
        "local" => settings
            .clone()
            .try_into::<pv_adapter_local::LocalConfig>()
            .map(drop)
            .map_err(|e| e.message().trim().to_owned()),
        #[cfg(feature = "mqtt")]
        "mqtt" => settings
            .clone()
            .try_into::<pv_adapter_mqtt::MqttConfig>()
            .map_err(|e| e.message().trim().to_owned())
            .and_then(|c| c.check().map(drop)),
        #[cfg(feature = "pantahub")]
        "pantahub" => settings
            .clone()
            .try_into::<pv_adapter_pantahub::PantahubConfig>()
            .map_err(|e| e.message().trim().to_owned())
            .and_then(|c| c.validate()),
        #[cfg(feature = "azure")]
        "azure" => settings
            .clone()
            .try_into::<pv_adapter_azure::AzureConfig>()
            .map_err(|e| e.message().trim().to_owned())
            .and_then(|c| c.validate()),
        #[cfg(feature = "hawkbit")]
        "hawkbit" => settings
            .clone()
            .try_into::<pv_adapter_hawkbit::HawkbitConfig>()
            .map_err(|e| e.message().trim().to_owned())
            .and_then(|c| c.validate()),
        _ => Ok(()),
    }
}

/// A configuration error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let err = |line, message: String| ConfigError {
            file: path.to_owned(),
            line,
            message,
        };
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            err(line, e.message().trim().to_owned())
        })?;
        let u = &cfg.updates;
        let section = |key: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(key))
                .map(|i| i + 1)
        };
        if !(1..=64).contains(&u.concurrency) {
            return Err(err(
                section("concurrency"),
                format!("updates.concurrency must be 1 to 64, got {}", u.concurrency),
            ));
        }
        if u.poll_interval_ms < 50 {
            return Err(err(
                section("poll_interval_ms"),
                format!(
                    "updates.poll_interval_ms must be at least 50, got {}",
                    u.poll_interval_ms
                ),
            ));
        }
        if u.lost_command_secs == 0 {
            return Err(err(
                section("lost_command_secs"),
                "updates.lost_command_secs must be at least 1, got 0".to_owned(),
            ));
        }
        if u.max_state_bytes < 1024 {
            return Err(err(
                section("max_state_bytes"),
                format!(
                    "updates.max_state_bytes must be at least 1024, got {}",
                    u.max_state_bytes
                ),
            ));
        }
        for (key, v) in [
            (
                "device_meta_interval_ms",
                cfg.metadata.device_meta_interval_ms,
            ),
            ("user_meta_interval_ms", cfg.metadata.user_meta_interval_ms),
        ] {
            if v < 100 {
                return Err(err(
                    section(key),
                    format!("metadata.{key} must be at least 100, got {v}"),
                ));
            }
        }
        let m = &cfg.metadata;
        let week = 7 * 86_400;
        for (key, v) in [
            (
                "device_meta_min_interval_secs",
                m.device_meta_min_interval_secs,
            ),
            (
                "device_meta_volatile_interval_secs",
                m.device_meta_volatile_interval_secs.unwrap_or(0),
            ),
        ] {
            if v > week {
                return Err(err(
                    section(key),
                    format!("metadata.{key} must be at most {week} (a week), got {v}"),
                ));
            }
        }
        if let Some(k) = m
            .device_meta_volatile_keys
            .iter()
            .find(|k| k.is_empty() || k.as_str() == "*")
        {
            return Err(err(
                section("device_meta_volatile_keys"),
                format!(
                    "metadata.device_meta_volatile_keys: {k:?} would make every key volatile; name keys or prefixes (`net.*`)"
                ),
            ));
        }
        if let Some(ca) = &u.ca_file {
            crate::engine::fetch::load_ca(ca)
                .map_err(|m| err(section("ca_file"), format!("updates.ca_file: {m}")))?;
        }
        let l = &cfg.logs;
        if l.poll_interval_ms < 50 {
            return Err(err(
                section("poll_interval_ms"),
                format!(
                    "logs.poll_interval_ms must be at least 50, got {}",
                    l.poll_interval_ms
                ),
            ));
        }
        if !(l.rate_per_sec > 0.0 && l.burst >= 1.0) {
            return Err(err(
                section("rate_per_sec"),
                "logs.rate_per_sec must be positive and logs.burst at least 1".into(),
            ));
        }
        if l.spool_max_bytes < 64 * 1024 {
            return Err(err(
                section("spool_max_bytes"),
                format!(
                    "logs.spool_max_bytes must be at least 65536, got {}",
                    l.spool_max_bytes
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for b in &cfg.backends {
            let kind = b.kind.get_ref();
            if !BACKEND_TYPES.contains(&kind.as_str()) {
                return Err(err(
                    Some(line_of(text, b.kind.span().start)),
                    format!(
                        "backend type must be one of {}, got {kind:?}",
                        BACKEND_TYPES.join(", ")
                    ),
                ));
            }
            let name = b.name.get_ref();
            let at = Some(line_of(text, b.name.span().start));
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(err(
                    at,
                    format!("backend name {name:?} must be 1 or more of A-Z a-z 0-9 - _ ."),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(err(at, format!("backend name {name:?} is used twice")));
            }
            if !AVAILABLE_TYPES.contains(&kind.as_str()) {
                return Err(err(
                    Some(line_of(text, b.kind.span().start)),
                    format!(
                        "backend {name:?}: type {kind:?} is not available in this build (available: {})",
                        if AVAILABLE_TYPES.is_empty() {
                            "none".to_owned()
                        } else {
                            AVAILABLE_TYPES.join(", ")
                        }
                    ),
                ));
            }
            check_settings(kind, &b.settings)
                .map_err(|m| err(at, format!("backend {name:?}: {m}")))?;
        }
        Ok(cfg)
    }

    /// One line per setting, for `check-config`.
    pub fn summary(&self) -> String {
        let limit = match self.updates.bandwidth_limit {
            0 => "none".to_owned(),
            n => format!("{n} B/s"),
        };
        let mut s = format!(
            "pv-ctrl socket: {}\nlogs: {}\nstate_dir: {}\nupdates: {} at once, bandwidth limit {limit}\nbackends: {}\n",
            self.pantavisor.socket.display(),
            self.pantavisor.logs.display(),
            self.bridge.state_dir.display(),
            self.updates.concurrency,
            self.backends.len()
        );
        for b in &self.backends {
            let off: Vec<&str> = [
                ("updates", b.updates),
                ("user_meta", b.user_meta),
                ("device_meta", b.device_meta),
                ("logs", b.logs),
            ]
            .into_iter()
            .filter(|(_, on)| !on)
            .map(|(k, _)| k)
            .collect();
            let mut line = format!("  - {} ({})", b.name.get_ref(), b.kind.get_ref());
            if b.priority != 0 {
                line.push_str(&format!(", priority {}", b.priority));
            }
            if !off.is_empty() {
                line.push_str(&format!(", off: {}", off.join(", ")));
            }
            s.push_str(&line);
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("config.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    #[cfg(feature = "local")]
    fn the_minimal_form_of_the_architecture_parses() {
        let c = parse(
            r#"
[pantavisor]
socket = "/pantavisor/pv-ctrl"
logs = "/pantavisor/logs"

[bridge]
state_dir = "/storage/pv-bridge"

[[backend]]
type = "local"
name = "usb"
dir = "/media/updates"
"#,
        )
        .unwrap();
        assert_eq!(c.backends.len(), 1);
        assert_eq!(
            c.backends[0].settings["dir"].as_str(),
            Some("/media/updates")
        );
        assert!(c.summary().contains("  - usb (local)"));
    }

    #[test]
    fn update_settings_are_checked() {
        let c = parse("[updates]\nconcurrency = 2\nbandwidth_limit = 1048576\n").unwrap();
        let o = c.updates.options();
        assert_eq!((o.fetch_concurrency, o.bandwidth_limit), (2, 1 << 20));
        assert_eq!(o.lost_command_after, std::time::Duration::from_secs(30));
        assert_eq!(
            parse("[updates]\nlost_command_secs = 0\n").unwrap_err(),
            "config.toml:2: updates.lost_command_secs must be at least 1, got 0"
        );
        assert_eq!(
            parse("[updates]\nconcurrency = 0\n").unwrap_err(),
            "config.toml:2: updates.concurrency must be 1 to 64, got 0"
        );
        assert_eq!(
            parse("[updates]\npoll_interval_ms = 5\n").unwrap_err(),
            "config.toml:2: updates.poll_interval_ms must be at least 50, got 5"
        );
        assert!(
            parse("[updates]\nparallel = 3\n")
                .unwrap_err()
                .contains("unknown field `parallel`")
        );
    }

    #[test]
    #[cfg(feature = "local")]
    fn common_backend_keys_are_not_passed_to_the_adapter() {
        let c = parse(
            "[[backend]]\ntype = \"local\"\nname = \"usb\"\ndir = \"/m\"\npriority = 5\nlogs = false\n",
        )
        .unwrap();
        let b = &c.backends[0];
        assert_eq!((b.priority, b.logs, b.updates), (5, false, true));
        assert!(!b.settings.contains_key("priority"));
        assert!(
            c.summary()
                .contains("  - usb (local), priority 5, off: logs")
        );
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = parse("").unwrap();
        assert_eq!(c.pantavisor.socket, Path::new("/pantavisor/pv-ctrl"));
        assert_eq!(c.bridge.state_dir, Path::new("/storage/pv-bridge"));
    }

    #[test]
    #[cfg(feature = "local")]
    fn errors_name_the_file_and_line() {
        assert_eq!(
            parse("[pantavisor]\nsocket = \"/x\"\nsockte = \"/y\"\n").unwrap_err(),
            "config.toml:3: unknown field `sockte`, expected `socket` or `logs`"
        );
        assert_eq!(
            parse("[[backend]]\ntype = \"local\"\nname = \"a\"\ndir = \"/x\"\n[[backend]]\ntype = \"http\"\nname = \"b\"\n")
                .unwrap_err(),
            "config.toml:6: backend type must be one of mqtt, pantahub, azure, hawkbit, local, got \"http\""
        );
        assert_eq!(
            parse("[[backend]]\ntype = \"local\"\nname = \"a\"\ndir = \"/x\"\n[[backend]]\ntype = \"local\"\nname = \"a\"\ndir = \"/y\"\n")
                .unwrap_err(),
            "config.toml:7: backend name \"a\" is used twice"
        );
        assert_eq!(
            parse("[[backend]]\ntype = \"local\"\nname = \"usb\"\ndri = \"/x\"\n").unwrap_err(),
            "config.toml:3: backend \"usb\": unknown field `dri`, expected `dir` or `scan_interval_secs`"
        );
        #[cfg(feature = "azure")]
        assert_eq!(
            parse("[[backend]]\ntype = \"azure\"\nname = \"cloud\"\n").unwrap_err(),
            "config.toml:3: backend \"cloud\": set one of connection_string_file, dps, or x509 with host_name and device_id"
        );
        #[cfg(feature = "hawkbit")]
        assert_eq!(
            parse("[[backend]]\ntype = \"hawkbit\"\nname = \"hb\"\nurl = \"http://hawkbit.lan\"\n")
                .unwrap_err(),
            "config.toml:3: backend \"hb\": url \"http://hawkbit.lan\" is plain http: the target token would cross the network in the clear; use https, or set insecure = true"
        );
        #[cfg(feature = "hawkbit")]
        assert!(
            parse(
                "[[backend]]\ntype = \"hawkbit\"\nname = \"hb\"\nurl = \"https://h\"\npoll = 5\n"
            )
            .unwrap_err()
            .contains("unknown field `poll`")
        );
        #[cfg(not(feature = "azure"))]
        assert_eq!(
            parse("[[backend]]\ntype = \"azure\"\nname = \"cloud\"\n").unwrap_err(),
            format!(
                "config.toml:2: backend \"cloud\": type \"azure\" is not available in this build (available: {})",
                AVAILABLE_TYPES.join(", ")
            )
        );
        assert!(
            parse("[bridge\n")
                .unwrap_err()
                .starts_with("config.toml:1: ")
        );
        assert!(
            parse("[[backend]]\nname = \"x\"\n")
                .unwrap_err()
                .contains("missing field `type`")
        );
    }
}
