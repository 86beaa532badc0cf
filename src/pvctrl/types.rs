//! Response types of pv-ctrl, parsed leniently: Pantavisor has sent numbers and
//! booleans as strings (`size`, `is_stable`), progress in two formats, and metadata
//! values of every JSON type.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Deserializers that take a value as a number, a boolean or a string.
mod lenient {
    use super::*;

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or_else(|| de::Error::custom(format!("expected an unsigned number, got {n}"))),
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| de::Error::custom(format!("expected a decimal string, got {s:?}"))),
            other => Err(de::Error::custom(format!("expected a number, got {other}"))),
        }
    }

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            v => u64(v).map(Some).map_err(de::Error::custom),
        }
    }

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| de::Error::custom(format!("expected an integer, got {n}"))),
            Value::String(s) => s
                .trim()
                .parse()
                .map_err(|_| de::Error::custom(format!("expected an integer string, got {s:?}"))),
            other => Err(de::Error::custom(format!(
                "expected an integer, got {other}"
            ))),
        }
    }

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(b)),
            Value::String(s) if s == "true" || s == "1" => Ok(Some(true)),
            Value::String(s) if s == "false" || s == "0" => Ok(Some(false)),
            other => Err(de::Error::custom(format!(
                "expected a boolean, got {other}"
            ))),
        }
    }

    pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        opt_bool(d).map(|b| b.unwrap_or(false))
    }
}

/// One platform (container) of the running revision (`GET /containers`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Container {
    pub name: String,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub status_goal: String,
    #[serde(default)]
    pub restart_policy: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Present from 027 when the policy is not `no`.
    #[serde(default)]
    pub auto_recovery: Option<AutoRecovery>,
    /// From 027, for `restart_policy: container` (sent as the string "true"/"false").
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub user_stopped: Option<bool>,
}

/// The auto-recovery state of a container (027+).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AutoRecovery {
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub max_retries: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub current_retries: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub stable_timeout: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub is_stable: Option<bool>,
    #[serde(default)]
    pub backoff_policy: Option<String>,
}

/// A start-up group (`GET /groups`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Group {
    pub name: String,
    #[serde(default)]
    pub status_goal: String,
    #[serde(default)]
    pub restart_policy: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub auto_recovery: Option<Value>,
}

/// An object in the device's store (`GET /objects`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ObjectInfo {
    pub sha256: String,
    /// Sent as a decimal string by Pantavisor.
    #[serde(deserialize_with = "lenient::u64")]
    pub size: u64,
}

/// A revision stored on the device (`GET /steps`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Step {
    pub name: String,
    #[serde(default)]
    pub date: String,
    #[serde(default)]
    pub commitmsg: String,
    /// `None` when Pantavisor reports `{}` (no progress stored).
    #[serde(default, deserialize_with = "progress_or_empty")]
    pub progress: Option<Progress>,
}

fn progress_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Progress>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Object(m) if m.is_empty() => Ok(None),
        v => Progress::deserialize(v)
            .map(Some)
            .map_err(de::Error::custom),
    }
}

/// A status as Pantavisor writes it in a progress object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PvStatus {
    New,
    Queued,
    Downloading,
    Inprogress,
    Testing,
    Updated,
    Done,
    Wontgo,
    Error,
    /// Set by Pantacor Hub, not by devices.
    Syncing,
    /// Set by Pantacor Hub, not by devices.
    Cancelled,
    /// 019 factory progress.
    Unregistered,
    /// 019 factory progress.
    Unclaimed,
    /// Anything else, kept verbatim.
    Other(String),
}

impl PvStatus {
    const NAMED: [(&'static str, PvStatus); 13] = [
        ("NEW", PvStatus::New),
        ("QUEUED", PvStatus::Queued),
        ("DOWNLOADING", PvStatus::Downloading),
        ("INPROGRESS", PvStatus::Inprogress),
        ("TESTING", PvStatus::Testing),
        ("UPDATED", PvStatus::Updated),
        ("DONE", PvStatus::Done),
        ("WONTGO", PvStatus::Wontgo),
        ("ERROR", PvStatus::Error),
        ("SYNCING", PvStatus::Syncing),
        ("CANCELLED", PvStatus::Cancelled),
        ("UNREGISTERED", PvStatus::Unregistered),
        ("UNCLAIMED", PvStatus::Unclaimed),
    ];

    pub fn parse(s: &str) -> Self {
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, st)| st.clone())
            .unwrap_or_else(|| Self::Other(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Other(s) => s,
            known => Self::NAMED
                .iter()
                .find(|(_, st)| st == known)
                .map_or("UNKNOWN", |(n, _)| n),
        }
    }

    /// DONE, UPDATED, ERROR and WONTGO: nothing more will happen on the device.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Done | Self::Updated | Self::Error | Self::Wontgo
        )
    }

    /// DONE or UPDATED: the revision runs.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Done | Self::Updated)
    }
}

impl fmt::Display for PvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PvStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

