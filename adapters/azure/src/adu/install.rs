//! From verified files to an engine offer (reference §10.4): the export is
//! unpacked by the local adapter's reader (entries outside `json` and
//! `objects/<sha>` are skipped, nothing is written outside the work directory),
//! overlaid on the running state for a pvr2adu package or taken whole, and
//! offered as `locals/<revision>`. Every object is checked against its name by
//! the engine before Pantavisor sees it.

use std::collections::BTreeMap;
use std::path::Path;

use pv_adapter_api::Offer;
use pv_adapter_local::archive;
use serde_json::Value;
use tracing::warn;

use super::handlers::Plan;
use super::manifest::erc;
use super::overlay::overlay;

/// Why a verified package cannot become an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallError {
    pub erc: u32,
    pub reason: String,
}

fn fail(erc: u32, reason: impl Into<String>) -> InstallError {
    InstallError {
        erc,
        reason: reason.into(),
    }
}

/// Builds the offer for `plan`. `file(id)` is where the verified file with that
/// id was downloaded; `running` is the running revision's state (for overlays).
pub async fn prepare(
    plan: &Plan,
    file: impl Fn(&str) -> std::path::PathBuf,
    file_name: impl Fn(&str) -> String,
    work: &Path,
    running: Option<&[u8]>,
) -> Result<Offer, InstallError> {
    let (export, revision, base) = match plan {
        Plan::Overlay {
            export, revision, ..
        } => (export, revision, true),
        Plan::Whole { export, revision } => (export, revision, false),
        Plan::Unsupported { erc, reason } => return Err(fail(*erc, reason.clone())),
    };
    let name = file_name(export);
    let compression = archive::kind(&name).unwrap_or(archive::Compression::Gzip);
    let dest = work.join("export");
    let archive_path = file(export);
    let unpacked = {
        let (a, d) = (archive_path.clone(), dest.clone());
        tokio::task::spawn_blocking(move || archive::unpack(&a, compression, &d))
            .await
            .map_err(|e| fail(erc::OVERLAY_FAILED, e.to_string()))?
    };
    unpacked.map_err(|e| fail(erc::OVERLAY_FAILED, format!("{name}: {e}")))?;
    if base {
        let running = running.ok_or_else(|| {
            fail(
                erc::OVERLAY_FAILED,
                "the running revision's state is unknown",
            )
        })?;
        let running: BTreeMap<String, Value> = serde_json::from_slice(running)
            .map_err(|e| fail(erc::OVERLAY_FAILED, format!("the running state: {e}")))?;
        let json = dest.join("json");
        let part: BTreeMap<String, Value> = serde_json::from_slice(
            &tokio::fs::read(&json)
                .await
                .map_err(|e| fail(erc::OVERLAY_FAILED, format!("{name}: json: {e}")))?,
        )
        .map_err(|e| {
            fail(
                erc::OVERLAY_FAILED,
                format!("{name}: json is not a state: {e}"),
            )
        })?;
        let (state, both) = overlay(&running, &part).map_err(|e| fail(erc::OVERLAY_FAILED, e))?;
        if !both.is_empty() {
            warn!(keys = ?both, "keys both kept by another signature and added: the package's values win");
        }
        let bytes =
            serde_json::to_vec(&state).map_err(|e| fail(erc::OVERLAY_FAILED, e.to_string()))?;
        tokio::fs::write(&json, bytes)
            .await
            .map_err(|e| fail(erc::OVERLAY_FAILED, format!("{}: {e}", json.display())))?;
    }
    pv_adapter_local::export_offer(&dest, revision)
        .await
        .map_err(|e| fail(erc::OVERLAY_FAILED, e))
}

#[cfg(test)]
mod tests;
