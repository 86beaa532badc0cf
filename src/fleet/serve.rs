//! Serving an export's objects to devices: a small HTTP/1.1 server (GET with
//! `Range: bytes=N-` for resumed downloads), and answers to MQTT chunk pulls.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::fleet::export::Export;

/// Starts the HTTP server; returns its address. `/objects/<sha256>` serves the
/// export's objects, `/state.json` its state.
pub async fn http(listen: SocketAddr, export: Arc<Export>) -> Result<SocketAddr, String> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let export = export.clone();
            tokio::spawn(async move {
                let _ = answer(s, &export).await;
            });
        }
    });
    Ok(addr)
}

async fn status(s: &mut TcpStream, code: &str) -> std::io::Result<()> {
    s.write_all(
        format!("HTTP/1.1 {code}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

async fn answer(mut s: TcpStream, export: &Export) -> std::io::Result<()> {
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut range: Option<u64> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if h.len() > 8192 {
            return status(&mut s, "431 Request Header Fields Too Large").await;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|v| v.strip_suffix('-'))
                    .and_then(|n| n.parse().ok());
            }
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return status(&mut s, "405 Method Not Allowed").await;
    }
    if path == "/state.json" {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            export.state.len()
        );
        s.write_all(head.as_bytes()).await?;
        return s.write_all(&export.state).await;
    }
    let Some((file, size)) = path
        .strip_prefix("/objects/")
        .and_then(|sha| export.objects.get(sha))
    else {
        return status(&mut s, "404 Not Found").await;
    };
    let start = range.unwrap_or(0);
    if start > *size {
        return status(&mut s, "416 Range Not Satisfiable").await;
    }
    let mut f = tokio::fs::File::open(file).await?;
    f.seek(std::io::SeekFrom::Start(start)).await?;
    let head = match range {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {start}-{}/{size}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            size.saturating_sub(1),
            size - start
        ),
        None => format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {size}\r\naccept-ranges: bytes\r\nconnection: close\r\n\r\n"
        ),
    };
    s.write_all(head.as_bytes()).await?;
    tokio::io::copy(&mut f.take(size - start), &mut s).await?;
    s.shutdown().await
}

/// The bytes of one chunk pull (`blob/get`), or an empty answer when the export
/// does not have the object or the range is wrong.
pub async fn chunk(export: &Export, sha: &str, offset: u64, length: u64) -> Vec<u8> {
    let Some((file, size)) = export.objects.get(sha) else {
        return Vec::new();
    };
    if offset >= *size || length == 0 || length > 4 * 1024 * 1024 {
        return Vec::new();
    }
    let n = length.min(size - offset);
    let Ok(mut f) = tokio::fs::File::open(file).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = vec![0; n as usize];
    match f.read_exact(&mut buf).await {
        Ok(_) => buf,
        Err(_) => Vec::new(),
    }
}
