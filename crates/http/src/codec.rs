//! A deliberately small HTTP/1.1 response codec, first written for pv-ctrl (see
//! `docs/decisions/0002-own-http-codec-for-pv-ctrl.md`) and shared by the client.
//!
//! Responses: `Content-Length`, chunked and close-delimited bodies; interim
//! `100 Continue` heads are skipped; an empty reason phrase is fine; only the first
//! final status line counts (pv-ctrl gen-1 may write an error and then `200 OK` on
//! one connection).

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Largest response head accepted (status line plus headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size line accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// A parsed response status line and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How the body that follows this head is delimited.
    pub fn framing(&self, request_was_head: bool) -> Result<Framing, String> {
        if request_was_head || self.status == 204 || self.status == 304 {
            return Ok(Framing::Length(0));
        }
        if let Some(te) = self.header("transfer-encoding") {
            let last = te.rsplit(',').next().unwrap_or_default().trim();
            if last.eq_ignore_ascii_case("chunked") {
                return Ok(Framing::Chunked);
            }
            if !last.eq_ignore_ascii_case("identity") {
                return Err(format!("unsupported Transfer-Encoding {te:?}"));
            }
        }
        match self.header("content-length") {
            Some(v) => v
                .trim()
                .parse()
                .map(Framing::Length)
                .map_err(|_| format!("bad Content-Length {v:?}")),
            None => Ok(Framing::Close),
        }
    }
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Read until the server closes the connection.
    Close,
}

/// Parses a status line such as `HTTP/1.1 200 OK` or gen-1's `HTTP/1.1 200 `.
pub fn parse_status_line(line: &str) -> Result<(u16, String), String> {
    let bad = || format!("bad status line {line:?}");
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .ok_or_else(bad)?;
    let code = rest.get(..3).ok_or_else(bad)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let after = &rest[3..];
    if !(after.is_empty() || after.starts_with(' ')) {
        return Err(bad());
    }
    let status = code.parse().map_err(|_| bad())?;
    Ok((status, after.trim().to_owned()))
}

/// Parses one header line (`Name: value`).
pub fn parse_header_line(line: &str) -> Result<(String, String), String> {
    let (k, v) = line
        .split_once(':')
        .ok_or_else(|| format!("bad header line {line:?}"))?;
    if k.is_empty() || k.contains(char::is_whitespace) {
        return Err(format!("bad header name in {line:?}"));
    }
    Ok((k.to_owned(), v.trim().to_owned()))
}

/// Reads one CRLF- (or LF-) terminated line, bounded by `budget`.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, budget: &mut usize) -> io::Result<String> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    if n > *budget {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "response head too large",
        ));
    }
    *budget -= n;
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside the response head",
        ));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "response head is not UTF-8"))
}

/// Reads the first final (non-1xx) response head.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Head> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(r, &mut budget).await?;
        let (status, reason) = parse_status_line(&line).map_err(invalid)?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(r, &mut budget).await?;
            if line.is_empty() {
                break;
            }
            headers.push(parse_header_line(&line).map_err(invalid)?);
        }
        if (100..200).contains(&status) {
            continue;
        }
        return Ok(Head {
            status,
            reason,
            headers,
        });
    }
}

/// Streams one response body according to its framing.
pub struct Body<R> {
    inner: R,
    framing: Framing,
    /// Bytes left in the current chunk or the whole fixed-length body.
    left: u64,
    /// Bytes of body delivered so far.
    read: u64,
    done: bool,
}

