//! Microsoft's root key packages and the test vectors (`tests/fixtures/adu`).

use super::*;
use crate::adu::jws::{Refusal, production_root_keys, verify};
use sha2::Digest;

fn bytes(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adu")
        .join(name);
    std::fs::read(&path).unwrap()
}

#[test]
fn the_production_package_is_signed_by_both_embedded_keys_over_its_compact_bytes() {
    for name in ["prod-rootkeys.json", "prod-rootkeys.compact.json"] {
        let p = Package::parse(&bytes(name)).unwrap();
        assert_eq!(p.signed.len(), 1220, "{name}");
        assert_eq!(
            pv_adapter_api::hex(&sha2::Sha256::digest(&p.signed)),
            "1ee9f8d800ee9717ef812b9e004857e714249f0009b2ac18877a52898f9ea2a7",
            "{name}"
        );
        assert!(
            p.signed
                .starts_with(br#"{"version":1,"published":1675972876,"disabledRootKeys":[],"d"#)
        );
        assert_eq!(
            p.root_keys
                .iter()
                .map(|k| k.kid.as_str())
                .collect::<Vec<_>>(),
            ["ADU.200702.R", "ADU.200703.R"],
            "document order"
        );
        p.validate(&production_root_keys(), true).unwrap();
        assert!(!p.is_test);
        assert_eq!(p.published, 1_675_972_876);
    }
    // The compact file holds the signed bytes verbatim.
    let compact = String::from_utf8(bytes("prod-rootkeys.compact.json")).unwrap();
    let p = Package::parse(compact.as_bytes()).unwrap();
    assert!(compact.contains(std::str::from_utf8(&p.signed).unwrap()));
}

#[test]
fn other_bytes_or_another_key_order_do_not_verify() {
    let mut p = Package::parse(&bytes("prod-rootkeys.json")).unwrap();
    let keys = production_root_keys();
    // Keys sorted differently (a parser that re-orders maps): the alignment breaks.
    p.root_keys.reverse();
    assert!(p.validate(&keys, true).is_err());
    p.root_keys.reverse();
    // The pretty-printed bytes are not what was signed.
    let pretty: Value = serde_json::from_slice(&bytes("prod-rootkeys.json")).unwrap();
    p.signed = serde_json::to_vec_pretty(&pretty["protected"]).unwrap();
    assert!(p.validate(&keys, true).is_err());
}

#[test]
fn packages_not_signed_by_microsoft_are_refused() {
    let keys = production_root_keys();
    for name in [
        "test-rootkeypackage.valid.json",
        "test-rootkeypackage.bad-signatures.json",
        "disabledRootKeyProd.json",
        "disabledSigningKeyProd.json",
    ] {
        let e = Package::parse(&bytes(name))
            .unwrap()
            .validate(&keys, true)
            .unwrap_err();
        assert_eq!(e.erc(), 0x8060_0004, "{name}: {e}");
    }
}

#[test]
fn a_test_package_verifies_with_its_own_test_keys_only_when_intact() {
    let good = Package::parse(&bytes("test-rootkeypackage.valid.json")).unwrap();
    // Its own keys as the embedded ones, as a test build would have them.
    let test_keys = good.root_keys.clone();
    assert_eq!(
        test_keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
        ["testrootkey1", "testrootkey2"]
    );
    good.validate(&test_keys, false).unwrap();
    let bad = Package::parse(&bytes("test-rootkeypackage.bad-signatures.json")).unwrap();
    assert_eq!(
        bad.validate(&test_keys, false).unwrap_err().erc(),
        0x8060_0004
    );
}

#[test]
fn disabled_lists_of_a_trusted_package_refuse_the_real_manifest() {
    let svc: Value = serde_json::from_slice(&bytes("service-desired.valid.json")).unwrap();
    let (sig, manifest) = (
        svc["updateManifestSignature"].as_str().unwrap(),
        svc["updateManifest"].as_str().unwrap(),
    );
    let keys = production_root_keys();
    // Injected past validation (their signature is "ToDo"), as the test hook does.
    let p = Package::parse(&bytes("disabledSigningKeyProd.json")).unwrap();
    assert_eq!(
        verify(sig, manifest, &p.trust(&keys)).unwrap_err(),
        Refusal::SigningKeyDisabled
    );
    let p = Package::parse(&bytes("disabledRootKeyProd.json")).unwrap();
    assert_eq!(
        verify(sig, manifest, &p.trust(&keys)).unwrap_err(),
        Refusal::DisallowedRootKid("ADU.200702.R".into())
    );
    // The production package disables nothing: the manifest verifies.
    let p = Package::parse(&bytes("prod-rootkeys.json")).unwrap();
    verify(sig, manifest, &p.trust(&keys)).unwrap();
}

#[test]
fn malformed_packages_are_named() {
    for (text, want) in [
        ("{}", "missing field"),
        (
            r#"{"protected": {"rootKeys": {"k": {"keyType": "EC"}}}, "signatures": []}"#,
            "keyType must be RSA",
        ),
        (
            r#"{"protected": {"rootKeys": {"k": {"keyType": "RSA", "n": "AQAB", "e": "x"}}}, "signatures": []}"#,
            "e is not a number",
        ),
        (
            r#"{"protected": {"rootKeys": {}, "disabledSigningKeys": [{"alg": "SHA256", "hash": "abc"}]}, "signatures": []}"#,
            "not 32 bytes",
        ),
    ] {
        let e = Package::parse(text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains(want), "{text}: {e}");
    }
    assert_eq!(
        minify("{ \"a\" : \"x y\\\" z\" ,\n \"b\": [1, 2] }"),
        "{\"a\":\"x y\\\" z\",\"b\":[1,2]}"
    );
}
