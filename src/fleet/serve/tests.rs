#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[test]
fn ranges_parse_like_rfc_9110_says() {
    assert_eq!(range(None, 100), Ok(None));
    assert_eq!(range(Some("bytes=10-19"), 100), Ok(Some((10, 19))));
    assert_eq!(range(Some("bytes=10-"), 100), Ok(Some((10, 99))));
    assert_eq!(range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
    assert_eq!(range(Some("bytes=-500"), 100), Ok(Some((0, 99))));
    assert_eq!(range(Some("bytes=90-500"), 100), Ok(Some((90, 99))));
    assert_eq!(range(Some("bytes=100-"), 100), Err(()));
    assert_eq!(range(Some("bytes=-0"), 100), Err(()));
    assert_eq!(range(Some("bytes=0-"), 0), Err(()));
    // Forms we do not serve are ignored: the whole object.
    assert_eq!(range(Some("bytes=0-1,5-6"), 100), Ok(None));
    assert_eq!(range(Some("bytes=9-2"), 100), Ok(None));
    assert_eq!(range(Some("items=0-1"), 100), Ok(None));
    assert_eq!(range(Some("bytes=x-"), 100), Ok(None));
}

fn noise(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

async fn server(data: &[u8]) -> (tempfile::TempDir, SocketAddr, String) {
    let d = tempfile::tempdir().unwrap();
    let sha = crate::pvctrl::hex(&sha2::Sha256::digest(data));
    std::fs::create_dir_all(d.path().join("e/objects")).unwrap();
    std::fs::write(
        d.path().join("e/json"),
        br##"{"#spec":"pantavisor-service-system@1"}"##,
    )
    .unwrap();
    std::fs::write(d.path().join("e/objects").join(&sha), data).unwrap();
    let export = Arc::new(Export::open(&d.path().join("e")).unwrap());
    let addr = http("127.0.0.1:0".parse().unwrap(), export).await.unwrap();
    (d, addr, sha)
}

/// Sends one request on `s` and reads one response: (status, headers, body).
async fn exchange(s: &mut TcpStream, req: &str) -> (u16, String, Vec<u8>) {
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "connection closed");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let code = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; if req.starts_with("HEAD") { 0 } else { len }];
    s.read_exact(&mut body).await.unwrap();
    (code, head.to_ascii_lowercase(), body)
}

#[tokio::test]
async fn serves_whole_objects_ranges_and_heads_on_one_connection() {
    let data = noise(300_000);
    let (_d, addr, sha) = server(&data).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let get = |extra: &str| format!("GET /objects/{sha} HTTP/1.1\r\nhost: x\r\n{extra}\r\n");
    let (code, head, body) = exchange(&mut s, &get("")).await;
    assert_eq!(code, 200);
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    assert!(head.contains(&format!("etag: \"{sha}\"")), "{head}");
    assert_eq!(body, data);
    // The same connection (keep-alive): a resumed download.
    let (code, head, body) = exchange(&mut s, &get("range: bytes=100000-\r\n")).await;
    assert_eq!(code, 206);
    assert!(
        head.contains("content-range: bytes 100000-299999/300000"),
        "{head}"
    );
    assert_eq!(body, &data[100_000..]);
    let (code, _, body) = exchange(&mut s, &get("range: bytes=-10\r\n")).await;
    assert_eq!((code, body.as_slice()), (206, &data[299_990..]));
    let (code, head, _) = exchange(&mut s, &get("range: bytes=300000-\r\n")).await;
    assert_eq!(code, 416);
    assert!(head.contains("content-range: bytes */300000"), "{head}");
    // If-Range with another validator: the whole object.
    let (code, _, body) =
        exchange(&mut s, &get("range: bytes=5-\r\nif-range: \"other\"\r\n")).await;
    assert_eq!((code, body.len()), (200, data.len()));
    let (code, _, body) = exchange(
        &mut s,
        &get(&format!("range: bytes=5-9\r\nif-range: \"{sha}\"\r\n")),
    )
    .await;
    assert_eq!((code, body.as_slice()), (206, &data[5..10]));
    let (code, head, body) = exchange(
        &mut s,
        &format!("HEAD /objects/{sha} HTTP/1.1\r\nhost: x\r\n\r\n"),
    )
    .await;
    assert_eq!(code, 200);
    assert!(head.contains("content-length: 300000"), "{head}");
    assert!(body.is_empty());
    let (code, _, _) = exchange(&mut s, "GET /objects/00 HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(code, 404);
    let (code, head, _) = exchange(
        &mut s,
        &format!("PUT /objects/{sha} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"),
    )
    .await;
    assert_eq!(code, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    let (code, _, body) = exchange(&mut s, "GET /state.json HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(code, 200);
    assert!(body.starts_with(b"{\"#spec\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_download_at_once() {
    let data = noise(1_000_000);
    let (_d, addr, sha) = server(&data).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let sha = sha.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let from = i * 1000;
                let (code, _, body) = exchange(
                    &mut s,
                    &format!(
                        "GET /objects/{sha} HTTP/1.1\r\nhost: x\r\nrange: bytes={from}-\r\n\r\n"
                    ),
                )
                .await;
                (code, from, body)
            })
        })
        .collect();
    for t in tasks {
        let (code, from, body) = t.await.unwrap();
        assert_eq!(code, 206);
        assert_eq!(body, &data[from..]);
    }
}
