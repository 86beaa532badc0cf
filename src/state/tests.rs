use serde_json::{Value, json};

use super::*;

fn sha(n: u8) -> String {
    format!("{:02x}", n).repeat(32)
}

/// A state shaped like a real device's: a BSP, a system container with a dm-verity
/// rootfs, a mgmt bridge container in `app`, and an app container.
fn device_state() -> Value {
    json!({
        "#spec": "pantavisor-service-system@1",
        "bsp/run.json": {"addons": [], "firmware": "firmware.squashfs", "initrd": "pantavisor",
                          "initrd_config": "trail.config", "linux": "kernel.img", "modules": "modules.squashfs"},
        "bsp/kernel.img": sha(1),
        "bsp/pantavisor": sha(2),
        "bsp/modules.squashfs": sha(3),
        "bsp/firmware.squashfs": sha(4),
        "bsp/trail.config": sha(5),
        "bsp/src.json": {"#spec": "bsp-manifest-src@1", "pvr": "https://example.invalid/bsp"},
        "bsp/build.json": {"commit": "abc"},
        "device.json": {"groups": [
            {"name": "data", "status_goal": "MOUNTED", "restart_policy": "system"},
            {"name": "root", "status_goal": "STARTED", "restart_policy": "system"},
            {"name": "platform", "status_goal": "STARTED", "restart_policy": "system"},
            {"name": "app", "status_goal": "STARTED", "restart_policy": "container"}
        ]},
        "network-mapping.json": {},
        "_sigs/bsp.json": {"#spec": "pvs@2", "protected": "eyJ...", "signature": "xyz"},
        "os/run.json": {"#spec": "service-manifest-run@1", "name": "os", "type": "lxc",
                         "config": "lxc.container.conf", "root-volume": "dm:root.squashfs",
                         "group": "root", "volumes": [], "storage": {"lxc-overlay": {"persistence": "boot"}}},
        "os/lxc.container.conf": sha(6),
        "os/root.squashfs": sha(7),
        "os/_dm/root.squashfs.json": {"data_device": "root.squashfs", "hash_device": "root.squashfs.hash",
                                       "root_hash": "2b95"},
        "os/root.squashfs.hash": sha(8),
        "_config/os/etc/hostname": sha(9),
        "pv-bridge/run.json": {"#spec": "service-manifest-run@1", "name": "pv-bridge", "type": "lxc",
                                "config": "lxc.container.conf", "root-volume": "root.squashfs",
                                "group": "app", "roles": ["mgmt"], "status_goal": "READY",
                                "restart_policy": "container", "volumes": [],
                                "storage": {"pv-bridge-state": {"persistence": "permanent"}}},
        "pv-bridge/lxc.container.conf": sha(10),
        "pv-bridge/root.squashfs": sha(11),
        "_config/pv-bridge/etc/pv-bridge/config.toml": sha(12),
        "app/run.json": {"#spec": "service-manifest-run@1", "name": "app", "type": "lxc",
                          "config": "lxc.container.conf", "root-volume": "root.squashfs",
                          "group": "app", "roles": [], "volumes": []},
        "app/lxc.container.conf": sha(13),
        "app/root.squashfs": sha(14),
        "_config/app/etc/app/settings.json": {"level": 3}
    })
}

fn parse(v: &Value) -> State {
    State::from_value(v.clone()).unwrap()
}

