//! A file download that survives interruptions: a part already on disk is
//! resumed with `Range`, nothing beyond the expected size is ever written, and
//! what arrived before a failure is kept (synced) for the next attempt. Callers
//! check the content (hashes) themselves; this only gets the bytes.

use std::path::Path;

use tokio::io::AsyncWriteExt;

use crate::Client;

/// Why a download did not complete. The texts never carry the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The request failed (connection, TLS, timeout) or the body broke off;
    /// what arrived is kept.
    Transport(String),
    /// The server answered with this status instead of 200 or 206.
    Status(u16),
    /// The server sent more than the expected size (or the file on disk was
    /// already longer): the file is deleted.
    TooLong,
    /// The body ended before the expected size; what arrived is kept.
    Short { have: u64 },
    /// Writing the file failed.
    Io(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Transport(e) => write!(f, "{e}"),
            FetchError::Status(s) => write!(f, "HTTP {s}"),
            FetchError::TooLong => f.write_str("more bytes than expected"),
            FetchError::Short { have } => write!(f, "ended after {have} bytes"),
            FetchError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Downloads `url` into `dest` until it holds `size` bytes, resuming what is
/// there. `headers` go with the request (authorisation, `If-Match`).
pub async fn resume_to_file(
    client: &Client,
    url: &str,
    headers: &[(&str, &str)],
    dest: &Path,
    size: u64,
) -> Result<(), FetchError> {
    let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", dest.display()));
    let have = tokio::fs::metadata(dest)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if have > size {
        let _ = tokio::fs::remove_file(dest).await;
        return Err(FetchError::TooLong);
    }
    if have == size {
        return Ok(());
    }
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| FetchError::Transport(e.to_string()))?;
    let append = match resp.status {
        206 if have > 0 => true,
        200 => false,
        s => return Err(FetchError::Status(s)),
    };
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(dest)
        .await
        .map_err(io)?;
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
                let _ = f.sync_all().await;
                return Err(FetchError::Transport(e.to_string()));
            }
        };
        if n == 0 {
            break;
        }
        if written + n as u64 > size {
            drop(f);
            let _ = tokio::fs::remove_file(dest).await;
            return Err(FetchError::TooLong);
        }
        f.write_all(&buf[..n]).await.map_err(io)?;
        written += n as u64;
    }
    f.sync_all().await.map_err(io)?;
    if written < size {
        return Err(FetchError::Short { have: written });
    }
    Ok(())
}
