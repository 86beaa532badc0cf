//! pv-ctrl's side of HTTP: the request heads it sends (see
//! `docs/decisions/0002-own-http-codec-for-pv-ctrl.md`); responses are read with the
//! shared codec of `pv-http`.
//!
//! Requests: origin-form path, `Host: localhost`, `Content-Length` on every body,
//! `Connection: close`, at most five headers (gen-1 servers accept eight).

pub(crate) use pv_http::codec::{Body, Framing, Head, read_head};

/// Encodes a request head. `body_len` is `None` only for requests without a body.
pub(crate) fn encode_head(
    method: &str,
    path: &str,
    body_len: Option<u64>,
    content_type: Option<&str>,
) -> Vec<u8> {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    h.push_str(concat!(
        "User-Agent: pv-bridge/",
        env!("CARGO_PKG_VERSION"),
        "\r\n"
    ));
    if let Some(len) = body_len {
        h.push_str(&format!("Content-Length: {len}\r\n"));
    }
    if let Some(ct) = content_type {
        h.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    h.push_str("Connection: close\r\n\r\n");
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_small_and_origin_form() {
        let h = String::from_utf8(encode_head(
            "PUT",
            "/objects/ab",
            Some(3),
            Some("application/octet-stream"),
        ))
        .unwrap();
        assert!(h.starts_with("PUT /objects/ab HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(h.contains("Content-Length: 3\r\n"));
        assert!(h.ends_with("Connection: close\r\n\r\n"));
        let headers = h.lines().skip(1).filter(|l| !l.is_empty()).count();
        assert!(
            headers <= 8,
            "gen-1 refuses more than 8 headers; sent {headers}"
        );
        let get = String::from_utf8(encode_head("GET", "/containers", None, None)).unwrap();
        assert!(!get.contains("Content-Length"));
    }
}
