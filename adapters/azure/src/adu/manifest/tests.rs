//! The golden manifest (`tests/fixtures/adu/service-desired.valid.json`) and what
//! must be refused.

use super::*;
use serde_json::json;

fn golden() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/adu/service-desired.valid.json");
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["updateManifest"].as_str().unwrap().to_owned()
}

fn device(m: &str, model: &str) -> BTreeMap<String, String> {
    [("manufacturer", m), ("model", model)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_golden_manifest_parses_as_adu_reads_it() {
    let m = Manifest::parse(&golden()).unwrap();
    assert_eq!(m.version, 4);
    assert_eq!(
        m.update_id.to_json_string(),
        r#"{"provider":"Contoso","name":"Virtual-Vacuum","version":"20.0"}"#
    );
    assert_eq!(m.steps.len(), 2);
    assert_eq!(
        m.steps[0],
        Step::Inline {
            handler: "microsoft/apt:1".into(),
            files: vec!["f483750ebb885d32c".into()],
            properties: json!({"installedCriteria": "apt-update-tree-1.0"}),
            installed_criteria: Some("apt-update-tree-1.0".into()),
        }
    );
    assert_eq!(
        m.steps[1],
        Step::Reference {
            file_id: "f222b9ffefaaac577".into()
        }
    );
    let f = &m.files["f483750ebb885d32c"];
    assert_eq!(
        (f.name.as_str(), f.size),
        ("apt-manifest-tree-1.0.json", 136)
    );
    assert_eq!(
        STANDARD.encode(f.sha256),
        "Uk1vsEL/nT4btMngo0YSJjheOL2aqm6/EAFhzPb0rXs="
    );
    assert_eq!(m.files["f222b9ffefaaac577"].size, 1031);
}

#[test]
fn compatibility_maps_import_keys_to_the_device_properties() {
    let m = Manifest::parse(&golden()).unwrap();
    assert!(m.compatible(&device("contoso", "virtual-vacuum-v1")));
    assert!(
        m.compatible(&device("Contoso", "VIRTUAL-VACUUM-V1")),
        "case"
    );
    assert!(!m.compatible(&device("contoso", "virtual-vacuum-v2")));
    assert!(!m.compatible(&device("pantacor", "virtual-vacuum-v1")));
    assert!(!m.compatible(&BTreeMap::new()));
}

#[test]
fn what_a_device_cannot_trust_is_refused_with_the_reason() {
    let base: Value = serde_json::from_str(&golden()).unwrap();
    let with = |path: &[&str], v: Value| {
        let mut m = base.clone();
        let mut at = &mut m;
        for p in &path[..path.len() - 1] {
            at = match p.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*p],
            };
        }
        at[path[path.len() - 1]] = v;
        m.to_string()
    };
    for (text, want) in [
        (with(&["manifestVersion"], json!("3")), "is not 4 or 5"),
        (
            with(&["updateId"], json!("x")),
            "updateId must be an object",
        ),
        (
            with(&["compatibility"], json!([])),
            "compatibility must be a non-empty array",
        ),
        (with(&["instructions", "steps"], json!([])), "0 steps"),
        (
            with(&["instructions", "steps", "0", "handler"], json!("apt")),
            "is not vendor/name:version",
        ),
        (
            with(&["instructions", "steps", "0", "files"], json!(["nope"])),
            "not among the files",
        ),
        (
            with(&["files", "f483750ebb885d32c", "sizeInBytes"], json!(-1)),
            "sizeInBytes must be a byte count",
        ),
        (
            with(
                &["files", "f483750ebb885d32c", "hashes"],
                json!({"sha256": "abc"}),
            ),
            "must be a base64 SHA-256",
        ),
        (
            with(
                &["files", "f483750ebb885d32c", "fileName"],
                json!("../etc/passwd"),
            ),
            "is not a file name",
        ),
        ("[]".to_owned(), "not a JSON object"),
    ] {
        let e = Manifest::parse(&text).unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    // pvr2adu writes sizes as strings; a v5 manifest parses too.
    let m = Manifest::parse(&with(
        &["files", "f483750ebb885d32c", "sizeInBytes"],
        json!("136"),
    ))
    .unwrap();
    assert_eq!(m.files["f483750ebb885d32c"].size, 136);
    assert_eq!(
        Manifest::parse(&with(&["manifestVersion"], json!("5")))
            .unwrap()
            .version,
        5
    );
}

#[test]
fn a_mini_manifest_points_at_the_detached_one() {
    let mini = json!({"manifestVersion": "5",
        "updateId": {"provider": "P", "name": "N", "version": "1"},
        "detachedManifestFileId": "d1",
        "files": {"d1": {"fileName": "full.json", "sizeInBytes": 10,
                          "hashes": {"sha256": STANDARD.encode([7u8; 32])}}}});
    let m = Manifest::parse(&mini.to_string()).unwrap();
    assert_eq!(m.detached.as_deref(), Some("d1"));
    assert!(m.steps.is_empty());
}

#[test]
fn a_child_manifest_comes_from_its_file_and_cannot_nest() {
    let child = json!({"manifestVersion": "5",
        "updateId": {"provider": "P", "name": "child", "version": "1"},
        "compatibility": [{"deviceManufacturer": "m", "deviceModel": "x"}],
        "instructions": {"steps": [{"handler": "pantacor/pvrevision:1", "files": ["c1"],
                                    "handlerProperties": {"installedCriteria": "1"}}]},
        "files": {"c1": {"fileName": "rev.tgz", "sizeInBytes": 3,
                          "hashes": {"sha256": STANDARD.encode([1u8; 32])}}}});
    let file = json!({"updateManifest": child.to_string()}).to_string();
    let m = Manifest::parse_child(file.as_bytes()).unwrap();
    assert_eq!(m.update_id.name, "child");
    let mut nested = child.clone();
    nested["instructions"]["steps"] =
        json!([{"type": "reference", "detachedManifestFileId": "c1"}]);
    let file = json!({"updateManifest": nested.to_string()}).to_string();
    assert!(
        Manifest::parse_child(file.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("refers to another manifest")
    );
    assert!(Manifest::parse_child(b"{}").is_err());
    assert!(Manifest::parse_child(b"not json").is_err());
}
