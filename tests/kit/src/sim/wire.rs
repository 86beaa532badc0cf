//! Server side of pv-ctrl's HTTP, byte-exact for both generations.
//!
//! gen-2 (libevent): keep-alive, `Content-Type: application/json` on every JSON and
//! empty 200, chunked object downloads, `{"Error":..}` bodies with libevent's reason
//! phrases. gen-1 (≤ 023): one request per connection, at most 8 headers and 4096
//! header bytes, `HTTP/1.1 200 OK\r\n\r\n` for successful PUT/POST, an empty reason
//! phrase on successful GET, and an error body typed `application/json;
//! charset=utf-8`.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Generation;

/// A request head as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The raw request target, never decoded (Pantavisor routes on it verbatim).
    pub target: String,
    pub http10: bool,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.trim().parse().ok()
    }

    pub fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    /// Whether the connection ends after this exchange.
    pub fn wants_close(&self) -> bool {
        self.http10
            || self
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Why a request head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed before sending anything: a normal end of keep-alive.
    Closed,
    /// Too many or too large headers, or not HTTP.
    BadFormat(String),
    Io,
}

/// Reads a request head. gen-1 allows 4096 bytes and 8 headers.
pub async fn read_request<R: AsyncBufRead + Unpin>(
    r: &mut R,
    generation: Generation,
) -> Result<Request, HeadError> {
    let (max_bytes, max_headers) = match generation {
        Generation::Gen1 => (4096usize, 8usize),
        Generation::Gen2 => (16 * 1024, 100),
    };
    let mut used = 0usize;
    let mut first = true;
    let mut lines = Vec::new();
    loop {
        let mut buf = Vec::new();
        let n = (&mut *r)
            .take((max_bytes - used) as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(if first && lines.is_empty() {
                HeadError::Closed
            } else {
                HeadError::BadFormat("connection closed inside the request head".into())
            });
        }
        used += n;
        if used > max_bytes {
            return Err(HeadError::BadFormat("request head too large".into()));
        }
        if buf.last() != Some(&b'\n') {
            return Err(HeadError::BadFormat(
                "connection closed inside the request head".into(),
            ));
        }
        let line = String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        if first && line.is_empty() {
            // Tolerate stray CRLF between keep-alive requests.
            continue;
        }
        first = false;
        if line.is_empty() {
            break;
        }
        lines.push(line);
        if lines.len() > max_headers + 1 {
            return Err(HeadError::BadFormat("too many headers".into()));
        }
    }
    let mut it = lines.into_iter();
    let start = it.next().unwrap_or_default();
    let mut parts = start.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::BadFormat(format!("bad request line {start:?}")));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => {
            return Err(HeadError::BadFormat(format!(
                "bad HTTP version {version:?}"
            )));
        }
    };
    let mut headers = Vec::new();
    for line in it {
        let Some((k, v)) = line.split_once(':') else {
            return Err(HeadError::BadFormat(format!("bad header line {line:?}")));
        };
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        http10,
        headers,
    })
}

/// Reads a whole request body into memory, up to `limit` bytes. `Ok(None)` when it
/// is larger than `limit` (the caller answers with the handler's quirk).
pub async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    req: &Request,
    limit: usize,
) -> io::Result<Option<Vec<u8>>> {
    if req.chunked() {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            if (&mut *r).take(1024).read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                loop {
                    let mut t = String::new();
                    if (&mut *r).take(1024).read_line(&mut t).await? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                return Ok(Some(out));
            }
            if out.len() + size > limit {
                return Ok(None);
            }
            let start = out.len();
            out.resize(start + size, 0);
            r.read_exact(&mut out[start..]).await?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).await?;
        }
    }
    let len = req.content_length().unwrap_or(0);
    if len > limit as u64 {
        return Ok(None);
    }
    let mut out = vec![0u8; len as usize];
    r.read_exact(&mut out).await?;
    Ok(Some(out))
}

/// libevent's (and Pantavisor's own table's) reason phrases.
pub fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Content",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// What a handler answers.
#[derive(Debug)]
pub enum Reply {
    /// 200 with no data.
    Ok,
    /// 200 with a JSON body.
    Json(Vec<u8>),
    /// 200 `text/plain`.
    Text(Vec<u8>),
    /// 204, no body.
    NoContent,
    Error {
        code: u16,
        text: String,
        retry_after: Option<u32>,
        /// gen-1 quirk: a `200 OK` follows the error on the same connection.
        then_ok: bool,
    },
    /// Stream a file (`GET /objects/<sha>`).
    File(std::path::PathBuf),
    /// Quirk: never answer (gen-2 wildcard PUTs with an empty body).
    Silence,
    /// Close the connection without any answer (gen-2 wrong Host).
    Drop,
}

