//! The HTTP/1.1 response codec shared by the pv-ctrl client and the HTTP client
//! (crates/http): status line, headers, then the body as its framing says
//! (Content-Length, chunked, close-delimited). Never panics, never keeps more than
//! the head bound (64 KiB) or the body limit it is given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_http::codec::{Body, read_head};

const LIMIT: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = data;
        let Ok(head) = read_head(&mut r).await else {
            return;
        };
        assert!(data.len() - r.len() <= 64 * 1024 + 2, "head over its bound");
        let _ = head.header("content-length");
        for was_head in [false, true] {
            let Ok(framing) = head.framing(was_head) else {
                continue;
            };
            let mut body = Body::new(r, framing);
            if let Ok(v) = body.read_to_vec(LIMIT).await {
                assert!(v.len() <= LIMIT, "body over its limit");
            }
        }
    });
});
