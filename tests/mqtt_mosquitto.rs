//! The MQTT adapter against a real mosquitto (Debian package `mosquitto`, started
//! here on a random loopback port), with operator actions done by `mosquitto_pub`
//! and `mosquitto_sub`. Everything the bridge publishes is checked against the
//! JSON Schemas in docs/schemas. A missing mosquitto fails these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
#[path = "common/mosquitto.rs"]
mod mosquitto;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::sha256_hex;
use mosquitto::{Bridge, Broker, Recorder, Sub, publish, publish_args, retained, wait_for};
use pv_bridge::pvctrl::Meta;
use pv_testkit::objects::ObjectServer;
use pv_testkit::sim::Generation;
use serde_json::{Value, json};

const ROOT: &str = "pv/dev-1";

/// The device's factory state with `app/root.squashfs` pointing at `sha`.
async fn state_with_root(d: &common::Device, sha: &str) -> Value {
    let mut state: Value = serde_json::from_slice(&d.pv.step("0").await.unwrap()).unwrap();
    state["app/root.squashfs"] = json!(sha);
    state
}

/// Publishes an offer, retained, on `revision/set`.
fn publish_offer(port: u16, offer: &Value) {
    publish(port, "pv/dev-1/revision/set", &offer.to_string(), true);
}

