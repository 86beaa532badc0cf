//! What Device Update sends: an `updateManifestSignature` with its manifest, root
//! key packages and update manifests. Never panics, and the fuzzer cannot forge RSA: whatever
//! verifies must be what Microsoft signed (the seeds' golden manifest and
//! production package).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_adapter_azure::adu::{jws, manifest, rootkeys};

/// SHA-256 (hex) of what Microsoft signed in the seeds.
const GOLDEN_MANIFEST: &str = "8c89afc6396c8e38282320676bc9def7ac035db5254accf16a1dc26e70332352";
const PROD_PACKAGE: &str = "1ee9f8d800ee9717ef812b9e004857e714249f0009b2ac18877a52898f9ea2a7";

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    pv_adapter_api::hex(&sha2::Sha256::digest(b))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let keys = jws::production_root_keys();
    if which % 3 == 2 {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(m) = manifest::Manifest::parse(text) {
                let device = [("manufacturer".to_owned(), "contoso".to_owned())].into();
                let _ = m.compatible(&device);
                let _ = m.update_id.to_json_string();
            }
        }
    } else if which % 3 == 0 {
        let text = String::from_utf8_lossy(rest);
        let (sig, manifest) = text.split_once('\n').unwrap_or((&text, ""));
        let trust = jws::Trust {
            roots: keys,
            ..jws::Trust::default()
        };
        if jws::verify(sig, manifest, &trust).is_ok() {
            assert_eq!(
                sha256_hex(manifest.as_bytes()),
                GOLDEN_MANIFEST,
                "a forged manifest verified"
            );
        }
    } else if let Ok(p) = rootkeys::Package::parse(rest) {
        if p.validate(&keys, true).is_ok() {
            assert_eq!(
                sha256_hex(&p.signed),
                PROD_PACKAGE,
                "a forged package verified"
            );
        }
        let _ = p.trust(&keys);
    }
});
