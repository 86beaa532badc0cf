//! The Device Update service side of the fake IoT Hub (written from
//! `shared/reference/azure-device-update.md`): import (an import manifest and
//! its files become a delivered update manifest with file ids, signed through a
//! signing key by a test root key this fake generates), deployments, retries
//! and cancels through the desired `deviceUpdate.service`, log collection
//! requests, and a Blob storage endpoint taking block-blob PUTs under a SAS.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rsa::pkcs1v15::SigningKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, sha2::Sha256 as RsaSha256};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::FakeIotHub;
use crate::hub::http::{self, Response};
use crate::objects::ObjectServer;

/// The root key's id: a test key, never one of Microsoft's.
pub const ROOT_KID: &str = "PVB.TEST.R";
pub const SIGNING_KID: &str = "PVB.TEST.S";

/// Whether a device's reported Device Update agent belongs to a device class
/// one of the `compatibility` entries matches.
fn device_class_matches(reported: &Value, compat: &[Value]) -> bool {
    let du = &reported["deviceUpdate"];
    let agent = &du["agent"];
    if du["__t"] != "c" || !agent.is_object() {
        return false;
    }
    let props = &agent["deviceProperties"];
    let names: Vec<&str> = agent["compatPropertyNames"]
        .as_str()
        .unwrap_or("manufacturer,model")
        .split(',')
        .map(str::trim)
        .collect();
    compat.iter().any(|entry| {
        names.iter().all(|name| {
            let mut chars = name.chars();
            let aliased = chars
                .next()
                .map(|c| format!("device{}{}", c.to_ascii_uppercase(), chars.as_str()))
                .unwrap_or_default();
            let want = entry.get(*name).or_else(|| entry.get(&aliased));
            want.is_some() && want == props.get(*name)
        })
    })
}

/// An imported update as the service delivers it.
#[derive(Debug, Clone)]
pub struct Update {
    pub update_id: Value,
    /// The delivered update manifest (a JSON document in a string).
    pub manifest: String,
    pub signature: String,
    /// File id → download URL.
    pub file_urls: BTreeMap<String, String>,
}

/// A blob written through the Blob endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub name: String,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct BlobState {
    blobs: Vec<Blob>,
    refused: Vec<String>,
}

/// The fake Device Update instance.
pub struct AduService {
    root: RsaPrivateKey,
    signing: RsaPrivateKey,
    pub files: ObjectServer,
    blob_addr: std::net::SocketAddr,
    blob_sig: String,
    blobs: Arc<Mutex<BlobState>>,
    next: AtomicU64,
    _blob_task: tokio::task::JoinHandle<()>,
}

