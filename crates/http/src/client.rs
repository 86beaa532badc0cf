//! The HTTP/1.1 client: one request at a time per connection, connections kept
//! for reuse, TLS by rustls, proxies by CONNECT (https) or absolute-form (http).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use crate::codec::{self, Framing, Head};
use crate::url::Url;

/// What went wrong, broadly (for retry decisions); the message says exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Url,
    Connect,
    Tls,
    Proxy,
    Timeout,
    Io,
    Protocol,
    TooLarge,
    Config,
}

/// An error with the call it belongs to.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    msg: String,
}

impl Error {
    fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
        }
    }

    /// A certificate or handshake problem: retrying will not help.
    pub fn is_tls(&self) -> bool {
        self.kind == ErrorKind::Tls
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// A request body.
pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// Streamed: exactly this many bytes from the reader.
    Reader(Box<dyn AsyncRead + Send + Unpin>, u64),
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body::Bytes(b)
    }
}

/// Reads PEM certificates (a bundle).
pub fn load_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

/// Hosts a proxy is not used for (`NO_PROXY`): `*`, names (matching their
/// sub-domains too, with or without a leading dot) and addresses.
#[derive(Debug, Clone, Default)]
struct NoProxy(Vec<String>);

impl NoProxy {
    fn parse(list: &str) -> Self {
        NoProxy(
            list.split(',')
                .map(|e| {
                    let e = e.trim().trim_start_matches('.').to_ascii_lowercase();
                    // A port in an entry is ignored.
                    match e.rsplit_once(':') {
                        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => {
                            h.to_owned()
                        }
                        _ => e,
                    }
                })
                .filter(|e| !e.is_empty())
                .collect(),
        )
    }

    fn matches(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.0
            .iter()
            .any(|e| e == "*" || host == *e || host.ends_with(&format!(".{e}")))
    }
}

