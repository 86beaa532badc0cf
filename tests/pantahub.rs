//! The Pantacor Hub adapter end to end: the real pv-bridge binary, pv-sim, and the
//! test kit's fake Pantacor Hub (protocol of pantacor-hub-api.md, quirks included).
//! The user side (claim, steps, cancel, user-meta) goes through the hub's own API
//! as `pvr` would call it.

#![cfg(feature = "pantahub")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/pantahub.rs"]
mod hubkit;
#[path = "common/mosquitto.rs"]
mod mosquitto;
#[path = "common/tinyproxy.rs"]
mod tinyproxy;

use hubkit::{Bridge, claimed, final_on_hub, hub_status, next_state, wait};

use std::path::Path;
use std::time::{Duration, Instant};

use pv_testkit::hub::{Action, FakeHub, Fault, HubConfig};
use pv_testkit::sim::Generation;
use serde_json::{Value, json};
use tinyproxy::Tinyproxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_claim_sync_update_and_rollback_as_the_hub_sees_them() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 5.0).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let b = Bridge::start(&d, d.dir.path(), &hub, "", "");

    // Registration: credentials kept with mode 0600, the challenge shown in a
    // log line and a file, never in device-meta.
    let id = wait(&b, "registration", Duration::from_secs(20), || {
        hub.device_ids().first().cloned()
    })
    .await;
    let record = hub.device(&id).unwrap();
    let challenge = record["challenge"].as_str().unwrap().to_owned();
    let secret = record["secret"].as_str().unwrap().to_owned();
    let creds = b.state.join("adapters/hub/pantahub.creds");
    let text = wait(&b, "the credentials file", Duration::from_secs(10), || {
        std::fs::read_to_string(&creds).ok()
    })
    .await;
    assert!(text.contains(&format!("PH_CREDS_ID={id}")), "{text}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let file = b.state.join("adapters/hub/challenge");
    wait(&b, "the challenge file", Duration::from_secs(10), || {
        (std::fs::read_to_string(&file).ok()? == challenge).then_some(())
    })
    .await;
    wait(
        &b,
        "the challenge in the log",
        Duration::from_secs(10),
        || b.log_text().contains(&challenge).then_some(()),
    )
    .await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the challenge file is for the installer only");
    }
    // Device-meta is published by every backend (MQTT, the Azure twin): whoever
    // reads the challenge there could claim the device. Only `claimed` goes there.
    let meta = common::eventually(
        Duration::from_secs(10),
        "pantahub.claimed in device-meta",
        || async {
            let m = d.pv.meta(pv_bridge::pvctrl::Meta::Device).await.ok()?;
            m.contains_key("pantahub.claimed").then_some(m)
        },
    )
    .await;
    assert!(
        !meta.values().any(|v| v.to_string().contains(&challenge)),
        "the challenge leaked into device-meta: {meta:?}"
    );
    let hub_meta = hub.device_meta(&id);
    assert!(
        !Value::Object(hub_meta.clone())
            .to_string()
            .contains(&challenge),
        "{hub_meta:?}"
    );
    assert_eq!(meta.get("pantahub.claimed"), Some(&json!("0")));
    // Unclaimed: nothing synced yet, and every call carried a User-Agent.
    assert!(hub.factory_state(&id).is_none());

    // Claim → fresh login → factory sync of the running revision.
    assert_eq!(hub.claim(&id), 200);
    let factory = wait(&b, "the factory sync", Duration::from_secs(30), || {
        hub.factory_state(&id)
    })
    .await;
    let running: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    assert_eq!(factory, running);
    for (k, v) in running.as_object().unwrap() {
        if let Some(sha) = v.as_str().filter(|s| s.len() == 64) {
            assert!(hub.has_blob(sha), "{k} was not uploaded");
        }
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
    let logins_before_claim = hub
        .seen()
        .iter()
        .filter(|s| s.path == "/auth/login")
        .count();
    assert!(logins_before_claim >= 2, "a fresh login after the claim");
    assert!(
        hub.seen().iter().all(|s| s
            .user_agent
            .as_deref()
            .is_some_and(|u| u.starts_with("pv-bridge/"))),
        "every call has pv-bridge's User-Agent"
    );

    // An update: the user posts rev 1; the device installs locals/hub-1 and the hub
    // follows Pantavisor's statuses with its fixed progress numbers.
    // A new kernel too: a reboot update, committed as DONE.
    let root = pv_testkit::sim::factory::blob("hub-root-1", 300_000);
    let kernel = pv_testkit::sim::factory::blob("hub-kernel-1", 100_000);
    let ksha = hub.upload("bsp/kernel.img", &kernel);
    let state = next_state(&d, &hub, &root, json!({"bsp/kernel.img": ksha})).await;
    // Slow enough (about 1.5 s) for DOWNLOADING reports with byte counts.
    hub.fault(Fault::new(
        Some("GET"),
        "/local-s3/",
        Action::Slow(200_000),
        1,
    ));
    let (status, step) = hub.post_step(&id, &state, "first update");
    assert_eq!(status, 200, "{step}");
    assert_eq!(step["rev"], 1);
    assert_eq!(final_on_hub(&b, &hub, &id, 1).await, "DONE");
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/hub-1");
    let history = hub.progress_history(&id, 1);
    let statuses: Vec<&str> = history
        .iter()
        .filter_map(|p| p["status"].as_str())
        .collect();
    let order = [
        "QUEUED",
        "DOWNLOADING",
        "INPROGRESS",
        "TESTING",
        "UPDATED",
        "DONE",
    ];
    let numbers = [5, 25, 50, 75, 100, 100];
    let mut last = 0;
    for p in &history {
        let i = order
            .iter()
            .position(|s| p["status"] == *s)
            .unwrap_or_else(|| panic!("unexpected status in {statuses:?}"));
        assert!(i >= last, "statuses out of order: {statuses:?}");
        assert_eq!(p["progress"], numbers[i], "{p}");
        last = i;
    }
    assert_eq!(statuses.first(), Some(&"QUEUED"), "{statuses:?}");
    let dl = history
        .iter()
        .rev()
        .find(|p| p["status"] == "DOWNLOADING")
        .unwrap_or_else(|| panic!("no DOWNLOADING in {statuses:?}"));
    assert_eq!(
        dl["downloads"]["total"]["total_size"],
        (root.len() + kernel.len()) as u64,
        "{dl}"
    );
    // The hub sees Pantavisor's statuses as the bridge polls them: a status can
    // pass between two polls (here the bridge survives the simulated reboot and
    // signals READY at once, so INPROGRESS "Trying new revision" can be short), but
    // the installation is seen before the final status.
    assert!(
        statuses.contains(&"INPROGRESS") || statuses.contains(&"TESTING"),
        "{statuses:?}"
    );
    assert!(
        history
            .iter()
            .all(|p| p["status"] == "DOWNLOADING" || p.get("downloads").is_none())
    );
    assert_eq!(history.last().unwrap()["progress"], 100);

    // The hub shows the running revision by its own number.
    wait(
        &b,
        "pantavisor.revision 1 on the hub",
        Duration::from_secs(15),
        || {
            let m = hub.device_meta(&id);
            (m.get("pantavisor.revision") == Some(&json!("1"))
                && m.get("pv-bridge.revision") == Some(&json!("locals/hub-1")))
            .then_some(())
        },
    )
    .await;

    // A failing revision: ERROR on the hub with the update log, and the device
    // back on locals/hub-1.
    let bad = next_state(
        &d,
        &hub,
        b"failing root",
        json!({"_sim/behaviour.json": {"outcome": "error", "container": "app"}}),
    )
    .await;
    assert_eq!(hub.post_step(&id, &bad, "broken").0, 200);
    assert_eq!(final_on_hub(&b, &hub, &id, 2).await, "ERROR");
    // Back to the rollback point, rev 1, as the hub keeps showing.
    assert_eq!(d.sim.as_ref().unwrap().running(), "locals/hub-1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        hub.device_meta(&id).get("pantavisor.revision"),
        Some(&json!("1"))
    );
    let last = hub.progress_history(&id, 2).last().cloned().unwrap();
    assert!(
        last["logs"].as_str().is_some_and(|l| !l.is_empty()),
        "{last}"
    );

    // Logs: real timestamps, levels, platform and the hub revision.
    let logs = wait(
        &b,
        "log entries on the hub",
        Duration::from_secs(20),
        || {
            let l = hub.logs();
            l.iter().any(|e| e["rev"] == "1").then_some(l)
        },
    )
    .await;
    let e = logs.iter().find(|e| e["rev"] == "1").unwrap();
    assert!(e["tsec"].as_i64().unwrap() > 1_600_000_000, "{e}");
    assert!(e["plat"].as_str().is_some_and(|p| !p.is_empty()), "{e}");
    // The failed try revision's lines stay under its own number after the
    // rollback, as Pantavisor's log pusher labels them by log directory.
    wait(
        &b,
        "the failed try revision's logs under rev 2",
        Duration::from_secs(20),
        || hub.logs().iter().any(|e| e["rev"] == "2").then_some(()),
    )
    .await;

    // Nothing secret in the log.
    let log = b.log_text();
    assert!(!log.contains(&secret), "the secret leaked into the log");
    assert!(!log.contains("Bearer "), "a token leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_the_hub_before_inprogress_stops_the_update() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let root = pv_testkit::sim::factory::blob("to-cancel", 400_000);
    let state = next_state(&d, &hub, &root, json!({})).await;
    // About 8 s of download: time to cancel in the middle.
    hub.fault(Fault::new(
        Some("GET"),
        "/local-s3/",
        Action::Slow(50_000),
        1,
    ));
    assert_eq!(hub.post_step(&id, &state, "to cancel").0, 200);
    wait(
        &b,
        "DOWNLOADING on the hub",
        Duration::from_secs(20),
        || (hub_status(&hub, &id, 1) == "DOWNLOADING").then_some(()),
    )
    .await;
    assert_eq!(hub.cancel(&id, 1), 200);
    assert_eq!(final_on_hub(&b, &hub, &id, 1).await, "CANCEL");
    wait(&b, "the device's CANCEL", Duration::from_secs(20), || {
        let h = hub.progress_history(&id, 1);
        let last = h.last()?;
        (last["status"] == "CANCEL" && last["status-msg"] == "Cancelled as requested by owner")
            .then_some(())
    })
    .await;
    // It stays cancelled: no later report overwrote it, and nothing was installed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hub_status(&hub, &id, 1), "CANCEL");
    assert!(d.pv.step("locals/hub-1").await.is_err());
    assert_eq!(d.sim.as_ref().unwrap().running(), "0");

    // The next revision goes through.
    let state = next_state(&d, &hub, b"after the cancel", json!({})).await;
    assert_eq!(hub.post_step(&id, &state, "next").0, 200);
    let outcome = final_on_hub(&b, &hub, &id, 2).await;
    assert!(outcome == "DONE" || outcome == "UPDATED", "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_and_a_cut_download_do_not_stop_an_update() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let root = pv_testkit::sim::factory::blob("resume-me", 400_000);
    let state = next_state(&d, &hub, &root, json!({})).await;
    // The first download is cut after 100 000 bytes; the resumed one is slow
    // enough for the session to expire while it runs.
    hub.fault(Fault::new(
        Some("GET"),
        "/local-s3/",
        Action::CutAfter(100_000),
        1,
    ));
    hub.fault(Fault::new(
        Some("GET"),
        "/local-s3/",
        Action::Slow(100_000),
        1,
    ));
    assert_eq!(hub.post_step(&id, &state, "resume").0, 200);
    wait(
        &b,
        "DOWNLOADING on the hub",
        Duration::from_secs(20),
        || (hub_status(&hub, &id, 1) == "DOWNLOADING").then_some(()),
    )
    .await;
    let logins = |hub: &FakeHub| {
        hub.seen()
            .iter()
            .filter(|s| s.path == "/auth/login")
            .count()
    };
    let before = logins(&hub);
    hub.expire_sessions();
    let outcome = final_on_hub(&b, &hub, &id, 1).await;
    assert!(outcome == "DONE" || outcome == "UPDATED", "{outcome}");
    let seen = hub.seen();
    assert!(
        seen.iter().any(|s| s.status == 401),
        "the expired token was refused"
    );
    assert!(logins(&hub) > before, "logged in again after the expiry");
    let downloads: Vec<_> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/local-s3/"))
        .collect();
    assert!(
        downloads
            .iter()
            .any(|s| s.status == 206 && s.range.as_deref() == Some("bytes=100000-")),
        "resumed with Range: {downloads:?}"
    );
    assert_eq!(
        downloads.iter().filter(|s| s.status == 200).count(),
        1,
        "{downloads:?}"
    );
    // Never a hot loop of logins.
    assert!(
        logins(&hub) - before <= 3,
        "{} logins",
        logins(&hub) - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_named_and_nothing_half_installed_runs() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, id) = claimed(&d, &hub, "", "").await;
    let steps = format!("/trails/{id}/steps");

    // Garbage and an oversize answer to the steps poll.
    hub.fault(Fault::new(
        Some("GET"),
        &steps,
        Action::Body(200, b"<html>oops".to_vec()),
        1,
    ));
    wait(&b, "the garbage named", Duration::from_secs(10), || {
        b.log_text()
            .contains("not a JSON array of steps")
            .then_some(())
    })
    .await;
    let mut huge = vec![b' '; 3 * 1024 * 1024];
    huge.extend_from_slice(b"[]");
    hub.fault(Fault::new(Some("GET"), &steps, Action::Body(200, huge), 1));
    wait(
        &b,
        "the oversize answer named",
        Duration::from_secs(10),
        || {
            b.log_text()
                .contains("the answer exceeds 2097152 bytes")
                .then_some(())
        },
    )
    .await;

    // An object whose download gives other bytes than its sha256 names.
    let wanted = pv_testkit::sim::factory::blob("wanted", 50_000);
    let other = pv_testkit::sim::factory::blob("other", 50_000);
    let state = next_state(&d, &hub, &wanted, json!({})).await;
    let wanted_sha = state["app/root.squashfs"].as_str().unwrap().to_owned();
    let other_sha = hub.upload("other", &other);
    let tok = hub.user_token();
    let (_, meta) = hub.call("GET", &format!("/objects/{other_sha}"), Some(&tok), None);
    let lie = json!({"id": wanted_sha, "sha256sum": wanted_sha, "size": other.len().to_string(),
        "sizeint": other.len(), "signed-geturl": meta["signed-geturl"]});
    hub.fault(Fault::new(
        Some("GET"),
        &format!("/objects/{wanted_sha}"),
        Action::Body(200, lie.to_string().into_bytes()),
        10,
    ));
    assert_eq!(hub.post_step(&id, &state, "corrupt").0, 200);
    assert_eq!(final_on_hub(&b, &hub, &id, 1).await, "WONTGO");
    let last = hub.progress_history(&id, 1).last().cloned().unwrap();
    assert!(
        last["status-msg"].as_str().unwrap().contains("hash to"),
        "{last}"
    );
    assert!(d.pv.step("locals/hub-1").await.is_err());
    assert_eq!(d.sim.as_ref().unwrap().running(), "0");

    // Still working: a good revision installs.
    let state = next_state(&d, &hub, b"good one", json!({})).await;
    assert_eq!(hub.post_step(&id, &state, "good").0, 200);
    let outcome = final_on_hub(&b, &hub, &id, 2).await;
    assert!(outcome == "DONE" || outcome == "UPDATED", "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_meta_and_device_meta_round_trip() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    // Device-meta read every 300 ms: pv-sim's `time` and `sysinfo` change on every
    // read, as Pantavisor's do.
    let top = "[metadata]\ndevice_meta_interval_ms = 300\ndevice_meta_min_interval_secs = 1\n";
    let (b, id) = claimed(&d, &hub, top, "").await;
    use pv_bridge::pvctrl::Meta;

    assert_eq!(
        hub.set_user_meta(&id, json!({"a": "1", "b": {"x": 1}})),
        200
    );
    common::eventually(
        Duration::from_secs(15),
        "user-meta on the device",
        || async {
            let m = d.pv.meta(Meta::User).await.ok()?;
            (m.get("a") == Some(&json!("1")) && m.contains_key("b")).then_some(())
        },
    )
    .await;
    // The hub's map is the whole set: b disappears from the device.
    assert_eq!(hub.set_user_meta(&id, json!({"a": "2"})), 200);
    common::eventually(
        Duration::from_secs(15),
        "the deletion on the device",
        || async {
            let m = d.pv.meta(Meta::User).await.ok()?;
            (m.get("a") == Some(&json!("2")) && !m.contains_key("b")).then_some(())
        },
    )
    .await;

    // Device-meta: Pantavisor's keys reach the hub, replaced only when changed.
    let local = d.pv.meta(Meta::Device).await.unwrap();
    let key = local
        .keys()
        .find(|k| k.starts_with("pantavisor."))
        .cloned()
        .unwrap();
    wait(
        &b,
        "device-meta on the hub",
        Duration::from_secs(15),
        || {
            let m = hub.device_meta(&id);
            (m.contains_key(&key) && m.get("pantahub.claimed") == Some(&json!("1"))).then_some(())
        },
    )
    .await;
    let puts = |hub: &FakeHub| {
        hub.seen()
            .iter()
            .filter(|s| s.method == "PUT" && s.path.ends_with("/device-meta"))
            .count()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = puts(&hub);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        puts(&hub) - n,
        0,
        "device-meta sent again when only volatile keys (time, sysinfo) changed"
    );
    d.pv.put_meta(Meta::Device, "app.health", b"green")
        .await
        .unwrap();
    let t = Instant::now();
    wait(
        &b,
        "a changed key on the hub",
        Duration::from_secs(15),
        || (hub.device_meta(&id).get("app.health") == Some(&json!("green"))).then_some(()),
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(puts(&hub) - n, 1, "one PUT for one change");
}

/// "synthetic log line N" → N.
fn seq(e: &Value) -> Option<u64> {
    e["msg"]
        .as_str()?
        .split("synthetic log line ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_arrive_complete_and_in_order_after_a_hub_outage() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 40.0).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, _id) = claimed(&d, &hub, "", "").await;
    // An outage of the log service: 503s, then dropped connections.
    hub.fault(Fault::new(Some("POST"), "/logs/", Action::Status(503), 3));
    hub.fault(Fault::new(Some("POST"), "/logs/", Action::Drop, 2));
    let logs = wait(&b, "200 synthetic lines", Duration::from_secs(60), || {
        let l = hub.logs();
        (l.iter().filter(|e| seq(e).is_some()).count() >= 200).then_some(l)
    })
    .await;
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.path == "/logs/" && s.status == 503)
    );
    let mut files: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    for e in &logs {
        if let Some(n) = seq(e) {
            let key = (
                e["plat"].as_str().unwrap().to_owned(),
                e["src"].as_str().unwrap().to_owned(),
            );
            files.entry(key).or_default().push(n);
            assert_eq!(e["lvl"], "INFO", "{e}");
        }
    }
    for (f, ns) in &files {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{f:?} out of order or duplicated: {ns:?}"
        );
    }
    // Every line between the latest first line and the earliest last line of all
    // the files arrived.
    let lo = files.values().map(|v| v[0]).max().unwrap();
    let hi = files.values().map(|v| *v.last().unwrap()).min().unwrap();
    let all: std::collections::BTreeSet<u64> = files.values().flatten().copied().collect();
    let missing: Vec<u64> = (lo..=hi).filter(|n| !all.contains(n)).collect();
    assert!(
        hi > lo && missing.is_empty(),
        "missing {missing:?} in {lo}..={hi}"
    );
    // Batches stay within the hub's limits.
    assert!(hub.seen().iter().filter(|s| s.path == "/logs/").count() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_device_talks_tls_through_an_https_proxy() {
    let d = common::start(Generation::Gen2).await;
    let pki = common::test_pki(&d.dir.path().join("pki"));
    // Objects are served as 127.0.0.1, the API as localhost: the proxy's log tells
    // downloads from API calls.
    let cfg = HubConfig {
        object_host: Some("127.0.0.1".into()),
        ..HubConfig::default()
    };
    let hub = FakeHub::start_tls(cfg, &pki.server_cert, &pki.server_key)
        .await
        .unwrap();
    assert!(hub.url().starts_with("https://localhost:"));
    // A device the built-in client registered and its owner claimed: its
    // pantahub.config moves to pv-bridge as it is.
    let tok = hub.user_token();
    let (status, dev) = hub.call(
        "POST",
        "/devices/",
        Some(&tok),
        Some(json!({"nick": "moved"})),
    );
    assert_eq!(status, 200, "{dev}");
    let id = dev["id"].as_str().unwrap().to_owned();
    let creds = d.dir.path().join("pantahub.config");
    std::fs::write(
        &creds,
        format!(
            "PH_CREDS_HOST=localhost\nPH_CREDS_PORT=443\nPH_CREDS_ID={id}\nPH_CREDS_PRN={}\nPH_CREDS_SECRET={}\n",
            dev["prn"].as_str().unwrap(),
            dev["secret"].as_str().unwrap()
        ),
    )
    .unwrap();
    let proxy = Tinyproxy::start(d.dir.path());

    // First with a CA that did not sign the hub's certificate: refused, and said.
    let other = common::test_pki(&d.dir.path().join("other-pki"));
    let backend = |ca: &Path, proxy_key: bool| {
        let key = if proxy_key {
            format!("proxy = \"http://127.0.0.1:{}\"\n", proxy.port)
        } else {
            String::new()
        };
        format!(
            "ca_file = \"{}\"\ncredentials_file = \"{}\"\n{key}",
            ca.display(),
            creds.display(),
        )
    };
    let wrong_dir = d.dir.path().join("wrong");
    std::fs::create_dir_all(&wrong_dir).unwrap();
    let b = Bridge::start(&d, &wrong_dir, &hub, "", &backend(&other.ca, true));
    wait(&b, "a certificate error", Duration::from_secs(20), || {
        b.log_text().contains("certificate").then_some(())
    })
    .await;
    drop(b);
    assert!(hub.factory_state(&id).is_none());
    let port = hub.addr().port();
    let connect = format!("CONNECT localhost:{port}");
    let first = proxy.log_text().matches(&connect).count();
    assert!(
        first > 0,
        "the `proxy` setting is used: {}",
        proxy.log_text()
    );

    // With the right CA, and the proxy from HTTPS_PROXY: no registration,
    // straight to the factory sync.
    let via = format!("http://127.0.0.1:{}", proxy.port);
    let b = Bridge::start_env(
        &d,
        d.dir.path(),
        &hub,
        "",
        &backend(&pki.ca, false),
        &[("HTTPS_PROXY", &via)],
    );
    wait(&b, "the factory sync", Duration::from_secs(30), || {
        hub.factory_state(&id)
    })
    .await;
    assert_eq!(hub.device_ids(), vec![id.clone()], "no new registration");
    assert!(!b.state.join("adapters/hub/pantahub.creds").exists());
    let plog = proxy.log_text();
    let before = plog.matches(&connect).count();
    assert!(before > first, "HTTPS_PROXY is used: {plog}");
    // An update: objects come over TLS from the hub (trusted through the
    // backend's ca_file) and through the proxy too.
    let state = next_state(&d, &hub, b"over the proxy", json!({})).await;
    assert_eq!(hub.post_step(&id, &state, "via proxy").0, 200);
    let outcome = final_on_hub(&b, &hub, &id, 1).await;
    assert!(outcome == "DONE" || outcome == "UPDATED", "{outcome}");
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.method == "GET" && s.path.starts_with("/local-s3/") && s.status == 200)
    );
    let plog = proxy.log_text();
    assert!(
        plog.contains(&format!("CONNECT 127.0.0.1:{port}")),
        "object downloads go through the proxy too: {plog}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_claim_token_skips_the_claim_and_brings_default_user_meta() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let tok = hub.user_token();
    let (status, t) = hub.call(
        "POST",
        "/devices/tokens",
        Some(&tok),
        Some(json!({"default-user-meta": {"fleet": "north"}})),
    );
    assert_eq!(status, 200, "{t}");
    let autotok = d.dir.path().join("autotok");
    std::fs::write(&autotok, format!("{}\n", t["token"].as_str().unwrap())).unwrap();
    // One of the device's objects is already on the hub: the sync skips it (409).
    let state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    let sha = state["app/root.squashfs"].as_str().unwrap().to_owned();
    let mut bytes = Vec::new();
    d.pv.get_object(&sha, &mut bytes).await.unwrap();
    assert_eq!(hub.upload("app/root.squashfs", &bytes), sha);
    // A proxy that does not exist, bypassed by NO_PROXY.
    let b = Bridge::start_env(
        &d,
        d.dir.path(),
        &hub,
        "",
        &format!("autotok_file = \"{}\"\n", autotok.display()),
        &[
            ("HTTP_PROXY", "http://127.0.0.1:9"),
            ("NO_PROXY", "localhost"),
        ],
    );
    let id = wait(&b, "the factory sync", Duration::from_secs(30), || {
        let id = hub.device_ids().first().cloned()?;
        hub.factory_state(&id).map(|_| id)
    })
    .await;
    let rec = hub.device(&id).unwrap();
    assert_eq!(rec["owner"], pv_testkit::hub::USER_PRN);
    assert_eq!(rec["challenge"], "");
    assert!(
        hub.seen()
            .iter()
            .any(|s| s.method == "POST" && s.path == "/objects/" && s.status == 409),
        "the object already there was not uploaded again"
    );
    assert!(!b.log_text().contains("waiting to be claimed"));
    common::eventually(Duration::from_secs(15), "the token's user-meta", || async {
        let m = d.pv.meta(pv_bridge::pvctrl::Meta::User).await.ok()?;
        (m.get("fleet") == Some(&json!("north"))).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_entry_the_hub_refuses_is_dropped_and_the_rest_arrive() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let (b, _id) = claimed(&d, &hub, "", "").await;
    hub.refuse_logs_containing("POISON");
    let running = d.sim.as_ref().unwrap().running();
    let file = d
        .storage()
        .join(format!("logs/{running}/app/lxc/console.log"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let mut text = String::new();
    for i in 0..5 {
        text.push_str(&format!("line before {i}\n"));
    }
    text.push_str("a POISON line\n");
    for i in 0..5 {
        text.push_str(&format!("line after {i}\n"));
    }
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let msgs = wait(
        &b,
        "the lines after the poison",
        Duration::from_secs(30),
        || {
            let msgs: Vec<String> = hub
                .logs()
                .iter()
                .filter(|e| e["plat"] == "app")
                .filter_map(|e| e["msg"].as_str().map(str::to_owned))
                .filter(|m| m.starts_with("line "))
                .collect();
            msgs.iter().any(|m| m == "line after 4").then_some(msgs)
        },
    )
    .await;
    let want: Vec<String> = (0..5)
        .map(|i| format!("line before {i}"))
        .chain((0..5).map(|i| format!("line after {i}")))
        .collect();
    assert_eq!(msgs, want);
    assert!(
        !hub.logs()
            .iter()
            .any(|e| e["msg"].as_str().unwrap_or("").contains("POISON"))
    );
    assert!(
        b.log_text()
            .contains("dropping a log entry the hub refuses")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_and_mqtt_run_together_with_the_hub_owning_updates() {
    let d = common::start(Generation::Gen2).await;
    let broker = mosquitto::Broker::start(d.dir.path(), "");
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let mqtt = format!(
        "[[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"dev-1\"\nbroker = \"mqtt://127.0.0.1:{}\"\nupdates = false\n",
        broker.port
    );
    let (b, id) = claimed(&d, &hub, &mqtt, "priority = 10\n").await;
    mosquitto::wait_for("MQTT status online", Duration::from_secs(15), || {
        mosquitto::retained(broker.port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;

    // An offer over MQTT is refused: that backend does not own updates.
    let running: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    mosquitto::publish(
        broker.port,
        "pv/dev-1/revision/set",
        &json!({"v": 1, "id": "m1", "state": running}).to_string(),
        true,
    );
    let p = mosquitto::wait_for("WONTGO over MQTT", Duration::from_secs(15), || {
        mosquitto::retained(broker.port, "pv/dev-1/revision/progress")
            .filter(|p| p["id"] == "m1" && p["status"] == "WONTGO")
    })
    .await;
    assert!(
        p["status_msg"].as_str().unwrap().contains("switched off"),
        "{p}"
    );

    // The hub's update runs, and MQTT sees the device on it.
    let state = next_state(&d, &hub, b"both backends", json!({})).await;
    assert_eq!(hub.post_step(&id, &state, "together").0, 200);
    let outcome = final_on_hub(&b, &hub, &id, 1).await;
    assert!(outcome == "DONE" || outcome == "UPDATED", "{outcome}");
    mosquitto::wait_for(
        "the new revision in MQTT's status",
        Duration::from_secs(15),
        || {
            mosquitto::retained(broker.port, "pv/dev-1/status")
                .filter(|s| s["online"] == true && s["revision"] == "locals/hub-1")
        },
    )
    .await;
    // User-meta from both backends reaches the device.
    assert_eq!(hub.set_user_meta(&id, json!({"from-hub": "1"})), 200);
    mosquitto::publish(
        broker.port,
        "pv/dev-1/meta/user/set",
        &json!({"v": 1, "version": 1, "data": {"from-mqtt": "2"}}).to_string(),
        true,
    );
    common::eventually(Duration::from_secs(15), "user-meta from both", || async {
        let m = d.pv.meta(pv_bridge::pvctrl::Meta::User).await.ok()?;
        (m.get("from-hub") == Some(&json!("1")) && m.get("from-mqtt") == Some(&json!("2")))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_back_off_and_a_fixed_file_recovers() {
    let d = common::start(Generation::Gen2).await;
    let hub = FakeHub::start(HubConfig::default()).await.unwrap();
    let tok = hub.user_token();
    let (_, dev) = hub.call(
        "POST",
        "/devices/",
        Some(&tok),
        Some(json!({"nick": "dev"})),
    );
    let id = dev["id"].as_str().unwrap().to_owned();
    let secret = dev["secret"].as_str().unwrap().to_owned();
    let creds = d.dir.path().join("pantahub.config");
    let write = |s: &str| {
        std::fs::write(&creds, format!("PH_CREDS_ID={id}\nPH_CREDS_SECRET={s}\n")).unwrap()
    };
    write("not-the-secret");
    let b = Bridge::start(
        &d,
        d.dir.path(),
        &hub,
        "",
        &format!("credentials_file = \"{}\"\n", creds.display()),
    );
    let logins = || {
        hub.seen()
            .iter()
            .filter(|s| s.path == "/auth/login")
            .count()
    };
    wait(&b, "a refused login", Duration::from_secs(10), || {
        (logins() > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let n = logins();
    assert!(
        (2..=6).contains(&n),
        "{n} login attempts in about 8 s: backoff, not a hot loop"
    );
    let log = b.log_text();
    assert!(log.contains("POST /auth/login: HTTP 401"), "{log}");
    assert!(!log.contains("not-the-secret"));
    assert!(hub.factory_state(&id).is_none());
    // The file is read again on every attempt: fixing it is enough.
    write(&secret);
    wait(&b, "the factory sync", Duration::from_secs(90), || {
        hub.factory_state(&id)
    })
    .await;
    assert!(!b.log_text().contains(&secret));
}
