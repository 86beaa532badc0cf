//! The URLs the client needs: `http(s)://[user:pass@]host[:port][/path][?query]`.

use std::fmt;

/// A parsed http or https URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
    /// `user:pass` before the host, if any (proxies).
    pub userinfo: Option<String>,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let bad = |why: &str| format!("bad URL {s:?}: {why}");
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("only http:// and https:// are supported"));
        };
        let (authority, target) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let target = target.split('#').next().unwrap_or_default();
        let target = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("spaces or control characters in the path"));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_owned()), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("junk after ]")),
            };
            (h.to_owned(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (hostport.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.bytes().any(|b| b <= b' ' || b"/?#@".contains(&b)) {
            return Err(bad("bad host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if https => 443,
            None => 80,
        };
        Ok(Url {
            https,
            host,
            port,
            target,
            userinfo,
        })
    }

    /// `host[:port]` as the Host header wants it (the port only when not the
    /// scheme's default).
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `host:port` as CONNECT wants it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves a `Location` header against this URL.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        if location.starts_with("http://") || location.starts_with("https://") {
            return Url::parse(location);
        }
        let mut u = self.clone();
        u.userinfo = None;
        if let Some(rest) = location.strip_prefix("//") {
            let scheme = if self.https { "https" } else { "http" };
            return Url::parse(&format!("{scheme}://{rest}"));
        }
        if location.starts_with('/') {
            u.target = location.to_owned();
        } else {
            let path = self.target.split('?').next().unwrap_or("/");
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            u.target = format!("{dir}{location}");
        }
        Ok(u)
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        // Never print credentials, nor a path or query that may carry them.
        let shown = format!("{scheme}://{}{}", self.host_header(), self.target);
        f.write_str(&redact(&shown))
    }
}

/// A URL as it may appear in logs, errors, statuses and acks when the bridge did
/// not take it from its own configuration. Signed URLs carry their secret in the
/// query (S3 signatures, Azure SAS tokens) or in the path (Pantacor Hub's
/// `/local-s3/<JWT>`, valid a day), so only the scheme, host and port are kept,
/// with the last path segment when it is a sha256 (an object's name, not a
/// secret) and a short fingerprint of the whole URL so that two URLs can be told
/// apart: `https://hub.example:443/…/<sha256>~a1b2c3`. User information is
/// dropped.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None => return format!("…~{}", fingerprint(url)),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(end);
    let host = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    if tail.is_empty() || tail == "/" {
        return format!("{scheme}://{host}{tail}");
    }
    let path = tail.split(['?', '#']).next().unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or_default();
    let object = if last.len() == 64 && last.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("/{last}")
    } else {
        String::new()
    };
    format!("{scheme}://{host}/…{object}~{}", fingerprint(url))
}

/// Six hex digits of FNV-1a over the text: enough to tell URLs apart in a log,
/// far too few to recover anything.
fn fingerprint(text: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h >> 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_servers_and_proxies_give() {
        let u = Url::parse("https://api.pantahub.com/objects/ab?x=1").unwrap();
        assert_eq!(
            (u.https, u.host.as_str(), u.port, u.target.as_str()),
            (true, "api.pantahub.com", 443, "/objects/ab?x=1")
        );
        assert_eq!(u.host_header(), "api.pantahub.com");
        let u = Url::parse("http://user:p%40ss@127.0.0.1:3128").unwrap();
        assert_eq!(u.userinfo.as_deref(), Some("user:p%40ss"));
        assert_eq!((u.port, u.target.as_str()), (3128, "/"));
        assert_eq!(u.to_string(), "http://127.0.0.1:3128/");
        let u = Url::parse("http://[::1]:8080/a").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority()),
            ("::1", "[::1]:8080".into())
        );
        for bad in [
            "ftp://x/",
            "http://",
            "http://h:port/",
            "https://h/a b",
            "http://[::1/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn joins_redirect_locations() {
        let u = Url::parse("https://cdn.example/a/b/c?q").unwrap();
        assert_eq!(u.join("/x").unwrap().target, "/x");
        assert_eq!(u.join("d").unwrap().target, "/a/b/d");
        assert_eq!(u.join("http://o.example/z").unwrap().host, "o.example");
        let j = u.join("//s3.example/k").unwrap();
        assert_eq!((j.host.as_str(), j.target.as_str()), ("s3.example", "/k"));
        assert!(j.https);
    }

    #[test]
    fn redaction_hides_queries_paths_and_credentials() {
        let sas = redact("https://acct.blob.core.windows.net/c/o?sv=2024&sig=SECRET");
        assert!(
            sas.starts_with("https://acct.blob.core.windows.net/…~"),
            "{sas}"
        );
        assert!(!sas.contains("SECRET") && !sas.contains("/c/o"), "{sas}");
        // Pantacor Hub's object token is the path.
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJwcm46ZGV2In0.c2lnbmF0dXJl";
        let hub = redact(&format!("https://api.pantahub.com:443/local-s3/{jwt}"));
        assert!(hub.starts_with("https://api.pantahub.com:443/…~"), "{hub}");
        assert!(!hub.contains("eyJ") && !hub.contains("local-s3"), "{hub}");
        let sha = "a".repeat(64);
        assert_eq!(
            redact(&format!("http://u:p@h:1/objects/{sha}"))
                .split('~')
                .next(),
            Some(format!("http://h:1/…/{sha}").as_str())
        );
        assert_eq!(redact("https://h"), "https://h");
        assert_eq!(redact("https://h/"), "https://h/");
        assert_ne!(redact("https://h/a"), redact("https://h/b"), "told apart");
        assert!(!redact("not a url with SECRET").contains("SECRET"));
        let u = Url::parse(&format!("https://h:8443/local-s3/{jwt}?x=1")).unwrap();
        assert!(!u.to_string().contains("eyJ"), "{u}");
    }
}
