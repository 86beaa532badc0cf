//! A small HTTP/1.1 server side for the fake hub: keep-alive, bodies by
//! `Content-Length` or chunked, and responses written whole or streamed.

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A request as the fake hub sees it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// The path, percent-encoding kept.
    pub path: String,
    /// The raw query string (after `?`), if any.
    pub query: Option<String>,
    pub http10: bool,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }

    /// The bearer token, if any.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    pub fn wants_close(&self) -> bool {
        self.http10
            || self
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Decodes `%XX` escapes and `+` (as space), leaving malformed escapes as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    Bad(String),
    Io(io::Error),
}

/// Largest request head and body the fake accepts.
const MAX_HEAD: usize = 64 * 1024;
pub const MAX_BODY: usize = 512 * 1024 * 1024;

/// Reads one request, body included.
pub async fn read_request<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Request, ReadError> {
    let mut lines = Vec::new();
    let mut used = 0;
    loop {
        let mut line = Vec::new();
        let n = (&mut *r)
            .take((MAX_HEAD - used) as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return Err(if lines.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Bad("connection closed inside the request head".into())
            });
        }
        used += n;
        if used > MAX_HEAD {
            return Err(ReadError::Bad("request head too large".into()));
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.is_empty() {
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(text);
    }
    let mut first = lines[0].split(' ');
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default().to_owned();
    let version = first.next().unwrap_or_default();
    if method.is_empty() || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(format!("bad request line {:?}", lines[0])));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target, None),
    };
    let mut headers = Vec::new();
    for l in &lines[1..] {
        let (k, v) = l
            .split_once(':')
            .ok_or_else(|| ReadError::Bad(format!("bad header line {l:?}")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut req = Request {
        method,
        path,
        query,
        http10: version == "HTTP/1.0",
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.map_err(ReadError::Io)?;
            let size = size.trim().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(size, 16)
                .map_err(|_| ReadError::Bad(format!("bad chunk size {size:?}")))?;
            if req.body.len() + n > MAX_BODY {
                return Err(ReadError::Bad("body too large".into()));
            }
            let start = req.body.len();
            req.body.resize(start + n, 0);
            r.read_exact(&mut req.body[start..])
                .await
                .map_err(ReadError::Io)?;
            let mut crlf = String::new();
            r.read_line(&mut crlf).await.map_err(ReadError::Io)?;
            if n == 0 {
                break;
            }
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| ReadError::Bad(format!("bad Content-Length {len:?}")))?;
        if len > MAX_BODY {
            return Err(ReadError::Bad("body too large".into()));
        }
        req.body.resize(len, 0);
        r.read_exact(&mut req.body).await.map_err(ReadError::Io)?;
    }
    Ok(req)
}

/// A response: status, headers and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_owned(), v.into()));
        self
    }

    /// A JSON body, typed as go-json-rest types it.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        let mut r = Self::new(status).header("Content-Type", "application/json; charset=utf-8");
        r.body = body.into();
        r
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        416 => "Requested Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes the head of `resp` with `Content-Length: body_len`.
pub async fn write_head<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
    body_len: u64,
    close: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {body_len}\r\n"));
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes()).await
}
