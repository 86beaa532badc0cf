//! Pantacor Hub's step lists (`GET /trails/<id>/steps?…`) and the objects a hub
//! state names. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_adapter_pantahub::wire::{Step, state_objects};

fuzz_target!(|data: &[u8]| {
    if let Ok(steps) = serde_json::from_slice::<Vec<Step>>(data) {
        for s in &steps {
            let _ = s.status();
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(s.state.get()) {
                if let Ok(objects) = state_objects(&v) {
                    for (_, sha) in objects {
                        assert!(pv_adapter_api::is_sha256_hex(&sha), "{sha}");
                    }
                }
            }
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = state_objects(&v);
    }
});