/// Builds a [`Client`].
pub struct ClientBuilder {
    user_agent: String,
    roots: Vec<CertificateDer<'static>>,
    system_roots: bool,
    proxy_http: Option<String>,
    proxy_https: Option<String>,
    no_proxy: NoProxy,
    connect_timeout: Duration,
    read_timeout: Duration,
    max_redirects: usize,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientBuilder {
    pub fn new() -> Self {
        Self {
            user_agent: concat!("pv-bridge/", env!("CARGO_PKG_VERSION")).into(),
            roots: Vec::new(),
            system_roots: true,
            proxy_http: None,
            proxy_https: None,
            no_proxy: NoProxy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            max_redirects: 10,
        }
    }

    pub fn user_agent(mut self, ua: &str) -> Self {
        self.user_agent = ua.to_owned();
        self
    }

    /// Trusts the certificates of a PEM file besides the system's.
    pub fn ca_file(mut self, path: &Path) -> Result<Self, Error> {
        let pem = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read CA file {}: {e}", path.display()),
            )
        })?;
        let certs = load_pem_certs(&pem).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("CA file {}: {e}", path.display()),
            )
        })?;
        self.roots.extend(certs);
        Ok(self)
    }

    /// Whether to trust the system's roots (default true).
    pub fn system_roots(mut self, on: bool) -> Self {
        self.system_roots = on;
        self
    }

    /// One proxy for http and https URLs (`http://[user:pass@]host:port`).
    pub fn proxy(mut self, url: &str) -> Self {
        self.proxy_http = Some(url.to_owned());
        self.proxy_https = Some(url.to_owned());
        self
    }

    /// Proxies from `HTTPS_PROXY`, `HTTP_PROXY` and `ALL_PROXY` (either case),
    /// for those not set yet, and `NO_PROXY`.
    pub fn proxy_from_env(mut self) -> Self {
        let env = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        if self.proxy_https.is_none() {
            self.proxy_https = env(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]);
        }
        if self.proxy_http.is_none() {
            self.proxy_http = env(&["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]);
        }
        if let Some(list) = env(&["NO_PROXY", "no_proxy"]) {
            self.no_proxy = NoProxy::parse(&list);
        }
        self
    }

    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// The longest wait for any read (the response head, each piece of a body).
    pub fn read_timeout(mut self, d: Duration) -> Self {
        self.read_timeout = d;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let config_err = |m: String| Error::new(ErrorKind::Config, m);
        let mut store = rustls::RootCertStore::empty();
        if self.system_roots {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = store.add(c);
            }
        }
        for c in self.roots {
            store
                .add(c)
                .map_err(|e| config_err(format!("unusable CA certificate: {e}")))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let proxy = |p: Option<String>| -> Result<Option<Url>, Error> {
            match p {
                Some(s) => {
                    let u = Url::parse(&s).map_err(|e| config_err(format!("proxy: {e}")))?;
                    if u.https {
                        return Err(config_err(format!(
                            "proxy {s:?}: only http:// proxies are supported"
                        )));
                    }
                    Ok(Some(u))
                }
                None => Ok(None),
            }
        };
        Ok(Client {
            inner: Arc::new(Inner {
                tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                user_agent: self.user_agent,
                proxy_http: proxy(self.proxy_http)?,
                proxy_https: proxy(self.proxy_https)?,
                no_proxy: self.no_proxy,
                connect_timeout: self.connect_timeout,
                read_timeout: self.read_timeout,
                max_redirects: self.max_redirects,
                pool: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// A connection: plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Idle connections older than this are not reused.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per host.
const POOL_PER_HOST: usize = 4;

struct Inner {
    tls: tokio_rustls::TlsConnector,
    user_agent: String,
    proxy_http: Option<Url>,
    proxy_https: Option<Url>,
    no_proxy: NoProxy,
    connect_timeout: Duration,
    read_timeout: Duration,
    max_redirects: usize,
    pool: Mutex<HashMap<String, Vec<(Stream, Instant)>>>,
}

/// The HTTP client. Cheap to clone; clones share their connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// One request being put together.
pub struct RequestBuilder {
    client: Client,
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    pub fn request(&self, method: &str, url: &str) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            method: method.to_owned(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    pub fn get(&self, url: &str) -> RequestBuilder {
        self.request("GET", url)
    }
}

impl RequestBuilder {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    pub fn body(mut self, body: impl Into<Body>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends the request; GET and HEAD follow up to 10 redirects (dropping
    /// `Authorization` when the host changes).
    pub async fn send(self) -> Result<Response, Error> {
        let inner = self.client.inner.clone();
        let mut url = Url::parse(&self.url).map_err(|e| Error::new(ErrorKind::Url, e))?;
        let mut headers = self.headers;
        let mut body = self.body;
        let follow = matches!(self.method.as_str(), "GET" | "HEAD");
        let mut hops = 0;
        loop {
            let resp = send_once(&inner, &self.method, &url, &headers, &mut body).await?;
            let redirect = matches!(resp.status, 301 | 302 | 303 | 307 | 308);
            if !(follow && redirect) {
                return Ok(resp);
            }
            let Some(location) = resp.header("location").map(str::to_owned) else {
                return Ok(resp);
            };
            hops += 1;
            if hops > inner.max_redirects {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("{url}: more than {} redirects", inner.max_redirects),
                ));
            }
            let next = url
                .join(&location)
                .map_err(|e| Error::new(ErrorKind::Protocol, format!("{url}: redirect: {e}")))?;
            if next.host != url.host {
                headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
            }
            url = next;
        }
    }
}

fn io_err(what: &str, e: io::Error) -> Error {
    let kind = if e.kind() == io::ErrorKind::TimedOut {
        ErrorKind::Timeout
    } else {
        ErrorKind::Io
    };
    Error::new(kind, format!("{what}: {e}"))
}

async fn within<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r.map_err(|e| io_err(what, e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!("{what}: no answer within {d:?}"),
        )),
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn proxy_auth(p: &Url) -> Option<String> {
    p.userinfo
        .as_deref()
        .map(|u| format!("Basic {}", base64(&percent_decode(u))))
}

impl Inner {
    fn proxy_for(&self, url: &Url) -> Option<&Url> {
        let p = if url.https {
            self.proxy_https.as_ref()
        } else {
            self.proxy_http.as_ref()
        };
        p.filter(|_| !self.no_proxy.matches(&url.host))
    }

    fn pool_key(url: &Url) -> String {
        format!(
            "{}://{}",
            if url.https { "s" } else { "p" },
            url.authority()
        )
    }

    fn pooled(&self, url: &Url) -> Option<Stream> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let list = pool.get_mut(&Self::pool_key(url))?;
        while let Some((s, at)) = list.pop() {
            if at.elapsed() < POOL_IDLE {
                return Some(s);
            }
        }
        None
    }

    fn put_back(&self, key: String, s: Stream) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let list = pool.entry(key).or_default();
        list.retain(|(_, at)| at.elapsed() < POOL_IDLE);
        if list.len() < POOL_PER_HOST {
            list.push((s, Instant::now()));
        }
    }

    async fn connect(&self, url: &Url) -> Result<Stream, Error> {
        let proxy = self.proxy_for(url).cloned();
        let target = url.authority();
        let work = async {
            let tcp = match &proxy {
                None => TcpStream::connect((url.host.as_str(), url.port))
                    .await
                    .map_err(|e| {
                        Error::new(ErrorKind::Connect, format!("connect to {target}: {e}"))
                    })?,
                Some(p) => {
                    let mut tcp = TcpStream::connect((p.host.as_str(), p.port))
                        .await
                        .map_err(|e| {
                            Error::new(
                                ErrorKind::Proxy,
                                format!("connect to proxy {}: {e}", p.authority()),
                            )
                        })?;
                    if url.https {
                        let mut req = format!(
                            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {}\r\n",
                            self.user_agent
                        );
                        if let Some(a) = proxy_auth(p) {
                            req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
                        }
                        req.push_str("\r\n");
                        tcp.write_all(req.as_bytes()).await.map_err(|e| {
                            Error::new(ErrorKind::Proxy, format!("proxy {}: {e}", p.authority()))
                        })?;
                        let mut r = BufReader::new(tcp);
                        let head = codec::read_head(&mut r).await.map_err(|e| {
                            Error::new(ErrorKind::Proxy, format!("proxy {}: {e}", p.authority()))
                        })?;
                        if head.status != 200 {
                            return Err(Error::new(
                                ErrorKind::Proxy,
                                format!(
                                    "proxy {} refused CONNECT {target}: HTTP {} {}",
                                    p.authority(),
                                    head.status,
                                    head.reason
                                ),
                            ));
                        }
                        if !r.buffer().is_empty() {
                            return Err(Error::new(
                                ErrorKind::Proxy,
                                format!(
                                    "proxy {} sent data after its CONNECT answer",
                                    p.authority()
                                ),
                            ));
                        }
                        tcp = r.into_inner();
                    }
                    tcp
                }
            };
            let _ = tcp.set_nodelay(true);
            if !url.https {
                return Ok(Stream::Plain(tcp));
            }
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| Error::new(ErrorKind::Url, format!("{}: {e}", url.host)))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| Error::new(ErrorKind::Tls, format!("TLS with {target}: {e}")))?;
            Ok(Stream::Tls(Box::new(tls)))
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "connect to {target}: no connection within {:?}",
                    self.connect_timeout
                ),
            )),
        }
    }
}

