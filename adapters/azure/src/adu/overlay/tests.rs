//! The overlay on a real Pantavisor state (`tests/fixtures/pantavisor-states`).

use super::*;
use serde_json::json;

fn running() -> BTreeMap<String, Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pantavisor-states/initial_state.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn keys(m: &BTreeMap<String, Value>, prefix: &str) -> Vec<String> {
    m.keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

#[test]
fn signatures_give_their_include_and_exclude_cut_at_the_star() {
    let r = running();
    let mut p = sig_patterns(&r["_sigs/awconnect.json"]).unwrap();
    p.sort();
    assert_eq!(
        p,
        [
            "_config/awconnect/",
            "_sigs/awconnect.json",
            "awconnect/",
            "awconnect/src.json"
        ]
    );
    assert!(sig_patterns(&json!({"protected": "***"})).is_err());
}

#[test]
fn a_signed_part_replaces_everything_its_running_signature_covers() {
    let r = running();
    let before_other: Vec<String> = keys(&r, "bsp/");
    // The new version of awconnect: a signature, a root, a config file; its old
    // lxc.container.conf and iptables files are gone from the new version.
    let added: BTreeMap<String, Value> = [
        ("_sigs/awconnect.json", r["_sigs/awconnect.json"].clone()),
        ("awconnect/root.squashfs", json!("a".repeat(64))),
        ("awconnect/run.json", json!({"name": "awconnect"})),
        ("_config/awconnect/etc/new.conf", json!("b".repeat(64))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let (out, both) = overlay(&r, &added).unwrap();
    assert!(both.is_empty(), "{both:?}");
    assert_eq!(
        keys(&out, "awconnect/"),
        ["awconnect/root.squashfs", "awconnect/run.json"],
        "files deleted in the new version disappear"
    );
    assert_eq!(
        keys(&out, "_config/awconnect/"),
        ["_config/awconnect/etc/new.conf"]
    );
    assert_eq!(keys(&out, "bsp/"), before_other, "other parts untouched");
    assert_eq!(out["#spec"], r["#spec"]);
    assert_eq!(out["awconnect/root.squashfs"], json!("a".repeat(64)));
}

#[test]
fn without_its_signature_only_the_keys_it_names_are_replaced() {
    let r = running();
    let added: BTreeMap<String, Value> =
        [("awconnect/run.json".to_owned(), json!({"v": 2}))].into();
    let (out, _) = overlay(&r, &added).unwrap();
    assert_eq!(out["awconnect/run.json"], json!({"v": 2}));
    assert_eq!(
        keys(&out, "awconnect/"),
        keys(&r, "awconnect/"),
        "the rest survives"
    );
    assert_eq!(out.len(), r.len());
}

#[test]
fn a_new_part_is_added_and_nothing_else_moves() {
    let r = running();
    let added: BTreeMap<String, Value> = [
        ("myapp/run.json".to_owned(), json!({})),
        ("myapp/root.squashfs".to_owned(), json!("c".repeat(64))),
    ]
    .into();
    let (out, _) = overlay(&r, &added).unwrap();
    assert_eq!(out.len(), r.len() + 2);
    for (k, v) in &r {
        assert_eq!(&out[k], v, "{k}");
    }
}

#[test]
fn a_running_signature_that_cannot_be_read_stops_the_overlay() {
    let mut r = running();
    r.insert("_sigs/broken.json".into(), json!({"protected": "!!"}));
    let e = overlay(&r, &BTreeMap::new()).unwrap_err();
    assert!(e.contains("_sigs/broken.json"), "{e}");
}

/// Pantavisor's own pvtx test vectors (`tests/fixtures/pvtx`, README there): the
/// overlay gives exactly the states the real `pvtx add` gives.
#[test]
fn the_overlay_matches_the_real_pvtx_on_its_own_tests() {
    let load = |n: &str| -> BTreeMap<String, Value> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/pvtx")
            .join(n);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    for (base, add, want) in [
        (
            "initial_state.json",
            "awconnect.json",
            "state_after_adding_existing.json",
        ),
        (
            "initial_state.json",
            "vaultwarden.json",
            "state_after_new_package.json",
        ),
        ("bsp_init.json", "bsp_update.json", "state_bsp_update.json"),
    ] {
        let (got, both) = overlay(&load(base), &load(add)).unwrap();
        assert!(both.is_empty(), "{add}: {both:?}");
        let want = load(want);
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .keys()
            .filter(|k| got.get(*k).is_some_and(|v| v != &want[*k]))
            .collect();
        assert!(
            extra.is_empty() && missing.is_empty() && differ.is_empty(),
            "{base} + {add}: extra {extra:?}, missing {missing:?}, different {differ:?}"
        );
    }
}