fn b64u(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn jws(key: &RsaPrivateKey, header: &Value, payload: &[u8]) -> String {
    let signed = format!("{}.{}", b64u(header.to_string().as_bytes()), b64u(payload));
    let sig = SigningKey::<RsaSha256>::new(key.clone())
        .sign(signed.as_bytes())
        .to_vec();
    format!("{signed}.{}", b64u(&sig))
}

/// A `fileUrls`-style id: `f` and 16 hex digits.
fn file_id(n: u64, name: &str) -> String {
    let h = sha2::Sha256::digest(format!("{n}/{name}").as_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("f{hex}")
}

impl AduService {
    /// Generates the test root and signing keys (2048-bit) and starts the file
    /// and Blob servers.
    pub async fn start() -> io::Result<AduService> {
        let (root, signing) = tokio::task::spawn_blocking(|| {
            let mut rng = rsa::rand_core::OsRng;
            (
                RsaPrivateKey::new(&mut rng, 2048),
                RsaPrivateKey::new(&mut rng, 2048),
            )
        })
        .await
        .map_err(io::Error::other)?;
        let root = root.map_err(io::Error::other)?;
        let signing = signing.map_err(io::Error::other)?;
        let files = ObjectServer::start().await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let blob_addr = listener.local_addr()?;
        let blobs = Arc::new(Mutex::new(BlobState::default()));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let blob_sig = format!("SAS{}x{nanos}Sig", std::process::id());
        let (st, sig) = (blobs.clone(), blob_sig.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_blob(s, st.clone(), sig.clone()));
            }
        });
        Ok(AduService {
            root,
            signing,
            files,
            blob_addr,
            blob_sig,
            blobs,
            next: AtomicU64::new(1),
            _blob_task: task,
        })
    }

    /// The test root key as `test_root_keys_file` takes it.
    pub fn root_keys_json(&self) -> String {
        json!({ROOT_KID: {"n": b64u(&self.root.n().to_bytes_be()), "e": 65537}}).to_string()
    }

    /// The signature of `manifest` (reference §5.1): the signing key as a JWK
    /// (standard base64 `n`, as the real service writes it) signed by the root
    /// key, and the manifest's hash signed by the signing key.
    pub fn sign(&self, manifest: &str) -> String {
        self.sign_with(manifest, &self.root, ROOT_KID)
    }

    /// [`AduService::sign`] under another root key and kid (for refusals).
    pub fn sign_with(&self, manifest: &str, root: &RsaPrivateKey, kid: &str) -> String {
        let jwk = json!({"kty": "RSA", "n": STANDARD.encode(self.signing.n().to_bytes_be()),
                         "e": "AQAB", "alg": "RS256", "kid": SIGNING_KID});
        let sjwk = jws(
            root,
            &json!({"alg": "RS256", "kid": kid}),
            jwk.to_string().as_bytes(),
        );
        let hash = STANDARD.encode(sha2::Sha256::digest(manifest.as_bytes()));
        jws(
            &self.signing,
            &json!({"alg": "RS256", "sjwk": sjwk}),
            json!({"sha256": hash}).to_string().as_bytes(),
        )
    }

    /// Imports an update: checks the import manifest as the service does, serves
    /// its files and returns the delivered, signed update manifest.
    pub fn import(&self, import: &Value, files: &[(&str, Vec<u8>)]) -> Result<Update, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let uid = import.get("updateId").ok_or("updateId is missing")?;
        for k in ["provider", "name"] {
            let v = uid[k].as_str().unwrap_or_default();
            if v.is_empty()
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return Err(format!("updateId.{k} {v:?} is not valid"));
            }
        }
        let version = uid["version"].as_str().unwrap_or_default();
        let parts: Vec<&str> = version.split('.').collect();
        if !(2..=4).contains(&parts.len())
            || parts
                .iter()
                .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "updateId.version {version:?} must be 2 to 4 numeric parts"
            ));
        }
        let listed = import["files"].as_array().cloned().unwrap_or_default();
        if listed.len() > 10 {
            return Err("at most 10 files".into());
        }
        let mut ids = BTreeMap::new();
        let mut delivered = serde_json::Map::new();
        for f in &listed {
            let name = f["filename"]
                .as_str()
                .ok_or("files[].filename is missing")?;
            let (_, data) = files
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| format!("file {name} was not uploaded"))?;
            let size = match &f["sizeInBytes"] {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .ok_or_else(|| format!("{name}: sizeInBytes"))?;
            if size != data.len() as u64 {
                return Err(format!(
                    "{name}: sizeInBytes {size} but {} bytes",
                    data.len()
                ));
            }
            let sha = STANDARD.encode(sha2::Sha256::digest(data));
            if f["hashes"]["sha256"].as_str() != Some(sha.as_str()) {
                return Err(format!("{name}: hashes.sha256 does not match the file"));
            }
            let id = file_id(n, name);
            let path = format!("/westus2/instance/{id}/{name}");
            self.files.put(&path, data.clone());
            ids.insert(name.to_owned(), id.clone());
            delivered.insert(
                id,
                json!({"fileName": name, "sizeInBytes": size, "hashes": {"sha256": sha}}),
            );
        }
        let mut steps = import["instructions"]["steps"].clone();
        for s in steps
            .as_array_mut()
            .ok_or("instructions.steps is missing")?
        {
            if let Some(fs) = s.get_mut("files").and_then(Value::as_array_mut) {
                for f in fs.iter_mut() {
                    let name = f.as_str().unwrap_or_default().to_owned();
                    *f = json!(
                        ids.get(&name)
                            .ok_or_else(|| format!("step file {name} is not in files"))?
                    );
                }
            }
        }
        let manifest = json!({
            "manifestVersion": "5",
            "updateId": uid,
            "compatibility": import["compatibility"],
            "instructions": {"steps": steps},
            "files": delivered,
            "createdDateTime": "2026-11-30T10:00:00.0000000Z",
        })
        .to_string();
        let file_urls = ids
            .values()
            .map(|id| {
                let name = delivered[id]["fileName"].as_str().unwrap_or_default();
                (
                    id.clone(),
                    self.files.url(&format!("/westus2/instance/{id}/{name}")),
                )
            })
            .collect();
        Ok(Update {
            update_id: uid.clone(),
            signature: self.sign(&manifest),
            manifest,
            file_urls,
        })
    }

    /// The desired `deviceUpdate` value deploying `u` as `workflow`.
    pub fn service(&self, u: &Update, workflow: &str, retry: Option<&str>) -> Value {
        // The twin takes merge patches: a deployment without a retry deletes
        // the last one's retryTimestamp.
        let w = json!({"action": 3, "id": workflow, "retryTimestamp": retry});
        json!({"__t": "c", "service": {"workflow": w, "updateManifest": u.manifest,
               "updateManifestSignature": u.signature, "fileUrls": u.file_urls}})
    }

    /// Deploys `u` to each device of a group (ADU writes every member's twin).
    pub fn deploy(
        &self,
        hub: &FakeIotHub,
        devices: &[&str],
        u: &Update,
        workflow: &str,
        retry: Option<&str>,
    ) -> Result<(), String> {
        for d in devices {
            hub.update_desired(d, json!({"deviceUpdate": self.service(u, workflow, retry)}))?;
        }
        Ok(())
    }

    /// Deploys `u` to a device group as the service does (reference §6.1): the
    /// group is the devices whose twin tag `ADUGroup` is `group` (those
    /// without the tag are `$default`); of those, only devices that reported
    /// the Device Update agent (`deviceUpdate` component with `agent`) and
    /// whose compatibility properties (`compatPropertyNames` of their
    /// `deviceProperties`, default `manufacturer,model`) match one of the
    /// update's `compatibility` entries get the deployment. An entry's key
    /// `deviceManufacturer` stands for `manufacturer`, as imports spell it.
    /// Returns the devices deployed to, sorted.
    pub fn deploy_group(
        &self,
        hub: &FakeIotHub,
        group: &str,
        u: &Update,
        workflow: &str,
        retry: Option<&str>,
    ) -> Result<Vec<String>, String> {
        let manifest: Value = serde_json::from_str(&u.manifest).map_err(|e| e.to_string())?;
        let compat = manifest["compatibility"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let members: Vec<String> = hub
            .device_ids()
            .into_iter()
            .filter(|id| !id.contains('/'))
            .filter(|id| hub.tags(id)["ADUGroup"].as_str().unwrap_or("$default") == group)
            .filter(|id| device_class_matches(&hub.reported(id), &compat))
            .collect();
        let ids: Vec<&str> = members.iter().map(String::as_str).collect();
        self.deploy(hub, &ids, u, workflow, retry)?;
        Ok(members)
    }

    /// Cancels the deployment on each device ("nodeployment", null members).
    pub fn cancel(&self, hub: &FakeIotHub, devices: &[&str]) -> Result<(), String> {
        for d in devices {
            hub.update_desired(
                d,
                json!({"deviceUpdate": {"__t": "c", "service": {
                    "workflow": {"action": 255, "id": "nodeployment"},
                    "updateManifest": null, "updateManifestSignature": null, "fileUrls": null}}}),
            )?;
        }
        Ok(())
    }

    /// The container URL with its SAS, as a log collection request carries it.
    pub fn container_sas_url(&self) -> String {
        format!(
            "http://{}/diagnostics?sv=2021-08-06&sp=cw&se=2099-01-01T00%3A00%3A00Z&sig={}",
            self.blob_addr, self.blob_sig
        )
    }

    /// Asks `device` for its logs (`diagnosticInformation.service`).
    pub fn request_logs(
        &self,
        hub: &FakeIotHub,
        device: &str,
        operation_id: &str,
    ) -> Result<u64, String> {
        hub.update_desired(
            device,
            json!({"diagnosticInformation": {"__t": "c", "service": {
                "operationId": operation_id, "storageSasUrl": self.container_sas_url()}}}),
        )
    }

    pub fn blobs(&self) -> Vec<Blob> {
        self.blobs
            .lock()
            .map(|s| s.blobs.clone())
            .unwrap_or_default()
    }

    /// Requests the Blob endpoint refused, and why.
    pub fn blob_refusals(&self) -> Vec<String> {
        self.blobs
            .lock()
            .map(|s| s.refused.clone())
            .unwrap_or_default()
    }
}

