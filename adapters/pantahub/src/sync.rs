//! Factory sync: the running revision becomes the hub's revision 0.

use pv_adapter_api::AdapterError;
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::client::{Method, status_error};
use crate::{Hub, wire};

impl Hub {
    pub(crate) async fn factory_sync(&self, device: &str) -> Result<(), AdapterError> {
        let mut wait = self.poll();
        loop {
            match self.try_sync(device).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(backend = %self.link.backend(), error = %e, retry_in = ?wait, "factory sync failed; retrying");
                    tokio::time::sleep(pv_adapter_api::timing::jittered(wait, 0.2)).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(300));
                }
            }
        }
    }

    pub(crate) async fn try_sync(&self, device: &str) -> Result<(), String> {
        let trails: Vec<Value> = self
            .client
            .json(Method::GET, "/trails/", None)
            .await
            .map_err(|e| e.to_string())?;
        if !trails.is_empty() {
            return Ok(());
        }
        let mut view = self.link.view();
        let running = loop {
            if let Some(r) = view.borrow().running.clone() {
                break r;
            }
            if view.changed().await.is_err() {
                return Err("the engine stopped".into());
            }
        };
        let store = self
            .link
            .device()
            .ok_or("the engine gives no access to the device's store")?;
        let state = store.state(&running).await.map_err(|e| e.to_string())?;
        let parsed: Value = serde_json::from_slice(&state)
            .map_err(|e| format!("the state of {running} is not JSON: {e}"))?;
        let objects = wire::state_objects(&parsed)?;
        info!(backend = %self.link.backend(), device, revision = %running, objects = objects.len(), "uploading the running revision as the factory state");
        let mut uploaded = 0u64;
        let mut seen = std::collections::BTreeSet::new();
        for (name, sha) in &objects {
            if !seen.insert(sha.clone()) {
                continue;
            }
            if self.memory().synced.contains(sha) {
                continue;
            }
            uploaded += self.upload_object(&*store, name, sha).await?;
            self.remember(|m| {
                m.synced.insert(sha.clone());
            });
        }
        let r = self
            .client
            .call(Method::POST, "/trails/", Some(state))
            .await
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(status_error("POST /trails/", &r).to_string());
        }
        self.remember(|m| {
            m.factory_rev = Some(running.clone());
            m.synced.clear();
        });
        info!(backend = %self.link.backend(), revision = %running, bytes = uploaded, "factory state synced to the hub");
        Ok(())
    }

    /// Hashes the stored object (a writable object whose bytes changed since it
    /// was installed no longer matches its name: skipped, as Pantavisor skips it),
    /// then `POST /objects/` and, unless the hub has it (409), a streamed `PUT` of
    /// the bytes to the signed URL. Returns the bytes sent.
    pub(crate) async fn upload_object(
        &self,
        store: &dyn pv_adapter_api::DeviceStore,
        name: &str,
        sha: &str,
    ) -> Result<u64, String> {
        let (reader, len) = store.object(sha).await.map_err(|e| e.to_string())?;
        let actual = match sha256_of(reader).await {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => String::new(),
            Err(e) => {
                return Err(format!(
                    "reading object {name} ({sha}) from the device: {e}"
                ));
            }
        };
        if actual != sha {
            warn!(backend = %self.link.backend(), object = %sha, name, "the object's bytes no longer match its name (a writable object?); not uploading it");
            return Ok(0);
        }
        let (reader, len2) = store.object(sha).await.map_err(|e| e.to_string())?;
        if len2 != len {
            return Err(format!(
                "object {name} ({sha}) changed size while it was read"
            ));
        }
        let body = json!({"objectname": name, "size": len.to_string(), "sha256sum": sha});
        let r = self
            .client
            .call(
                Method::POST,
                "/objects/",
                Some(body.to_string().into_bytes()),
            )
            .await
            .map_err(|e| e.to_string())?;
        match r.status {
            409 => {
                debug!(object = %sha, "the hub has it already");
                return Ok(0);
            }
            200 => {}
            _ => return Err(status_error("POST /objects/", &r).to_string()),
        }
        let obj: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("POST /objects/: unexpected answer: {e}"))?;
        let put = obj
            .get("signed-puturl")
            .and_then(Value::as_str)
            .ok_or("POST /objects/: no signed-puturl in the answer")?;
        let url = self.client.upload_url(put);
        let resp = self
            .client
            .http()
            .request("PUT", &url)
            .header("Content-Type", "application/json")
            .body(pv_http::Body::Reader(reader, len))
            .send()
            .await
            .map_err(|e| format!("PUT object {sha}: {e}"))?;
        let status = resp.status;
        let _ = resp.bytes(64 * 1024).await;
        if status != 200 {
            // The bytes matched their name here: a refusal is the hub's or the
            // link's, and the pass is tried again (as Pantavisor aborts it).
            return Err(format!(
                "PUT object {name} ({sha}): the hub answered {status}"
            ));
        }
        info!(backend = %self.link.backend(), object = %sha, name, bytes = len, "object uploaded");
        Ok(len)
    }
}

/// The sha256 (hex) of everything `reader` gives.
async fn sha256_of(mut reader: pv_adapter_api::ObjectReader) -> std::io::Result<String> {
    use sha2::Digest;
    use tokio::io::AsyncReadExt;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(pv_adapter_api::hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}
