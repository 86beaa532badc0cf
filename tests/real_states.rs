//! Real state JSONs from Pantavisor's own test resources (kept in
//! `tests/fixtures/pantavisor-states` with their provenance, or the folder named by
//! `PV_BRIDGE_FIXTURES`): the state model and pv-sim must accept what real devices run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use pv_bridge::state::{EntryKind, RestartPolicy, Revision, Spec, State, transition};
use pv_testkit::sim::Generation;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let dir = std::env::var_os("PV_BRIDGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pantavisor-states")
        });
    let path = dir.join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e}. These tests read Pantavisor's real states from \
             tests/fixtures/pantavisor-states, or from PV_BRIDGE_FIXTURES when it is set \
             (a folder holding initial_state.json and state_bsp_update.json)",
            path.display()
        )
    })
}

#[test]
fn the_real_initial_state_parses_and_classifies() {
    let s = State::parse(&fixture("initial_state.json")).expect("real state accepted");
    assert_eq!(s.spec(), Spec::ServiceSystem1);
    let kind = |k: &str| s.kind(k).cloned().unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(kind("bsp/run.json"), EntryKind::Special);
    assert_eq!(kind("device.json"), EntryKind::Special);
    assert_eq!(kind("awconnect/run.json"), EntryKind::ContainerManifest);
    assert_eq!(kind("awconnect/src.json"), EntryKind::BuildMetadata);
    assert_eq!(kind("bsp/build.json"), EntryKind::BuildMetadata);
    assert_eq!(kind("_sigs/pvr-sdk.json"), EntryKind::BuildMetadata);
    assert_eq!(kind("network-mapping.json"), EntryKind::InlineJson);
    assert_eq!(
        kind("pvr-sdk/_dm/root.squashfs.json"),
        EntryKind::InlineJson
    );
    assert_eq!(
        kind("_config/awconnect/etc/wifi-connect/conf.d/WifiHotspot.json"),
        EntryKind::InlineJson
    );
    assert!(matches!(kind("bsp/trail.config"), EntryKind::Object { .. }));
    assert!(matches!(
        kind("_config/pv-avahi/etc/hostname"),
        EntryKind::Object { .. }
    ));
    // Every value that is a string and not in an ignored or inline key is an object.
    let doc = s.as_json();
    let objects: Vec<_> = s.objects().collect();
    assert_eq!(objects.len(), 21);
    for (path, sha) in &objects {
        assert_eq!(doc[*path], Value::String(sha.to_string()));
    }
    let plats = s.platforms();
    assert_eq!(
        plats.keys().collect::<Vec<_>>(),
        ["awconnect", "pv-avahi", "pvr-sdk"]
    );
    assert_eq!(plats["awconnect"].group, "root");
    assert!(
        plats
            .values()
            .all(|p| p.restart_policy == RestartPolicy::System)
    );
}

#[test]
fn the_real_bsp_update_is_a_reboot() {
    let initial = State::parse(&fixture("initial_state.json")).unwrap();
    let bsp = State::parse(&fixture("state_bsp_update.json")).unwrap();
    assert!(bsp.platforms().is_empty());
    let t = transition(&initial, &bsp);
    assert!(t.is_reboot(), "{t:?}");
    // Editing a container's config overlay in a system container also reboots.
    let mut edited = initial.as_json().clone();
    edited.insert(
        "_config/pv-avahi/etc/hostname".into(),
        Value::String("e".repeat(64)),
    );
    let edited = State::from_value(Value::Object(edited)).unwrap();
    assert!(transition(&initial, &edited).is_reboot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pv_sim_accepts_real_states() {
    let d = common::start(Generation::Gen2).await;
    for (name, file) in [
        ("initial", "initial_state.json"),
        ("bsp", "state_bsp_update.json"),
    ] {
        let rev: Revision = format!("locals/{name}").parse().unwrap();
        d.pv.put_step(&rev, &fixture(file))
            .await
            .expect("pv-sim takes a real state");
        let back = d.pv.step(&rev.to_string()).await.unwrap();
        assert_eq!(back, fixture(file), "stored verbatim");
    }
    // Running one whose blobs are absent ends as Pantavisor would: the boot finds
    // the objects missing and rolls back.
    d.pv.command(pv_bridge::pvctrl::Command::LocalRun(
        "locals/bsp".parse().unwrap(),
    ))
    .await
    .unwrap();
    let seen = common::follow(&d.pv, "locals/bsp", true, Duration::from_secs(30)).await;
    assert_eq!(
        seen.last().unwrap().1,
        "Object validation went wrong",
        "{seen:?}"
    );
}
