//! Objects stream through the client both ways with bounded memory, whatever their
//! size. Alone in its own test binary so the process's peak RSS is this test's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};

use pv_testkit::sim::Generation;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Deterministic pseudo-random bytes, produced on demand.
struct Blob {
    left: u64,
    x: u64,
}

impl Blob {
    fn new(len: u64) -> Self {
        Self {
            left: len,
            x: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl AsyncRead for Blob {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize / 8 * 8;
        let n = if n == 0 {
            (buf.remaining() as u64).min(self.left) as usize
        } else {
            n
        };
        let mut chunk = Vec::with_capacity(n);
        while chunk.len() < n {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let take = (n - chunk.len()).min(8);
            chunk.extend_from_slice(&self.x.to_le_bytes()[..take]);
        }
        self.left -= n as u64;
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

/// A writer that only hashes.
struct HashSink(Sha256, u64);

impl AsyncWrite for HashSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.update(b);
        self.1 += b.len() as u64;
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Peak resident set of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_round_trip_keeps_memory_flat() {
    const SIZE: u64 = 96 * 1024 * 1024;
    let d = common::start_with(Generation::Gen2, |c| c.capacity = 1 << 30).await;
    let mut sink = HashSink(Sha256::new(), 0);
    tokio::io::copy(&mut Blob::new(SIZE), &mut sink)
        .await
        .unwrap();
    let sha = pv_bridge::pvctrl::hex(&sink.0.finalize());
    let before = peak_rss_kib();

    d.pv.put_object(&sha, Blob::new(SIZE), SIZE).await.unwrap();
    let listed = d.pv.objects().await.unwrap();
    assert_eq!(
        listed.iter().find(|o| o.sha256 == sha).map(|o| o.size),
        Some(SIZE)
    );
    let mut back = HashSink(Sha256::new(), 0);
    let n = d.pv.get_object(&sha, &mut back).await.unwrap();
    assert_eq!(n, SIZE);
    assert_eq!(pv_bridge::pvctrl::hex(&back.0.finalize()), sha);

    let growth_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    println!(
        "peak RSS growth for a {} MiB round trip: {growth_mib} MiB",
        SIZE >> 20
    );
    assert!(
        growth_mib <= 16,
        "peak RSS grew by {growth_mib} MiB moving {} MiB",
        SIZE >> 20
    );
}