fn problems_of(v: Value) -> Vec<String> {
    match State::from_value(v).unwrap_err() {
        StateError::Invalid { problems, .. } => problems.iter().map(ToString::to_string).collect(),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn classifies_every_key_like_pantavisor() {
    let s = parse(&device_state());
    assert_eq!(s.spec(), Spec::ServiceSystem1);
    let kind = |k: &str| s.kind(k).cloned().unwrap();
    assert_eq!(kind("bsp/run.json"), EntryKind::Special);
    assert_eq!(kind("device.json"), EntryKind::Special);
    assert_eq!(kind("bsp/src.json"), EntryKind::BuildMetadata);
    assert_eq!(kind("bsp/build.json"), EntryKind::BuildMetadata);
    assert_eq!(kind("_sigs/bsp.json"), EntryKind::BuildMetadata);
    assert_eq!(kind("os/run.json"), EntryKind::ContainerManifest);
    assert_eq!(kind("network-mapping.json"), EntryKind::InlineJson);
    assert_eq!(kind("os/_dm/root.squashfs.json"), EntryKind::InlineJson);
    assert_eq!(
        kind("_config/app/etc/app/settings.json"),
        EntryKind::InlineJson
    );
    assert_eq!(kind("bsp/kernel.img"), EntryKind::Object { sha256: sha(1) });
    assert_eq!(
        kind("_config/os/etc/hostname"),
        EntryKind::Object { sha256: sha(9) }
    );
    assert!(s.kind("#spec").is_none());
}

#[test]
fn a_json_key_holding_a_sha_is_an_object_reference() {
    let mut v = device_state();
    v["app/extra.json"] = json!(sha(20));
    let s = parse(&v);
    assert_eq!(
        s.kind("app/extra.json"),
        Some(&EntryKind::Object { sha256: sha(20) })
    );
}

#[test]
fn lists_object_references_with_their_paths() {
    let s = parse(&device_state());
    let objs: Vec<_> = s.objects().collect();
    assert_eq!(objs.len(), 14);
    assert!(objs.contains(&("bsp/kernel.img", sha(1).as_str())));
    assert!(objs.contains(&(
        "_config/pv-bridge/etc/pv-bridge/config.toml",
        sha(12).as_str()
    )));
    let mut v = device_state();
    v["app/copy-of-kernel"] = json!(sha(1));
    assert_eq!(
        parse(&v).object_ids().len(),
        14,
        "duplicates are listed once"
    );
}

#[test]
fn resolves_platform_groups_policies_and_roles() {
    let s = parse(&device_state());
    let p = s.platforms();
    assert_eq!(p.len(), 3);
    assert_eq!(p["os"].restart_policy, RestartPolicy::System);
    assert_eq!(p["os"].status_goal, "STARTED");
    assert!(p["os"].mgmt, "no roles key means mgmt");
    assert_eq!(p["pv-bridge"].status_goal, "READY");
    assert!(p["pv-bridge"].mgmt);
    assert!(!p["app"].mgmt);
    assert_eq!(p["app"].restart_policy, RestartPolicy::Container);
}

#[test]
fn a_container_without_group_joins_the_last_group() {
    let mut v = device_state();
    v["app/run.json"].as_object_mut().unwrap().remove("group");
    v.as_object_mut().unwrap().remove("device.json");
    let p = parse(&v).platforms();
    // Default groups end with `app` (restart policy container).
    assert_eq!(p["app"].group, "app");
    assert_eq!(p["app"].restart_policy, RestartPolicy::Container);
}

#[test]
fn rejects_missing_and_unknown_spec() {
    assert_eq!(
        State::from_value(json!({"a/b": sha(1)})).unwrap_err(),
        StateError::MissingSpec
    );
    let err = State::from_value(json!({"#spec": "pantavisor-service-system@2"})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "state JSON \"#spec\" is \"pantavisor-service-system@2\"; expected \"pantavisor-service-system@1\""
    );
    assert_eq!(
        State::from_value(json!([1])).unwrap_err(),
        StateError::NotAnObject("an array")
    );
}

#[test]
fn multi_platform_states_are_read_but_never_staged() {
    let doc = json!({"#spec": "pantavisor-multi-platform@1", "kernel.img": sha(1)});
    let bytes = serde_json::to_vec(&doc).unwrap();
    assert_eq!(State::parse(&bytes).unwrap().spec(), Spec::MultiPlatform1);
    assert_eq!(
        State::parse_for_staging(&bytes, DEFAULT_MAX_STATE_BYTES).unwrap_err(),
        StateError::ReadOnlySpec
    );
}

#[test]
fn rejects_path_escapes_with_the_offending_key() {
    for (key, why) in [
        (
            "../etc/passwd",
            "\"..\" segment escapes or aliases a directory",
        ),
        (
            "app/../../x",
            "\"..\" segment escapes or aliases a directory",
        ),
        ("./x", "\".\" segment escapes or aliases a directory"),
        (
            "/abs/path",
            "absolute path; keys are relative to the revision root",
        ),
        ("app//root.squashfs", "empty path segment"),
        ("app/", "empty path segment"),
        ("", "empty path"),
        ("app/x\ny", "control character '\\n' in path"),
        ("app\\x", "backslash in path"),
    ] {
        let mut v = device_state();
        v[key] = json!(sha(30));
        let problems = problems_of(v);
        assert_eq!(problems, vec![format!("key {key:?}: {why}")], "{key:?}");
    }
}

#[test]
fn rejects_bad_object_references_precisely() {
    let mut v = device_state();
    v["app/root.squashfs"] = json!(sha(14).to_uppercase());
    v["app/lxc.container.conf"] = json!("abc");
    v["bsp/kernel.img"] = json!(42);
    let problems = problems_of(v);
    assert_eq!(
        problems,
        vec![
            "key \"app/lxc.container.conf\": object reference \"abc\" is not a sha256 (64 lower-case hex digits)".to_string(),
            "key \"app/root.squashfs\": object reference must be lower-case hex".to_string(),
            "key \"bsp/kernel.img\": expected an object reference (sha256 string), got a number".to_string(),
        ]
    );
}

#[test]
fn rejects_malformed_container_manifests() {
    let mut v = device_state();
    v["app/run.json"] = json!("not an object");
    v["os/run.json"]["status_goal"] = json!("RUNNING");
    v["pv-bridge/run.json"]
        .as_object_mut()
        .unwrap()
        .remove("name");
    let problems = problems_of(v);
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].contains("app/run.json") && problems[0].contains("got a string"));
    assert!(problems[1].contains("\"status_goal\" must be MOUNTED, STARTED or READY"));
    assert!(problems[2].contains("pv-bridge/run.json") && problems[2].contains("missing \"name\""));
}

