//! The device's HTTP side of DDI (reference §1, §2, §10): requests under
//! `<url>/<tenant>/controller/v1/<controller>` with the configured token,
//! answers read up to a bound, and status codes turned into what the adapter
//! does about them. The token is read from its file on every request and
//! never appears in an error; links the server gives are followed, and a
//! token only goes to the server's own origin.

use std::time::Duration;

use serde_json::Value;

use crate::config::{Auth, HawkbitConfig};
use crate::ddi;

const USER_AGENT: &str = concat!("pv-bridge/", env!("CARGO_PKG_VERSION"));

/// What went wrong with a DDI request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdiError {
    /// 401/403: the server refused the credentials (a configuration error
    /// for the operator; retried with backoff).
    Auth(u16),
    /// 404: unknown target or action, or an action being cancelled or
    /// waiting for consent.
    NotFound,
    /// 410: the action is no longer active.
    Gone,
    /// 429: a quota (status entries, attributes) or a rate limit.
    TooMany,
    /// Another status, with the start of the answer.
    Status(u16, String),
    /// Connection, TLS, timeout.
    Transport(String),
    /// An answer that does not parse.
    Protocol(String),
    /// The token file cannot be read.
    Token(String),
}

impl std::fmt::Display for DdiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DdiError::Auth(s) => write!(
                f,
                "HTTP {s}: the server refused the device's credentials (check the token and that the controller id is known to the server)"
            ),
            DdiError::NotFound => f.write_str("HTTP 404: not found"),
            DdiError::Gone => f.write_str("HTTP 410: the action is no longer active"),
            DdiError::TooMany => f.write_str("HTTP 429: the server's quota or rate limit"),
            DdiError::Status(s, body) if body.is_empty() => write!(f, "HTTP {s}"),
            DdiError::Status(s, body) => write!(f, "HTTP {s}: {body}"),
            DdiError::Transport(e) | DdiError::Protocol(e) | DdiError::Token(e) => f.write_str(e),
        }
    }
}

/// The DDI resources of one controller.
pub struct Ddi {
    http: pv_http::Client,
    /// `<url>/<tenant>/controller/v1/<controller>`.
    base: String,
    origin: (bool, String, u16),
    auth: Auth,
    max: usize,
    timeout: Duration,
}

fn origin_of(url: &str) -> Option<(bool, String, u16)> {
    pv_http::Url::parse(url)
        .ok()
        .map(|u| (u.https, u.host.to_ascii_lowercase(), u.port))
}

