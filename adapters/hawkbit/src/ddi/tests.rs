//! The shapes of the reference (hawkBit's own examples and goosebit's
//! observed answers, reference §3, §4, §6 and §8.8).

use super::*;

#[test]
fn polls_of_hawkbit_and_goosebit_are_read() {
    let hawkbit = br#"{"config": {"polling": {"sleep": "00:05:00"}},
        "_links": {
          "deploymentBase": {"href": "https://host/TENANT/controller/v1/CTRL/deploymentBase/5?c=-2127183556"},
          "installedBase": {"href": "https://host/TENANT/controller/v1/CTRL/installedBase/4"},
          "configData": {"href": "https://host/TENANT/controller/v1/CTRL/configData"}}}"#;
    let p = parse_poll(hawkbit).unwrap();
    assert_eq!(p.sleep, Some(Duration::from_secs(300)));
    assert_eq!(
        p.deployment.as_deref().and_then(action_id).as_deref(),
        Some("5")
    );
    assert!(p.config_data && p.cancel.is_none() && p.confirmation.is_none());

    let unregistered = br#"{"config":{"polling":{"sleep":"00:00:10"}},"_links":{"configData":{"href":"http://127.0.0.1:60053/DEFAULT/controller/v1/dev-1/configData"}}}"#;
    let p = parse_poll(unregistered).unwrap();
    assert_eq!(p.sleep, Some(Duration::from_secs(10)));
    assert!(p.config_data && p.deployment.is_none());

    let idle = br#"{"config":{"polling":{"sleep":"00:00:05"}},"_links":{}}"#;
    assert_eq!(
        parse_poll(idle).unwrap(),
        Poll {
            sleep: Some(Duration::from_secs(5)),
            ..Poll::default()
        }
    );
    let cancel =
        br#"{"_links":{"cancelAction":{"href":"http://h/T/controller/v1/c/cancelAction/11"}}}"#;
    let p = parse_poll(cancel).unwrap();
    assert_eq!(p.sleep, None);
    assert_eq!(
        p.cancel.as_deref().and_then(action_id).as_deref(),
        Some("11")
    );
    for bad in [&b"[]"[..], b"nope", b""] {
        assert!(parse_poll(bad).is_err());
    }
}

#[test]
fn sleep_is_hours_minutes_seconds() {
    assert_eq!(parse_sleep("12:00:00"), Some(Duration::from_secs(43200)));
    assert_eq!(parse_sleep("23:59:59"), Some(Duration::from_secs(86399)));
    assert_eq!(parse_sleep("00:00:30"), Some(Duration::from_secs(30)));
    for bad in [
        "", "5", "00:60:00", "00:00:60", "a:b:c", "1:2:3:4", "-1:00:00",
    ] {
        assert_eq!(parse_sleep(bad), None, "{bad}");
    }
}

#[test]
fn action_ids_come_from_the_link_path() {
    assert_eq!(
        action_id("http://h/T/controller/v1/c/deploymentBase/8?c=-1").as_deref(),
        Some("8")
    );
    assert_eq!(
        action_id("http://h/x/deploymentBase/-1").as_deref(),
        Some("-1")
    );
    assert_eq!(
        action_id("http://h/x/deploymentBase/a%2F..").as_deref(),
        None
    );
}

#[test]
fn a_hawkbit_deployment_is_read_with_its_strongest_hash_and_https_link() {
    let body = br#"{"id": "8",
     "deployment": {"download": "forced", "update": "attempt", "maintenanceWindow": "unavailable",
       "chunks": [{"part": "os", "version": "1.0.79", "name": "one Firmware", "encrypted": false,
         "metadata": [{"key": "aMetadataKey", "value": "v"}],
         "artifacts": [{"filename": "binary.tgz",
           "hashes": {"sha1": "574cd34be20f75d101ed23518339cc38c5157bdb",
                      "md5": "a0637c1ccb9fd53e2ba6f45712516989",
                      "sha256": "498014801AAB66BE1D7FBEA56B1AA5959651B6FD710308E196A8C414029E7291"},
           "size": 13,
           "_links": {"download": {"href": "https://cdn/sm/24/artifacts/binary.tgz"},
                      "download-http": {"href": "http://cdn/sm/24/artifacts/binary.tgz"},
                      "md5sum": {"href": "https://cdn/binary.tgz.MD5SUM"}}}]}]},
     "actionHistory": {"status": "RUNNING", "messages": ["a", "b"]}}"#;
    let d = parse_deployment(body).unwrap().unwrap();
    assert_eq!(d.id, "8");
    assert_eq!(
        (d.download, d.update),
        (Handling::Forced, Handling::Attempt)
    );
    assert_eq!(d.window_open, Some(false));
    let a = &d.chunks[0].artifacts[0];
    assert_eq!(d.chunks[0].version, "1.0.79");
    assert_eq!(a.size, 13);
    assert_eq!(
        a.hashes.sha256.as_deref(),
        Some("498014801aab66be1d7fbea56b1aa5959651b6fd710308e196a8c414029e7291")
    );
    assert_eq!(
        a.href.as_deref(),
        Some("https://cdn/sm/24/artifacts/binary.tgz")
    );
}

