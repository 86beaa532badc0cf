//! The typed pv-ctrl client against pv-sim: every endpoint and every error text of
//! the reference, for both server generations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{sha256_hex, start};
use pv_bridge::pvctrl::{
    Command, CommandOutcome, ContainerAction, DaemonAction, Error, Generation as ClientGen, Meta,
    PvCtrl,
};
use pv_bridge::state::Revision;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

fn status_of(e: &Error) -> (u16, String) {
    (
        e.status().unwrap_or(0),
        e.message().unwrap_or_default().to_owned(),
    )
}

async fn expect_status<T: std::fmt::Debug>(r: Result<T, Error>, code: u16, text: &str) {
    let e = r.expect_err("expected an error status");
    assert_eq!(status_of(&e), (code, text.to_owned()), "{e}");
}

both_generations!(containers_and_groups, |g| async move {
    let d = start(g).await;
    let cs = d.pv.containers().await.unwrap();
    let names: Vec<_> = cs.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "pv-bridge"]);
    let bridge = &cs[1];
    assert_eq!(bridge.roles, ["mgmt"]);
    assert_eq!(bridge.status_goal, "READY");
    assert_eq!(bridge.restart_policy, "container");
    assert_eq!(bridge.status, "STARTED", "not READY before the signal");
    // 027+ fields only from gen-2.
    assert_eq!(cs[0].auto_recovery.is_some(), g == Generation::Gen2);
    assert_eq!(cs[0].user_stopped.is_some(), g == Generation::Gen2);
    let groups = d.pv.groups().await.unwrap();
    for want in ["data", "root", "platform", "app"] {
        assert!(
            groups.iter().any(|gr| gr.name == want),
            "group {want} in {groups:?}"
        );
    }
});

both_generations!(signal_ready_and_refusals, |g| async move {
    let d = start(g).await;
    d.pv.signal_ready().await.unwrap();
    let cs = d.pv.containers().await.unwrap();
    assert_eq!(
        cs.iter().find(|c| c.name == "pv-bridge").unwrap().status,
        "READY"
    );
    expect_status(
        d.pv.signal("alive", "").await,
        500,
        "Signal not expected from this platform",
    )
    .await;
    // The non-mgmt `app` (goal STARTED) may use /signal but is not expected to.
    let app = PvCtrl::with_options(d.dir.path().join("pv-ctrl-app"), common::test_options());
    expect_status(
        app.signal_ready().await,
        500,
        "Signal not expected from this platform",
    )
    .await;
});

both_generations!(
    non_mgmt_callers_get_403_everywhere_but_signal,
    |g| async move {
        let d = start(g).await;
        let app = PvCtrl::with_options(d.dir.path().join("pv-ctrl-app"), common::test_options());
        let exact = if g == Generation::Gen2 {
            "Request not sent from a mgmt platform"
        } else {
            "Request not sent from mgmt platform"
        };
        let wildcard = "Request not sent from mgmt platform";
        expect_status(app.containers().await, 403, exact).await;
        expect_status(app.steps().await, 403, exact).await;
        expect_status(app.meta(Meta::User).await, 403, exact).await;
        expect_status(app.command(Command::RunGc).await, 403, exact).await;
        expect_status(app.progress("current").await, 403, wildcard).await;
        expect_status(app.put_meta(Meta::User, "k", b"v").await, 403, wildcard).await;
        expect_status(
            app.get_object(&"a".repeat(64), &mut Vec::new()).await,
            403,
            wildcard,
        )
        .await;
    }
);

