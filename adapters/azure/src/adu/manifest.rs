//! The update manifest (reference §6), parsed only after its signature verified.
//! Unknown fields are ignored, as ADU asks; what a Pantavisor device needs is
//! checked strictly.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

/// pv-bridge's own extended result codes (facility 3, component 0x3B; reference
/// §8.3), listed in `docs/azure.md`.
pub mod erc {
    /// The manifest does not parse or breaks ADU's rules (ADU's own code).
    pub const MANIFEST_INVALID: u32 = 0x8030_0001;
    pub const UNSUPPORTED_HANDLER: u32 = 0x3B00_0001;
    pub const OVERLAY_FAILED: u32 = 0x3B00_0002;
    pub const UPLOAD_FAILED: u32 = 0x3B00_0003;
    pub const REVISION_REFUSED: u32 = 0x3B00_0004;
    pub const ROLLED_BACK: u32 = 0x3B00_0005;
    /// No `compatibility` entry matches this device's manufacturer and model.
    pub const INCOMPATIBLE: u32 = 0x3B00_0006;
    /// A file is not what the manifest signs (size or SHA-256).
    pub const FILE_MISMATCH: u32 = 0x3B00_0007;
    /// A file could not be downloaded.
    pub const DOWNLOAD_FAILED: u32 = 0x3B00_0008;
}

/// `updateId`: it becomes `installedUpdateId` once installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateId {
    pub provider: String,
    pub name: String,
    pub version: String,
}

impl UpdateId {
    /// The string ADU expects in `installedUpdateId` (key order as ADU writes it).
    pub fn to_json_string(&self) -> String {
        format!(
            "{{\"provider\":{},\"name\":{},\"version\":{}}}",
            Value::String(self.provider.clone()),
            Value::String(self.name.clone()),
            Value::String(self.version.clone())
        )
    }
}

/// A file the manifest signs: name, size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// One step of `instructions.steps`.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Inline {
        handler: String,
        files: Vec<String>,
        properties: Value,
        installed_criteria: Option<String>,
    },
    /// A child manifest in the file `file_id`.
    Reference { file_id: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub version: u8,
    pub update_id: UpdateId,
    pub compatibility: Vec<BTreeMap<String, String>>,
    pub steps: Vec<Step>,
    pub files: BTreeMap<String, FileEntry>,
    /// A mini manifest: the full one is in this file.
    pub detached: Option<String>,
}

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError(pub String);

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "update manifest: {}", self.0)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError(m.into()))
}

fn text<'a>(o: &'a Map<String, Value>, k: &str, at: &str) -> Result<&'a str, ManifestError> {
    match o.get(k) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => err(format!("{at}{k} must be a string")),
        None => err(format!("{at}{k} is missing")),
    }
}

/// `^\S+/\S+:\d{1,5}$`, at most 32 characters.
fn valid_handler(h: &str) -> bool {
    let Some((vendor_name, number)) = h.rsplit_once(':') else {
        return false;
    };
    let Some((vendor, name)) = vendor_name.split_once('/') else {
        return false;
    };
    h.len() <= 32
        && !vendor.is_empty()
        && !name.is_empty()
        && !h.contains(char::is_whitespace)
        && (1..=5).contains(&number.len())
        && number.bytes().all(|b| b.is_ascii_digit())
}

fn file_entry(id: &str, v: &Value) -> Result<FileEntry, ManifestError> {
    let Value::Object(o) = v else {
        return err(format!("files.{id} must be an object"));
    };
    let name = match (o.get("fileName"), o.get("filename")) {
        (Some(Value::String(n)), _) | (None, Some(Value::String(n))) => n.clone(),
        _ => return err(format!("files.{id}.fileName is missing")),
    };
    if name.is_empty() || name.contains('/') || name == ".." {
        return err(format!("files.{id}.fileName {name:?} is not a file name"));
    }
    let size = match o.get("sizeInBytes") {
        Some(Value::Number(n)) => n.as_u64(),
        // pvr2adu writes it as a string in its import manifests.
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| ManifestError(format!("files.{id}.sizeInBytes must be a byte count")))?;
    let sha = o
        .get("hashes")
        .and_then(|h| h.get("sha256"))
        .and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).ok())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            ManifestError(format!("files.{id}.hashes.sha256 must be a base64 SHA-256"))
        })?;
    Ok(FileEntry {
        name,
        size,
        sha256: sha,
    })
}

