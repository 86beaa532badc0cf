//! Device-driven object pulls over MQTT, for sites where the broker is the only
//! way in (protocol v1, `blob/get`).
//!
//! The bridge publishes `blob/get` `{v, sha256, offset, length}`; the operator
//! answers on `blob/<sha256>/<offset>` with exactly those raw bytes (an empty
//! payload means "I do not have it"). A few chunks are asked for ahead of need so
//! the pull keeps moving; memory stays bounded by that window. A chunk that does
//! not come is asked for again, across reconnects, before the pull gives up.
//! Every byte is still checked against the sha256 by the engine.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use pv_adapter_api::{AdapterError, BoxFuture, ObjectFetcher, ObjectReader, is_sha256_hex};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::protocol::{self, Topics};
use crate::transport::Client;

/// How chunk pulls behave.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Bytes asked for in one `blob/get`.
    pub chunk: u64,
    /// Chunks asked for ahead of the one being read.
    pub window: usize,
    /// How long one request may go unanswered before it is asked again.
    pub timeout: Duration,
    /// Requests per chunk before the pull fails.
    pub attempts: u32,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            chunk: 64 * 1024,
            window: 4,
            timeout: Duration::from_secs(30),
            attempts: 5,
        }
    }
}

type Waiting = BTreeMap<(String, u64), oneshot::Sender<Bytes>>;

struct Inner {
    topics: Topics,
    opts: PullOptions,
    client: Mutex<Option<Client>>,
    waiting: Mutex<Waiting>,
}

/// The object fetcher of the MQTT adapter; cheap to clone.
#[derive(Clone)]
pub struct Pull(Arc<Inner>);

impl Pull {
    pub fn new(topics: Topics, opts: PullOptions) -> Pull {
        Pull(Arc::new(Inner {
            topics,
            opts,
            client: Mutex::new(None),
            waiting: Mutex::new(BTreeMap::new()),
        }))
    }

    /// The connection requests go out on (`None` while disconnected).
    pub fn set_client(&self, c: Option<Client>) {
        if let Ok(mut g) = self.0.client.lock() {
            *g = c;
        }
    }

    /// Hands an arrived chunk to its reader; false if nobody asked for it
    /// (late duplicates, answers to requests already given up).
    pub fn deliver(&self, sha: &str, offset: u64, payload: Bytes) -> bool {
        let tx = self
            .0
            .waiting
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&(sha.to_owned(), offset)));
        match tx {
            Some(tx) => tx.send(payload).is_ok(),
            None => false,
        }
    }

    /// Asks for one chunk; the receiver gets its bytes.
    fn request(&self, sha: &str, offset: u64, length: u64) -> oneshot::Receiver<Bytes> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.0.waiting.lock() {
            w.insert((sha.to_owned(), offset), tx);
        }
        let client = self.0.client.lock().ok().and_then(|g| g.clone());
        match client {
            Some(c) => {
                let payload = serde_json::to_vec(&protocol::blob_get(sha, offset, length))
                    .unwrap_or_default();
                if !c.try_publish(self.0.topics.blob_get(), false, payload) {
                    debug!(sha, offset, "blob/get not queued; will ask again");
                }
            }
            None => debug!(sha, offset, "not connected; will ask again"),
        }
        rx
    }

    fn forget(&self, sha: &str) {
        if let Ok(mut w) = self.0.waiting.lock() {
            w.retain(|(s, _), _| s != sha);
        }
    }

    /// Pulls `sha` (`size` bytes) into `out`, chunk by chunk, in order.
    async fn pull(self, sha: String, size: u64, out: mpsc::Sender<io::Result<Bytes>>) {
        let o = self.0.opts.clone();
        let want = |off: u64| o.chunk.min(size - off);
        let mut ahead: VecDeque<(u64, oneshot::Receiver<Bytes>)> = VecDeque::new();
        let mut next = 0u64;
        let mut done = 0u64;
        while done < size {
            while ahead.len() < o.window.max(1) && next < size {
                ahead.push_back((next, self.request(&sha, next, want(next))));
                next += want(next);
            }
            let Some((off, mut rx)) = ahead.pop_front() else {
                break;
            };
            let mut attempts = 1;
            let bytes = loop {
                match tokio::time::timeout(o.timeout, &mut rx).await {
                    Ok(Ok(b)) => break Ok(b),
                    _ if out.is_closed() => {
                        self.forget(&sha);
                        return; // the reader is gone
                    }
                    Ok(Err(_)) | Err(_) if attempts < o.attempts => {
                        attempts += 1;
                        warn!(sha = %sha, offset = off, attempt = attempts, "chunk not answered; asking again");
                        rx = self.request(&sha, off, want(off));
                    }
                    _ => {
                        break Err(format!(
                            "no answer on blob/{sha}/{off} after {} requests of {:?}",
                            o.attempts, o.timeout
                        ));
                    }
                }
            };
            let result = bytes.and_then(|b| {
                if b.is_empty() {
                    Err(format!(
                        "the operator has no object {sha} (empty chunk at {off})"
                    ))
                } else if b.len() as u64 != want(off) {
                    Err(format!(
                        "blob/{sha}/{off}: {} bytes, asked for {}",
                        b.len(),
                        want(off)
                    ))
                } else {
                    Ok(b)
                }
            });
            match result {
                Ok(b) => {
                    done += b.len() as u64;
                    if out.send(Ok(b)).await.is_err() {
                        break; // the reader is gone
                    }
                }
                Err(e) => {
                    warn!(error = %e, "chunk pull failed");
                    let _ = out.send(Err(io::Error::other(e))).await;
                    break;
                }
            }
        }
        self.forget(&sha);
    }
}

/// Reads what a pull task sends.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.cur.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(b))) => self.cur = b,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.cur.len().min(buf.remaining());
        buf.put_slice(&self.cur.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl ObjectFetcher for Pull {
    /// `key` is `<sha256>:<size>` (the offer gave the size).
    fn open(&self, key: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>> {
        let parsed = key
            .split_once(':')
            .filter(|(sha, _)| is_sha256_hex(sha))
            .and_then(|(sha, n)| n.parse::<u64>().ok().map(|n| (sha.to_owned(), n)));
        let key = key.to_owned();
        Box::pin(async move {
            let (sha, size) = parsed.ok_or_else(|| AdapterError::Object {
                key,
                reason: "not a <sha256>:<size> chunk-pull key".into(),
            })?;
            let (tx, rx) = mpsc::channel(2);
            if size > 0 {
                tokio::spawn(self.clone().pull(sha, size, tx));
            }
            let reader = ChunkReader {
                rx,
                cur: Bytes::new(),
            };
            Ok((Box::new(reader) as ObjectReader, size))
        })
    }
}
