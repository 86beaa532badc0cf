//! Who the device is on the hub: registration, the claim, login.

use std::path::Path;

use pv_adapter_api::{AdapterError, BackendEvent, read_secret};
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::client::{HubError, Method, status_error};
use crate::creds::{self, Creds};
use crate::{DeviceRecord, Hub};

impl Hub {
    /// Registers if needed, waits for the claim, and logs in with an owner.
    pub(crate) async fn identity(&self) -> Result<Creds, AdapterError> {
        let own_file = self.work.join("pantahub.creds");
        let configured = self.cfg.credentials_file.is_some();
        let mut said = String::new();
        loop {
            let creds = match &self.cfg.credentials_file {
                Some(p) => Creds::load(p).map_err(AdapterError::Config)?,
                None => match Creds::load(&own_file) {
                    Ok(c) => c,
                    Err(_) => match self.register(&own_file).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "cannot register with the hub; retrying");
                            self.disconnected(&e).await;
                            tokio::time::sleep(self.poll()).await;
                            continue;
                        }
                    },
                },
            };
            self.client.set_creds(creds.clone());
            let _ = pv_adapter_api::durable::write_durable(
                &self.work.join("device-id"),
                creds.id.as_bytes(),
            );
            let path = format!("/devices/{}", creds.id);
            let rec: Result<DeviceRecord, HubError> =
                self.client.json(Method::GET, &path, None).await;
            match rec {
                Ok(d) if !d.owner.is_empty() => {
                    if !said.is_empty() {
                        info!(backend = %self.link.backend(), device = %creds.id, "device claimed");
                    }
                    self.show_challenge("").await;
                    // The token was minted before the claim: its owner is stale.
                    self.client.drop_token().await;
                    match self.client.login().await {
                        Ok(()) => {
                            info!(backend = %self.link.backend(), device = %creds.id, hub = %self.client.base(), "logged in to Pantacor Hub");
                            return Ok(creds);
                        }
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "cannot log in");
                            self.disconnected(&e).await;
                        }
                    }
                }
                Ok(d) => {
                    if d.challenge != said {
                        info!(
                            backend = %self.link.backend(),
                            device = %creds.id,
                            challenge = %d.challenge,
                            "waiting to be claimed: claim this device on Pantacor Hub with its id and challenge"
                        );
                        self.show_challenge(&d.challenge).await;
                        said = d.challenge.clone();
                    }
                    let _ = self
                        .client
                        .call(
                            Method::PUT,
                            &format!("/devices/{}/device-meta", creds.id),
                            Some(
                                json!({"pantahub.state": "claim", "pantahub.claimed": "0"})
                                    .to_string()
                                    .into_bytes(),
                            ),
                        )
                        .await;
                }
                Err(e) if !configured && matches!(e.status(), Some(401 | 403 | 404)) => {
                    // Unclaimed and unknown to the hub (deleted there): register again,
                    // as Pantavisor does while unclaimed.
                    warn!(backend = %self.link.backend(), error = %e, "the hub does not know this device; registering again");
                    let _ = std::fs::remove_file(&own_file);
                    self.client.drop_token().await;
                }
                Err(e) => {
                    warn!(backend = %self.link.backend(), error = %e, "cannot read the device record");
                    self.disconnected(&e).await;
                }
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    pub(crate) async fn register(&self, file: &Path) -> Result<Creds, HubError> {
        let mut headers = Vec::new();
        if let Some(p) = &self.cfg.autotok_file {
            let tok = read_secret("autotok_file", p).map_err(|e| HubError::Json {
                what: "autotok_file".into(),
                detail: e.to_string(),
            })?;
            headers.push(("Pantahub-Devices-Auto-Token-V1", tok));
        }
        let r = self
            .client
            .anonymous(Method::POST, "/devices/", &headers, None)
            .await?;
        if r.status != 200 {
            let e = status_error("POST /devices/", &r);
            if r.status == 400 && !headers.is_empty() {
                warn!(backend = %self.link.backend(), "the hub refused the auto-claim token");
            }
            return Err(e);
        }
        #[derive(Deserialize)]
        struct Registered {
            id: String,
            prn: String,
            secret: String,
        }
        let reg: Registered = serde_json::from_slice(&r.body).map_err(|e| HubError::Json {
            what: "POST /devices/".into(),
            detail: format!("unexpected answer: {e}"),
        })?;
        let creds = Creds {
            id: reg.id,
            prn: reg.prn,
            secret: reg.secret,
        };
        if !creds::is_device_id(&creds.id) {
            return Err(HubError::Json {
                what: "POST /devices/".into(),
                detail: format!("device id {:?} is not 24 hex digits", creds.id),
            });
        }
        creds.save(file).map_err(|e| HubError::Json {
            what: "saving credentials".into(),
            detail: e,
        })?;
        info!(backend = %self.link.backend(), device = %creds.id, file = %file.display(), "registered with Pantacor Hub");
        Ok(creds)
    }

    /// The claim challenge in `challenge` (state dir) and device-meta; empty once
    /// claimed.
    pub(crate) async fn show_challenge(&self, challenge: &str) {
        let _ = std::fs::create_dir_all(&self.work);
        let _ = pv_adapter_api::durable::write_durable(
            &self.work.join("challenge"),
            challenge.as_bytes(),
        );
        if let Some(store) = self.link.device() {
            let claimed = if challenge.is_empty() { "1" } else { "0" };
            let value = (!challenge.is_empty()).then_some(challenge);
            for (k, v) in [
                ("pantahub.challenge", value),
                ("pantahub.claimed", Some(claimed)),
            ] {
                if let Err(e) = store.set_device_meta(k, v).await {
                    debug!(key = k, error = %e, "cannot set device-meta");
                }
            }
        }
    }

    pub(crate) async fn disconnected(&self, e: &HubError) {
        if e.is_transient() {
            let _ = self
                .link
                .send(BackendEvent::Disconnected {
                    reason: e.to_string(),
                })
                .await;
        }
    }
}
