//! The device's store as adapters see it ([`DeviceStore`]): state JSONs and objects
//! read through pv-ctrl.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pv_adapter_api::{AdapterError, BoxFuture, DeviceStore, ObjectReader};
use tokio::io::{AsyncRead, ReadBuf};

use crate::pvctrl::{Meta, PvCtrl};

/// Reads the device's store through pv-ctrl.
pub struct PvStore {
    pv: PvCtrl,
}

impl PvStore {
    pub fn new(pv: PvCtrl) -> Self {
        Self { pv }
    }
}

impl DeviceStore for PvStore {
    fn set_device_meta<'a>(
        &'a self,
        key: &'a str,
        value: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let r = match value {
                Some(v) => self.pv.put_meta(Meta::Device, key, v.as_bytes()).await,
                None => self.pv.delete_meta(Meta::Device, key).await,
            };
            r.map_err(|e| AdapterError::Object {
                key: format!("device-meta {key}"),
                reason: e.to_string(),
            })
        })
    }

    fn state(&self, rev: &str) -> BoxFuture<'_, Result<Vec<u8>, AdapterError>> {
        let rev = rev.to_owned();
        Box::pin(async move {
            self.pv.step(&rev).await.map_err(|e| AdapterError::Object {
                key: format!("state of {rev}"),
                reason: e.to_string(),
            })
        })
    }

    fn object(&self, sha: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>> {
        let sha = sha.to_owned();
        Box::pin(async move {
            let fail = |reason: String| AdapterError::Object {
                key: sha.clone(),
                reason,
            };
            let listed = self.pv.objects().await.map_err(|e| fail(e.to_string()))?;
            let len = listed
                .iter()
                .find(|o| o.sha256 == sha)
                .map(|o| o.size)
                .ok_or_else(|| fail("not in the device's store".into()))?;
            // pv-ctrl writes into one end of a small pipe while the caller reads
            // the other: memory stays at the pipe's size whatever the object's.
            let (mut tx, rx) = tokio::io::duplex(64 * 1024);
            let (err_tx, err_rx) = tokio::sync::oneshot::channel();
            let pv = self.pv.clone();
            let key = sha.clone();
            tokio::spawn(async move {
                let r = pv.get_object(&key, &mut tx).await;
                let _ = err_tx.send(r.err().map(|e| {
                    let kind = if matches!(e, crate::pvctrl::Error::BadHash { .. }) {
                        std::io::ErrorKind::InvalidData
                    } else {
                        std::io::ErrorKind::Other
                    };
                    (kind, e.to_string())
                }));
            });
            let reader = Checked {
                inner: rx,
                left: len,
                error: Some(err_rx),
            };
            Ok((Box::new(reader) as ObjectReader, len))
        })
    }
}

/// A reader that fails instead of ending early: the object's length is known, and a
/// pv-ctrl error (bad hash, cut connection) is turned into a read error.
struct Checked {
    inner: tokio::io::DuplexStream,
    left: u64,
    error: Option<tokio::sync::oneshot::Receiver<Option<(std::io::ErrorKind, String)>>>,
}

impl AsyncRead for Checked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if n > 0 {
                    self.left = self.left.saturating_sub(n);
                    return Poll::Ready(Ok(()));
                }
                // End of the pipe: it is a clean end only if pv-ctrl said so.
                let outcome = match self.error.as_mut() {
                    Some(rx) => match Pin::new(rx).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r.unwrap_or(Some((
                            std::io::ErrorKind::Other,
                            "pv-ctrl reader stopped".into(),
                        ))),
                    },
                    None => None,
                };
                self.error = None;
                if let Some((kind, reason)) = outcome {
                    return Poll::Ready(Err(std::io::Error::new(kind, reason)));
                }
                if self.left > 0 {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("pv-ctrl sent {} bytes less than listed", self.left),
                    )));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}
