//! A step's objects: sizes and signed download URLs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pv_adapter_api::{AdapterError, BoxFuture, ObjectFetcher, ObjectReader};
use serde::Deserialize;
use tracing::debug;

use crate::client::{Client, HubError, Method};

/// Objects of a step: signed URLs from `GET /objects/<sha>`, asked for again when
/// older than an hour (they last a day).
pub(crate) struct HubObjects {
    pub(crate) client: Arc<Client>,
    pub(crate) urls: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

impl HubObjects {
    /// Size and signed download URL of an object.
    pub(crate) async fn meta(&self, sha: &str) -> Result<(u64, String), HubError> {
        #[derive(Deserialize)]
        struct Meta {
            #[serde(default)]
            size: Option<String>,
            #[serde(default)]
            sizeint: Option<u64>,
            #[serde(rename = "signed-geturl")]
            url: String,
        }
        let what = format!("GET /objects/{sha}");
        let m: Meta = self
            .client
            .json(Method::GET, &format!("/objects/{sha}"), None)
            .await?;
        let size = match (m.sizeint.filter(|n| *n > 0), m.size.as_deref()) {
            (Some(n), _) => n,
            (None, Some(s)) => s.trim().parse().map_err(|_| HubError::Json {
                what: what.clone(),
                detail: format!("size {s:?} is not a number"),
            })?,
            (None, None) => {
                return Err(HubError::Json {
                    what,
                    detail: "no size".into(),
                });
            }
        };
        self.urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.to_owned(), (m.url.clone(), Instant::now()));
        Ok((size, m.url))
    }
}

impl ObjectFetcher for HubObjects {
    fn open(&self, key: &str) -> BoxFuture<'_, Result<(ObjectReader, u64), AdapterError>> {
        let key = key.to_owned();
        Box::pin(async move {
            Err(AdapterError::Object {
                key,
                reason: "hub objects are downloaded from their signed URL".into(),
            })
        })
    }

    fn url(&self, key: &str) -> BoxFuture<'_, Result<Option<String>, AdapterError>> {
        let key = key.to_owned();
        Box::pin(async move {
            let fresh = self
                .urls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .filter(|(_, at)| at.elapsed() < Duration::from_secs(3600))
                .map(|(u, _)| u.clone());
            if let Some(u) = fresh {
                return Ok(Some(u));
            }
            let mut wait = Duration::from_secs(1);
            for attempt in 1.. {
                match self.meta(&key).await {
                    Ok((_, url)) => return Ok(Some(url)),
                    Err(e) if e.is_transient() && attempt < 6 => {
                        debug!(object = %key, error = %e, "retrying the object's metadata");
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    Err(e) => {
                        return Err(AdapterError::Object {
                            key,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            unreachable!("the loop returns")
        })
    }
}