impl Reply {
    pub fn err(code: u16, text: impl Into<String>) -> Self {
        Reply::Error {
            code,
            text: text.into(),
            retry_after: None,
            then_ok: false,
        }
    }

    pub fn json(v: &serde_json::Value) -> Self {
        Reply::Json(v.to_string().into_bytes())
    }
}

fn error_body(text: &str) -> Vec<u8> {
    serde_json::json!({ "Error": text })
        .to_string()
        .into_bytes()
}

/// Writes `reply` for `method`. Returns false if the connection must close.
pub async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    generation: Generation,
    req: &Request,
    reply: Reply,
) -> io::Result<bool> {
    let keep = generation == Generation::Gen2 && !req.wants_close();
    match (generation, reply) {
        (_, Reply::Drop) => return Ok(false),
        (_, Reply::Silence) => return Ok(keep),
        (Generation::Gen2, Reply::Ok) => {
            w.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n",
            )
            .await?
        }
        (Generation::Gen2, Reply::Json(b)) => {
            write_full(w, 200, "application/json", &b, None).await?
        }
        (Generation::Gen2, Reply::Text(b)) => write_full(w, 200, "text/plain", &b, None).await?,
        (_, Reply::NoContent) => w.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await?,
        (
            Generation::Gen2,
            Reply::Error {
                code,
                text,
                retry_after,
                ..
            },
        ) => write_full(w, code, "application/json", &error_body(&text), retry_after).await?,
        (Generation::Gen2, Reply::File(path)) => {
            stream_file(w, &path, req.http10).await?;
            return Ok(keep && !req.http10);
        }
        (Generation::Gen1, Reply::Ok) => w.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?,
        (Generation::Gen1, Reply::Json(b) | Reply::Text(b)) => {
            let head = format!("HTTP/1.1 200 \r\nContent-Length: {}\r\n\r\n", b.len());
            w.write_all(&[head.as_bytes(), &b].concat()).await?
        }
        (Generation::Gen1, Reply::File(path)) => {
            let mut f = tokio::fs::File::open(&path).await?;
            let len = f.metadata().await?.len();
            let head = format!("HTTP/1.1 200 \r\nContent-Length: {len}\r\n\r\n");
            w.write_all(head.as_bytes()).await?;
            tokio::io::copy(&mut f, w).await?;
        }
        (
            Generation::Gen1,
            Reply::Error {
                code,
                text,
                then_ok,
                ..
            },
        ) => {
            let body = error_body(&text);
            let head = format!(
                "HTTP/1.1 {code} {} \r\nContent-Length: {}\r\nContent-Type: application/json; charset=utf-8\r\n\r\n",
                reason(code),
                body.len()
            );
            w.write_all(&[head.as_bytes(), &body].concat()).await?;
            if then_ok {
                w.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
            }
        }
    }
    w.flush().await?;
    Ok(keep)
}

async fn write_full<W: AsyncWrite + Unpin>(
    w: &mut W,
    code: u16,
    ctype: &str,
    body: &[u8],
    retry_after: Option<u32>,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n",
        reason(code),
        body.len()
    );
    if let Some(s) = retry_after {
        head.push_str(&format!("Retry-After: {s}\r\n"));
    }
    head.push_str("\r\n");
    w.write_all(&[head.as_bytes(), body].concat()).await
}

/// gen-2 object download: 4 KiB chunks, chunked on HTTP/1.1 and close-delimited on
/// HTTP/1.0.
async fn stream_file<W: AsyncWrite + Unpin>(
    w: &mut W,
    path: &std::path::Path,
    http10: bool,
) -> io::Result<()> {
    let mut f = tokio::fs::File::open(path).await?;
    let head: &[u8] = if http10 {
        b"HTTP/1.0 200 OK\r\ncontent-type: application/octet-stream\r\nConnection: close\r\n\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    };
    w.write_all(head).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if http10 {
            w.write_all(&buf[..n]).await?;
        } else {
            w.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            w.write_all(&buf[..n]).await?;
            w.write_all(b"\r\n").await?;
        }
    }
    if !http10 {
        w.write_all(b"0\r\n\r\n").await?;
    }
    w.flush().await
}
