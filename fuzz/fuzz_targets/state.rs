//! The state JSON parser (what a backend offers for `PUT /steps`): never panics,
//! and never accepts more than its size bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_bridge::state::State;

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = State::parse_for_staging(data, MAX) {
        assert!(
            data.len() <= MAX,
            "accepted {} bytes over the bound",
            data.len()
        );
        // Whatever it accepted has well-formed object references and paths.
        for (path, sha) in s.objects() {
            assert!(pv_adapter_api::is_sha256_hex(sha), "{path}: {sha}");
            assert!(
                !path.split('/').any(|seg| seg == ".." || seg.is_empty()),
                "{path}"
            );
        }
    }
    let _ = State::parse(data);
});
