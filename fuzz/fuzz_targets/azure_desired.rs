//! What Azure IoT Hub sends down: desired properties (`revision`, `userMeta`, a
//! whole desired document) and direct-method calls. Never panics; a method
//! payload over 128 KiB is refused with 413.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_adapter_azure::{methods, twin};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = twin::DesiredRevision::parse(&v);
                let _ = twin::user_meta(&v);
                let _ = twin::validate(&v);
                let _ = twin::size(&v);
                let mut t = serde_json::json!({});
                twin::merge_patch(&mut t, &v);
                let _ = twin::diff(&serde_json::json!({}), &t);
            }
        }
        1 => {
            let (name, payload) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&b"ping"[..], rest),
            };
            let name = String::from_utf8_lossy(name);
            let r = methods::parse(&name, payload);
            if payload.len() > 128 * 1024 {
                assert!(
                    matches!(r, Err((413, _))),
                    "an oversize method payload was taken"
                );
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let k = twin::escape_key(s);
                assert_eq!(twin::unescape_key(&k), s, "escaping is reversible");
                let _ = twin::key_problem(s);
            }
        }
    }
});
