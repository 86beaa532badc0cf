//! Who the device is on the hub: registration, the claim, login.

use std::path::Path;

use pv_adapter_api::{AdapterError, BackendEvent, read_secret};
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::client::{HubError, Method, status_error};
use crate::creds::{self, Creds};
use crate::{DeviceRecord, Hub};
use pv_adapter_api::timing::jittered;

/// The longest wait between two attempts at the device record.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

impl Hub {
    /// Registers if needed, waits for the claim, and logs in with an owner.
    ///
    /// Once the hub has shown an owner, the device is claimed for good (a
    /// `claimed` file beside the credentials): an error at start (a WAF's 403, a
    /// maintenance page's 404, a 401) is retried with a growing wait and never
    /// drops the identity. Only an unclaimed, self-registered device the hub does
    /// not know registers again, as Pantavisor does while unclaimed.
    pub(crate) async fn identity(&self) -> Result<Creds, AdapterError> {
        let own_file = self.work.join("pantahub.creds");
        let claimed_file = self.work.join("claimed");
        let configured = self.cfg.credentials_file.is_some();
        let mut said = String::new();
        let mut wait = self.poll();
        loop {
            let creds = match &self.cfg.credentials_file {
                Some(p) => Creds::load(p).map_err(AdapterError::Config)?,
                None => match Creds::load(&own_file) {
                    Ok(c) => c,
                    Err(_) if claimed_file.exists() => {
                        return Err(AdapterError::Config(format!(
                            "this device was claimed on the hub but its credentials ({}) are gone; \
                             restore them, or delete {} to register as a new device",
                            own_file.display(),
                            claimed_file.display()
                        )));
                    }
                    Err(_) => match self.register(&own_file).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "cannot register with the hub; retrying");
                            self.disconnected(&e).await;
                            tokio::time::sleep(jittered(wait, 0.2)).await;
                            wait = (wait * 2).min(MAX_WAIT);
                            continue;
                        }
                    },
                },
            };
            let claimed = configured || claimed_file.exists();
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
                    if !configured && !claimed_file.exists() {
                        if let Err(e) = pv_adapter_api::durable::write_durable(
                            &claimed_file,
                            d.owner.as_bytes(),
                        ) {
                            warn!(backend = %self.link.backend(), file = %claimed_file.display(), error = %e, "cannot record the claim");
                        }
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
                    wait = self.poll();
                    if d.challenge != said {
                        // The challenge lets whoever knows it own the device: it goes
                        // to the console, the `challenge` file and D-Bus, never into
                        // device-meta or the logs the backends forward.
                        pv_adapter_api::secrets::register(&d.challenge);
                        info!(
                            backend = %self.link.backend(),
                            device = %creds.id,
                            challenge = %d.challenge,
                            file = %self.work.join("challenge").display(),
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
                    tokio::time::sleep(jittered(self.poll(), 0.2)).await;
                    continue;
                }
                Err(e) if !claimed && matches!(e.status(), Some(401 | 403 | 404)) => {
                    // Unclaimed and unknown to the hub (deleted there): register again,
                    // as Pantavisor does while unclaimed. The old credentials stay
                    // until the new ones are saved.
                    warn!(backend = %self.link.backend(), error = %e, "the hub does not know this unclaimed device; registering again");
                    self.client.drop_token().await;
                    match self.register(&own_file).await {
                        Ok(_) => continue,
                        Err(e) => {
                            warn!(backend = %self.link.backend(), error = %e, "cannot register with the hub; retrying");
                            self.disconnected(&e).await;
                        }
                    }
                }
                Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => {
                    warn!(
                        backend = %self.link.backend(),
                        device = %creds.id,
                        error = %e,
                        retry_in = ?wait,
                        "the hub refuses this claimed device; keeping its identity and trying again \
                         (registering anew would lose the claim)"
                    );
                    self.disconnected(&e).await;
                }
                Err(e) => {
                    warn!(backend = %self.link.backend(), error = %e, retry_in = ?wait, "cannot read the device record");
                    self.disconnected(&e).await;
                }
            }
            tokio::time::sleep(jittered(wait, 0.2)).await;
            wait = (wait * 2).min(MAX_WAIT);
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

    /// The claim challenge in `challenge` (state dir, mode 0600, as Pantavisor's
    /// hint file; empty once claimed) and on D-Bus. Device-meta gets only
    /// `pantahub.claimed`: device-meta is published by every backend, and whoever
    /// knows the challenge can claim the device. A challenge an older version put
    /// there is deleted.
    pub(crate) async fn show_challenge(&self, challenge: &str) {
        let _ = std::fs::create_dir_all(&self.work);
        let _ = pv_adapter_api::durable::write_durable_private(
            &self.work.join("challenge"),
            challenge.as_bytes(),
        );
        let notice = (!challenge.is_empty()).then(|| {
            format!(
                "claim this device on Pantacor Hub: device id {}, challenge {challenge}",
                self.client.creds().map(|c| c.id).unwrap_or_default()
            )
        });
        let _ = self.link.send(BackendEvent::Notice { text: notice }).await;
        if let Some(store) = self.link.device() {
            let claimed = if challenge.is_empty() { "1" } else { "0" };
            for (k, v) in [
                ("pantahub.challenge", None),
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