impl Ddi {
    pub fn new(cfg: &HawkbitConfig, controller: &str) -> Result<Ddi, String> {
        let timeout = Duration::from_secs(cfg.request_timeout_secs);
        let mut b = pv_http::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(30).min(timeout))
            .read_timeout(timeout);
        if let Some(path) = &cfg.ca_file {
            b = b.ca_file(path).map_err(|e| format!("ca_file: {e}"))?;
        }
        if let Some(p) = &cfg.proxy {
            b = b.proxy(p);
        }
        let http = b
            .proxy_from_env()
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        let root = cfg.url.trim_end_matches('/');
        Ok(Ddi {
            http,
            base: format!("{root}/{}/controller/v1/{controller}", cfg.tenant),
            origin: origin_of(root).ok_or_else(|| format!("url {root:?} cannot be parsed"))?,
            auth: cfg.auth(),
            max: cfg.max_response_bytes,
            timeout,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn http(&self) -> &pv_http::Client {
        &self.http
    }

    /// Whether `url` is on the server's own origin (scheme, host and port):
    /// only there does the device's token go.
    pub fn same_origin(&self, url: &str) -> bool {
        origin_of(url).is_some_and(|o| o == self.origin)
    }

    /// The `Authorization` header for `url`, if it gets one.
    pub fn authorization(&self, url: &str) -> Result<Option<String>, DdiError> {
        if !self.same_origin(url) {
            return Ok(None);
        }
        let (scheme, setting, path) = match &self.auth {
            Auth::Target(p) => ("TargetToken", "target_token_file", p),
            Auth::Gateway(p) => ("GatewayToken", "gateway_token_file", p),
            Auth::None => return Ok(None),
        };
        let token = pv_adapter_api::read_secret(setting, path)
            .map_err(|e| DdiError::Token(e.to_string()))?;
        pv_adapter_api::secrets::register(&token);
        Ok(Some(format!("{scheme} {token}")))
    }

    async fn call(
        &self,
        method: &str,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, DdiError> {
        let mut req = self
            .http
            .request(method, url)
            .header("Accept", "application/json");
        if let Some(a) = self.authorization(url)? {
            req = req.header("Authorization", &a);
        }
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b).map_err(|e| DdiError::Protocol(e.to_string()))?;
            req = req.header("Content-Type", "application/json").body(bytes);
        }
        let shown = pv_http::redact(url);
        let go = async {
            let resp = req
                .send()
                .await
                .map_err(|e| DdiError::Transport(format!("{method} {shown}: {e}")))?;
            let status = resp.status;
            let bytes = resp
                .bytes(self.max)
                .await
                .map_err(|e| DdiError::Transport(format!("{method} {shown}: {e}")))?;
            Ok::<_, DdiError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, go).await.map_err(|_| {
            DdiError::Transport(format!(
                "{method} {shown}: no answer within {:?}",
                self.timeout
            ))
        })??;
        match status {
            200..=299 => Ok(bytes),
            401 | 403 => Err(DdiError::Auth(status)),
            404 => Err(DdiError::NotFound),
            410 => Err(DdiError::Gone),
            429 => Err(DdiError::TooMany),
            s => Err(DdiError::Status(s, excerpt(&bytes))),
        }
    }

    /// `GET` the base resource.
    pub async fn poll(&self) -> Result<ddi::Poll, DdiError> {
        let body = self.call("GET", &self.base, None).await?;
        ddi::parse_poll(&body).map_err(DdiError::Protocol)
    }

    /// `GET` a link the server gave, on the configured origin.
    pub async fn get(&self, href: &str) -> Result<Vec<u8>, DdiError> {
        self.call("GET", &self.resource(href), None).await
    }

    /// A DDI link (`…/controller/v1/<controller>/<rest>`) on the configured
    /// origin. hawkBit names its links after the host a request reached it
    /// by, which behind a load balancer or a proxy is not always the name the
    /// device was configured with: the path and query are followed, but the
    /// device's token only ever goes to the configured server.
    pub fn resource(&self, href: &str) -> String {
        if self.same_origin(href) {
            return href.to_owned();
        }
        let Some(at) = href.find("/controller/v1/") else {
            return href.to_owned();
        };
        let after = &href[at + "/controller/v1/".len()..];
        match after.find(['/', '?']) {
            Some(i) => format!("{}{}", self.base, &after[i..]),
            None => self.base.clone(),
        }
    }

    /// `POST` feedback on a deployment (`cancel`: on a cancel request).
    pub async fn feedback(&self, action: &str, cancel: bool, body: &Value) -> Result<(), DdiError> {
        let kind = if cancel {
            "cancelAction"
        } else {
            "deploymentBase"
        };
        let url = format!("{}/{kind}/{action}/feedback", self.base);
        self.call("POST", &url, Some(body)).await.map(|_| ())
    }

    /// `PUT configData`.
    pub async fn config_data(&self, body: &Value) -> Result<(), DdiError> {
        let url = format!("{}/configData", self.base);
        self.call("PUT", &url, Some(body)).await.map(|_| ())
    }
}

/// The first line of an answer, short and printable (an error page says why).
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    let line = text.lines().next().unwrap_or("").trim();
    ddi::clip(
        &line.chars().filter(|c| !c.is_control()).collect::<String>(),
        200,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ddi(url: &str) -> Ddi {
        let cfg: HawkbitConfig =
            serde_json::from_value(serde_json::json!({"url": url, "insecure": true})).unwrap();
        Ddi::new(&cfg, "dev-1").unwrap()
    }

    #[test]
    fn links_are_followed_on_the_configured_origin() {
        let d = ddi("https://hawkbit.example.com/");
        assert_eq!(
            d.base(),
            "https://hawkbit.example.com/DEFAULT/controller/v1/dev-1"
        );
        let same = "https://hawkbit.example.com/DEFAULT/controller/v1/dev-1/deploymentBase/5?c=-2";
        assert_eq!(d.resource(same), same);
        assert_eq!(
            d.resource("http://10.0.0.7:8080/DEFAULT/controller/v1/dev-1/deploymentBase/5?c=-2"),
            "https://hawkbit.example.com/DEFAULT/controller/v1/dev-1/deploymentBase/5?c=-2"
        );
        assert_eq!(
            d.resource("http://lb/DEFAULT/controller/v1/dev-1"),
            "https://hawkbit.example.com/DEFAULT/controller/v1/dev-1"
        );
        let cdn = "https://cdn.example.net/artifacts/a.tgz";
        assert_eq!(d.resource(cdn), cdn);
        assert!(d.same_origin("https://HAWKBIT.example.com:443/x"));
        assert!(!d.same_origin("http://hawkbit.example.com/x"));
        assert!(!d.same_origin(cdn));
    }

    #[test]
    fn the_token_goes_only_to_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("token");
        std::fs::write(&t, "secret-target-token\n").unwrap();
        let cfg: HawkbitConfig = serde_json::from_value(serde_json::json!({
            "url": "https://hawkbit.example.com", "target_token_file": t}))
        .unwrap();
        let d = Ddi::new(&cfg, "dev-1").unwrap();
        assert_eq!(
            d.authorization("https://hawkbit.example.com/a")
                .unwrap()
                .as_deref(),
            Some("TargetToken secret-target-token")
        );
        assert_eq!(d.authorization("https://cdn.example.net/a").unwrap(), None);
        std::fs::remove_file(&t).unwrap();
        let e = d
            .authorization("https://hawkbit.example.com/a")
            .unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
