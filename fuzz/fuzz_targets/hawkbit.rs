//! What a hawkBit DDI server sends: poll answers, deployments, cancel
//! requests, and `.swu` images (cpio newc member tables). Never panics; every
//! member the table gives lies inside the image.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use pv_adapter_hawkbit::{ddi, swu};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(p) = ddi::parse_poll(rest) {
                for href in [&p.deployment, &p.cancel].into_iter().flatten() {
                    let _ = ddi::action_id(href);
                }
            }
        }
        1 => {
            if let Ok(Some(d)) = ddi::parse_deployment(rest) {
                for c in &d.chunks {
                    for a in &c.artifacts {
                        if let Some(h) = &a.hashes.sha256 {
                            assert_eq!(h.len(), 64);
                        }
                    }
                }
            }
        }
        2 => {
            let _ = ddi::parse_cancel(rest);
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = ddi::parse_sleep(s);
            }
        }
        _ => {
            let len = rest.len() as u64;
            if let Ok(members) = swu::members(&mut Cursor::new(rest), len) {
                for m in &members {
                    assert!(m.offset + m.size <= len, "{m:?} past {len}");
                }
                let _ = swu::payload(&members);
            }
        }
    }
});
