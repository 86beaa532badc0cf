//! Device-meta up, user-meta down.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use pv_adapter_api::{BackendEvent, DeviceView};
use serde_json::{Map, Value, json};
use tracing::{debug, warn};

use crate::client::{Method, status_error};
use crate::{Hub, secs};

impl Hub {
    pub(crate) async fn metadata(self, device: String) {
        let mut view = self.link.view();
        let mut user = tokio::time::interval(secs(self.cfg.user_meta_interval_secs));
        user.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut devmeta = tokio::time::interval(secs(self.cfg.device_meta_interval_secs));
        devmeta.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_user: Option<BTreeMap<String, Value>> = None;
        let mut version = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let mut sent_dev: Option<Map<String, Value>> = None;
        loop {
            tokio::select! {
                _ = user.tick() => {
                    let path = format!("/devices/{device}/user-meta");
                    match self.client.json::<Map<String, Value>>(Method::GET, &path, None).await {
                        Ok(m) => {
                            // The answer is the whole set; null values are ignored.
                            let data: BTreeMap<String, Value> =
                                m.into_iter().filter(|(_, v)| !v.is_null()).collect();
                            if last_user.as_ref() != Some(&data) {
                                version += 1;
                                debug!(keys = data.len(), version, "user-meta changed on the hub");
                                if self.link.send(BackendEvent::UserMeta { version, data: data.clone() }).await.is_err() {
                                    return;
                                }
                                last_user = Some(data);
                            }
                        }
                        Err(e) => debug!(error = %e, "cannot read user-meta"),
                    }
                }
                _ = devmeta.tick() => {
                    let v = view.borrow_and_update().clone();
                    let map = self.device_meta(&v);
                    if sent_dev.as_ref() == Some(&map) {
                        continue;
                    }
                    let path = format!("/devices/{device}/device-meta");
                    let body = Value::Object(map.clone()).to_string().into_bytes();
                    match self.client.call(Method::PUT, &path, Some(body)).await {
                        Ok(r) if r.status == 200 => sent_dev = Some(map),
                        Ok(r) => warn!(backend = %self.link.backend(), error = %status_error(&format!("PUT {path}"), &r), "device-meta not accepted"),
                        Err(e) => debug!(error = %e, "cannot send device-meta"),
                    }
                }
            }
        }
    }

    /// The device-meta the hub gets: Pantavisor's, with `pantavisor.revision` as
    /// the hub's revision number when the running revision is one of the hub's
    /// (the device's own name in `pv-bridge.revision`), and the hub client's keys.
    pub(crate) fn device_meta(&self, v: &DeviceView) -> Map<String, Value> {
        let mut m: Map<String, Value> = v
            .device_meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(running) = &v.running {
            m.insert("pv-bridge.revision".into(), json!(running));
            if let Some(rev) = self.hub_rev(running) {
                m.insert("pantavisor.revision".into(), json!(rev.to_string()));
            }
        }
        m.insert("pantahub.claimed".into(), json!("1"));
        m.insert("pantahub.online".into(), json!("1"));
        m.insert("pantahub.state".into(), json!("idle"));
        m.remove("pantahub.challenge");
        m.insert("pv-bridge.version".into(), json!(env!("CARGO_PKG_VERSION")));
        m
    }
}