#[test]
fn a_goosebit_deployment_and_nothing_due_are_read() {
    let body = br#"{"id":"1","deployment":{"download":"forced","update":"forced","chunks":[{"part":"os","version":"1.2.3","name":"test-1.2.3.swu","artifacts":[{"filename":"test-1.2.3.swu","hashes":{"sha1":"ec6c173c24d9749008516fc589c754cbf43488e2"},"size":1536,"_links":{"download":{"href":"http://127.0.0.1:60053/DEFAULT/controller/v1/dev-1/download"}}}]}]}}"#;
    let d = parse_deployment(body).unwrap().unwrap();
    assert_eq!(d.window_open, None);
    let a = &d.chunks[0].artifacts[0];
    assert_eq!(a.hashes.sha256, None);
    assert_eq!(
        a.hashes.sha1.as_deref(),
        Some("ec6c173c24d9749008516fc589c754cbf43488e2")
    );
    assert_eq!(parse_deployment(b"null").unwrap(), None);

    let http_only = br#"{"id":2,"deployment":{"chunks":[{"artifacts":[{"filename":"a.tgz","size":1,"hashes":{},"_links":{"download-http":{"href":"http://h/a"}}}]}]}}"#;
    let d = parse_deployment(http_only).unwrap().unwrap();
    assert_eq!(d.id, "2");
    assert_eq!(d.chunks[0].artifacts[0].href.as_deref(), Some("http://h/a"));
    assert_eq!((d.download, d.update), (Handling::Forced, Handling::Forced));
}

#[test]
fn a_broken_deployment_says_what_is_wrong() {
    for (body, want) in [
        (&br#"{"deployment":{"chunks":[]}}"#[..], "no id"),
        (br#"{"id":"1"}"#, "no `deployment`"),
        (br#"{"id":"1","deployment":{}}"#, "chunks must be an array"),
        (
            br#"{"id":"1","deployment":{"download":"now","chunks":[]}}"#,
            "skip, attempt or forced",
        ),
        (
            br#"{"id":"1","deployment":{"maintenanceWindow":"soon","chunks":[]}}"#,
            "available or unavailable",
        ),
        (
            br#"{"id":"1","deployment":{"chunks":[{"artifacts":[{"size":1}]}]}}"#,
            "no filename",
        ),
        (
            br#"{"id":"1","deployment":{"chunks":[{"artifacts":[{"filename":"a"}]}]}}"#,
            "has no size",
        ),
        (b"[1]", "not a JSON object"),
    ] {
        let e = parse_deployment(body).unwrap_err();
        assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
    }
}

#[test]
fn cancel_requests_name_the_action_to_stop() {
    assert_eq!(
        parse_cancel(br#"{"id": "11", "cancelAction": {"stopId": "11"}}"#).unwrap(),
        "11"
    );
    assert_eq!(parse_cancel(br#"{"id": 12}"#).unwrap(), "12");
    assert!(parse_cancel(br#"{"cancelAction": {}}"#).is_err());
}

#[test]
fn feedback_bodies_have_the_shape_both_servers_accept() {
    let f = feedback(
        "8",
        Execution::Proceeding,
        Finished::None,
        Some((2, 5)),
        &["Downloading artifact 2 of 5".into()],
        1_733_218_554_123,
    );
    assert_eq!(
        f,
        json!({"id": "8", "timestamp": 1_733_218_554_123u64,
               "status": {"execution": "proceeding",
                          "result": {"finished": "none", "progress": {"cnt": 2, "of": 5}},
                          "details": ["Downloading artifact 2 of 5"]}})
    );
    let long: Vec<String> = (0..30).map(|i| format!("{i}{}", "x".repeat(600))).collect();
    let f = feedback("8", Execution::Closed, Finished::Failure, None, &long, 0);
    let d = f["status"]["details"].as_array().unwrap();
    assert_eq!(d.len(), MAX_DETAILS);
    assert!(
        d.iter()
            .all(|l| l.as_str().unwrap().chars().count() <= MAX_DETAIL_CHARS)
    );
    assert_eq!(f["status"]["result"], json!({"finished": "failure"}));
    assert_eq!(
        config_data(&BTreeMap::from([(
            "hw_revision".to_owned(),
            "1.0".to_owned()
        )])),
        json!({"mode": "merge", "data": {"hw_revision": "1.0"}})
    );
}
