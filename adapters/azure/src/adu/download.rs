//! Downloading the files of a deployment (reference §6.2): `fileUrls` are not
//! signed, so each file is checked against its signed size and SHA-256 before it
//! is used. A part already on disk is resumed with `Range`; nothing beyond the
//! signed size is ever written.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let have = tokio::fs::metadata(dest)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if have < entry.size {
        let mut req = client.get(url);
        if have > 0 {
            req = req.header("Range", &format!("bytes={have}-"));
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", entry.name)))?;
        let append = match resp.status {
            206 if have > 0 => true,
            200 => false,
            s => {
                return Err(fail(
                    ERC_DOWNLOAD_FAILED,
                    format!("{} from {shown}: HTTP {s}", entry.name),
                ));
            }
        };
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(dest)
            .await
            .map_err(|e| fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", dest.display())))?;
        let mut written = if append { have } else { 0 };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match resp.chunk(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    // What arrived is kept for the next attempt: finish writing it
                    // (tokio hands writes to a thread; dropping the file would not
                    // wait for them).
                    let _ = f.flush().await;
                    return Err(fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", entry.name)));
                }
            };
            if n == 0 {
                break;
            }
            if written + n as u64 > entry.size {
                drop(f);
                let _ = tokio::fs::remove_file(dest).await;
                return Err(fail(
                    ERC_FILE_MISMATCH,
                    format!(
                        "{} is larger than the {} bytes the manifest signs",
                        entry.name, entry.size
                    ),
                ));
            }
            f.write_all(&buf[..n])
                .await
                .map_err(|e| fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", dest.display())))?;
            written += n as u64;
        }
        f.sync_all()
            .await
            .map_err(|e| fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", dest.display())))?;
        if written < entry.size {
            // Kept: the next attempt resumes it.
            return Err(fail(
                ERC_DOWNLOAD_FAILED,
                format!(
                    "{} ended after {written} of {} bytes",
                    entry.name, entry.size
                ),
            ));
        }
    }
    let got = sha256_file(dest)
        .await
        .map_err(|e| fail(ERC_DOWNLOAD_FAILED, format!("{}: {e}", dest.display())))?;
    if got != entry.sha256 || have > entry.size {
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