/// Sends one request on a pooled or new connection. A reused connection that
/// turns out closed is replaced once (bodies from a reader never use the pool).
async fn send_once(
    inner: &Arc<Inner>,
    method: &str,
    url: &Url,
    headers: &[(String, String)],
    body: &mut Body,
) -> Result<Response, Error> {
    let replayable = !matches!(body, Body::Reader(..));
    if replayable && let Some(s) = inner.pooled(url) {
        if let Ok(r) = exchange(inner, s, method, url, headers, body).await {
            return Ok(r);
        }
    }
    let s = inner.connect(url).await?;
    exchange(inner, s, method, url, headers, body).await
}

async fn exchange(
    inner: &Arc<Inner>,
    mut s: Stream,
    method: &str,
    url: &Url,
    headers: &[(String, String)],
    body: &mut Body,
) -> Result<Response, Error> {
    let what = format!("{method} {url}");
    let proxied_http = !url.https && inner.proxy_for(url).is_some();
    let target = if proxied_http {
        format!("http://{}{}", url.authority(), url.target)
    } else {
        url.target.clone()
    };
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\n",
        url.host_header()
    );
    let has_ua = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("user-agent"));
    if !has_ua {
        head.push_str(&format!("User-Agent: {}\r\n", inner.user_agent));
    }
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("host") {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if proxied_http && let Some(a) = inner.proxy_for(url).and_then(proxy_auth) {
        head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    let len = match body {
        Body::Empty => None,
        Body::Bytes(b) => Some(b.len() as u64),
        Body::Reader(_, n) => Some(*n),
    };
    match len {
        Some(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
        None if matches!(method, "POST" | "PUT" | "PATCH") => {
            head.push_str("Content-Length: 0\r\n")
        }
        None => {}
    }
    head.push_str("\r\n");
    let t = inner.read_timeout;
    match body {
        Body::Bytes(b) => {
            let mut all = head.into_bytes();
            all.extend_from_slice(b);
            within(t, &what, s.write_all(&all)).await?;
        }
        Body::Empty => within(t, &what, s.write_all(head.as_bytes())).await?,
        Body::Reader(r, n) => {
            within(t, &what, s.write_all(head.as_bytes())).await?;
            let mut left = *n;
            let mut buf = vec![0u8; 64 * 1024];
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let got = within(
                    t,
                    &format!("{what}: reading the body"),
                    r.read(&mut buf[..want]),
                )
                .await?;
                if got == 0 {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("{what}: the body ended {left} bytes short"),
                    ));
                }
                within(t, &what, s.write_all(&buf[..got])).await?;
                left -= got as u64;
            }
        }
    }
    within(t, &what, s.flush()).await?;
    let mut reader = BufReader::with_capacity(16 * 1024, s);
    let head = within(t, &what, codec::read_head(&mut reader)).await?;
    let framing = head
        .framing(method == "HEAD")
        .map_err(|e| Error::new(ErrorKind::Protocol, format!("{what}: {e}")))?;
    let reusable = framing != Framing::Close
        && !head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let mut resp = Response {
        status: head.status,
        head,
        url: url.clone(),
        body: Some(codec::Body::new(reader, framing)),
        reuse: reusable.then(|| (inner.clone(), Inner::pool_key(url))),
        read_timeout: t,
    };
    resp.recycle_if_done();
    Ok(resp)
}