async fn online(port: u16) -> Value {
    wait_for("status online", Duration::from_secs(15), || {
        retained(port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_over_mosquitto_installs_and_the_last_will_reports_lost() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let srv = ObjectServer::start().await.unwrap();
    let mut bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    let log = || std::fs::read_to_string(d.dir.path().join("bridge.log")).unwrap_or_default();

    let status = online(broker.port).await;
    assert_eq!(
        (status["v"].as_u64(), status["state"].as_str()),
        (Some(1), Some("ready")),
        "{status}"
    );

    // A malformed offer is rejected on `events`; the bridge keeps working.
    let events = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "-t",
            "pv/dev-1/events",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(
        broker.port,
        "pv/dev-1/revision/set",
        r#"{"v":1,"id":"bad/id"}"#,
        false,
    );
    let out = tokio::task::block_in_place(|| events.wait_with_output()).unwrap();
    let ev: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", out.stdout, log()));
    assert_eq!(ev["kind"], "rejected");
    assert_eq!(ev["topic"], "pv/dev-1/revision/set");
    assert!(
        ev["reason"].as_str().unwrap().contains("must be 1 to 64"),
        "{ev}"
    );

    // A retained offer with a URL object installs.
    let root = b"app over mqtt".repeat(4000);
    let sha = sha256_hex(&root);
    srv.put("/o/root", root.clone());
    let state = state_with_root(&d, &sha).await;
    let offer = json!({"v": 1, "id": "m1", "state": state,
        "objects": {sha.clone(): {"url": srv.url("/o/root"), "size": root.len()}}});
    publish_offer(broker.port, &offer);
    let p = wait_for("UPDATED", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "UPDATED")
    })
    .await;
    assert_eq!(
        (p["id"].as_str(), p["rev"].as_str()),
        (Some("m1"), Some("locals/m1")),
        "{p}"
    );
    let cur = retained(broker.port, "pv/dev-1/revision/current").unwrap();
    assert_eq!(cur["rev"], "locals/m1");

    // kill -9: the broker publishes the last will, of this very session.
    let ready = retained(broker.port, "pv/dev-1/status").unwrap();
    let session = ready["session"]
        .as_u64()
        .expect("status carries its session");
    bridge.child.kill().unwrap();
    bridge.child.wait().unwrap();
    let lost = wait_for("LWT", Duration::from_secs(10), || {
        retained(broker.port, "pv/dev-1/status").filter(|s| s["state"] == "lost")
    })
    .await;
    assert_eq!(
        lost,
        json!({"v": 1, "online": false, "state": "lost", "session": session})
    );

    // Restarted, the retained offer of a finished update does not run again.
    drop(bridge);
    let mut bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    wait_for(
        "online again, naming the running revision",
        Duration::from_secs(15),
        || {
            retained(broker.port, "pv/dev-1/status")
                .filter(|s| s["online"] == true && s["revision"] == "locals/m1")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs =
        std::fs::read_to_string(d.storage().join("logs/locals/m1/pantavisor/pantavisor.log"))
            .unwrap_or_default()
            + &std::fs::read_to_string(d.storage().join("logs/0/pantavisor/pantavisor.log"))
                .unwrap_or_default();
    assert_eq!(
        runs.matches("processing command LOCAL_RUN \"locals/m1\"")
            .count(),
        1,
        "{}",
        log()
    );

    // A graceful stop says `offline`, not the last will's `lost`.
    let term = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -TERM {}", bridge.child.id()))
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::block_in_place(|| bridge.child.wait()).unwrap();
    assert_eq!(status.code(), Some(0), "{}", log());
    let bye = retained(broker.port, "pv/dev-1/status").unwrap();
    assert_eq!(
        (bye["online"].as_bool(), bye["state"].as_str()),
        (Some(false), Some("offline")),
        "{bye}"
    );
    let checked = mosquitto::check_published(ROOT, &rec.messages());
    assert!(checked >= 8, "only {checked} messages checked");
}

#[test]
fn the_schemas_refuse_what_the_protocol_forbids() {
    let bad = [
        (
            "status",
            json!({"v": 1, "online": true, "state": "sleeping"}),
        ),
        ("status", json!({"v": 1, "online": true, "state": "lost"})),
        (
            "logs",
            json!({"v": 1, "seq": 0, "dropped": 0, "records": []}),
        ),
        (
            "revision-progress",
            json!({"v": 1, "id": "x", "rev": "locals/x", "status": "DONE"}),
        ),
        (
            "revision-current",
            json!({"v": 1, "rev": "locals/x", "status": "DONE", "ts": "yesterday"}),
        ),
        (
            "cmd-response",
            json!({"v": 1, "id": "c1", "status": "maybe"}),
        ),
        ("revision-set", json!({"v": 1, "id": "bad/id", "state": {}})),
        (
            "revision-set",
            json!({"v": 1, "id": "a", "state": {}, "state_url": "https://x/s"}),
        ),
        ("meta-user-set", json!({"v": 2, "version": 1, "data": {}})),
    ];
    for (name, v) in bad {
        assert!(
            !mosquitto::validator(name).is_valid(&v),
            "docs/schemas/{name}.json accepts {v}"
        );
    }
    let good = [
        ("status", json!({"v": 1, "online": false, "state": "lost"})),
        (
            "revision-set",
            json!({"v": 1, "id": "a", "state_url": "https://x/s", "state_sha256": "0".repeat(64)}),
        ),
        (
            "cmd",
            json!({"v": 1, "id": "c-1", "args": {"enable": true}}),
        ),
    ];
    for (name, v) in good {
        assert!(
            mosquitto::validator(name).is_valid(&v),
            "docs/schemas/{name}.json refuses {v}"
        );
    }
}

/// Waits until the recorder saw a command answer with `status` on `suffix`.
async fn answer(rec: &Recorder, suffix: &str, status: &str) -> Value {
    wait_for(
        &format!("{status} on {suffix}"),
        Duration::from_secs(15),
        || {
            rec.json_on(suffix)
                .into_iter()
                .find(|v| v["status"] == status)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_inbound_message_is_rejected_on_events_and_the_bridge_keeps_working() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let mut bridge = Bridge::start(
        &d,
        d.dir.path(),
        broker.port,
        "",
        "max_payload_bytes = 4096",
    );
    online(broker.port).await;
    let big = format!(r#"{{"v":1,"id":"x","pad":"{}"}}"#, "x".repeat(5000));
    let cases: Vec<(&str, String, &str)> = vec![
        ("revision/set", "{not json".into(), "not JSON"),
        ("revision/set", "[1]".into(), "must be a JSON object"),
        (
            "revision/set",
            r#"{"v":1,"id":5}"#.into(),
            "\"id\" must be a string",
        ),
        (
            "revision/set",
            r#"{"v":2,"id":"a","state":{}}"#.into(),
            "unsupported protocol version",
        ),
        ("revision/set", r#"{"id":"a"}"#.into(), "missing \"v\""),
        ("revision/set", big.clone(), "the limit is 4096"),
        (
            "revision/set",
            r#"{"v":1,"id":"a","state":{},"objects":{"abc":{"url":"http://x/"}}}"#.into(),
            "is not a sha256",
        ),
        (
            "meta/user/set",
            r#"{"v":1,"version":"3","data":{}}"#.into(),
            "\"version\" must be a non-negative integer",
        ),
        (
            "meta/user/set",
            r#"{"v":1,"version":3,"data":[]}"#.into(),
            "\"data\" must be an object",
        ),
        ("meta/user/set", big.clone(), "the limit is 4096"),
        ("cmd/reboot", r#"{"v":1}"#.into(), "missing \"id\""),
        ("cmd/fly", r#"{"v":1,"id":"f1"}"#.into(), "unknown command"),
        ("cmd/ssh", r#"{"v":1,"id":"s1"}"#.into(), "ssh needs"),
        (
            "cmd/reboot",
            r#"{"v":1,"id":"r1","expires_at":"soon"}"#.into(),
            "is not an RFC 3339 time",
        ),
        ("cmd/ping", big, "the limit is 4096"),
    ];
    for (topic, payload, _) in &cases {
        publish(broker.port, &format!("{ROOT}/{topic}"), payload, false);
    }
    let events = wait_for("every rejection", Duration::from_secs(15), || {
        let ev = rec.json_on("/events");
        (ev.len() >= cases.len()).then_some(ev)
    })
    .await;
    for (i, (topic, _, reason)) in cases.iter().enumerate() {
        let ev = &events[i];
        assert_eq!(ev["kind"], "rejected", "{ev}");
        assert_eq!(ev["topic"], format!("{ROOT}/{topic}"), "{ev}");
        assert!(
            ev["reason"].as_str().unwrap().contains(reason),
            "case {i} ({topic}): {ev} should say {reason:?}"
        );
    }
    // A refused command with a usable id gets its answer too.
    let r = answer(&rec, "/cmd/ssh/res/s1", "rejected").await;
    assert!(r["reason"].as_str().unwrap().contains("ssh needs"), "{r}");
    answer(&rec, "/cmd/fly/res/f1", "rejected").await;

    // Still working: a ping is answered on the fallback topic (MQTT 3.1.1).
    publish(
        broker.port,
        &format!("{ROOT}/cmd/ping"),
        r#"{"v":1,"id":"p1"}"#,
        false,
    );
    answer(&rec, "/cmd/ping/res/p1", "successful").await;
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "the bridge exited"
    );
    let log = bridge.log_text();
    assert!(log.contains("rejected"), "{log}");
    mosquitto::check_published(ROOT, &rec.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_mqtt5_answer_on_the_response_topic_with_the_correlation_data() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let _bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "protocol = \"v5\"");
    online(broker.port).await;
    let replies = Sub::start(
        broker.port,
        &["-V", "5", "-t", "pv/dev-1/replies/#"],
        "%t|%D|%C|%p",
        2,
        15,
    );
    publish_args(
        broker.port,
        &[
            "-V",
            "5",
            "-t",
            "pv/dev-1/cmd/ping",
            "-m",
            r#"{"v":1,"id":"p5"}"#,
            "-D",
            "publish",
            "response-topic",
            "pv/dev-1/replies/42",
            "-D",
            "publish",
            "correlation-data",
            "req-42",
        ],
    );
    let lines = tokio::task::block_in_place(|| replies.collect());
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no reply: {lines:?}"));
    let parts: Vec<&str> = last.splitn(4, '|').collect();
    assert_eq!(
        parts[..3],
        ["pv/dev-1/replies/42", "req-42", "application/json"],
        "{lines:?}"
    );
    let v: Value = serde_json::from_str(parts[3]).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["status"].as_str()),
        (Some("p5"), Some("successful"))
    );
    assert!(mosquitto::validator("cmd-response").is_valid(&v), "{v}");
    // The answer went where it was asked for, not to the fallback topic.
    assert!(rec.json_on("/cmd/ping/res/p5").is_empty());

    // A Response Topic outside the device's reply prefix: not carried out, and
    // refused on the fallback topic (the device never publishes elsewhere).
    publish_args(
        broker.port,
        &[
            "-V",
            "5",
            "-t",
            "pv/dev-1/cmd/reboot",
            "-m",
            r#"{"v":1,"id":"r-out"}"#,
            "-D",
            "publish",
            "response-topic",
            "ops/replies/43",
        ],
    );
    let refused = answer(&rec, "/cmd/reboot/res/r-out", "rejected").await;
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("is not under \"pv/dev-1/replies/\""),
        "{refused}"
    );
    let requests = d.sim.as_ref().unwrap().requests();
    assert!(
        !requests.keys().any(|k| k.starts_with("POST /commands")),
        "a command reached the device: {requests:?}"
    );

    // Without a Response Topic, v5 answers on the fallback topic too.
    publish_args(
        broker.port,
        &[
            "-V",
            "5",
            "-t",
            "pv/dev-1/cmd/ping",
            "-m",
            r#"{"v":1,"id":"p6"}"#,
        ],
    );
    answer(&rec, "/cmd/ping/res/p6", "successful").await;
    mosquitto::check_published(ROOT, &rec.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_meta_set_and_unset_round_trip_to_pantavisor() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let _bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    online(broker.port).await;
    let set = json!({"v": 1, "version": 3, "data": {"app.mode": "eco", "app.level": 5}});
    assert!(mosquitto::validator("meta-user-set").is_valid(&set));
    publish(
        broker.port,
        "pv/dev-1/meta/user/set",
        &set.to_string(),
        true,
    );
    let applied = wait_for("meta/user version 3", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/meta/user").filter(|m| m["version"] == 3)
    })
    .await;
    assert_eq!(applied["data"]["app.mode"], "eco", "{applied}");
    let on_device = d.pv.meta(Meta::User).await.unwrap();
    assert_eq!(on_device.get("app.mode"), Some(&json!("eco")));
    // Pantavisor keeps text: a JSON number is stored as its digits.
    assert_eq!(on_device.get("app.level"), Some(&json!("5")));

    // A key left out of the next version is deleted on the device.
    let set = json!({"v": 1, "version": 4, "data": {"app.level": 6}});
    publish(
        broker.port,
        "pv/dev-1/meta/user/set",
        &set.to_string(),
        true,
    );
    let applied = wait_for("meta/user version 4", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/meta/user").filter(|m| m["version"] == 4)
    })
    .await;
    assert!(applied["data"].get("app.mode").is_none(), "{applied}");
    let on_device = d.pv.meta(Meta::User).await.unwrap();
    assert_eq!(on_device.get("app.mode"), None);
    assert_eq!(on_device.get("app.level"), Some(&json!("6")));

    // An empty retained message withdraws everything this backend set.
    publish(broker.port, "pv/dev-1/meta/user/set", "", true);
    wait_for("user-meta emptied", Duration::from_secs(15), || {
        let m = tokio::runtime::Handle::current().block_on(d.pv.meta(Meta::User));
        m.ok().filter(|m| m.get("app.level").is_none())
    })
    .await;
    mosquitto::check_published(ROOT, &rec.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca_and_a_client_certificate() {
    let d = common::start(Generation::Gen2).await;
    let pki = common::test_pki(&d.dir.path().join("pki"));
    let other = common::test_pki(&d.dir.path().join("other-pki"));
    let tls_port = mosquitto::free_port();
    let broker = Broker::start(
        d.dir.path(),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    );
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let tls = |ca: &std::path::Path, client: bool| {
        let mut s = format!(
            "broker = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\n",
            ca.display()
        );
        if client {
            s += &format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                pki.client_cert.display(),
                pki.client_key.display()
            );
        }
        s
    };

    // A broker certificate from another CA: refused, and the log says why.
    let wrong = d.dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let b = Bridge::start(&d, &wrong, 0, "", &tls(&other.ca, true));
    b.wait_log("a certificate error", Duration::from_secs(15), |log| {
        log.contains("MQTT connection lost") && log.contains("invalid peer certificate")
    })
    .await;
    drop(b);

    // No client certificate: the broker refuses the handshake.
    let nocert = d.dir.path().join("nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    let b = Bridge::start(&d, &nocert, 0, "", &tls(&pki.ca, false));
    b.wait_log("a refused handshake", Duration::from_secs(15), |log| {
        log.contains("MQTT connection lost")
    })
    .await;
    assert!(retained(broker.port, "pv/dev-1/status").is_none());
    drop(b);

    // The right CA and a client certificate: connected, and commands work.
    let bridge = Bridge::start(&d, d.dir.path(), 0, "", &tls(&pki.ca, true));
    online(broker.port).await;
    publish(
        broker.port,
        &format!("{ROOT}/cmd/ping"),
        r#"{"v":1,"id":"t1"}"#,
        false,
    );
    answer(&rec, "/cmd/ping/res/t1", "successful").await;
    assert!(bridge.log_text().contains("connected"));
    assert!(
        broker.log_text().contains("as dev-1") || broker.log_text().contains("u'dev-1'"),
        "the broker knows the device by its certificate:\n{}",
        broker.log_text()
    );

    // check-config reads every TLS file and names the one that is wrong.
    let cfg = d.dir.path().join("bad-tls.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pantavisor]\nsocket = \"/nonexistent\"\n[[backend]]\ntype = \"mqtt\"\nname = \"p\"\ndevice_id = \"d\"\nbroker = \"mqtts://h\"\nclient_cert_file = \"{}\"\nclient_key_file = \"/nonexistent/key.pem\"\n",
            pki.client_cert.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pv-bridge"))
        .arg("check-config")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("client_key_file /nonexistent/key.pem"),
        "{err}"
    );
    mosquitto::check_published(ROOT, &rec.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_give_a_clear_error_and_a_bounded_reconnect_rate() {
    let d = common::start(Generation::Gen2).await;
    let pw = d.dir.path().join("passwd");
    let ok = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["dev-1", "right-secret"])
        .status()
        .expect("mosquitto_passwd (package mosquitto) is required");
    assert!(ok.success());
    let auth_port = mosquitto::free_port();
    let broker = Broker::start(
        d.dir.path(),
        &format!(
            "listener {auth_port} 127.0.0.1\npassword_file {}\nallow_anonymous false\n",
            pw.display()
        ),
    );
    let secret = d.dir.path().join("secret");
    std::fs::write(&secret, "wrong-secret\n").unwrap();
    let bridge = Bridge::start(
        &d,
        d.dir.path(),
        auth_port,
        "",
        &format!(
            "username = \"dev-1\"\npassword_file = \"{}\"\n",
            secret.display()
        ),
    );
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(9)).await;
    let log = bridge.log_text();
    let attempts = log.matches("MQTT connection lost").count();
    // Backoff 1, 2, 4 s (+ up to 25 % jitter): attempts near 0, 1, 3 and 7 s.
    // That schedule allows at most 6 attempts in the first minute.
    assert!(
        (3..=4).contains(&attempts),
        "{attempts} attempts in {:?}:\n{log}",
        t0.elapsed()
    );
    assert!(
        log.contains("NotAuthorized") || log.contains("BadUserNamePassword"),
        "the reason is named:\n{log}"
    );
    assert!(
        !log.contains("wrong-secret"),
        "the password leaked into the log"
    );

    // The password file is read again on every attempt: fixing it is enough.
    std::fs::write(&secret, "right-secret\n").unwrap();
    wait_for("connected after the fix", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/status").filter(|s| s["online"] == true)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_arrives_in_sequenced_batches_that_count_what_was_dropped() {
    let d = common::start_with(Generation::Gen2, |c| c.log_rate = 2000.0).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/logs/#", d.dir.path());
    let _bridge = Bridge::start(
        &d,
        d.dir.path(),
        broker.port,
        "[logs]\npoll_interval_ms = 100\nrate_per_sec = 50\nburst = 50\n",
        "",
    );
    let batches = wait_for("log batches with drops", Duration::from_secs(20), || {
        let m = rec.messages();
        let dropped: u64 = m
            .iter()
            .filter_map(|(_, p)| serde_json::from_slice::<Value>(p).ok())
            .map(|v| v["dropped"].as_u64().unwrap_or(0))
            .sum();
        (m.len() >= 6 && dropped > 0).then_some(m)
    })
    .await;
    let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (topic, payload) in &batches {
        assert!(
            payload.len() <= 64 * 1024,
            "{topic}: {} bytes",
            payload.len()
        );
        let v: Value = serde_json::from_slice(payload).unwrap();
        for r in v["records"].as_array().unwrap() {
            assert_eq!(
                topic,
                &format!("{ROOT}/logs/{}", r["plat"].as_str().unwrap())
            );
        }
        seqs.entry(topic.clone())
            .or_default()
            .push(v["seq"].as_u64().unwrap());
    }
    for (topic, s) in &seqs {
        let expected: Vec<u64> = (s[0]..s[0] + s.len() as u64).collect();
        assert_eq!(s, &expected, "{topic}: seq must have no gaps");
    }
    assert_eq!(mosquitto::check_published(ROOT, &batches), batches.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_in_the_middle_of_a_download_loses_nothing() {
    let d = common::start(Generation::Gen2).await;
    let mut broker = Broker::start(d.dir.path(), "");
    let srv = ObjectServer::start().await.unwrap();
    // 2 MiB at 256 KiB/s: about 8 s of download.
    let _bridge = Bridge::start(
        &d,
        d.dir.path(),
        broker.port,
        "[updates]\nbandwidth_limit = 262144\n",
        "",
    );
    online(broker.port).await;
    let root: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sha = sha256_hex(&root);
    srv.put("/o/big", root.clone());
    let state = state_with_root(&d, &sha).await;
    let offer = json!({"v": 1, "id": "r1", "state": state,
        "objects": {sha.clone(): {"url": srv.url("/o/big"), "size": root.len()}}});
    publish_offer(broker.port, &offer);
    wait_for("DOWNLOADING with bytes", Duration::from_secs(15), || {
        retained(broker.port, "pv/dev-1/revision/progress")
            .filter(|p| p["status"] == "DOWNLOADING" && p["bytes_done"].as_u64() > Some(0))
    })
    .await;
    broker.restart();
    // The broker forgot everything; the bridge reconnects and reports again.
    let p = wait_for(
        "UPDATED after the broker restart",
        Duration::from_secs(40),
        || retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "UPDATED"),
    )
    .await;
    assert_eq!(p["bytes_done"], json!(root.len()), "{p}");
    // The download itself never stopped: one request for the object.
    let gets = srv.seen().iter().filter(|s| s.path == "/o/big").count();
    assert_eq!(gets, 1);
    let cur = retained(broker.port, "pv/dev-1/revision/current").unwrap();
    assert_eq!(cur["rev"], "locals/r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_with_the_wrong_sha_fails_the_update_and_nothing_runs() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let srv = ObjectServer::start().await.unwrap();
    let _bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    online(broker.port).await;
    let claimed = sha256_hex(b"what the state promises");
    srv.put("/o/x", b"something else entirely".to_vec());
    let state = state_with_root(&d, &claimed).await;
    let offer = json!({"v": 1, "id": "bad-sha", "state": state,
        "objects": {claimed.clone(): {"url": srv.url("/o/x")}}});
    assert!(mosquitto::validator("revision-set").is_valid(&offer));
    publish_offer(broker.port, &offer);
    let p = wait_for("a final failure", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| {
            p["id"] == "bad-sha"
                && ["WONTGO", "ERROR"].contains(&p["status"].as_str().unwrap_or(""))
        })
    })
    .await;
    assert!(p["status_msg"].as_str().unwrap().contains("hash to"), "{p}");
    let pvlog = std::fs::read_to_string(d.storage().join("logs/0/pantavisor/pantavisor.log"))
        .unwrap_or_default();
    assert!(!pvlog.contains("LOCAL_RUN"), "{pvlog}");
    assert!(
        d.pv.step("locals/bad-sha").await.is_err(),
        "nothing was installed"
    );
    mosquitto::check_published(ROOT, &rec.messages());
}

/// Answers `blob/get` with `mosquitto_pub -f`, as an operator tool would; the
/// first request for offset `drop_once` goes unanswered. Returns the requests seen.
fn chunk_responder(
    port: u16,
    dir: &std::path::Path,
    objects: std::collections::BTreeMap<String, Vec<u8>>,
    drop_once: u64,
) -> (Responder, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::BufRead;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "pv/dev-1/blob/get"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = sub.stdout.take().unwrap();
    let (dir, seen2) = (dir.to_owned(), seen.clone());
    std::thread::spawn(move || {
        let mut dropped = false;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let req: Value = serde_json::from_str(&line).unwrap();
            seen2.lock().unwrap().push(req.clone());
            let (sha, off, len) = (
                req["sha256"].as_str().unwrap().to_owned(),
                req["offset"].as_u64().unwrap(),
                req["length"].as_u64().unwrap(),
            );
            if off == drop_once && !dropped {
                dropped = true;
                continue;
            }
            let data = &objects[&sha][off as usize..(off + len) as usize];
            let f = dir.join(format!("chunk-{off}"));
            std::fs::write(&f, data).unwrap();
            publish_args(
                port,
                &[
                    "-t",
                    &format!("pv/dev-1/blob/{sha}/{off}"),
                    "-f",
                    f.to_str().unwrap(),
                ],
            );
        }
    });
    (Responder(sub), seen)
}

/// Stops the responder's `mosquitto_sub` (its reading thread then ends).
struct Responder(std::process::Child);

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_pulled_in_chunks_over_mqtt_install_and_a_lost_chunk_is_asked_again() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let _bridge = Bridge::start(
        &d,
        d.dir.path(),
        broker.port,
        "",
        "chunk_bytes = 65536\nchunk_timeout_secs = 1",
    );
    online(broker.port).await;
    let root: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let sha = sha256_hex(&root);
    let (_responder, seen) = chunk_responder(
        broker.port,
        d.dir.path(),
        [(sha.clone(), root.clone())].into(),
        65536,
    );
    let state = state_with_root(&d, &sha).await;
    let offer = json!({"v": 1, "id": "pulled", "state": state,
        "objects": {sha.clone(): {"size": root.len()}}});
    assert!(mosquitto::validator("revision-set").is_valid(&offer));
    publish_offer(broker.port, &offer);
    let p = wait_for("UPDATED", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress").filter(|p| p["status"] == "UPDATED")
    })
    .await;
    assert_eq!(p["bytes_total"], json!(root.len()), "{p}");
    let reqs = seen.lock().unwrap().clone();
    let offsets: Vec<u64> = reqs.iter().map(|r| r["offset"].as_u64().unwrap()).collect();
    // Four chunks (64 KiB, the last 3 392 bytes), the dropped one asked twice.
    let mut sorted = offsets.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 65536, 65536, 131072, 196608], "{reqs:?}");
    assert_eq!(reqs.last().unwrap()["length"], 65536, "{reqs:?}");
    let last = reqs.iter().find(|r| r["offset"] == 196608).unwrap();
    assert_eq!(last["length"], 200_000 - 196_608);
    assert!(
        d.pv.step("locals/pulled").await.is_ok(),
        "the revision was installed"
    );
    // A chunk-pull offer without a size cannot be pulled: refused up front.
    let bad = json!({"v": 1, "id": "nosize", "state": state, "objects": {sha.clone(): {}}});
    publish(
        broker.port,
        "pv/dev-1/revision/set",
        &bad.to_string(),
        false,
    );
    let ev = wait_for("rejection", Duration::from_secs(10), || {
        rec.json_on("/events").into_iter().next()
    })
    .await;
    assert!(
        ev["reason"].as_str().unwrap().contains("needs the size"),
        "{ev}"
    );
    mosquitto::check_published(ROOT, &rec.messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_given_by_url_is_downloaded_checked_and_installed() {
    let d = common::start(Generation::Gen2).await;
    let broker = Broker::start(d.dir.path(), "");
    let rec = Recorder::start(broker.port, "pv/dev-1/#", d.dir.path());
    let srv = ObjectServer::start().await.unwrap();
    let _bridge = Bridge::start(&d, d.dir.path(), broker.port, "", "");
    online(broker.port).await;
    let root = b"state by url".repeat(1000);
    let sha = sha256_hex(&root);
    srv.put("/o/root", root.clone());
    let state = state_with_root(&d, &sha).await;
    let state_bytes = serde_json::to_vec_pretty(&state).unwrap();
    srv.put("/state.json", state_bytes.clone());

    // The wrong sha256 for the state: refused, nothing installed.
    let wrong = json!({"v": 1, "id": "s-bad", "state_url": srv.url("/state.json"),
        "state_sha256": sha256_hex(b"another state"),
        "objects": {sha.clone(): {"url": srv.url("/o/root"), "size": root.len()}}});
    assert!(mosquitto::validator("revision-set").is_valid(&wrong));
    publish_offer(broker.port, &wrong);
    let p = wait_for("WONTGO", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress")
            .filter(|p| p["id"] == "s-bad" && p["status"] == "WONTGO")
    })
    .await;
    assert!(p["status_msg"].as_str().unwrap().contains("hash to"), "{p}");
    assert!(d.pv.step("locals/s-bad").await.is_err());

    let good = json!({"v": 1, "id": "s-url", "state_url": srv.url("/state.json"),
        "state_sha256": sha256_hex(&state_bytes),
        "objects": {sha.clone(): {"url": srv.url("/o/root"), "size": root.len()}}});
    publish_offer(broker.port, &good);
    wait_for("UPDATED", Duration::from_secs(30), || {
        retained(broker.port, "pv/dev-1/revision/progress")
            .filter(|p| p["id"] == "s-url" && p["status"] == "UPDATED")
    })
    .await;
    // Installed byte for byte as served (the signature would cover these bytes).
    assert_eq!(d.pv.step("locals/s-url").await.unwrap(), state_bytes);
    mosquitto::check_published(ROOT, &rec.messages());
}
