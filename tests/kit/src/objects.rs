//! An HTTP/1.1 object server on loopback for download tests: `GET` with `Range`,
//! `If-Range` and `ETag`, plus faults queued by the test (cut a body short, answer
//! an error status) and a record of every request. Plain HTTP, or HTTPS with a
//! certificate the test provides.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A fault applied to the next `GET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send the headers as usual, then only this many body bytes, then close.
    CutAfter(usize),
    /// Answer with this status and an empty body.
    Status(u16),
    /// Send the body at about this many bytes per second (in 4 KiB pieces).
    Slow(u64),
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub range_start: Option<u64>,
    pub if_range: Option<String>,
    pub status: u16,
    /// Whether the request carried an `Authorization` header (a credential
    /// sent to a host it was not meant for).
    pub authorization: bool,
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, (Arc<Vec<u8>>, String)>,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    /// Body bytes written to clients, by path.
    served: BTreeMap<String, u64>,
    /// Every body is sent at about this many bytes per second (a slow link).
    rate: Option<u64>,
}

pub struct ObjectServer {
    addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for ObjectServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ObjectServer {
    pub async fn start() -> io::Result<ObjectServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, st.clone()));
            }
        });
        Ok(ObjectServer {
            addr,
            scheme: "http",
            state,
            task,
        })
    }

    /// HTTPS with the certificate chain and key (PEM files) given.
    pub async fn start_tls(cert_chain: &Path, key: &Path) -> io::Result<ObjectServer> {
        let acceptor = crate::hub::acceptor(cert_chain, key)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    // A client that rejects our certificate just goes away.
                    if let Ok(tls) = acceptor.accept(s).await {
                        serve(tls, st).await;
                    }
                });
            }
        });
        Ok(ObjectServer {
            addr,
            scheme: "https",
            state,
            task,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Serves `data` at `path`, with an ETag derived from a counter.
    pub fn put(&self, path: &str, data: Vec<u8>) {
        let mut s = self.state();
        let etag = format!("\"v{}-{}\"", s.files.len(), data.len());
        s.files.insert(path.to_owned(), (Arc::new(data), etag));
    }

    /// Replaces the content at `path` and gives it a new ETag.
    pub fn replace(&self, path: &str, data: Vec<u8>) {
        let mut s = self.state();
        let etag = format!("\"r{}-{}\"", s.seen.len(), data.len());
        s.files.insert(path.to_owned(), (Arc::new(data), etag));
    }

    /// Queues a fault for the next `GET`.
    pub fn fault(&self, f: Fault) {
        self.state().faults.push_back(f);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state().seen.clone()
    }

    /// Body bytes written to clients for `path` so far (what a metered link bills).
    pub fn bytes_served(&self, path: &str) -> u64 {
        self.state().served.get(path).copied().unwrap_or(0)
    }

    /// Sends every body at about `bytes_per_sec` from now on (`None`: full speed).
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        self.state().rate = bytes_per_sec;
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    state: Arc<Mutex<State>>,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line.trim_end().to_owned());
        if head.len() > 100 {
            return;
        }
    }
    let mut parts = head.first().map(|l| l.split(' ')).into_iter().flatten();
    let (method, path) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let range_start = header("range")
        .and_then(|r| r.strip_prefix("bytes=").map(str::to_owned))
        .and_then(|r| r.strip_suffix('-').and_then(|n| n.parse().ok()));
    let if_range = header("if-range");
    let authorization = header("authorization").is_some();
    let (fault, file) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let fault = s.faults.pop_front().or(s.rate.map(Fault::Slow));
        (fault, s.files.get(&path).cloned())
    };
    let record = |status: u16| {
        state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .push(Seen {
                path: path.clone(),
                range_start,
                if_range: if_range.clone(),
                status,
                authorization,
            });
    };
    if method != "GET" {
        record(405);
        let _ = wr.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        return;
    }
    if let Some(Fault::Status(code)) = fault {
        record(code);
        let _ = wr
            .write_all(
                format!("HTTP/1.1 {code} Fault\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        return;
    }
    let Some((data, etag)) = file else {
        record(404);
        let _ = wr
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let len = data.len() as u64;
    let ranged = range_start.filter(|s| *s < len && if_range.as_ref().is_none_or(|v| *v == etag));
    let (status, start, head) = match ranged {
        Some(s) => (
            206,
            s,
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{}/{len}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                len - s,
                len - 1
            ),
        ),
        None => (
            200,
            0,
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n"
            ),
        ),
    };
    record(status);
    if wr.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let body = &data[start as usize..];
    let body = match fault {
        Some(Fault::CutAfter(n)) => &body[..n.min(body.len())],
        _ => body,
    };
    let (piece_len, pause) = match fault {
        Some(Fault::Slow(rate)) => (
            4096,
            Some(std::time::Duration::from_secs_f64(
                4096.0 / rate.max(1) as f64,
            )),
        ),
        _ => (64 * 1024, None),
    };
    for piece in body.chunks(piece_len) {
        if wr.write_all(piece).await.is_err() {
            return;
        }
        *state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .served
            .entry(path.clone())
            .or_default() += piece.len() as u64;
        if let Some(p) = pause {
            let _ = wr.flush().await;
            tokio::time::sleep(p).await;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}
