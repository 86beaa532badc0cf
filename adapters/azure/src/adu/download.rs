//! Downloading the files of a deployment (reference §6.2): `fileUrls` are not
//! signed, so each file is checked against its signed size and SHA-256 before it
//! is used. A part already on disk is resumed with `Range`; nothing beyond the
//! signed size is ever written.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest;
use tokio::io::AsyncReadExt;

use super::manifest::FileEntry;

pub use super::manifest::erc::{
    DOWNLOAD_FAILED as ERC_DOWNLOAD_FAILED, FILE_MISMATCH as ERC_FILE_MISMATCH,
};

/// Why a file could not be used; the text never carries the URL's secret parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadError {
    pub erc: u32,
    pub reason: String,
}

fn fail(erc: u32, reason: String) -> DownloadError {
    DownloadError { erc, reason }
}

async fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// Fetches `url` into `dest` (resuming a part there) and checks it against
/// `entry`. On a mismatch the file is deleted.
pub async fn fetch(
    client: &pv_http::Client,
    url: &str,
    entry: &FileEntry,
    dest: &Path,
) -> Result<(), DownloadError> {
    let shown = pv_http::redact(url);
    let name = &entry.name;
    pv_http::resume_to_file(client, url, &[], dest, entry.size)
        .await
        .map_err(|e| match e {
            pv_http::FetchError::TooLong => fail(
                ERC_FILE_MISMATCH,
                format!(
                    "{name} is larger than the {} bytes the manifest signs",
                    entry.size
                ),
            ),
            pv_http::FetchError::Status(s) => fail(
                ERC_DOWNLOAD_FAILED,
                format!("{name} from {shown}: HTTP {s}"),
            ),
            pv_http::FetchError::Short { have } => fail(
                ERC_DOWNLOAD_FAILED,
                format!("{name} ended after {have} of {} bytes", entry.size),
            ),
            other => fail(ERC_DOWNLOAD_FAILED, format!("{name}: {other}")),
        })?;
    let got = sha256_file(dest)
        .await
        .map_err(|e| fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", dest.display())))?;
    if got != entry.sha256 {
        let _ = tokio::fs::remove_file(dest).await;
        return Err(fail(
            ERC_FILE_MISMATCH,
            format!(
                "{} hashes to {}, the manifest signs {}",
                entry.name,
                STANDARD.encode(got),
                STANDARD.encode(entry.sha256)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