impl Serialize for PvStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The progress object of a revision (`GET /steps/<rev>/progress`), in the current
/// format or 019's (spaces, no `retries`, sometimes `data`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Progress {
    pub status: PvStatus,
    #[serde(rename = "status-msg", default)]
    pub status_msg: String,
    /// Coarse percentage fixed by the status; may arrive as a string.
    #[serde(default, deserialize_with = "lenient::u64")]
    pub progress: u64,
    #[serde(
        default,
        deserialize_with = "lenient::opt_u64",
        skip_serializing_if = "Option::is_none"
    )]
    pub retries: Option<u64>,
    /// Newline-separated JSON log lines of a failed update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
    /// Hub downloads only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloads: Option<Value>,
    /// 019 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// One configuration value (`GET /config2`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ConfigEntry {
    pub key: String,
    /// `None` when Pantavisor reports `"(null)"` (unset).
    #[serde(deserialize_with = "null_string")]
    pub value: Option<String>,
    /// The level the value came from: default, env, metadata, command, …
    #[serde(default)]
    pub modified: String,
}

fn null_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) if s == "(null)" => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// A driver of the calling container (`GET /drivers`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Driver {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub status: String,
}

/// A Pantavisor daemon (`GET /daemons`, 027+).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Daemon {
    pub name: String,
    #[serde(default, deserialize_with = "lenient::i64")]
    pub pid: i64,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub respawn: bool,
}

/// Result of `POST /storage/gc` (029+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct GcReport {
    #[serde(deserialize_with = "lenient::u64")]
    pub reclaimed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn golden_container_entry_parses() {
        // From pvtest local/control/basic-endpoints.
        let c: Vec<Container> = serde_json::from_str(
            r#"[{"name":"pvr-sdk","group":"platform","status":"STARTED","status_goal":"STARTED","restart_policy":"system","roles":["mgmt"]}]"#,
        )
        .unwrap();
        assert_eq!(c[0].name, "pvr-sdk");
        assert_eq!(c[0].roles, vec!["mgmt"]);
        assert_eq!(c[0].auto_recovery, None);
    }

    #[test]
    fn stringly_typed_fields_parse() {
        let c: Container = serde_json::from_value(json!({
            "name": "app", "group": null, "status": "STARTED", "status_goal": "STARTED",
            "restart_policy": "container", "roles": [], "user_stopped": "false",
            "auto_recovery": {"policy": "on-failure", "max_retries": 5, "current_retries": "0",
                               "stable_timeout": 30, "is_stable": "true", "backoff_policy": "reboot"}
        }))
        .unwrap();
        assert_eq!(c.group, None);
        assert_eq!(c.user_stopped, Some(false));
        let ar = c.auto_recovery.unwrap();
        assert_eq!(ar.is_stable, Some(true));
        assert_eq!(ar.current_retries, Some(0));
        let o: Vec<ObjectInfo> =
            serde_json::from_str(r#"[{"sha256":"ab","size":"2097152"},{"sha256":"cd","size":7}]"#)
                .unwrap();
        assert_eq!((o[0].size, o[1].size), (2097152, 7));
        let d: Daemon =
            serde_json::from_str(r#"{"name":"hwrngd","pid":"0","respawn":"true"}"#).unwrap();
        assert!(d.respawn);
        let bad: Result<ObjectInfo, _> = serde_json::from_str(r#"{"sha256":"ab","size":"big"}"#);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("expected a decimal string")
        );
    }

    #[test]
    fn both_progress_formats_parse() {
        let new: Progress = serde_json::from_str(
            r#"{"status":"TESTING","status-msg":"Awaiting to set rollback point if update is stable","progress":75,"retries":0}"#,
        )
        .unwrap();
        assert_eq!(new.status, PvStatus::Testing);
        assert_eq!(new.progress, 75);
        let old: Progress = serde_json::from_str(
            r#"{ "status" : "DONE", "status-msg" : "Update finished", "progress" : 95, "data" : "x" }"#,
        )
        .unwrap();
        assert_eq!((old.status, old.retries), (PvStatus::Done, None));
        assert_eq!(old.data, Some(json!("x")));
        let odd: Progress =
            serde_json::from_str(r#"{"status":"SOMETHING","progress":"50"}"#).unwrap();
        assert_eq!(odd.status, PvStatus::Other("SOMETHING".into()));
        assert_eq!(odd.progress, 50);
        assert!(!odd.status.is_final());
    }

    #[test]
    fn steps_with_empty_progress_have_none() {
        let s: Vec<Step> = serde_json::from_str(
            r#"[{"name":"0", "date":"2026-05-26T10:00:50Z", "commitmsg":"", "progress":{}}, {"name":"locals/a", "date":"x", "commitmsg":"m", "progress":{"status":"NEW","status-msg":"Update ready to be run","progress":0,"retries":0}}]"#,
        )
        .unwrap();
        assert_eq!(s[0].progress, None);
        assert_eq!(s[1].progress.as_ref().unwrap().status, PvStatus::New);
    }

    #[test]
    fn config2_null_values_are_none() {
        let c: Vec<ConfigEntry> = serde_json::from_str(
            r#"[{"key":"PV_CONTROL_REMOTE","value":"0","modified":"env"},{"key":"PH_CREDS_PRN","value":"(null)","modified":"default"}]"#,
        )
        .unwrap();
        assert_eq!(c[0].value.as_deref(), Some("0"));
        assert_eq!(c[1].value, None);
    }

    #[test]
    fn status_names_round_trip() {
        for (name, st) in PvStatus::NAMED {
            assert_eq!(PvStatus::parse(name), st);
            assert_eq!(st.as_str(), name);
        }
    }
}
