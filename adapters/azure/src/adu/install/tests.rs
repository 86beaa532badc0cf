//! A pvr2adu-style partial export overlaid on a real running state, and a whole
//! export.

use super::*;
use serde_json::json;
use sha2::Digest;

fn running() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pantavisor-states/initial_state.json");
    std::fs::read(path).unwrap()
}

/// A `pvr export` tarball: `json` first, then `objects/<sha>`, plus an entry that
/// tries to escape.
fn tgz(path: &Path, state: &Value, objects: &[Vec<u8>]) {
    let f = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, data).unwrap();
    };
    add("json", &serde_json::to_vec(state).unwrap());
    for o in objects {
        add(
            &format!("objects/{}", pv_adapter_api::hex(&sha2::Sha256::digest(o))),
            o,
        );
    }
    add("extra/evil.sh", b"#!/bin/sh\nrm -rf /\n");
    t.into_inner().unwrap().finish().unwrap();
}

#[tokio::test]
async fn a_pvr2adu_part_is_overlaid_on_the_running_state() {
    let dir = tempfile::tempdir().unwrap();
    let run: Value = serde_json::from_slice(&running()).unwrap();
    let root = b"new awconnect root".to_vec();
    let sha = pv_adapter_api::hex(&sha2::Sha256::digest(&root));
    let part = json!({
        "#spec": run["#spec"],
        "_sigs/awconnect.json": run["_sigs/awconnect.json"],
        "awconnect/root.squashfs": sha,
        "awconnect/run.json": {"name": "awconnect", "type": "lxc"},
    });
    tgz(
        &dir.path().join("pvadu.tgz"),
        &part,
        std::slice::from_ref(&root),
    );
    let plan = Plan::Overlay {
        export: "f1".into(),
        script: "f2".into(),
        revision: "1.0.3".into(),
    };
    let offer = prepare(
        &plan,
        |_| dir.path().join("pvadu.tgz"),
        |_| "pvadu.tgz".into(),
        dir.path(),
        Some(&running()),
    )
    .await
    .unwrap();
    assert_eq!(offer.id, "1.0.3");
    let state: BTreeMap<String, Value> = serde_json::from_slice(&offer.state).unwrap();
    let aw: Vec<&String> = state
        .keys()
        .filter(|k| k.starts_with("awconnect/"))
        .collect();
    assert_eq!(aw, ["awconnect/root.squashfs", "awconnect/run.json"]);
    assert_eq!(state["awconnect/root.squashfs"], json!(sha));
    assert_eq!(
        state["bsp/kernel.img"], run["bsp/kernel.img"],
        "the rest runs on"
    );
    assert_eq!(offer.objects.len(), 1, "only the package's objects travel");
    assert_eq!(offer.objects[&sha].size, Some(root.len() as u64));
    assert!(
        !dir.path().join("export/extra").exists(),
        "foreign entries are skipped"
    );
}

#[tokio::test]
async fn a_whole_export_is_offered_as_it_is_and_broken_packages_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let run: Value = serde_json::from_slice(&running()).unwrap();
    tgz(&dir.path().join("full.tgz"), &run, &[]);
    let plan = Plan::Whole {
        export: "f3".into(),
        revision: "r7".into(),
    };
    let offer = prepare(
        &plan,
        |_| dir.path().join("full.tgz"),
        |_| "full.tgz".into(),
        dir.path(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&offer.state).unwrap(), run);
    std::fs::write(dir.path().join("bad.tgz"), b"not gzip at all").unwrap();
    let e = prepare(
        &plan,
        |_| dir.path().join("bad.tgz"),
        |_| "bad.tgz".into(),
        dir.path(),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.erc, erc::OVERLAY_FAILED);
    assert!(e.reason.starts_with("bad.tgz: "), "{}", e.reason);
    let unsupported = Plan::Unsupported {
        erc: erc::UNSUPPORTED_HANDLER,
        reason: "no".into(),
    };
    let e = prepare(
        &unsupported,
        |_| dir.path().join("x"),
        |_| "x".into(),
        dir.path(),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.erc, erc::UNSUPPORTED_HANDLER);
}