both_generations!(objects_crud, |g| async move {
    let d = start(g).await;
    let before = d.pv.objects().await.unwrap();
    assert!(before.len() >= 8, "factory objects listed: {before:?}");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = sha256_hex(&data);
    d.pv.put_object(&sha, &data[..], data.len() as u64)
        .await
        .unwrap();
    let listed = d.pv.objects().await.unwrap();
    let o = listed
        .iter()
        .find(|o| o.sha256 == sha)
        .expect("uploaded object listed");
    assert_eq!(o.size, data.len() as u64);
    let mut back = Vec::new();
    let n = d.pv.get_object(&sha, &mut back).await.unwrap();
    assert_eq!((n as usize, back == data), (data.len(), true));
    // Uploading it again is idempotent.
    d.pv.put_object(&sha, &data[..], data.len() as u64)
        .await
        .unwrap();
    // Wrong bytes for a name: 422, and nothing is left behind.
    let other = sha256_hex(b"something else");
    expect_status(
        d.pv.put_object(&other, &b"not it"[..], 6).await,
        422,
        "Object has bad checksum",
    )
    .await;
    assert!(
        !d.pv
            .objects()
            .await
            .unwrap()
            .iter()
            .any(|o| o.sha256 == other)
    );
    // A missing object: 400 on gen-2, 404 on gen-1.
    let missing = d.pv.get_object(&"b".repeat(64), &mut Vec::new()).await;
    match g {
        Generation::Gen2 => expect_status(missing, 400, "Request has bad object name").await,
        Generation::Gen1 => expect_status(missing, 404, "Resource does not exist").await,
    }
});

both_generations!(object_uploads_respect_free_space, |g| async move {
    let d = common::start_with(g, |c| c.capacity = 4 * 1024 * 1024).await;
    let big = vec![7u8; 3 * 1024 * 1024];
    let sha = sha256_hex(&big);
    let put = d.pv.put_object(&sha, &big[..], big.len() as u64).await;
    let listed =
        d.pv.objects()
            .await
            .unwrap()
            .into_iter()
            .find(|o| o.sha256 == sha)
            .map(|o| o.size);
    match g {
        // gen-1 checks Content-Length up front and writes nothing.
        Generation::Gen1 => {
            expect_status(put, 507, "Not enough disk space available").await;
            assert_eq!(listed, None);
        }
        // gen-2 checks each chunk, answers 200 anyway and keeps what it wrote
        // (ctrl_upload.c): only the listed size tells.
        Generation::Gen2 => {
            put.expect("gen-2 answers 200 to an upload the full disk cut short");
            let size = listed.expect("the partial file is listed");
            assert!(size < big.len() as u64, "{size}");
        }
    }
});

both_generations!(steps_read_write, |g| async move {
    let d = start(g).await;
    let steps = d.pv.steps().await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].name, "0");
    let p = steps[0].progress.as_ref().unwrap();
    assert_eq!(
        (p.status.as_str(), p.status_msg.as_str()),
        ("DONE", "Factory revision")
    );
    let factory = d.pv.step("0").await.unwrap();
    assert_eq!(d.pv.step("current").await.unwrap(), factory);
    let rev: Revision = "locals/copy".parse().unwrap();
    d.pv.put_step(&rev, &factory).await.unwrap();
    assert_eq!(d.pv.step("locals/copy").await.unwrap(), factory);
    let steps = d.pv.steps().await.unwrap();
    assert_eq!(steps[0].name, "locals/copy", "locals are listed first");
    match g {
        Generation::Gen2 => {
            let p = d.pv.progress("locals/copy").await.unwrap();
            assert_eq!(
                (p.status.as_str(), p.status_msg.as_str()),
                ("NEW", "Update ready to be run")
            );
        }
        Generation::Gen1 => {
            expect_status(
                d.pv.progress("locals/copy").await,
                404,
                "Resource does not exist",
            )
            .await
        }
    }
    d.pv.put_commitmsg("locals/copy", "copy of the factory")
        .await
        .unwrap();
    let steps = d.pv.steps().await.unwrap();
    assert_eq!(steps[0].commitmsg, "copy of the factory");
    // A state Pantavisor's parser refuses: 422 and the trail is gone.
    let bad: Revision = "locals/bad".parse().unwrap();
    let text = if g == Generation::Gen2 {
        "Parser: State JSON has bad format"
    } else {
        "State verification has failed"
    };
    expect_status(
        d.pv.put_step(&bad, br##"{"#spec":"nope@1"}"##).await,
        422,
        text,
    )
    .await;
    expect_status(
        d.pv.step("locals/bad").await,
        404,
        "Resource does not exist",
    )
    .await;
    expect_status(
        d.pv.step("locals/never").await,
        404,
        "Resource does not exist",
    )
    .await;
    expect_status(d.pv.progress("7").await, 404, "Resource does not exist").await;
});

