//! The Azure IoT Hub adapter end to end: the real pv-bridge binary, pv-sim, and
//! the test kit's fake IoT Hub (MQTT over TLS with a test CA; the protocol of
//! azure-iot-hub.md), driven the way a back end drives a real hub: desired
//! properties, direct methods, and reading the reported side.

#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/azure.rs"]
mod azurekit;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use azurekit::{Bridge, Env, HOST, KEY, env_with, wait};

use std::process::Command;
use std::time::{Duration, Instant};

use pv_testkit::iothub::{DpsSetup, Invoked};
use serde_json::{Value, json};

fn final_ack(a: &Value) -> bool {
    a["ac"] != 202
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_sync_desired_revisions_and_user_meta() {
    let e = env_with(|_| {}).await;
    let b = e.bridge("model_id = \"dtmi:pantacor:pvbridge;1\"\n");
    e.connected(&b).await;
    assert_eq!(
        e.hub.model_id("dev-1").as_deref(),
        Some("dtmi:pantacor:pvbridge;1")
    );
    // The reported side: running revision, health, device-meta with escaped keys.
    let r = wait(
        &b,
        "device-meta in the twin",
        Duration::from_secs(20),
        || {
            let r = e.reported();
            r["pantavisor"]["deviceMeta"]["pantavisor%2Erevision"]
                .is_string()
                .then_some(r)
        },
    )
    .await;
    assert_eq!(r["pantavisor"]["revision"], "0");
    assert_eq!(
        r["pantavisor"]["bridge"]["backends"]["azure"]["connected"],
        true
    );
    assert!(
        r["pantavisor"]["deviceMeta"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.contains('.'))
    );

    // A desired revision with its objects listed → DONE, progress visible on the way.
    let rev = e
        .revision("r1", &b"new root".repeat(50_000), json!({}), false)
        .await;
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 200, "{a}");
    let ad = a["ad"].as_str().unwrap();
    assert!(ad.starts_with("DONE") || ad.starts_with("UPDATED"), "{a}");
    assert_eq!(a["value"], json!({"id": "r1"}));
    assert_eq!(e.d.sim.as_ref().unwrap().running(), "locals/r1");
    let r = wait(
        &b,
        "the running revision reported",
        Duration::from_secs(20),
        || {
            let r = e.reported();
            (r["pantavisor"]["revision"] == "locals/r1").then_some(r)
        },
    )
    .await;
    assert_eq!(
        r["pantavisor"]["update"]["status"],
        ad.split(':').next().unwrap()
    );
    assert_eq!(r["pantavisor"]["update"]["bytesTotal"], 400_000);
    let seen: Vec<String> = e
        .hub
        .reported_patches("dev-1")
        .iter()
        .filter_map(|p| {
            p["pantavisor"]["update"]["status"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(
        seen.iter()
            .any(|s| s == "DOWNLOADING" || s == "INPROGRESS" || s == "QUEUED"),
        "no progress on the way: {seen:?}"
    );
    assert!(
        e.hub
            .reported_patches("dev-1")
            .iter()
            .any(|p| p["revision"]["ac"] == 202),
        "no 202 ack while installing"
    );

    // A failing revision fetched by template → ERROR, ack 500, rolled back.
    let rev = e
        .revision(
            "r2",
            b"bad root",
            json!({"_sim/behaviour.json": {"outcome": "error", "container": "app"}}),
            true,
        )
        .await;
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 500, "{a}");
    assert!(a["ad"].as_str().unwrap().starts_with("ERROR"), "{a}");
    // Rolled back to the last rollback point (r1 ended UPDATED, not DONE).
    assert_ne!(e.d.sim.as_ref().unwrap().running(), "locals/r2");

    // userMeta: escaped keys arrive unescaped; null deletes.
    let v = e
        .hub
        .update_desired(
            "dev-1",
            json!({"userMeta": {"app%2Emode": "fast", "colour": "blue"}}),
        )
        .unwrap();
    let a = e.ack(&b, "userMeta", v, final_ack).await;
    assert_eq!(a["ac"], 200, "{a}");
    let m = common::eventually(
        Duration::from_secs(10),
        "user-meta on the device",
        || async {
            let m = e.d.pv.meta(pv_bridge::pvctrl::Meta::User).await.ok()?;
            (m.get("app.mode") == Some(&json!("fast")) && m.contains_key("colour")).then_some(m)
        },
    )
    .await;
    assert_eq!(m.get("colour"), Some(&json!("blue")));
    let v = e
        .hub
        .update_desired("dev-1", json!({"userMeta": {"colour": null}}))
        .unwrap();
    e.ack(&b, "userMeta", v, |a| a["ac"] == 200).await;
    common::eventually(Duration::from_secs(10), "colour deleted", || async {
        let m = e.d.pv.meta(pv_bridge::pvctrl::Meta::User).await.ok()?;
        (!m.contains_key("colour") && m.contains_key("app.mode")).then_some(())
    })
    .await;
    // Reported patches stayed within the twin's rules (the fake answers 400 otherwise).
    assert!(
        !b.log_text().contains("refused a reported patch"),
        "{}",
        b.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_methods_reach_the_device() {
    let e = env_with(|_| {}).await;
    let b = e.bridge("");
    e.connected(&b).await;
    let call = |name: &'static str, payload: Value| {
        let hub = &e.hub;
        async move {
            hub.invoke("dev-1", name, payload, Duration::from_secs(30))
                .await
        }
    };
    let answered = |r: Invoked| match r {
        Invoked::Answered { status, payload } => (status, payload),
        other => panic!("no answer: {other:?}"),
    };
    let (s, p) = answered(call("ping", Value::Null).await);
    assert_eq!(
        (s, p["status"].as_str(), p["detail"].as_str()),
        (200, Some("successful"), Some("pong"))
    );
    let (s, _) = answered(call("ssh", json!({"enable": true})).await);
    assert_eq!(s, 200);
    let (s, p) = answered(call("gc", Value::Null).await);
    assert_eq!(s, 200, "{p}");
    assert!(
        p["detail"].as_str().unwrap().starts_with("reclaimed "),
        "{p}"
    );
    let (s, _) = answered(call("resync", json!({})).await);
    assert_eq!(s, 200);
    // Nothing to cancel: the engine's reason comes back with 500.
    let (s, p) = answered(call("cancel", Value::Null).await);
    assert_eq!(s, 500, "{p}");
    assert!(p["detail"].is_string(), "{p}");
    // Refusals name the problem.
    let (s, p) = answered(call("selfdestruct", Value::Null).await);
    assert_eq!(s, 404);
    assert!(
        p["error"].as_str().unwrap().contains("reboot, poweroff"),
        "{p}"
    );
    let (s, p) = answered(call("ssh", json!({"enable": "yes"})).await);
    assert_eq!(s, 400, "{p}");
    let (s, p) = answered(call("update", json!({"id": "r/1"})).await);
    assert_eq!(s, 400);
    assert!(p["error"].as_str().unwrap().contains("revision.id"), "{p}");
    // reboot: 202 at once; the device goes down.
    let (s, p) = answered(call("reboot", Value::Null).await);
    assert_eq!((s, p["status"].as_str()), (202, Some("accepted")), "{p}");
    let sim = e.d.sim.as_ref().unwrap();
    sim.wait_power(pv_testkit::sim::PowerState::Rebooting).await;
    sim.wait_power(pv_testkit::sim::PowerState::On).await;
    // On a device the bridge restarts with it; its outcome is reported then.
    drop(b);
    let b = e.bridge("");
    wait(
        &b,
        "the reboot reported successful",
        Duration::from_secs(30),
        || {
            let r = e.reported();
            r["pantavisor"]["commands"]
                .as_object()?
                .values()
                .any(|c| c["command"] == "reboot" && c["status"] == "successful")
                .then_some(())
        },
    )
    .await;
    // update: 202 at once, the outcome in reported properties.
    let rev = e.revision("m1", b"by method", json!({}), false).await;
    let (s, p) = answered(call("update", rev).await);
    assert_eq!((s, p["id"].as_str()), (202, Some("m1")), "{p}");
    wait(&b, "m1 installed", Duration::from_secs(60), || {
        let r = e.reported();
        let st = r["pantavisor"]["update"]["status"].as_str()?.to_owned();
        (r["pantavisor"]["update"]["id"] == "m1" && (st == "DONE" || st == "UPDATED")).then_some(())
    })
    .await;
    assert_eq!(e.d.sim.as_ref().unwrap().running(), "locals/m1");
    // poweroff: 202, and the device goes off.
    let (s, p) = answered(call("poweroff", Value::Null).await);
    assert_eq!(s, 202, "{p}");
    if tokio::time::timeout(
        Duration::from_secs(20),
        sim.wait_power(pv_testkit::sim::PowerState::Off),
    )
    .await
    .is_err()
    {
        panic!(
            "the device did not power off; the bridge's log:\n{}",
            b.log_text()
        );
    }
    // Every command reached Pantavisor.
    let pv_log = pantavisor_logs(&e.d.storage().join("logs"));
    for op in ["ENABLE_SSH", "REBOOT_DEVICE", "POWEROFF_DEVICE"] {
        assert!(
            pv_log.contains(&format!("processing command {op}")),
            "{op} not in:\n{pv_log}"
        );
    }
    // A device that is not connected: 404 from the hub itself.
    drop(b);
    let gone = wait_offline(&e).await;
    assert_eq!(gone, Invoked::Offline);
}

/// Every `pantavisor.log` under the log tree (one per revision and boot).
fn pantavisor_logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_symlink() {
            continue;
        }
        if p.is_dir() {
            out.push_str(&pantavisor_logs(&p));
        } else if p.file_name().is_some_and(|n| n == "pantavisor.log") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

async fn wait_offline(e: &Env) -> Invoked {
    for _ in 0..100 {
        if !e.hub.connected("dev-1") {
            return e
                .hub
                .invoke("dev-1", "ping", Value::Null, Duration::from_secs(5))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the device stayed connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_desired_properties_are_refused_with_the_reason() {
    let e = env_with(|_| {}).await;
    let b = e.bridge("max_state_bytes = 2048\n");
    e.connected(&b).await;
    let v = e
        .hub
        .update_desired(
            "dev-1",
            json!({"revision": {"id": "bad/id", "stateUrl": "https://x/s", "stateSha256": "ab"}}),
        )
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 400);
    assert!(
        a["ad"].as_str().unwrap().contains("revision.id \"bad/id\""),
        "{a}"
    );
    let v = e
        .hub
        .update_desired("dev-1", json!({"userMeta": "all of it"}))
        .unwrap();
    let a = e.ack(&b, "userMeta", v, final_ack).await;
    assert_eq!(a["ac"], 400);
    assert!(
        a["ad"]
            .as_str()
            .unwrap()
            .contains("userMeta must be an object, not a string"),
        "{a}"
    );
    // A state bigger than max_state_bytes (fetched for objectUrlTemplate).
    let big: serde_json::Map<String, Value> = (0..100)
        .map(|i| (format!("k{i}/x.json"), json!({"pad": "y".repeat(40)})))
        .collect();
    let rev = e.revision("huge", b"x", Value::Object(big), true).await;
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 400);
    assert!(
        a["ad"]
            .as_str()
            .unwrap()
            .contains("larger than max_state_bytes (2048)"),
        "{a}"
    );
    // A state that does not hash to stateSha256.
    let mut rev = e.revision("liar", b"z", json!({}), true).await;
    rev["stateSha256"] = json!("0".repeat(64));
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 400);
    assert!(a["ad"].as_str().unwrap().contains("hashes to"), "{a}");
    // The hub itself refuses a desired section over 32 KiB.
    let e2 = e.hub.update_desired("dev-1", json!({"blob": "x".repeat(4000), "b2": {"a": "y".repeat(4096), "b": "y".repeat(4096), "c": "y".repeat(4096), "d": "y".repeat(4096), "e": "y".repeat(4096), "f": "y".repeat(4096), "g": "y".repeat(4096), "h": "y".repeat(4096)}}));
    assert!(e2.unwrap_err().contains("limit 32768"));
    // Nothing was installed, the bridge still runs and the next good revision goes.
    assert_eq!(e.d.sim.as_ref().unwrap().running(), "0");
    let rev = e.revision("good", b"fine", json!({}), false).await;
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    assert_eq!(e.ack(&b, "revision", v, final_ack).await["ac"], 200);
}

/// Waits until the update `id` is final in the reported twin; returns its status.
async fn final_status(e: &Env, b: &Bridge, id: &str, within: Duration) -> String {
    wait(b, &format!("{id} final in the twin"), within, || {
        let r = e.reported();
        let u = &r["pantavisor"]["update"];
        let st = u["status"].as_str()?.to_owned();
        (u["id"] == id
            && ["DONE", "UPDATED", "ERROR", "WONTGO", "CANCELLED"].contains(&st.as_str()))
        .then_some(st)
    })
    .await
}

fn synthetic_seq(msg: &str) -> Option<u64> {
    msg.split("synthetic log line ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Every log entry the hub received, decoded (gzip or not).
fn hub_logs(e: &Env) -> Vec<Value> {
    let mut out = Vec::new();
    for m in e.hub.d2c("dev-1") {
        assert_eq!(m.property("$.ct"), Some("application/json"));
        assert_eq!(m.property("type"), Some("pvlog"));
        let body = match m.property("$.ce") {
            Some("gzip") => {
                let mut s = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&m.body[..]), &mut s)
                    .unwrap();
                s
            }
            Some("utf-8") => m.body.clone(),
            other => panic!("content encoding {other:?}"),
        };
        assert!(m.body.len() <= 256 * 1024);
        let v: Vec<Value> = serde_json::from_slice(&body).unwrap();
        out.extend(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_during_an_update_without_losing_it() {
    let e = env_with(|c| c.log_rate = 10.0).await;
    let b = e.bridge("sas_lifetime_secs = 10\nlog_gzip = true\n");
    e.connected(&b).await;
    // 160 KiB at 8 KiB/s: the download spans two token renewals.
    let rev = e
        .revision("slow", &vec![7u8; 160 * 1024], json!({}), false)
        .await;
    let sha = rev["objects"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    // The state is fetched first, then the object: both slow.
    e.objects.fault(pv_testkit::objects::Fault::Slow(8 * 1024));
    e.objects.fault(pv_testkit::objects::Fault::Slow(8 * 1024));
    let _ = sha;
    let started = Instant::now();
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let st = final_status(&e, &b, "slow", Duration::from_secs(90)).await;
    assert!(st == "DONE" || st == "UPDATED", "{st}");
    assert!(
        started.elapsed() > Duration::from_secs(15),
        "the download was not slow"
    );
    assert_eq!(e.ack(&b, "revision", v, final_ack).await["ac"], 200);
    assert!(
        e.hub.connects("dev-1") >= 3,
        "connects: {}",
        e.hub.connects("dev-1")
    );
    assert!(
        b.log_text().matches("reconnecting with a new one").count() >= 2,
        "{}",
        b.log_text()
    );
    // Renewed before the hub had to cut an expired token.
    let refusals = e.hub.refusals();
    assert!(
        !refusals.iter().any(|r| r.contains("SAS token expired")),
        "{refusals:?}"
    );
    // Compressed logs arrived too.
    wait(&b, "gzip log messages", Duration::from_secs(20), || {
        (hub_logs(&e)
            .iter()
            .filter(|l| synthetic_seq(l["msg"].as_str().unwrap_or("")).is_some())
            .count()
            >= 20)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restart_in_the_middle_of_an_update() {
    let e = env_with(|_| {}).await;
    let b = e.bridge("");
    e.connected(&b).await;
    let rev = e
        .revision("mid", &vec![9u8; 64 * 1024], json!({}), false)
        .await;
    e.objects.fault(pv_testkit::objects::Fault::Slow(8 * 1024));
    e.objects.fault(pv_testkit::objects::Fault::Slow(8 * 1024));
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    wait(
        &b,
        "DOWNLOADING in the twin",
        Duration::from_secs(20),
        || (e.reported()["pantavisor"]["update"]["status"] == "DOWNLOADING").then_some(()),
    )
    .await;
    e.hub.outage(Duration::from_secs(3));
    wait(&b, "the bridge to notice", Duration::from_secs(10), || {
        b.log_text()
            .contains("IoT Hub connection lost")
            .then_some(())
    })
    .await;
    let st = final_status(&e, &b, "mid", Duration::from_secs(60)).await;
    assert!(st == "DONE" || st == "UPDATED", "{st}");
    assert_eq!(e.ack(&b, "revision", v, final_ack).await["ac"], 200);
    assert!(e.hub.connects("dev-1") >= 2);
    assert_eq!(e.d.sim.as_ref().unwrap().running(), "locals/mid");
    // A desired change made while the device was away is picked up by the GET.
    e.hub.kick("dev-1", "test");
    let v = e
        .hub
        .update_desired("dev-1", json!({"userMeta": {"after": "restart"}}))
        .unwrap();
    assert_eq!(e.ack(&b, "userMeta", v, final_ack).await["ac"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_arrive_complete_and_in_order_after_an_outage() {
    let e = env_with(|c| c.log_rate = 40.0).await;
    let b = e.bridge("");
    e.connected(&b).await;
    wait(&b, "first logs", Duration::from_secs(20), || {
        (!e.hub.d2c("dev-1").is_empty()).then_some(())
    })
    .await;
    e.hub.outage(Duration::from_secs(4));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let logs = wait(&b, "400 synthetic lines", Duration::from_secs(60), || {
        let l = hub_logs(&e);
        let lines: std::collections::BTreeSet<u64> = l
            .iter()
            .filter(|x| synthetic_seq(x["msg"].as_str().unwrap_or("")).is_some())
            .filter_map(|x| x["seq"].as_u64())
            .collect();
        (lines.len() >= 400).then_some(l)
    })
    .await;
    // The contract (docs/azure.md, Logs): at-least-once, and a copy sent again
    // carries the same `seq`. Copies are identical; after dropping them every line
    // is there once, in order.
    let mut by_seq: std::collections::BTreeMap<u64, &Value> = Default::default();
    let mut copies = 0;
    for x in &logs {
        let seq = x["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {x}"));
        if let Some(first) = by_seq.insert(seq, x) {
            assert_eq!(first, x, "two different entries with seq {seq}");
            copies += 1;
        }
    }
    eprintln!("{} entries, {copies} copies sent again", logs.len());
    let in_order: Vec<u64> = logs
        .iter()
        .filter_map(|x| x["seq"].as_u64())
        .scan(None, |top: &mut Option<u64>, s| {
            let fresh = top.is_none_or(|t| s > t);
            *top = Some(top.map_or(s, |t| t.max(s)));
            Some(fresh.then_some(s))
        })
        .flatten()
        .collect();
    assert_eq!(
        in_order,
        by_seq.keys().copied().collect::<Vec<_>>(),
        "first copies arrive in spool order"
    );
    let mut files: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    for x in by_seq.values() {
        if let Some(n) = synthetic_seq(x["msg"].as_str().unwrap()) {
            files
                .entry((
                    x["plat"].as_str().unwrap().to_owned(),
                    x["src"].as_str().unwrap().to_owned(),
                ))
                .or_default()
                .push(n);
            assert!(x["tsec"].as_i64().unwrap() > 1_600_000_000, "{x}");
        }
    }
    for (f, ns) in &files {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{f:?} out of order or duplicated: {ns:?}"
        );
    }
    let lo = files.values().map(|v| v[0]).max().unwrap();
    let hi = files.values().map(|v| *v.last().unwrap()).min().unwrap();
    let all: std::collections::BTreeSet<u64> = files.values().flatten().copied().collect();
    let missing: Vec<u64> = (lo..=hi).filter(|n| !all.contains(n)).collect();
    assert!(
        hi > lo && missing.is_empty(),
        "missing {missing:?} in {lo}..={hi}"
    );
    let r = e.reported();
    assert!(
        r["pantavisor"]["logs"]["messages"].as_u64().unwrap() >= 1,
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_log_budget_is_kept_and_drops_are_reported() {
    let e = env_with(|c| c.log_rate = 200.0).await;
    let b = e.bridge("log_budget_kib_per_day = 8\nlog_batch_bytes = 4096\n");
    e.connected(&b).await;
    let r = wait(
        &b,
        "dropped records reported",
        Duration::from_secs(30),
        || {
            let r = e.reported();
            (r["pantavisor"]["logs"]["droppedRecords"].as_u64()? > 0).then_some(r)
        },
    )
    .await;
    assert!(
        r["pantavisor"]["logs"]["usedKiBToday"].as_u64().unwrap() <= 8,
        "{r}"
    );
    let total: usize = e
        .hub
        .d2c("dev-1")
        .iter()
        .map(|m| m.body.len().div_ceil(4096))
        .sum();
    assert!(total <= 2, "{total} units sent");
    assert!(
        b.log_text().contains("daily log budget spent"),
        "{}",
        b.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_group_enrollment_with_a_derived_key() {
    let e = env_with(|_| {}).await;
    let group =
        "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
    // DPS asks to wait 8 s between status polls; with a 5 s keep-alive the device
    // must keep pinging through the wait, or DPS drops it at 7.5 s.
    e.hub.set_dps(DpsSetup {
        id_scope: "0ne00000A0A".into(),
        group_key: Some(group.into()),
        retry_after: Some(8),
        ..DpsSetup::default()
    });
    // The device holds only its derived key (the factory computed it).
    let reg = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6";
    let key_file = e.d.dir.path().join("device.key");
    std::fs::write(&key_file, "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=\n").unwrap();
    let b = e.bridge_with(
        &format!(
            "keep_alive_secs = 5\ndps = {{ id_scope = \"0ne00000A0A\", registration_id = \"{reg}\", symmetric_key_file = \"{}\", connect_address = \"{}\" }}\n",
            key_file.display(),
            e.hub.mqtt_addr()
        ),
        "",
    );
    wait(
        &b,
        "the assigned device online",
        Duration::from_secs(30),
        || (e.hub.reported(reg)["pantavisor"]["bridge"]["version"].is_string()).then_some(()),
    )
    .await;
    assert_eq!(e.hub.registrations(), 1);
    let cache: Value =
        serde_json::from_slice(&std::fs::read(b.state.join("adapters/azure/dps.json")).unwrap())
            .unwrap();
    assert_eq!(cache["assignedHub"], HOST);
    assert_eq!(cache["deviceId"], reg);
    // A reconnect uses the cached assignment: no second registration.
    e.hub.kick(reg, "test");
    wait(&b, "a second connection", Duration::from_secs(20), || {
        (e.hub.connects(reg) >= 2).then_some(())
    })
    .await;
    assert_eq!(e.hub.registrations(), 1);
    // The hub refuses the identity (deleted and re-created elsewhere): DPS again.
    e.hub.set_key(reg, "b3RoZXIta2V5LW5vdC10aGUtZGV2aWNlcw==");
    e.hub.kick(reg, "test");
    wait(&b, "provisioned again", Duration::from_secs(30), || {
        (e.hub.registrations() >= 2).then_some(())
    })
    .await;
    wait(&b, "connected again", Duration::from_secs(30), || {
        e.hub.connected(reg).then_some(())
    })
    .await;
    assert!(
        b.log_text().contains("provisioning through DPS again"),
        "{}",
        b.log_text()
    );
    // Refused again within the hour: no second registration in a row (each is
    // billed and DPS throttles a device registering in a loop).
    e.hub
        .set_key(reg, "eWV0LWFub3RoZXIta2V5LW5vdC10aGUtZGV2aWNlcw==");
    e.hub.kick(reg, "test");
    wait(&b, "the refusal logged", Duration::from_secs(20), || {
        b.log_text()
            .contains("check the key, certificate and clock")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(e.hub.registrations(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_device_connects_with_its_certificate() {
    let e = env_with(|_| {}).await;
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&e.pki.client_cert)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let thumb: String = text
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .replace(':', "")
        .to_ascii_lowercase();
    e.hub.add_x509_device("dev-x", &thumb);
    let b = e.bridge_with(
        &format!(
            "host_name = \"{HOST}\"\ndevice_id = \"dev-x\"\nx509 = {{ cert_file = \"{}\", key_file = \"{}\" }}\n",
            e.pki.client_cert.display(),
            e.pki.client_key.display()
        ),
        "",
    );
    wait(
        &b,
        "the X.509 device online",
        Duration::from_secs(20),
        || (e.hub.reported("dev-x")["pantavisor"]["bridge"]["version"].is_string()).then_some(()),
    )
    .await;
    // Without the certificate registered, the hub refuses it.
    e.hub.add_x509_device("dev-x", &"0".repeat(64));
    e.hub.kick("dev-x", "test");
    wait(&b, "the refusal", Duration::from_secs(20), || {
        b.log_text()
            .contains("refused the credentials")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_backs_off_and_a_fixed_file_recovers() {
    let e = env_with(|_| {}).await;
    let wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    std::fs::write(
        &e.conn_file,
        format!("HostName={HOST};DeviceId=dev-1;SharedAccessKey={wrong}"),
    )
    .unwrap();
    let b = e.bridge("");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let refused = e
        .hub
        .refusals()
        .iter()
        .filter(|r| r.contains("signature mismatch"))
        .count();
    assert!(
        (2..=6).contains(&refused),
        "{refused} attempts in 8 s: {:?}",
        e.hub.refusals()
    );
    let log = b.log_text();
    assert!(log.contains("refused the credentials"), "{log}");
    assert!(
        !log.contains(wrong) && !log.contains(KEY),
        "a key in the log:\n{log}"
    );
    // Credentials are read on every connection: fixing the file is enough.
    std::fs::write(&e.conn_file, e.hub.add_device("dev-1", KEY)).unwrap();
    e.connected(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_and_mqtt_run_together_with_azure_owning_updates() {
    let e = env_with(|c| c.log_rate = 10.0).await;
    let broker = mosquitto::Broker::start(e.d.dir.path(), "");
    let mqtt = format!(
        "[[backend]]\ntype = \"mqtt\"\nname = \"plant\"\ndevice_id = \"dev-1\"\nbroker = \"mqtt://127.0.0.1:{}\"\nupdates = false\n",
        broker.port
    );
    let b = e.bridge_with(
        &format!(
            "connection_string_file = \"{}\"\npriority = 10\n",
            e.conn_file.display()
        ),
        &mqtt,
    );
    e.connected(&b).await;
    mosquitto::wait_for("MQTT status online", Duration::from_secs(15), || {
        mosquitto::retained(broker.port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;
    // Both backends' health is in the twin.
    wait(
        &b,
        "both backends in the twin",
        Duration::from_secs(15),
        || {
            (e.reported()["pantavisor"]["bridge"]["backends"]["plant"]["connected"] == true)
                .then_some(())
        },
    )
    .await;
    let rev = e.revision("az1", b"from azure", json!({}), false).await;
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    assert_eq!(e.ack(&b, "revision", v, final_ack).await["ac"], 200);
    mosquitto::wait_for(
        "the new revision in MQTT's status",
        Duration::from_secs(15),
        || {
            mosquitto::retained(broker.port, "pv/dev-1/status")
                .filter(|s| s["revision"] == "locals/az1")
        },
    )
    .await;
    let v = e
        .hub
        .update_desired("dev-1", json!({"userMeta": {"from-azure": "1"}}))
        .unwrap();
    mosquitto::publish(
        broker.port,
        "pv/dev-1/meta/user/set",
        &json!({"v": 1, "version": 1, "data": {"from-mqtt": "2"}}).to_string(),
        true,
    );
    e.ack(&b, "userMeta", v, |a| a["ac"] == 200).await;
    common::eventually(Duration::from_secs(15), "user-meta from both", || async {
        let m = e.d.pv.meta(pv_bridge::pvctrl::Meta::User).await.ok()?;
        (m.get("from-azure") == Some(&json!("1")) && m.get("from-mqtt") == Some(&json!("2")))
            .then_some(())
    })
    .await;
    // Logs go to both.
    wait(&b, "logs on the hub", Duration::from_secs(20), || {
        (!e.hub.d2c("dev-1").is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_lost_answers_duplicates_and_c2d() {
    let e = env_with(|_| {}).await;
    // The first three twin requests are throttled, the next one is lost.
    e.hub.fail_twin(429, 3);
    e.hub.drop_twin_responses(1);
    e.hub.duplicate_desired(true);
    let b = e.bridge("request_timeout_secs = 2\n");
    e.connected(&b).await;
    let log = b.log_text();
    assert!(log.contains("twin GET refused; asking again"), "{log}");
    assert!(
        log.contains("no answer to the twin GET; asking again")
            || log.contains("no answer to a reported patch"),
        "{log}"
    );
    // Duplicated desired notifications are applied once.
    let v = e
        .hub
        .update_desired("dev-1", json!({"userMeta": {"k": "v"}}))
        .unwrap();
    assert_eq!(e.ack(&b, "userMeta", v, final_ack).await["ac"], 200);
    // The second copy arrives right after the first: give it time, then count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        b.log_text().matches("desired userMeta").count(),
        1,
        "{}",
        b.log_text()
    );
    // A cloud-to-device message is completed (PUBACK: over MQTT it cannot be
    // rejected), and the log says what came and that it is not acted on, without
    // its body.
    e.hub.send_c2d(
        "dev-1",
        b"hello device secret-body",
        &[("kind", "note"), ("$.mid", "msg-42")],
    );
    let line = wait(
        &b,
        "the C2D message completed",
        Duration::from_secs(10),
        || {
            let log = b.log_text();
            let line = log
                .lines()
                .find(|l| l.contains("does not act on C2D messages"))?
                .to_owned();
            (e.hub.c2d_pending("dev-1") == 0).then_some(line)
        },
    )
    .await;
    assert!(line.contains("msg-42") && line.contains("kind"), "{line}");
    assert!(!b.log_text().contains("secret-body"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_individual_enrollment_and_a_key_derived_on_the_device() {
    for (reg, setting) in [
        ("indiv-1", "symmetric_key_file"),
        ("grp-dev-2", "group_key_file"),
    ] {
        let e = env_with(|_| {}).await;
        let group = "Z3JvdXAta2V5LWZvci10aGUtcHYtYnJpZGdlLWZsZWV0";
        let mut dps = DpsSetup {
            id_scope: "0ne00000B0B".into(),
            group_key: Some(group.into()),
            ..DpsSetup::default()
        };
        let key_file = e.d.dir.path().join("dps.key");
        if setting == "symmetric_key_file" {
            dps.individual
                .insert(reg.into(), "aW5kaXZpZHVhbC1lbnJvbGxtZW50LWtleQ==".into());
            std::fs::write(&key_file, "aW5kaXZpZHVhbC1lbnJvbGxtZW50LWtleQ==").unwrap();
        } else {
            std::fs::write(&key_file, group).unwrap();
        }
        e.hub.set_dps(dps);
        let b = e.bridge_with(
            &format!(
                "dps = {{ id_scope = \"0ne00000B0B\", registration_id = \"{reg}\", {setting} = \"{}\", connect_address = \"{}\" }}\n",
                key_file.display(),
                e.hub.mqtt_addr()
            ),
            "",
        );
        wait(
            &b,
            "the provisioned device online",
            Duration::from_secs(30),
            || {
                e.hub.reported(reg)["pantavisor"]["bridge"]["version"]
                    .is_string()
                    .then_some(())
            },
        )
        .await;
        assert_eq!(e.hub.registrations(), 1, "{setting}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sas_tokens_in_urls_stay_out_of_logs_and_acks() {
    let e = env_with(|_| {}).await;
    let b = e.bridge("");
    e.connected(&b).await;
    // A state URL with a Blob SAS that the store refuses (404).
    let mut rev = e.revision("sas", b"x", json!({}), false).await;
    rev["stateUrl"] = json!(
        e.objects
            .url("/states/missing.json?sv=2024-01-01&sig=SECRETSIGNATURE")
    );
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 400, "{a}");
    let ad = a["ad"].as_str().unwrap();
    // Named by host and a fingerprint: path and query may carry the secret.
    assert!(ad.contains("/…~") && !ad.contains("missing.json"), "{a}");
    assert!(!ad.contains("SECRETSIGNATURE"), "{a}");
    // The same with objectUrlTemplate (the adapter fetches the state itself).
    let mut rev = e.revision("sas2", b"y", json!({}), true).await;
    rev["stateUrl"] = json!(e.objects.url("/states/missing2.json?sig=SECRETSIGNATURE"));
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 400, "{a}");
    assert!(
        !a["ad"].as_str().unwrap().contains("SECRETSIGNATURE"),
        "{a}"
    );
    assert!(
        !b.log_text().contains("SECRETSIGNATURE"),
        "{}",
        b.log_text()
    );
    assert!(!e.reported().to_string().contains("SECRETSIGNATURE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_identity_has_its_own_twin_methods_and_messages() {
    let e = env_with(|c| c.log_rate = 10.0).await;
    let conn = e
        .hub
        .add_module("dev-1", "pvbridge", "bW9kdWxlLWtleS1mb3ItdGhlLWJyaWRnZQ==");
    std::fs::write(&e.conn_file, conn).unwrap();
    let b = e.bridge("");
    let id = "dev-1/pvbridge";
    wait(
        &b,
        "the module's first report",
        Duration::from_secs(20),
        || {
            e.hub.reported(id)["pantavisor"]["bridge"]["version"]
                .is_string()
                .then_some(())
        },
    )
    .await;
    // The device's own twin is untouched.
    assert_eq!(e.hub.reported("dev-1"), json!({"$version": 1}));
    match e
        .hub
        .invoke(id, "ping", Value::Null, Duration::from_secs(10))
        .await
    {
        Invoked::Answered { status, .. } => assert_eq!(status, 200),
        other => panic!("{other:?}"),
    }
    let v = e
        .hub
        .update_desired(id, json!({"userMeta": {"via": "module"}}))
        .unwrap();
    wait(
        &b,
        "the module's userMeta ack",
        Duration::from_secs(20),
        || {
            let a = e.hub.reported(id)["userMeta"].clone();
            (a["av"] == v && a["ac"] == 200).then_some(())
        },
    )
    .await;
    let m = wait(
        &b,
        "logs on the module's topic",
        Duration::from_secs(20),
        || e.hub.d2c(id).first().cloned(),
    )
    .await;
    assert!(
        m.topic
            .starts_with("devices/dev-1/modules/pvbridge/messages/events/"),
        "{}",
        m.topic
    );
}

/// The reported section is shared: another agent (Microsoft's Device Update
/// agent before pv-bridge took over, a person with the service SDK writing as the
/// device) may own members there. The bridge diffs only its own members, and a
/// patch the hub refuses does not lose the members it carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_members_of_others_stay_and_a_refused_patch_loses_nothing() {
    let e = env_with(|_| {}).await;
    e.hub.set_reported(
        "dev-1",
        json!({"deviceUpdate": {"__t": "c", "agent": {"state": 0}}, "site": "plant-7"}),
    );
    let b = e.bridge("");
    e.connected(&b).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = e.reported();
    assert_eq!(r["site"], "plant-7", "{r}");
    assert_eq!(r["deviceUpdate"]["agent"]["state"], 0, "{r}");
    // The next twin request fails once with 400: the ack it carries must still land.
    e.hub.fail_twin(400, 1);
    let v = e
        .hub
        .update_desired("dev-1", json!({"userMeta": "not an object"}))
        .unwrap();
    let a = e.ack(&b, "userMeta", v, final_ack).await;
    assert_eq!(a["ac"], 400, "{a}");
    assert!(
        b.log_text().contains("the hub refused a reported patch"),
        "{}",
        b.log_text()
    );
}

/// Objects may come with their size, as in MQTT offers: the engine then knows
/// what the update needs, and a size the bytes do not match ends it with an ack
/// that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_with_sizes_are_used_and_a_wrong_size_is_named() {
    let e = env_with(|_| {}).await;
    let b = e.bridge("");
    e.connected(&b).await;
    let data = b"sized object bytes".repeat(1000);
    let mut rev = e.revision("sized", &data, json!({}), false).await;
    let sha = common::sha256_hex(&data);
    let url = rev["objects"][&sha].clone();
    rev["objects"] = json!({ sha.clone(): {"url": url, "size": data.len()} });
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 200, "{a}");
    let reported = e.reported();
    assert_eq!(
        reported["pantavisor"]["update"]["bytesTotal"],
        json!(data.len()),
        "{reported}"
    );
    // The same shape with a size smaller than the object.
    let data = b"other sized bytes".repeat(1000);
    let mut rev = e.revision("small", &data, json!({}), false).await;
    let sha = common::sha256_hex(&data);
    let url = rev["objects"][&sha].clone();
    rev["objects"] = json!({ sha.clone(): {"url": url, "size": 100} });
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_ne!(a["ac"], 200, "{a}");
    let ad = a["ad"].as_str().unwrap();
    assert!(ad.contains("more than the 100 bytes offered"), "{a}");
    // A malformed size is refused before anything is fetched.
    let mut rev = e.revision("bad", b"x", json!({}), false).await;
    let sha = common::sha256_hex(b"x");
    rev["objects"] = json!({ sha: {"url": e.objects.url("/x"), "size": "big"} });
    let v = e
        .hub
        .update_desired("dev-1", json!({"revision": rev}))
        .unwrap();
    let a = e.ack(&b, "revision", v, final_ack).await;
    assert_eq!(a["ac"], 400, "{a}");
    assert!(
        a["ad"]
            .as_str()
            .unwrap()
            .contains("size must be a byte count"),
        "{a}"
    );
}
