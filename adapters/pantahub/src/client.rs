//! The hub's REST API as the device uses it: one HTTP client, the session token
//! (log in, log in again on 401 with backoff, never in a hot loop), bodies capped
//! like Pantavisor caps them, and errors that say which call failed and how.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::creds::Creds;

/// How a call to the hub failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    /// No HTTP answer: DNS, TCP, TLS, proxy, timeout, or a cut connection.
    #[error("{what}: {detail}")]
    Transport { what: String, detail: String },
    /// The hub answered with an unexpected status.
    #[error("{what}: HTTP {status}{}", body_hint(.body))]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    /// The answer was larger than the limit.
    #[error("{what}: the answer exceeds {limit} bytes")]
    TooLarge { what: String, limit: usize },
    /// The answer was not the JSON expected.
    #[error("{what}: {detail}")]
    Json { what: String, detail: String },
    /// No credentials to log in with yet.
    #[error("not registered with the hub yet")]
    NoCreds,
}

fn body_hint(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(" {body}")
    }
}

impl HubError {
    /// Worth retrying later as it is: no answer, 408, 429 or 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            _ => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method(&'static str);

impl Method {
    pub const GET: Method = Method("GET");
    pub const POST: Method = Method("POST");
    pub const PUT: Method = Method("PUT");

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// An answer: status and body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Settings of the HTTP client.
pub struct ClientOptions<'a> {
    pub base: String,
    pub ca_file: Option<&'a Path>,
    /// An HTTP proxy (`http://host:port`), tunnelling with CONNECT.
    pub proxy: Option<String>,
    pub timeout: Duration,
    pub max_body: usize,
}

#[derive(Default)]
struct Session {
    token: Option<String>,
    last_attempt: Option<Instant>,
    failures: u32,
}

/// The hub's API with the device's session.
pub struct Client {
    http: pv_http::Client,
    base: String,
    max_body: usize,
    creds: std::sync::Mutex<Option<Creds>>,
    session: tokio::sync::Mutex<Session>,
}

pub const USER_AGENT: &str = concat!(
    "pv-bridge/",
    env!("CARGO_PKG_VERSION"),
    " (Pantavisor bridge)"
);

impl Client {
    pub fn new(opts: ClientOptions<'_>) -> Result<Client, String> {
        let mut b = pv_http::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(opts.timeout);
        if let Some(path) = opts.ca_file {
            b = b.ca_file(path).map_err(|e| format!("ca_file: {e}"))?;
        }
        if let Some(p) = &opts.proxy {
            b = b.proxy(p);
        }
        let http = b
            .proxy_from_env()
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Client {
            http,
            base: opts.base.trim_end_matches('/').to_owned(),
            max_body: opts.max_body,
            creds: std::sync::Mutex::new(None),
            session: tokio::sync::Mutex::new(Session::default()),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn http(&self) -> &pv_http::Client {
        &self.http
    }

    pub fn set_creds(&self, c: Creds) {
        *self.creds.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
    }

    pub fn creds(&self) -> Option<Creds> {
        self.creds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the session token: the next call logs in again (after a claim,
    /// the token's owner claim is stale).
    pub async fn drop_token(&self) {
        self.session.lock().await.token = None;
    }

    /// Sends one request and reads the answer (capped).
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp, HubError> {
        let what = format!("{method} {path}");
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method.as_str(), &url);
        if let Some(t) = token {
            rb = rb.bearer(t);
        }
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        rb = rb.header("Content-Type", "application/json");
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = rb.send().await.map_err(|e| HubError::Transport {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let status = resp.status;
        let body = match resp.bytes(self.max_body).await {
            Ok(b) => b,
            Err(e) if e.kind == pv_http::client::ErrorKind::TooLarge => {
                return Err(HubError::TooLarge {
                    what,
                    limit: self.max_body,
                });
            }
            Err(e) => {
                return Err(HubError::Transport {
                    what,
                    detail: e.to_string(),
                });
            }
        };
        debug!(call = %what, status, bytes = body.len(), "hub answered");
        Ok(Resp { status, body })
    }

    /// A call without a session (registration).
    pub async fn anonymous(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp, HubError> {
        self.send(method, path, None, headers, body).await
    }

    /// Logs in with the device's credentials (`POST /auth/login`). Consecutive
    /// failures wait 1 s, 2 s, 4 s … up to 60 s before trying again.
    pub async fn login(&self) -> Result<(), HubError> {
        let mut s = self.session.lock().await;
        self.login_locked(&mut s).await
    }

    async fn login_locked(&self, s: &mut Session) -> Result<(), HubError> {
        let creds = self.creds().ok_or(HubError::NoCreds)?;
        if s.failures > 0
            && let Some(last) = s.last_attempt
        {
            let wait = Duration::from_secs(1 << s.failures.min(6)).min(Duration::from_secs(60));
            let left = wait.saturating_sub(last.elapsed());
            if !left.is_zero() {
                debug!(wait = ?left, "waiting before logging in again");
                tokio::time::sleep(left).await;
            }
        }
        s.last_attempt = Some(Instant::now());
        let body = serde_json::json!({"username": creds.prn, "password": creds.secret});
        let r = self
            .send(
                Method::POST,
                "/auth/login",
                None,
                &[],
                Some(body.to_string().into_bytes()),
            )
            .await;
        let r = match r {
            Ok(r) if r.status == 200 => r,
            Ok(r) => {
                s.failures += 1;
                return Err(status_error("POST /auth/login", &r));
            }
            Err(e) => {
                s.failures += 1;
                return Err(e);
            }
        };
        #[derive(serde::Deserialize)]
        struct Token {
            token: String,
        }
        let t: Token = serde_json::from_slice(&r.body).map_err(|e| {
            s.failures += 1;
            HubError::Json {
                what: "POST /auth/login".into(),
                detail: format!("no token in the answer: {e}"),
            }
        })?;
        if s.failures > 0 {
            info!(after = s.failures, "logged in to the hub again");
        }
        s.failures = 0;
        s.token = Some(t.token);
        Ok(())
    }

    /// A call with the session: logs in first if needed, and on 401 logs in again
    /// and replays the call once.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Resp, HubError> {
        let token = self.token().await?;
        let r = self
            .send(method, path, Some(&token), &[], body.clone())
            .await?;
        if r.status != 401 {
            return Ok(r);
        }
        warn!(call = %format!("{method} {path}"), "hub session refused (401); logging in again");
        let token = {
            let mut s = self.session.lock().await;
            // Another task may have renewed it meanwhile.
            if s.token.as_deref() == Some(token.as_str()) {
                s.token = None;
            }
            if s.token.is_none() {
                self.login_locked(&mut s).await?;
            }
            s.token.clone().unwrap_or_default()
        };
        self.send(method, path, Some(&token), &[], body).await
    }

    async fn token(&self) -> Result<String, HubError> {
        let mut s = self.session.lock().await;
        if s.token.is_none() {
            self.login_locked(&mut s).await?;
        }
        Ok(s.token.clone().unwrap_or_default())
    }

    /// A call that must answer 200 with JSON of type `T`.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, HubError> {
        let what = format!("{method} {path}");
        let r = self.call(method, path, body).await?;
        if r.status != 200 {
            return Err(status_error(&what, &r));
        }
        serde_json::from_slice(&r.body).map_err(|e| HubError::Json {
            what,
            detail: format!("unexpected answer: {e}"),
        })
    }

    /// The URL to send a blob to: Pantavisor sends object uploads to the hub
    /// it is configured with, keeping only the path from `/local-s3` on; other
    /// signed URLs (S3 proper) are used as they are.
    pub fn upload_url(&self, signed: &str) -> String {
        for marker in ["/local-s3/", "/s3/"] {
            if let Some(i) = signed.find(marker) {
                return format!("{}{}", self.base, &signed[i..]);
            }
        }
        signed.to_owned()
    }
}

/// The error of an unexpected status, with the hub's message when it gave one.
pub fn status_error(what: &str, r: &Resp) -> HubError {
    let body = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| {
            v.get("msg")
                .or_else(|| v.get("Error"))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&r.body);
            text.chars().take(200).collect::<String>().trim().to_owned()
        });
    HubError::Status {
        what: what.to_owned(),
        status: r.status,
        body,
    }
}
