//! Serving an export's objects to devices: HTTP/1.1 by hyper (keep-alive, any
//! number of clients at once), with byte ranges for resumed downloads, `HEAD`,
//! and the object's sha256 as its strong `ETag` (`If-Range` works); and answers
//! to MQTT chunk pulls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio_util::io::ReaderStream;

use crate::fleet::export::Export;

type Body = BoxBody<Bytes, std::io::Error>;

/// Starts the HTTP server; returns its address. `/objects/<sha256>` serves the
/// export's objects, `/state.json` its state.
pub async fn http(listen: SocketAddr, export: Arc<Export>) -> Result<SocketAddr, String> {
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        loop {
            let s = match l.accept().await {
                Ok((s, _)) => s,
                // Out of descriptors, say: let some connections end first.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let export = export.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let export = export.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &export).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(s), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = code;
    r
}

/// What a `Range` header asks of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// The whole object: no header, or a form we do not serve (several ranges,
    /// another unit, nonsense); the RFC lets a server ignore a Range.
    Whole,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// Nothing of the object: 416.
    Unsatisfiable,
}

/// A `Range` header's single byte range over `size` bytes.
pub fn byte_range(h: Option<&str>, size: u64) -> Wanted {
    match range(h, size) {
        Ok(None) => Wanted::Whole,
        Ok(Some((a, b))) => Wanted::Part(a, b),
        Err(()) => Wanted::Unsatisfiable,
    }
}

fn range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: the whole object instead
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes
        (true, false) => {
            let Some(n) = parse(b) else { return Ok(None) };
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (false, _) => {
            let Some(start) = parse(a) else {
                return Ok(None);
            };
            let end = if b.is_empty() {
                size.saturating_sub(1)
            } else {
                match parse(b) {
                    Some(e) if e >= start => e.min(size.saturating_sub(1)),
                    _ => return Ok(None),
                }
            };
            (start, end)
        }
        (true, true) => return Ok(None),
    };
    if size == 0 || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn answer(req: &Request<hyper::body::Incoming>, export: &Export) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = status(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    if path == "/state.json" {
        let body = if head {
            empty()
        } else {
            Full::new(Bytes::from(export.state.clone()))
                .map_err(|never| match never {})
                .boxed()
        };
        let mut r = Response::new(body);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, export.state.len().into());
        return r;
    }
    let Some(sha) = path.strip_prefix("/objects/") else {
        return status(StatusCode::NOT_FOUND);
    };
    let Some((file, size)) = export.objects.get(sha) else {
        return status(StatusCode::NOT_FOUND);
    };
    let size = *size;
    let etag = format!("\"{sha}\"");
    let text = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok());
    // If-Range: the range holds only for the same object (always, here: the
    // name is the content's hash; a different validator means the whole).
    let range_header = match text(header::IF_RANGE) {
        Some(v) if v.trim() != etag => None,
        _ => text(header::RANGE),
    };
    let (start, end, partial) = match byte_range(range_header, size) {
        Wanted::Part(s, e) => (s, e, true),
        Wanted::Whole => (0, size.saturating_sub(1), false),
        Wanted::Unsatisfiable => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let body = if head || len == 0 {
        empty()
    } else {
        let mut f = match tokio::fs::File::open(file).await {
            Ok(f) => f,
            Err(_) => return status(StatusCode::INTERNAL_SERVER_ERROR),
        };
        if f.seek(std::io::SeekFrom::Start(start)).await.is_err() {
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        }
        let stream = ReaderStream::with_capacity(f.take(len), 64 * 1024);
        StreamBody::new(futures_frames(stream)).boxed()
    };
    let mut r = Response::new(body);
    if partial {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, len.into());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    r
}

/// The file's chunks as body frames.
fn futures_frames(
    s: ReaderStream<tokio::io::Take<tokio::fs::File>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    FrameStream(s)
}

struct FrameStream<S>(S);

impl<S> futures_core::Stream for FrameStream<S>
where
    S: futures_core::Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    type Item = std::io::Result<Frame<Bytes>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|o| o.map(|r| r.map(Frame::data)))
    }
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

#[cfg(test)]
mod tests;
