use super::*;
use pv_adapter_api::LogRecord;

const CAP: usize = 1 << 20;

fn sha(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn topics() -> Topics {
    Topics::new("pv/<device_id>", "dev-1").unwrap()
}

fn offer(payload: &str) -> Result<RevisionSet, Rejected> {
    parse_revision_set("pv/dev-1/revision/set", payload.as_bytes(), CAP, None)
}

fn rejected(payload: &str) -> String {
    offer(payload).unwrap_err().reason
}

#[test]
fn topics_follow_the_root_template() {
    let t = topics();
    assert_eq!(t.status(), "pv/dev-1/status");
    assert_eq!(t.revision_set(), "pv/dev-1/revision/set");
    assert_eq!(t.logs("app"), "pv/dev-1/logs/app");
    assert_eq!(t.cmd_filter(), "pv/dev-1/cmd/+");
    assert_eq!(t.cmd_response("reboot", "c1"), "pv/dev-1/cmd/reboot/res/c1");
    assert_eq!(
        Topics::new("acme/pv/<device_id>", "d").unwrap().status(),
        "acme/pv/d/status"
    );
    assert_eq!(t.classify("pv/dev-1/revision/set"), Inbound::RevisionSet);
    assert_eq!(t.classify("pv/dev-1/meta/user/set"), Inbound::UserMetaSet);
    assert_eq!(
        t.classify("pv/dev-1/cmd/reboot"),
        Inbound::Command("reboot")
    );
    assert_eq!(t.classify("pv/dev-1/cmd/reboot/res/x"), Inbound::Other);
    assert_eq!(t.classify("pv/dev-2/revision/set"), Inbound::Other);
    for bad in ["pv/+/x", "$SYS/<device_id>", "pv//<device_id>", ""] {
        assert!(Topics::new(bad, "d").is_err(), "{bad}");
    }
    assert!(Topics::new("pv/<device_id>", "a/b").is_err());
}

#[test]
fn an_offer_keeps_the_state_bytes_and_its_sources() {
    let state = format!(
        r##"{{"#spec":"pantavisor-service-system@1", "app/root.squashfs":"{}", "bsp/kernel.img":"{}"}}"##,
        sha(1),
        sha(2)
    );
    let payload = format!(
        r#"{{"v":1,"id":"r1","state":{state},"objects":{{"{}":{{"url":"https://cdn/1","size":10}}}},"object_url_template":"https://cdn/o/{{sha256}}"}}"#,
        sha(1)
    );
    let RevisionSet::Offer(o) = offer(&payload).unwrap() else {
        panic!()
    };
    assert_eq!(o.id, "r1");
    assert_eq!(o.state, state.as_bytes(), "byte for byte, spacing included");
    assert_eq!(
        o.objects[&sha(1)].source,
        ObjectSource::Url {
            url: "https://cdn/1".into()
        }
    );
    assert_eq!(o.objects[&sha(1)].size, Some(10));
    assert_eq!(
        o.objects[&sha(2)].source,
        ObjectSource::Url {
            url: format!("https://cdn/o/{}", sha(2))
        },
        "the template fills in what objects does not list"
    );
    assert!(matches!(offer("").unwrap(), RevisionSet::Withdrawn));
}

#[test]
fn malformed_offers_are_rejected_precisely() {
    let s = sha(1);
    let cases = [
        ("not json", "not JSON"),
        ("[1]", "payload must be a JSON object"),
        (r#"{"id":"r1"}"#, "missing \"v\": 1"),
        (
            r#"{"v":2,"id":"r1"}"#,
            "unsupported protocol version \"v\": 2; this bridge speaks 1",
        ),
        (r#"{"v":1}"#, "missing \"id\""),
        (
            r#"{"v":1,"id":"a/b","state":{}}"#,
            "\"id\" \"a/b\" must be 1 to 64 of A-Z a-z 0-9 . _ -",
        ),
        (r#"{"v":1,"id":7}"#, "\"id\" must be a string"),
        (
            r#"{"v":1,"id":"r1"}"#,
            "missing \"state\" (or \"state_url\")",
        ),
        (
            r#"{"v":1,"id":"r1","state":"x"}"#,
            "\"state\" must be a JSON object",
        ),
        (
            r#"{"v":1,"id":"r1","state_url":"https://x"}"#,
            "\"state_url\" needs \"state_sha256\"",
        ),
        (
            r#"{"v":1,"id":"r1","state":{},"objects":[]}"#,
            "\"objects\" must be an object keyed by sha256",
        ),
        (
            r#"{"v":1,"id":"r1","state":{},"objects":{"abc":{}}}"#,
            "objects: key \"abc\" is not a sha256 (64 lower-case hex digits)",
        ),
        (
            r#"{"v":1,"id":"r1","state":{},"object_url_template":"ftp://x"}"#,
            "\"object_url_template\" must be an http(s) URL containing {sha256}",
        ),
    ];
    for (payload, want) in cases {
        let got = rejected(payload);
        assert!(got.starts_with(want), "{payload}: {got}");
    }
    let r = rejected(&format!(
        r#"{{"v":1,"id":"r1","state":{{}},"objects":{{"{s}":{{"url":"file:///etc/passwd"}}}}}}"#
    ));
    assert!(r.contains("is not an http or https URL"), "{r}");
    // The reason is logged and forwarded: never the URL's credentials.
    let r = rejected(&format!(
        r#"{{"v":1,"id":"r1","state":{{}},"objects":{{"{s}":{{"url":"ftp://user:s3cret@h/o"}}}}}}"#
    ));
    assert!(
        r.contains("(it starts \"ftp://\")") && !r.contains("s3cret"),
        "{r}"
    );
    let r = rejected(r#"{"v":1,"id":"r1","state_url":"sftp://u:s3cret@h/s","state_sha256":"00"}"#);
    assert!(!r.contains("s3cret"), "{r}");
    let r = rejected(&format!(
        r#"{{"v":1,"id":"r1","state":{{}},"objects":{{"{s}":{{"url":"https://x","size":"big"}}}}}}"#
    ));
    assert!(r.contains("size must be a byte count"), "{r}");
    let r = rejected(&format!(
        r#"{{"v":1,"id":"r1","state":{{}},"objects":{{"{s}":{{}}}}}}"#
    ));
    assert_eq!(r, format!("objects.{s} has no url"));
    let big = format!(r#"{{"v":1,"pad":"{}"}}"#, "x".repeat(100));
    let e = parse_revision_set("t", big.as_bytes(), 50, None).unwrap_err();
    assert!(
        e.reason.starts_with("payload is ") && e.reason.ends_with("the limit is 50"),
        "{}",
        e.reason
    );
}

#[test]
fn user_meta_and_commands_parse_strictly() {
    let t = "pv/d/meta/user/set";
    let ev = parse_user_meta_set(t, br#"{"v":1,"version":3,"data":{"k":"v","n":5}}"#, CAP).unwrap();
    let BackendEvent::UserMeta { version, data } = ev else {
        panic!()
    };
    assert_eq!((version, data.len()), (3, 2));
    let BackendEvent::UserMeta { data, .. } = parse_user_meta_set(t, b"", CAP).unwrap() else {
        panic!()
    };
    assert!(data.is_empty(), "an empty retained message withdraws");
    assert_eq!(
        parse_user_meta_set(t, br#"{"v":1,"data":{}}"#, CAP)
            .unwrap_err()
            .reason,
        "missing \"version\""
    );
    assert_eq!(
        parse_user_meta_set(t, br#"{"v":1,"version":1,"data":[]}"#, CAP)
            .unwrap_err()
            .reason,
        "\"data\" must be an object"
    );

    let c = "pv/d/cmd/ssh";
    let ev = parse_command(
        c,
        "ssh",
        br#"{"v":1,"id":"c1","args":{"enable":true},"expires_at":"2030-01-01T00:00:00Z"}"#,
        CAP,
    )
    .unwrap();
    let BackendEvent::Command {
        id,
        kind,
        expires_at,
    } = ev
    else {
        panic!()
    };
    assert_eq!(
        (id.as_str(), kind, expires_at),
        ("c1", CommandKind::SshOn, Some(1_893_456_000))
    );
    assert_eq!(
        parse_command(c, "ssh", br#"{"v":1,"id":"c1"}"#, CAP)
            .unwrap_err()
            .reason,
        "ssh needs \"args\": {\"enable\": true|false}"
    );
    assert_eq!(
        parse_command(c, "format-disk", br#"{"v":1,"id":"c1"}"#, CAP)
            .unwrap_err()
            .reason,
        "unknown command \"format-disk\""
    );
    assert!(
        parse_command(
            c,
            "reboot",
            br#"{"v":1,"id":"c1","expires_at":"tomorrow"}"#,
            CAP
        )
        .unwrap_err()
        .reason
        .starts_with("\"expires_at\" \"tomorrow\" is not an RFC 3339 time")
    );
    assert_eq!(
        parse_command(c, "reboot", br#"{"v":1,"id":"a/b"}"#, CAP)
            .unwrap_err()
            .reason,
        "\"id\" must be a string of 1 to 64 characters without '/', '+', '#' or control characters"
    );
}

#[test]
fn published_payloads_carry_v1_and_rfc3339_times() {
    let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
    let s = status(true, "ready", Some("locals/r1"), "0.1.0", now, 42);
    assert_eq!(s["v"], 1);
    assert_eq!(s["session"], 42);
    assert_eq!(s["ts"], "2026-11-18T11:06:40.000Z");
    assert_eq!(
        last_will(42),
        json!({"v": 1, "online": false, "state": "lost", "session": 42})
    );
    let w = offer_refused(
        Some("m1"),
        "payload is 5000000 bytes; the limit is 1048576",
        now,
    );
    assert_eq!(
        (w["status"].as_str(), w["id"].as_str(), w["rev"].as_str()),
        (Some("WONTGO"), Some("m1"), Some("locals/m1"))
    );
    let c = capabilities(
        &Capabilities {
            version: "0.1.0",
            max_payload_bytes: 1 << 20,
            max_read_bytes: 16 << 20,
            chunk_bytes: 65536,
            response_topic_prefix: "pv/d/replies/",
        },
        now,
    );
    assert_eq!(c["protocol"], PROTOCOL);
    assert_eq!(c["limits"]["max_payload_bytes"], 1 << 20);
    assert_eq!(offer_id_of(br#"{"v":2,"id":"m9"}"#).as_deref(), Some("m9"));
    assert_eq!(offer_id_of(br#"{"id":"a/b"}"#), None);
    let r = Rejected {
        topic: "pv/d/revision/set".into(),
        reason: "missing \"id\"".into(),
    };
    let e = rejected_event(&r, now);
    assert_eq!(
        (e["kind"].as_str(), e["topic"].as_str()),
        (Some("rejected"), Some("pv/d/revision/set"))
    );
}

fn rejected_event(r: &Rejected, now: SystemTime) -> Value {
    super::rejected(r, now)
}

#[test]
fn log_batches_are_split_per_platform_under_64_kib_with_seq_and_dropped() {
    let rec = |plat: &str, i: usize| LogRecord {
        seq: 1000 + i as u64,
        tsec: 1_795_000_000,
        tnano: 0,
        lvl: "INFO".into(),
        plat: plat.into(),
        src: "lxc/console.log".into(),
        msg: format!("line {i} {}", "x".repeat(200)),
        rev: String::new(),
    };
    let mut recs: Vec<LogRecord> = (0..1000).map(|i| rec("app", i)).collect();
    recs.push(rec("pantavisor", 0));
    let mut seq = BTreeMap::new();
    let batches = log_batches(&recs, 7, &mut seq, 99);
    assert!(batches.len() > 3);
    let mut total = 0;
    for (i, (plat, payload)) in batches.iter().enumerate() {
        assert!(payload.len() <= MAX_LOG_BATCH, "{}", payload.len());
        let v: Value = serde_json::from_slice(payload).unwrap();
        total += v["records"].as_array().unwrap().len();
        assert_eq!(v["run"], 99);
        if i == 0 {
            assert_eq!(
                (plat.as_str(), v["dropped"].as_u64(), v["seq"].as_u64()),
                ("app", Some(7), Some(0))
            );
            // Each line carries its spool position: it does not restart with a run.
            assert_eq!(v["records"][0]["seq"], 1000);
        } else {
            assert_eq!(v["dropped"], 0);
        }
    }
    assert_eq!(total, 1001);
    let again = log_batches(&[rec("app", 0)], 0, &mut seq, 99);
    let v: Value = serde_json::from_slice(&again[0].1).unwrap();
    assert_eq!(
        v["seq"].as_u64(),
        Some(seq["app"] - 1),
        "seq continues across calls"
    );
}

#[test]
fn a_state_by_url_needs_its_sha256_and_an_inline_state_is_checked_against_one() {
    let s = sha(7);
    let RevisionSet::Offer(o) = offer(&format!(
        r#"{{"v":1,"id":"big","state_url":"https://h/s.json","state_sha256":"{s}","objects":{{"{s}":{{"url":"https://h/o","size":3}}}}}}"#
    ))
    .unwrap() else {
        panic!("withdrawn")
    };
    assert!(o.state.is_empty());
    assert_eq!(
        o.state_url,
        Some(StateUrl {
            url: "https://h/s.json".into(),
            sha256: s.clone()
        })
    );
    assert_eq!(
        rejected(r#"{"v":1,"id":"a","state_url":"https://h/s"}"#),
        "\"state_url\" needs \"state_sha256\""
    );
    assert!(
        rejected(r#"{"v":1,"id":"a","state_url":"ftp://h/s","state_sha256":"x"}"#)
            .contains("is not an http or https URL")
    );
    assert!(
        rejected(&format!(
            r#"{{"v":1,"id":"a","state":{{}},"state_url":"https://h/s","state_sha256":"{s}"}}"#
        ))
        .starts_with("give either")
    );
    assert!(
        rejected(&format!(
            r#"{{"v":1,"id":"a","state_url":"https://h/s","state_sha256":"{s}","object_url_template":"https://h/{{sha256}}"}}"#
        ))
        .contains("needs the state inline")
    );
    // Inline state with a sha256: the exact bytes are hashed (sha256sum of them).
    let state = r##"{"#spec":"pantavisor-service-system@1"}"##;
    let real = "fd138f7751b12a533d8b0e60c32bfae17be25a4206166973135cd7fa1d8b3760";
    let r = rejected(&format!(
        r#"{{"v":1,"id":"a","state":{state},"state_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}}"#
    ));
    assert_eq!(
        r,
        format!(
            "the inline state hashes to {real}, not \"state_sha256\" 0000000000000000000000000000000000000000000000000000000000000000"
        )
    );
    let RevisionSet::Offer(o) = offer(&format!(
        r#"{{"v":1,"id":"a","state":{state},"state_sha256":"{real}"}}"#
    ))
    .unwrap() else {
        panic!("withdrawn")
    };
    assert_eq!(o.state, state.as_bytes());
}
