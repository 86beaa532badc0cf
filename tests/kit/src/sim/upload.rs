//! `PUT /objects/<sha>`: how each generation takes an object upload, faults
//! included (partial files, a full disk, a stalled body).

use std::io;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use super::wire::{self, Reply};
use super::{Generation, Shared, device, drain};

/// `PUT /objects/<sha>`, as each generation really does it.
///
/// gen-2 (`ctrl/ctrl_objects_ep.c: ctrl_object_recv`, `ctrl/ctrl_upload.c`):
/// - an existing object whose checksum is valid: the body is drained, 200;
/// - otherwise the body streams straight into the final path (`ctrl_file.c` opens it
///   `O_CREAT|O_TRUNC`): a client that goes away mid-body leaves the partial file,
///   listed by `GET /objects` with its partial size;
/// - free space is checked per buffered chunk (`ctrl_upload_read_cb`); when it runs
///   out, writing stops and the rest is drained, and the complete callback
///   (`ctrl_object_upload_complete_cb`) answers **200** without checking the sum
///   (its `if (!file->ok) goto out` skips to `send_ok`): the partial file stays;
/// - a complete body with a wrong sum is deleted: 422.
///
/// gen-1 (`ctrl.c` of 023, `pv_ctrl_process_put_file`): Content-Length over free
/// space gets 507 up front; the body goes to `<sha>.tmp`; every `recv` waits at most
/// 1 s (`pv_ctrl_wait_recv`, `tv_sec = 1`), and a stall or a closed connection gets
/// 500 "Cannot read from socket" and the file is deleted; then the sum is checked
/// (422) and the file renamed into place.
pub(super) async fn put_object(
    req: &wire::Request,
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    sha: &str,
    shared: &Shared,
) -> io::Result<Reply> {
    let generation = shared.cfg.generation;
    if sha.len() != 64 {
        drain(rd, req).await?;
        return Ok(Reply::err(400, "Request has bad object name"));
    }
    let (final_path, free) = {
        let dev = shared.dev();
        (dev.store().object(sha), dev.free_bytes())
    };
    if generation == Generation::Gen2 && final_path.is_file() {
        let existing = tokio::task::spawn_blocking({
            let p = final_path.clone();
            move || device::sha256_file(&p)
        })
        .await
        .map_err(io::Error::other)?;
        if existing.is_some_and(|h| h == sha) {
            drain(rd, req).await?;
            return Ok(Reply::Ok);
        }
    }
    let len = req.content_length();
    if generation == Generation::Gen1 && len.is_some_and(|n| n > free) {
        drain(rd, req).await?;
        return Ok(Reply::err(507, "Not enough disk space available"));
    }
    let write_path = match generation {
        Generation::Gen1 => final_path.with_extension("tmp"),
        Generation::Gen2 => final_path.clone(),
    };
    let mut file = tokio::fs::File::create(&write_path).await?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut full = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut src: Box<dyn tokio::io::AsyncRead + Unpin + Send + '_> = if req.chunked() {
        // Rare for uploads; buffer it (the simulator only needs correctness here).
        let body = wire::read_body(rd, req, usize::MAX)
            .await?
            .unwrap_or_default();
        Box::new(std::io::Cursor::new(body))
    } else {
        Box::new((&mut *rd).take(len.unwrap_or(0)))
    };
    loop {
        let n = match generation {
            Generation::Gen2 => src.read(&mut buf).await?,
            Generation::Gen1 => {
                match tokio::time::timeout(GEN1_RECV_WAIT, src.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 || len.is_none_or(|l| written >= l) => n,
                    stalled => {
                        drop(file);
                        let _ = tokio::fs::remove_file(&write_path).await;
                        let why = match stalled {
                            Err(_) => "request timed out",
                            _ => "connection closed",
                        };
                        shared.dev().log(
                            "WARN",
                            "ctrl",
                            &format!("HTTP PUT content could not be read from ctrl socket ({why})"),
                        );
                        return Ok(Reply::err(500, "Cannot read from socket"));
                    }
                }
            }
        };
        if n == 0 {
            break;
        }
        if full {
            continue;
        }
        if written + n as u64 > free {
            // gen-2 only (gen-1 refused up front): stop writing, keep draining.
            full = true;
            shared.dev().log(
                "WARN",
                "ctrl_upload",
                &format!(
                    "at least {n} B needed but only {} B available. Cannot create file",
                    free.saturating_sub(written)
                ),
            );
            continue;
        }
        written += n as u64;
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await?;
    }
    file.flush().await?;
    drop(file);
    if full {
        shared.dev().log(
            "ERROR",
            "ctrl_upload",
            "upload error, object cannot be processed",
        );
        return Ok(Reply::Ok);
    }
    if len.is_some_and(|n| n != written) {
        // The client went away mid-body: gen-2 leaves the partial file in place.
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if device::hex(&hasher.finalize()) != sha {
        let _ = tokio::fs::remove_file(&write_path).await;
        return Ok(Reply::err(422, "Object has bad checksum"));
    }
    if write_path != final_path {
        tokio::fs::rename(&write_path, &final_path).await?;
    }
    shared.dev().log(
        "INFO",
        "ctrl",
        &format!("object {sha} stored ({written} bytes)"),
    );
    Ok(Reply::Ok)
}

/// How long gen-1 waits for each piece of a request body (`pv_ctrl_wait_recv`).
pub const GEN1_RECV_WAIT: Duration = Duration::from_secs(1);
