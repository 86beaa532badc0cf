//! The real Microsoft-signed vectors (`tests/fixtures/adu`, README there).

use super::*;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adu")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn prod() -> Trust {
    Trust {
        roots: production_root_keys(),
        ..Trust::default()
    }
}

fn parts(v: &Value) -> (String, String) {
    (
        v["updateManifestSignature"].as_str().unwrap().to_owned(),
        v["updateManifest"].as_str().unwrap().to_owned(),
    )
}

fn b64u(h: [u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(h)
}

#[test]
fn the_embedded_root_keys_are_microsofts() {
    let keys = production_root_keys();
    assert_eq!(keys.len(), 2);
    for (k, pkcs1) in keys.iter().zip([
        "dIFtrupfeMI2inXqVb93rnvthQw10TQiQZhAW5n76xM",
        "o0Ynh0Y30QzVAGYbBHgu6kXUKKcAj-GSsdyMG9DMlbI",
    ]) {
        assert_eq!(k.n.len(), 384, "{}", k.kid);
        assert_eq!(b64u(key_hashes(&k.n, &k.e).0), pkcs1, "{}", k.kid);
    }
    let spki = key_hashes(&keys[0].n, &keys[0].e).1;
    assert_eq!(b64u(spki), "jz-YRbYHNuhMRTSsogvYLO3EANxI5KBhMI5uPJ0ZeEg");
    // The package lists the same moduli.
    let pkg = fixture("prod-rootkeys.json");
    for k in &keys {
        let n = pkg["protected"]["rootKeys"][&k.kid]["n"].as_str().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(n).unwrap(), k.n, "{}", k.kid);
    }
}

#[test]
fn the_golden_vector_verifies_through_its_chain() {
    let (sig, manifest) = parts(&fixture("service-desired.valid.json"));
    let key = verify(&sig, &manifest, &prod()).unwrap();
    assert_eq!(
        (key.kid.as_str(), key.root_kid.as_str()),
        ("ADU.210609.R.S", "ADU.200702.R")
    );
    assert_eq!(key.n.len(), 384);
    let (pkcs1, spki) = key_hashes(&key.n, &key.e);
    assert_eq!(b64u(pkcs1), "q5xF2ARjhdtH-kaLNTwZAMoXdy0iJQjziQ_AyZWDPRA");
    assert_eq!(b64u(spki), "Y0jA4rDItwp5NIZYPUP8jAQoXIRPSKCDo4xtiWjyvig");
    assert_eq!(der(&key.n, &key.e).0.len(), 398);
    assert_eq!(der(&key.n, &key.e).1.len(), 422);
}

#[test]
fn a_manifest_changed_by_one_byte_is_refused_after_the_signatures() {
    let (sig, manifest) = parts(&fixture("service-desired.manifest-hash-mismatch.json"));
    let e = verify(&sig, &manifest, &prod()).unwrap_err();
    assert_eq!(
        e,
        Refusal::ManifestHashMismatch {
            signed: "jImvxjlsjjgoIyBna8ne96wDXbUlSszxah3CbnAzI1I=".into(),
            actual: "aLWH/FldemYweKOM5NLbctZloww9CXtES76m8yJAs/0=".into(),
        }
    );
    assert_eq!(e.erc(), 0x8030_0001);
}

#[test]
fn wrong_keys_disabled_keys_and_changed_bytes_fail() {
    let (sig, manifest) = parts(&fixture("service-desired.valid.json"));
    // Only the other root key: the sjwk's kid is missing.
    let only_other = Trust {
        roots: production_root_keys()
            .into_iter()
            .filter(|k| k.kid == "ADU.200703.R")
            .collect(),
        ..Trust::default()
    };
    assert_eq!(
        verify(&sig, &manifest, &only_other).unwrap_err(),
        Refusal::MissingRootKid("ADU.200702.R".into())
    );
    // The other key's modulus under the right kid: the sjwk signature fails.
    let mut swapped = production_root_keys();
    swapped[0].n = swapped[1].n.clone();
    let t = Trust {
        roots: swapped,
        ..Trust::default()
    };
    assert_eq!(
        verify(&sig, &manifest, &t).unwrap_err(),
        Refusal::InvalidSignature("sjwk")
    );
    // Disabled root key, as `disabledRootKeyProd.json` lists it.
    let pkg = fixture("disabledRootKeyProd.json");
    let disabled: Vec<String> = pkg["protected"]["disabledRootKeys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    let t = Trust {
        disabled_roots: disabled,
        ..prod()
    };
    let e = verify(&sig, &manifest, &t).unwrap_err();
    assert_eq!(
        (e.clone(), e.erc()),
        (
            Refusal::DisallowedRootKid("ADU.200702.R".into()),
            0xA020_0005
        )
    );
    // Disabled signing key, by its PKCS#1 hash as `disabledSigningKeyProd.json` lists it.
    let pkg = fixture("disabledSigningKeyProd.json");
    let hash = pkg["protected"]["disabledSigningKeys"][0]["hash"]
        .as_str()
        .unwrap();
    let h: [u8; 32] = URL_SAFE_NO_PAD.decode(hash).unwrap().try_into().unwrap();
    let t = Trust {
        disabled_signing: vec![h],
        ..prod()
    };
    let e = verify(&sig, &manifest, &t).unwrap_err();
    assert_eq!(
        (e.clone(), e.erc()),
        (Refusal::SigningKeyDisabled, 0xA000_0005)
    );
    // Any changed byte of the outer signature or of the signed header.
    let mut chars: Vec<char> = sig.chars().collect();
    let last = chars.len() - 5;
    chars[last] = if chars[last] == 'A' { 'B' } else { 'A' };
    let bad: String = chars.into_iter().collect();
    assert_eq!(
        verify(&bad, &manifest, &prod()).unwrap_err(),
        Refusal::InvalidSignature("manifest")
    );
    // Not a JWS at all.
    for bad in ["", "a.b", "a.b.c.d", "!!.@@.##"] {
        assert!(
            matches!(
                verify(bad, &manifest, &prod()),
                Err(Refusal::BadStructure(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn key_material_decodes_in_both_alphabets() {
    assert_eq!(b64_any("+/8="), Some(vec![0xfb, 0xff]));
    assert_eq!(b64_any("-_8"), Some(vec![0xfb, 0xff]));
    assert_eq!(b64_any("*"), None);
}