/// Blob storage's Put Blob: `PUT /<container>/<blob>?<sas>` with
/// `x-ms-blob-type: BlockBlob`; a wrong or missing signature is 403
/// `AuthenticationFailed`, a SAS without write permission 403
/// `AuthorizationPermissionMismatch`.
async fn serve_blob(s: tokio::net::TcpStream, st: Arc<Mutex<BlobState>>, sig: String) {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    while let Ok(req) = http::read_request(&mut r).await {
        let refuse = |why: &str| {
            if let Ok(mut s) = st.lock() {
                s.refused.push(why.to_owned());
            }
        };
        let resp = if req.method != "PUT" {
            refuse("method");
            Response::new(405)
        } else if req.param("sig").as_deref() != Some(sig.as_str()) {
            refuse("AuthenticationFailed");
            Response::new(403).header("x-ms-error-code", "AuthenticationFailed")
        } else if !req.param("sp").is_some_and(|p| p.contains('w')) {
            refuse("AuthorizationPermissionMismatch");
            Response::new(403).header("x-ms-error-code", "AuthorizationPermissionMismatch")
        } else if req.header("x-ms-blob-type") != Some("BlockBlob") {
            refuse("MissingRequiredHeader");
            Response::new(400).header("x-ms-error-code", "MissingRequiredHeader")
        } else {
            match req.path.strip_prefix("/diagnostics/") {
                Some(name) if !name.is_empty() => {
                    if let Ok(mut s) = st.lock() {
                        s.blobs.push(Blob {
                            name: http::percent_decode(name),
                            body: req.body.clone(),
                        });
                    }
                    Response::new(201)
                }
                _ => {
                    refuse("ContainerNotFound");
                    Response::new(404).header("x-ms-error-code", "ContainerNotFound")
                }
            }
        };
        if http::write_head(&mut w, &resp, 0, false).await.is_err() {
            return;
        }
        let _ = w.flush().await;
    }
}