#[test]
fn problem_lists_are_bounded() {
    let mut v = device_state();
    for i in 0..30 {
        v[format!("junk/{i}")] = json!(i);
    }
    match State::from_value(v).unwrap_err() {
        StateError::Invalid { problems, omitted } => {
            assert_eq!(problems.len(), 20);
            assert_eq!(omitted, 10);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rejects_oversize_and_unparsable_documents() {
    let big = vec![b' '; 100];
    assert_eq!(
        State::parse_with_limit(&big, 99).unwrap_err(),
        StateError::TooLarge { size: 100, max: 99 }
    );
    let err = State::parse(b"{\"#spec\": ").unwrap_err();
    assert!(
        matches!(err, StateError::Syntax(ref m) if m.contains("line 1")),
        "{err}"
    );
}

// --- transitions -----------------------------------------------------------

fn transition_after(edit: impl FnOnce(&mut Value)) -> Transition {
    let cur = device_state();
    let mut new = cur.clone();
    edit(&mut new);
    transition(&parse(&cur), &parse(&new))
}

fn restarted(names: &[&str]) -> Transition {
    Transition::NonReboot {
        restarted: names.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn identical_states_need_nothing() {
    assert_eq!(transition_after(|_| {}), restarted(&[]));
}

#[test]
fn a_changed_app_container_restarts_only_that_container() {
    assert_eq!(
        transition_after(|v| v["app/root.squashfs"] = json!(sha(40))),
        restarted(&["app"])
    );
    assert_eq!(
        transition_after(|v| v["_config/app/etc/app/settings.json"] = json!({"level": 4})),
        restarted(&["app"])
    );
    assert_eq!(
        transition_after(|v| v["_config/pv-bridge/etc/pv-bridge/config.toml"] = json!(sha(41))),
        restarted(&["pv-bridge"])
    );
}

#[test]
fn bsp_root_level_and_system_containers_force_a_reboot() {
    let t = transition_after(|v| v["bsp/kernel.img"] = json!(sha(50)));
    assert_eq!(
        t,
        Transition::Reboot {
            reason: "bsp/kernel.img changed and belongs to no container".into()
        }
    );
    assert!(transition_after(|v| v["network-mapping.json"] = json!({"x": 1})).is_reboot());
    assert!(transition_after(|v| v["os/root.squashfs"] = json!(sha(51))).is_reboot());
    assert!(transition_after(|v| v["_config/os/etc/hostname"] = json!(sha(52))).is_reboot());
    assert!(transition_after(|v| v["new-root-file"] = json!(sha(53))).is_reboot());
}

#[test]
fn adding_or_removing_an_app_container_does_not_reboot() {
    let t = transition_after(|v| {
        v["web/run.json"] = json!({"#spec": "service-manifest-run@1", "name": "web", "type": "lxc",
                                    "config": "lxc.container.conf", "group": "app"});
        v["web/root.squashfs"] = json!(sha(60));
    });
    assert_eq!(t, restarted(&["web"]));
    let t = transition_after(|v| {
        let m = v.as_object_mut().unwrap();
        m.remove("app/run.json");
        m.remove("app/lxc.container.conf");
        m.remove("app/root.squashfs");
        m.remove("_config/app/etc/app/settings.json");
    });
    assert_eq!(t, restarted(&["app"]));
}

#[test]
fn moving_a_container_to_a_system_group_reboots() {
    let t = transition_after(|v| v["app/run.json"]["group"] = json!("platform"));
    // The manifest changed; the running owner is `container` but the pending owner
    // is `system`.
    assert!(t.is_reboot(), "{t:?}");
}

#[test]
fn specially_parsed_files_and_build_metadata_are_not_compared() {
    // Pantavisor quirk: these alone never cause a reboot.
    assert_eq!(
        transition_after(|v| v["device.json"]["volumes"] = json!({})),
        restarted(&[])
    );
    assert_eq!(
        transition_after(|v| v["bsp/run.json"]["addons"] = json!(["x"])),
        restarted(&[])
    );
    assert_eq!(
        transition_after(|v| v["_sigs/bsp.json"]["signature"] = json!("other")),
        restarted(&[])
    );
    assert_eq!(
        transition_after(|v| v["bsp/src.json"]["pvr"] = json!("other")),
        restarted(&[])
    );
}

#[test]
fn diff_lists_added_removed_and_changed_keys() {
    let cur = device_state();
    let mut new = cur.clone();
    new["app/root.squashfs"] = json!(sha(70));
    new["web/root.squashfs"] = json!(sha(71));
    new.as_object_mut()
        .unwrap()
        .remove("_config/app/etc/app/settings.json");
    new["device.json"]["volumes"] = json!({});
    let (a, b) = (parse(&cur), parse(&new));
    let d = a.diff(&b);
    assert_eq!(d.added, ["web/root.squashfs"]);
    assert_eq!(d.removed, ["_config/app/etc/app/settings.json"]);
    assert_eq!(d.changed, ["app/root.squashfs", "device.json"]);
    assert!(a.diff(&a).is_empty());
    let fresh: Vec<&str> = a.new_objects(&b).into_iter().collect();
    assert_eq!(fresh, [sha(70).as_str(), sha(71).as_str()]);
}