impl<R: AsyncBufRead + Unpin> Body<R> {
    pub fn new(inner: R, framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            inner,
            framing,
            left,
            read: 0,
            done: matches!(framing, Framing::Length(0)),
        }
    }

    fn eof(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed {what} after {} body bytes", self.read),
        )
    }

    /// Reads the next piece of the body into `buf`; `Ok(0)` at the end.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        match self.framing {
            Framing::Close => {
                let n = self.inner.read(buf).await?;
                self.done = n == 0;
                self.read += n as u64;
                Ok(n)
            }
            Framing::Length(total) => {
                let want = buf
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(self.eof(&format!("of a {total}-byte body")));
                }
                self.left -= n as u64;
                self.read += n as u64;
                self.done = self.left == 0;
                Ok(n)
            }
            Framing::Chunked => {
                if self.left == 0 {
                    self.next_chunk().await?;
                    if self.done {
                        return Ok(0);
                    }
                }
                let want = buf
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                let n = self.inner.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(self.eof("inside a chunk"));
                }
                self.left -= n as u64;
                self.read += n as u64;
                if self.left == 0 {
                    let mut budget = 2;
                    let line = read_line(&mut self.inner, &mut budget).await?;
                    if !line.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "chunk not followed by CRLF",
                        ));
                    }
                }
                Ok(n)
            }
        }
    }

    async fn next_chunk(&mut self) -> io::Result<()> {
        let mut budget = MAX_CHUNK_LINE;
        let line = read_line(&mut self.inner, &mut budget).await?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {line:?}"),
            )
        })?;
        if size == 0 {
            // Trailers, then the blank line.
            let mut budget = MAX_HEAD;
            while !read_line(&mut self.inner, &mut budget).await?.is_empty() {}
            self.done = true;
        }
        self.left = size;
        Ok(())
    }

    /// True once the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The reader after the body (to reuse a keep-alive connection).
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads the whole body, refusing more than `limit` bytes.
    pub async fn read_to_vec(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = self.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            if out.len() + n > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("response body larger than {limit} bytes"),
                ));
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_of_both_generations_parse() {
        assert_eq!(
            parse_status_line("HTTP/1.1 200 OK").unwrap(),
            (200, "OK".into())
        );
        assert_eq!(
            parse_status_line("HTTP/1.1 200 ").unwrap(),
            (200, "".into())
        );
        assert_eq!(parse_status_line("HTTP/1.1 200").unwrap(), (200, "".into()));
        assert_eq!(
            parse_status_line("HTTP/1.0 422 Unprocessable Content").unwrap(),
            (422, "Unprocessable Content".into())
        );
        for bad in [
            "HTTP/2 200 OK",
            "HTTP/1.1 2x0 OK",
            "HTTP/1.1 2000",
            "garbage",
            "",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }

    async fn body_of(raw: &[u8]) -> io::Result<(Head, Vec<u8>)> {
        let mut r = tokio::io::BufReader::new(raw);
        let head = read_head(&mut r).await?;
        let framing = head
            .framing(false)
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
        let body = Body::new(r, framing).read_to_vec(1 << 20).await?;
        Ok((head, body))
    }

    #[tokio::test]
    async fn reads_length_chunked_and_close_delimited_bodies() {
        let (h, b) = body_of(b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        assert_eq!((h.status, b.as_slice()), (200, &b"hello"[..]));
        let (_, b) = body_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nwiki\r\n5\r\npedia\r\n0\r\nT: v\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(b, b"wikipedia");
        let (h, b) = body_of(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
            .await
            .unwrap();
        assert_eq!((h.status, b.as_slice()), (200, &b"until close"[..]));
    }

    #[tokio::test]
    async fn the_first_final_status_line_wins() {
        // gen-1: an error response followed by a stray `200 OK` on the same connection.
        let raw = b"HTTP/1.1 404 Not Found \r\nContent-Length: 32\r\nContent-Type: application/json; charset=utf-8\r\n\r\n{\"Error\":\"User meta does not exist\"}HTTP/1.1 200 OK\r\n\r\n";
        let raw = {
            // Fix the length to the real JSON size.
            let s = String::from_utf8(raw.to_vec()).unwrap();
            let json = "{\"Error\":\"User meta does not exist\"}";
            s.replace(
                "Content-Length: 32",
                &format!("Content-Length: {}", json.len()),
            )
        };
        let (h, b) = body_of(raw.as_bytes()).await.unwrap();
        assert_eq!(h.status, 404);
        assert_eq!(b, br#"{"Error":"User meta does not exist"}"#);
    }

    #[tokio::test]
    async fn interim_continue_heads_are_skipped() {
        let (h, b) = body_of(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(h.status, 200);
        assert!(b.is_empty());
    }

    #[tokio::test]
    async fn truncated_bodies_and_heads_are_errors() {
        let e = body_of(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("after 3 body bytes"), "{e}");
        let e = body_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = body_of(b"HTTP/1.1 200 OK\r\nContent-Le").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = body_of(b"").await.unwrap_err();
        assert_eq!(e.to_string(), "connection closed before a response");
        let e = body_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bad chunk size"));
    }

    #[tokio::test]
    async fn oversize_heads_and_bodies_are_refused() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        raw.extend(
            std::iter::repeat_n(
                b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".as_slice(),
                500,
            )
            .flatten(),
        );
        let e = body_of(&raw).await.unwrap_err();
        assert_eq!(e.to_string(), "response head too large");
        let mut r = tokio::io::BufReader::new(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"[..],
        );
        let head = read_head(&mut r).await.unwrap();
        let e = Body::new(r, head.framing(false).unwrap())
            .read_to_vec(4)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "response body larger than 4 bytes");
    }
}
