//! A `pvr export`: a folder with `json` and `objects/<sha256>`, or a `.tar`,
//! `.tgz`/`.tar.gz` archive of one (unpacked into a temporary directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pv_adapter_local::archive;

pub struct Export {
    /// A name for the export (folder or archive name without extension).
    pub name: String,
    pub state: Vec<u8>,
    /// sha256 → (file, size)
    pub objects: BTreeMap<String, (PathBuf, u64)>,
    _unpacked: Option<tempfile::TempDir>,
}

/// Largest state accepted (the bridge's default `max_state_bytes`).
const MAX_STATE: u64 = 4 * 1024 * 1024;

impl Export {
    pub fn open(path: &Path) -> Result<Export, String> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (folder, tmp, name) = if path.is_dir() {
            (path.to_owned(), None, file_name)
        } else {
            let kind = archive::kind(&file_name).ok_or_else(|| {
                format!(
                    "{}: not a folder and not a .tar, .tgz or .tar.gz archive",
                    path.display()
                )
            })?;
            let tmp = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
            let dest = tmp.path().join("export");
            archive::unpack(path, kind, &dest).map_err(|e| format!("{}: {e}", path.display()))?;
            (dest, Some(tmp), archive::stem(&file_name).to_owned())
        };
        let json = folder.join("json");
        let len = std::fs::metadata(&json)
            .map_err(|e| format!("{}: {e} (is this a pvr export?)", json.display()))?
            .len();
        if len > MAX_STATE {
            return Err(format!(
                "{}: {len} bytes is more than {MAX_STATE}",
                json.display()
            ));
        }
        let state = std::fs::read(&json).map_err(|e| format!("{}: {e}", json.display()))?;
        let parsed: serde_json::Value = serde_json::from_slice(&state)
            .map_err(|e| format!("{}: not JSON: {e}", json.display()))?;
        if !parsed.is_object() {
            return Err(format!(
                "{}: the state must be a JSON object",
                json.display()
            ));
        }
        let mut objects = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(folder.join("objects")) {
            for e in rd.flatten() {
                let sha = e.file_name().to_string_lossy().into_owned();
                if let (true, Ok(md)) = (pv_adapter_api::is_sha256_hex(&sha), e.metadata()) {
                    if md.is_file() {
                        objects.insert(sha, (e.path(), md.len()));
                    }
                }
            }
        }
        Ok(Export {
            name,
            state,
            objects,
            _unpacked: tmp,
        })
    }
}