both_generations!(metadata_crud, |g| async move {
    let d = start(g).await;
    d.pv.put_meta(Meta::User, "plain", b"value").await.unwrap();
    d.pv.put_meta(Meta::User, "app.color", br#"{"r":1}"#)
        .await
        .unwrap();
    d.pv.put_meta(Meta::User, "list", b"[1,2]").await.unwrap();
    let um = d.pv.meta(Meta::User).await.unwrap();
    assert_eq!(um["plain"], json!("value"));
    assert_eq!(um["app.color"], json!({"r": 1}), "objects are embedded raw");
    assert_eq!(um["list"], json!([1, 2]));
    // `<container>.<key>` also lands in the container's own directory.
    let split = d.storage().join("run/user-meta.app/color");
    assert_eq!(std::fs::read(split).unwrap(), br#"{"r":1}"#);
    d.pv.delete_meta(Meta::User, "plain").await.unwrap();
    assert!(!d.pv.meta(Meta::User).await.unwrap().contains_key("plain"));
    // gen-1 answers 404 and then 200 on the same connection; the first counts.
    expect_status(
        d.pv.delete_meta(Meta::User, "plain").await,
        404,
        "User meta does not exist",
    )
    .await;
    expect_status(
        d.pv.delete_meta(Meta::Device, "nope").await,
        404,
        "Device meta does not exist",
    )
    .await;
    let dm = d.pv.meta(Meta::Device).await.unwrap();
    assert_eq!(dm["pantavisor.revision"], json!("0"));
    assert_eq!(dm["pantavisor.mode"], json!("local"));
    for k in ["pantavisor.version", "pantavisor.status", "pantavisor.arch"] {
        assert!(dm[k].is_string(), "{k}: {dm:?}");
    }
    let storage = &dm["storage"];
    for k in ["total", "free", "reserved", "real_free"] {
        assert!(storage[k].is_u64(), "storage.{k}: {storage}");
    }
    d.pv.put_meta(Meta::Device, "pv-bridge.version", b"0.1.0")
        .await
        .unwrap();
    assert_eq!(
        d.pv.meta(Meta::Device).await.unwrap()["pv-bridge.version"],
        json!("0.1.0")
    );
    // Client-side guards: empty or oversize values, keys with '/'.
    assert!(matches!(
        d.pv.put_meta(Meta::User, "k", b"").await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        d.pv.put_meta(Meta::User, "k", &[b'x'; 4096]).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        d.pv.put_meta(Meta::User, "a/b", b"v").await,
        Err(Error::InvalidArgument(_))
    ));
});

both_generations!(buildinfo_config_and_drivers, |g| async move {
    let d = start(g).await;
    assert!(d.pv.buildinfo().await.unwrap().contains("pv-sim"));
    let cfg = d.pv.config().await.unwrap();
    assert_eq!(cfg["control.remote"], json!(false));
    let cfg2 = d.pv.config2().await.unwrap();
    let remote = cfg2.iter().find(|e| e.key == "PV_CONTROL_REMOTE").unwrap();
    assert_eq!(
        (remote.value.as_deref(), remote.modified.as_str()),
        (Some("0"), "env")
    );
    let prn = cfg2.iter().find(|e| e.key == "PH_CREDS_PRN").unwrap();
    assert_eq!(prn.value, None, "\"(null)\" means unset");
    assert_eq!(
        d.pv.drivers().await.unwrap(),
        vec![],
        "the bridge has no drivers: {{}}"
    );
    d.pv.driver_action(None, true).await.unwrap();
    expect_status(
        d.pv.driver_action(Some("wifi"), true).await,
        400,
        "Error loading driver(s)",
    )
    .await;
});

both_generations!(commands_acceptance_rules, |g| async move {
    let d = start(g).await;
    expect_status(
        d.pv.command(Command::UpdateMetadata(serde_json::Map::new()))
            .await,
        409,
        "Cannot do this operation while on local mode",
    )
    .await;
    expect_status(
        d.pv.command(Command::GoRemote).await,
        409,
        "Cannot do this operation when remote mode is disabled by config",
    )
    .await;
    expect_status(
        d.pv.command(Command::DeferReboot(60)).await,
        409,
        "Cannot do this operation when debug shell is not active",
    )
    .await;
    expect_status(
        d.pv.command(Command::Raw {
            op: "BOGUS".into(),
            payload: String::new(),
        })
        .await,
        400,
        "Command has bad format",
    )
    .await;
    match g {
        Generation::Gen2 => assert_eq!(
            d.pv.command(Command::Unclaim).await.unwrap(),
            CommandOutcome::AlreadyInEffect
        ),
        // UNCLAIM only exists from 029.
        Generation::Gen1 => {
            expect_status(
                d.pv.command(Command::Unclaim).await,
                400,
                "Command has bad format",
            )
            .await
        }
    }
    // Ops match by prefix: "ENABLE" is ENABLE_SSH.
    assert_eq!(
        d.pv.command(Command::Raw {
            op: "ENABLE".into(),
            payload: String::new()
        })
        .await
        .unwrap(),
        CommandOutcome::Queued
    );
});

both_generations!(newer_endpoints_by_generation, |g| async move {
    let d = start(g).await;
    let unknown = |path: &str| match g {
        Generation::Gen1 => (400u16, "Unknown endpoint".to_owned()),
        Generation::Gen2 => (400u16, format!("unknown endpoint: {path}")),
    };
    if g == Generation::Gen2 {
        let daemons = d.pv.daemons().await.unwrap();
        assert!(daemons.iter().any(|x| x.name == "hwrngd"));
        d.pv.daemon_action("pv-xconnect", DaemonAction::Stop)
            .await
            .unwrap();
        let stopped = d.pv.daemons().await.unwrap();
        assert_eq!(
            stopped
                .iter()
                .find(|x| x.name == "pv-xconnect")
                .unwrap()
                .pid,
            0
        );
        expect_status(
            d.pv.daemon_action("nope", DaemonAction::Start).await,
            404,
            "Daemon not found",
        )
        .await;
        expect_status(
            d.pv.xconnect_graph().await,
            404,
            "xconnect not enabled at build time",
        )
        .await;
        assert!(d.pv.wakelocks().await.unwrap().is_object());
        d.pv.storage_gc().await.unwrap();
        d.pv.container_action("app", ContainerAction::Stop)
            .await
            .unwrap();
        let app =
            d.pv.containers()
                .await
                .unwrap()
                .into_iter()
                .find(|c| c.name == "app")
                .unwrap();
        assert_eq!(
            (app.status.as_str(), app.user_stopped),
            ("STOPPED", Some(true))
        );
        expect_status(
            d.pv.container_action("app", ContainerAction::Restart).await,
            400,
            "Container state does not allow restart",
        )
        .await;
        d.pv.container_action("app", ContainerAction::Start)
            .await
            .unwrap();
        expect_status(
            d.pv.container_action("app", ContainerAction::Start).await,
            400,
            "Container must be in STOPPED, STOPPING, or RECOVERING state to start",
        )
        .await;
        expect_status(
            d.pv.container_action("nope", ContainerAction::Stop).await,
            404,
            "Container not found",
        )
        .await;
    } else {
        let e = d.pv.daemons().await.unwrap_err();
        assert_eq!(status_of(&e), unknown("/daemons"));
        let e = d.pv.storage_gc().await.unwrap_err();
        assert_eq!(status_of(&e), unknown("/storage/gc"));
        let e =
            d.pv.container_action("app", ContainerAction::Stop)
                .await
                .unwrap_err();
        assert_eq!(status_of(&e), unknown("/containers/app"));
    }
});

both_generations!(probe_detects_generation, |g| async move {
    let d = start(g).await;
    let info = d.pv.probe().await.unwrap();
    let want = if g == Generation::Gen2 {
        ClientGen::Gen2
    } else {
        ClientGen::Gen1
    };
    assert_eq!(info.generation, want);
    assert!(info.version.unwrap().contains("sim"));
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_container_cannot_be_controlled() {
    let d = start(Generation::Gen2).await;
    // Stage and run a state where `app` has restart_policy system (non-reboot move
    // is impossible, so check on a fresh device by reading the factory instead).
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/run.json"]["restart_policy"] = json!("system");
    let rev: Revision = "locals/sys".parse().unwrap();
    d.pv.put_step(&rev, state.to_string().as_bytes())
        .await
        .unwrap();
    d.pv.command(Command::LocalRun(rev)).await.unwrap();
    let seen = common::follow(&d.pv, "locals/sys", true, Duration::from_secs(20)).await;
    assert_eq!(seen.last().unwrap().0, "DONE", "{seen:?}");
    common::eventually(Duration::from_secs(10), "socket back", || async {
        d.pv.containers().await.ok()
    })
    .await;
    expect_status(
        d.pv.container_action("app", ContainerAction::Stop).await,
        403,
        "Container has restart_policy 'system' and cannot be controlled via API",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_what_pantavisor_would_misread() {
    let d = start(Generation::Gen2).await;
    for e in [
        d.pv.put_commitmsg("current", "").await.unwrap_err(),
        d.pv.put_commitmsg("current", &"x".repeat(257))
            .await
            .unwrap_err(),
        d.pv.get_object("ABC", &mut Vec::new()).await.unwrap_err(),
        d.pv.progress("locals/a/b").await.unwrap_err(),
        d.pv.command(Command::Reboot("a \"quoted\" reason".into()))
            .await
            .unwrap_err(),
        d.pv.put_step(&Revision::Remote(3), b"{}")
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let pv = PvCtrl::with_options(dir.path().join("nothing"), common::test_options());
    let e = pv.containers().await.unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert!(
        e.to_string().starts_with("cannot connect to pv-ctrl at "),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_caller_gets_500_everywhere() {
    // A process whose container is not in the running revision.
    let d = common::start_with(Generation::Gen2, |c| c.mgmt_caller = "ghost".into()).await;
    expect_status(
        d.pv.containers().await,
        500,
        "Internal error, unknown caller",
    )
    .await;
    expect_status(
        d.pv.signal_ready().await,
        500,
        "Internal error, unknown caller",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_upload_source_fails_fast_and_a_retry_repairs_the_partial_object() {
    let d = start(Generation::Gen2).await;
    let data = vec![42u8; 200_000];
    let sha = sha256_hex(&data);
    let started = std::time::Instant::now();
    let e =
        d.pv.put_object(&sha, &data[..1000], data.len() as u64)
            .await
            .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(
        e.to_string().contains("ended after 1000 of 200000 bytes"),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no wait for an answer"
    );
    // Pantavisor (gen-2) keeps the partial file under the final name: it is listed
    // with the wrong size until a complete upload replaces it.
    let partial = common::eventually(Duration::from_secs(5), "partial object listed", || async {
        d.pv.objects()
            .await
            .ok()?
            .into_iter()
            .find(|o| o.sha256 == sha)
    })
    .await;
    assert!(partial.size < data.len() as u64, "{partial:?}");
    d.pv.put_object(&sha, &data[..], data.len() as u64)
        .await
        .unwrap();
    let fixed =
        d.pv.objects()
            .await
            .unwrap()
            .into_iter()
            .find(|o| o.sha256 == sha)
            .unwrap();
    assert_eq!(fixed.size, data.len() as u64);
}