impl Manifest {
    /// Parses the `updateManifest` string (v4 or v5; a mini manifest too).
    pub fn parse(s: &str) -> Result<Manifest, ManifestError> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| ManifestError(format!("not JSON: {e}")))?;
        let Value::Object(o) = v else {
            return err("not a JSON object");
        };
        let version = match o.get("manifestVersion") {
            Some(Value::String(s)) if s == "4" || s == "5" => s.parse().unwrap_or(4),
            Some(Value::Number(n)) if matches!(n.as_u64(), Some(4 | 5)) => {
                n.as_u64().unwrap_or(4) as u8
            }
            Some(other) => return err(format!("manifestVersion {other} is not 4 or 5")),
            None => return err("manifestVersion is missing"),
        };
        let Some(Value::Object(id)) = o.get("updateId") else {
            return err("updateId must be an object");
        };
        let update_id = UpdateId {
            provider: text(id, "provider", "updateId.")?.to_owned(),
            name: text(id, "name", "updateId.")?.to_owned(),
            version: text(id, "version", "updateId.")?.to_owned(),
        };
        let mut files = BTreeMap::new();
        match o.get("files") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    files.insert(k.clone(), file_entry(k, v)?);
                }
            }
            Some(_) => return err("files must be an object keyed by file id"),
        }
        if let Some(d) = o.get("detachedManifestFileId") {
            let Value::String(d) = d else {
                return err("detachedManifestFileId must be a string");
            };
            if !files.contains_key(d) {
                return err(format!("detached manifest {d} is not among the files"));
            }
            return Ok(Manifest {
                version,
                update_id,
                compatibility: Vec::new(),
                steps: Vec::new(),
                files,
                detached: Some(d.clone()),
            });
        }
        let mut compatibility = Vec::new();
        match o.get("compatibility") {
            Some(Value::Array(a)) if !a.is_empty() => {
                for (i, c) in a.iter().enumerate() {
                    let Value::Object(c) = c else {
                        return err(format!("compatibility[{i}] must be an object"));
                    };
                    let mut m = BTreeMap::new();
                    for (k, v) in c {
                        let Value::String(v) = v else {
                            return err(format!("compatibility[{i}].{k} must be a string"));
                        };
                        m.insert(k.clone(), v.clone());
                    }
                    compatibility.push(m);
                }
            }
            _ => return err("compatibility must be a non-empty array"),
        }
        let Some(Value::Array(raw_steps)) = o.get("instructions").and_then(|i| i.get("steps"))
        else {
            return err("instructions.steps must be an array");
        };
        if raw_steps.is_empty() || raw_steps.len() > 10 {
            return err(format!("{} steps; ADU allows 1 to 10", raw_steps.len()));
        }
        let mut steps = Vec::new();
        for (i, s) in raw_steps.iter().enumerate() {
            let Value::Object(s) = s else {
                return err(format!("steps[{i}] must be an object"));
            };
            let at = format!("steps[{i}].");
            let kind = s.get("type").and_then(Value::as_str).unwrap_or("inline");
            let step = match kind {
                "reference" => {
                    let id = text(s, "detachedManifestFileId", &at)?.to_owned();
                    if !files.contains_key(&id) {
                        return err(format!(
                            "{at}detachedManifestFileId {id} is not among the files"
                        ));
                    }
                    Step::Reference { file_id: id }
                }
                "inline" => {
                    let handler = text(s, "handler", &at)?.to_owned();
                    if !valid_handler(&handler) {
                        return err(format!(
                            "{at}handler {handler:?} is not vendor/name:version"
                        ));
                    }
                    let mut ids = Vec::new();
                    if let Some(list) = s.get("files") {
                        let Value::Array(list) = list else {
                            return err(format!("{at}files must be an array of file ids"));
                        };
                        for f in list {
                            let Some(f) = f.as_str().filter(|f| files.contains_key(*f)) else {
                                return err(format!(
                                    "{at}files names {f}, which is not among the files"
                                ));
                            };
                            ids.push(f.to_owned());
                        }
                    }
                    let properties = s.get("handlerProperties").cloned().unwrap_or(Value::Null);
                    let installed_criteria = properties
                        .get("installedCriteria")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    Step::Inline {
                        handler,
                        files: ids,
                        properties,
                        installed_criteria,
                    }
                }
                other => return err(format!("{at}type {other:?} is not inline or reference")),
            };
            steps.push(step);
        }
        Ok(Manifest {
            version,
            update_id,
            compatibility,
            steps,
            files,
            detached: None,
        })
    }

    /// A child manifest from its downloaded file `{"updateManifest": "<manifest>"}`
    /// (a reference step's or a mini manifest's). The file was checked against
    /// the parent's signed size and hash, which is what authenticates it; a child
    /// cannot itself refer to further children.
    pub fn parse_child(file: &[u8]) -> Result<Manifest, ManifestError> {
        let v: Value = serde_json::from_slice(file)
            .map_err(|e| ManifestError(format!("child manifest file: not JSON: {e}")))?;
        let text = v
            .get("updateManifest")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ManifestError("child manifest file has no updateManifest string".into())
            })?;
        let m = Manifest::parse(text)?;
        if m.detached.is_some() || m.steps.iter().any(|s| matches!(s, Step::Reference { .. })) {
            return err("a child manifest refers to another manifest");
        }
        Ok(m)
    }

    /// Whether one `compatibility` entry matches the device: every key of the entry
    /// names a device property (`deviceManufacturer` or `manufacturer`, …) whose
    /// value is the same (ASCII case ignored).
    pub fn compatible(&self, device: &BTreeMap<String, String>) -> bool {
        self.compatibility.iter().any(|entry| {
            entry.iter().all(|(k, v)| {
                let key = k
                    .strip_prefix("device")
                    .map(|rest| {
                        let mut c = rest.chars();
                        c.next()
                            .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
                            .unwrap_or_default()
                    })
                    .unwrap_or_else(|| k.clone());
                device.get(&key).is_some_and(|d| d.eq_ignore_ascii_case(v))
            })
        })
    }
}

#[cfg(test)]
mod tests;