/// A response whose body is read piece by piece.
pub struct Response {
    pub status: u16,
    head: Head,
    url: Url,
    body: Option<codec::Body<BufReader<Stream>>>,
    reuse: Option<(Arc<Inner>, String)>,
    read_timeout: Duration,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("url", &self.url.to_string())
            .finish()
    }
}

impl Response {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// The URL that answered (after redirects).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Gives the connection back to the pool once the body is all read.
    fn recycle_if_done(&mut self) {
        if !self.body.as_ref().is_some_and(|b| b.is_done()) {
            return;
        }
        let Some(body) = self.body.take() else { return };
        if let Some((inner, key)) = self.reuse.take() {
            let reader = body.into_inner();
            if reader.buffer().is_empty() {
                inner.put_back(key, reader.into_inner());
            }
        }
    }

    /// Reads the next piece of the body into `buf`; `Ok(0)` at its end. Each read
    /// waits at most the client's read timeout.
    pub async fn chunk(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let Some(body) = self.body.as_mut() else {
            return Ok(0);
        };
        let what = format!("reading {}", self.url);
        let n = within(self.read_timeout, &what, body.read(buf)).await?;
        self.recycle_if_done();
        Ok(n)
    }

    /// The whole body, refusing more than `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = self.chunk(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            if out.len() + n > limit {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!("{}: the answer exceeds {limit} bytes", self.url),
                ));
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    #[test]
    fn no_proxy_lists_match_like_curl() {
        let n = NoProxy::parse("localhost, .example.com,10.0.0.1:8080");
        assert!(n.matches("localhost") && n.matches("a.example.com") && n.matches("example.com"));
        assert!(n.matches("10.0.0.1") && !n.matches("example.org") && !n.matches("badexample.com"));
        assert!(NoProxy::parse("*").matches("anything"));
    }

    #[test]
    fn basic_auth_is_standard_base64() {
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        let p = Url::parse("http://u%40x:p@proxy:3128").unwrap();
        assert_eq!(
            proxy_auth(&p).unwrap(),
            format!("Basic {}", base64(b"u@x:p"))
        );
    }

    /// A server answering each request on a connection with the next canned
    /// response; returns its address and the request heads it saw.
    async fn server(answers: Vec<&'static str>) -> (String, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        tokio::spawn(async move {
            let answers = Arc::new(Mutex::new(answers.into_iter()));
            while let Ok((s, _)) = l.accept().await {
                let (answers, seen) = (answers.clone(), s2.clone());
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = tokio::io::BufReader::new(r);
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|n| n.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).await.unwrap();
                        head.push_str(&String::from_utf8_lossy(&body));
                        seen.lock().unwrap().push(head);
                        let Some(a) = answers.lock().unwrap().next() else {
                            return;
                        };
                        w.write_all(a.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn keep_alive_redirects_and_bodies() {
        let (addr, seen) = server(vec![
            "HTTP/1.1 302 Found\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ])
        .await;
        let c = Client::builder().system_roots(false).build().unwrap();
        let r = c
            .get(&format!("http://{addr}/a"))
            .bearer("t")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.url().target, "/b");
        assert_eq!(r.bytes(100).await.unwrap(), b"hello");
        let r = c
            .request("PUT", &format!("http://{addr}/c"))
            .body(b"xyz".to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.bytes(100).await.unwrap(), b"ok");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].starts_with("GET /a HTTP/1.1\r\nHost: 127.0.0.1:"));
        assert!(
            seen[1].contains("Authorization: Bearer t"),
            "same host keeps it"
        );
        assert!(
            seen[2].starts_with("PUT /c")
                && seen[2].contains("Content-Length: 3")
                && seen[2].ends_with("xyz")
        );
        // Three requests, one connection: the pool worked (the server answers
        // one canned list across connections, so a second connection would
        // still pass; check the pool directly).
        assert_eq!(
            c.inner
                .pool
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>(),
            1
        );
    }

    #[tokio::test]
    async fn short_bodies_oversize_answers_and_timeouts_are_errors() {
        let (addr, _) = server(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
        ])
        .await;
        let c = Client::builder()
            .system_roots(false)
            .read_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let e = c
            .get(&format!("http://{addr}/"))
            .send()
            .await
            .unwrap()
            .bytes(4)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::TooLarge);
        // A reader body that ends early is refused before the server sees it all.
        let r: Box<dyn AsyncRead + Send + Unpin> = Box::new(&b"abc"[..]);
        let e = c
            .request("PUT", &format!("http://{addr}/"))
            .body(Body::Reader(r, 10))
            .send()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("7 bytes short"), "{e}");
        // No answer at all: a timeout naming the call.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let e = c
            .get(&format!("http://{silent}/x"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
        assert!(e.to_string().starts_with("GET http://"), "{e}");
    }
}
