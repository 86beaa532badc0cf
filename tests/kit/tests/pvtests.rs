//! The `pv-sim` binary driven with `curl --unix-socket`, the client Pantacor's own
//! `pvcontrol` uses. Each test encodes the golden behaviour of a pvtest from
//! meta-pantavisor (`recipes-pv/pantavisor-pvtests/files/local/...`) cited in the
//! pv-ctrl reference, plus the wire quirks of both server generations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

// --- local/control/basic-endpoints(-curl) ---------------------------------------

#[test]
fn basic_endpoints() {
    let s = PvSim::start(&[]);
    let r = s.curl(&[&u("/containers")]);
    assert_eq!(r.code, 200);
    // Fields in Pantavisor's order.
    assert!(
        r.body.contains(r#"{"name":"pv-bridge","group":"platform","status":"STARTED","status_goal":"READY","restart_policy":"container","roles":["mgmt"]"#),
        "{}",
        r.body
    );
    let groups = s.curl(&[&u("/groups")]).json();
    assert_eq!(
        groups[3],
        json!({"name": "app", "status_goal": "STARTED", "restart_policy": "container", "status": "READY",
               "auto_recovery": {"max_retries": 5, "stable_timeout": 30, "backoff_policy": "reboot"}})
    );
    assert_eq!(
        groups[0],
        json!({"name": "data", "status_goal": "MOUNTED", "restart_policy": "system", "status": "READY"})
    );
    assert_eq!(s.curl(&[&u("/user-meta")]).json(), json!({}));
    let dm = s.curl(&[&u("/device-meta")]).json();
    for (k, v) in [
        ("pantahub.claimed", "0"),
        ("pantahub.online", "0"),
        ("pantavisor.mode", "local"),
        ("pantavisor.revision", "0"),
        ("pantavisor.status", "READY"),
    ] {
        assert_eq!(dm[k], json!(v), "{k}");
    }
    for k in [
        "storage",
        "interfaces",
        "sysinfo",
        "time",
        "pantavisor.uname",
    ] {
        assert!(dm[k].is_object(), "{k} is embedded JSON: {dm}");
    }
    let steps = s.curl(&[&u("/steps")]);
    assert!(
        steps.body.starts_with(r#"[{"name":"0", "date":""#),
        "{}",
        steps.body
    );
    assert!(
        steps.body.ends_with(r#""commitmsg":"", "progress":{"status":"DONE","status-msg":"Factory revision","progress":100,"retries":0}}]"#),
        "{}",
        steps.body
    );
    let objects = s.curl(&[&u("/objects")]).json();
    assert_eq!(objects.as_array().unwrap().len(), 9, "factory objects");
    assert!(
        objects[0]["size"].is_string(),
        "size is a string: {}",
        objects[0]
    );
    let conf = s.curl(&[&u("/config2")]);
    assert!(
        conf.body
            .contains(r#"{"key":"PV_CONTROL_REMOTE","value":"0","modified":"env"}"#),
        "{}",
        conf.body
    );
    assert!(s.curl(&[&u("/config")]).json().is_object());
}

// --- local/control/status-codes -----------------------------------------------

#[test]
fn status_codes() {
    let s = PvSim::start(&[]);
    assert_eq!(s.curl(&[&u("/buildinfo")]).code, 200);
    assert_eq!(s.curl(&[&u("/drivers")]).body, "{}");
    assert_eq!(s.curl(&["-X", "PUT", &u("/drivers/load")]).code, 200);
    assert_eq!(s.curl(&["-X", "PUT", &u("/drivers/unload")]).code, 200);
    let ct = "Content-Type: application/json";
    // From a container whose goal is STARTED, both signals are refused.
    for t in ["ready", "alive"] {
        let body = format!(r#"{{"type":"{t}","payload":""}}"#);
        let r = curl(
            &s.app_sock(),
            &["-X", "POST", "-H", ct, "--data", &body, &u("/signal")],
        );
        assert_eq!(
            (r.code, r.body.as_str()),
            (500, r#"{"Error":"Signal not expected from this platform"}"#)
        );
    }
    // The bridge's goal is READY: ready is accepted, alive is not.
    let r = s.curl(&[
        "-X",
        "POST",
        "-H",
        ct,
        "--data",
        r#"{"type":"ready","payload":""}"#,
        &u("/signal"),
    ]);
    assert_eq!(r.code, 200);
    let r = s.curl(&["-X", "POST", "--data", r#"{"payload":""}"#, &u("/signal")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Signal has bad format"}"#)
    );
    // One command slot: retry on 503 until it frees, as the pvtest does.
    let mut saw_busy = false;
    for op in ["RUN_GC", "ENABLE_SSH", "DISABLE_SSH"] {
        let body = format!(r#"{{"op":"{op}","payload":""}}"#);
        let mut code = 0;
        for _ in 0..100 {
            let r = s.curl(&["-X", "POST", "-H", ct, "--data", &body, &u("/commands")]);
            code = r.code;
            if code != 503 {
                break;
            }
            saw_busy = true;
            assert_eq!(
                r.body,
                r#"{"Error":"A command is already in progress. Try again"}"#
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(code, 200, "{op}");
    }
    assert!(
        saw_busy,
        "back-to-back commands hit the busy slot at least once"
    );
    let r = s.curl(&[
        "-i",
        "-X",
        "POST",
        "--data",
        r#"{"op":"RUN_GC","payload":""}"#,
        &u("/commands"),
    ]);
    let r2 = s.curl(&[
        "-i",
        "-X",
        "POST",
        "--data",
        r#"{"op":"RUN_GC","payload":""}"#,
        &u("/commands"),
    ]);
    let busy = if r.code == 503 { &r } else { &r2 };
    assert!(busy.body.contains("Retry-After: 120"), "{busy:?}");
    let r = s.curl(&[
        "-X",
        "POST",
        "--data",
        r#"{"op":"RUN_GC"}"#,
        &u("/commands"),
    ]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Command has bad format"}"#)
    );
    let r = s.curl(&["-X", "POST", &u("/commands")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"No command found"}"#)
    );
    let r = s.curl(&[
        "-X",
        "POST",
        "--data",
        r#"{"op":"UNCLAIM","payload":""}"#,
        &u("/commands"),
    ]);
    assert_eq!((r.code, r.body.as_str()), (204, ""));
}

// --- local/runtime/objects-crud ----------------------------------------------------

#[test]
fn objects_crud() {
    let s = PvSim::start(&[]);
    let dir = s.dir.path();
    let count = || s.curl(&[&u("/objects")]).json().as_array().unwrap().len();
    let initial = count();
    let small = dir.join("small.txt");
    std::fs::write(&small, "hello pvctrl object test\n").unwrap();
    let sha_small = sha256(b"hello pvctrl object test\n");
    let r = s.curl(&[
        "-X",
        "PUT",
        "-T",
        small.to_str().unwrap(),
        &u(&format!("/objects/{sha_small}")),
    ]);
    assert_eq!(r.code, 200);
    let large = dir.join("large.bin");
    let data = vec![b'x'; 2 * 1024 * 1024];
    std::fs::write(&large, &data).unwrap();
    let sha_large = sha256(&data);
    // Chunked upload, as pvcontrol's large-object path does.
    let r = s.curl(&[
        "-X",
        "PUT",
        "-H",
        "Transfer-Encoding: chunked",
        "-T",
        large.to_str().unwrap(),
        &u(&format!("/objects/{sha_large}")),
    ]);
    assert_eq!(r.code, 200);
    assert_eq!(count(), initial + 2);
    let dl = dir.join("dl.bin");
    let r = s.curl(&[
        "-o",
        dl.to_str().unwrap(),
        &u(&format!("/objects/{sha_large}")),
    ]);
    assert_eq!(r.code, 200);
    assert_eq!(
        sha256(&std::fs::read(&dl).unwrap()),
        sha_large,
        "download integrity"
    );
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "checksum mismatch payload\n").unwrap();
    let r = s.curl(&[
        "-X",
        "PUT",
        "-T",
        bad.to_str().unwrap(),
        &u(&format!("/objects/{}", "a".repeat(64))),
    ]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (422, r#"{"Error":"Object has bad checksum"}"#)
    );
    let before = count();
    let r = s.curl(&[
        "-X",
        "PUT",
        "-T",
        small.to_str().unwrap(),
        &u(&format!("/objects/{sha_small}")),
    ]);
    assert_eq!(r.code, 200);
    assert_eq!(count(), before, "duplicate put is idempotent");
    let r = s.curl(&[&u("/objects/short")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Request has bad object name"}"#)
    );
}

// --- local/runtime/steps-rw -------------------------------------------------------

#[test]
fn steps_read_write() {
    let s = PvSim::start(&[]);
    let state = s.curl(&[&u("/steps/0")]).json();
    let keys: Vec<&String> = state.as_object().unwrap().keys().collect();
    assert!(keys.contains(&&"#spec".to_string()) && keys.contains(&&"bsp/run.json".to_string()));
    assert!(
        keys.contains(&&"pv-bridge/run.json".to_string())
            && keys.contains(&&"app/run.json".to_string())
    );
    let r = s.curl(&[&u("/steps/0/progress")]);
    assert_eq!(
        r.body,
        r#"{"status":"DONE","status-msg":"Factory revision","progress":100,"retries":0}"#
    );
    let current = s.curl(&[&u("/steps/current")]);
    assert_eq!(current.json(), state);
    let file = s.dir.path().join("state.json");
    std::fs::write(&file, &current.body).unwrap();
    let r = s.curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &format!("@{}", file.display()),
        &u("/steps/locals/test-put-rev"),
    ]);
    assert_eq!(r.code, 200);
    let r = s.curl(&[
        "-X",
        "PUT",
        "--data",
        "test put",
        &u("/steps/locals/test-put-rev/commitmsg"),
    ]);
    assert_eq!(r.code, 200);
    let steps = s.curl(&[&u("/steps")]).json();
    let mut names: Vec<&str> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["0", "locals/test-put-rev"]);
    assert_eq!(steps[0]["commitmsg"], json!("test put"));
    // Errors of reference §2.6, typos included.
    let r = s.curl(&[
        "-X",
        "PUT",
        "--data",
        "{}",
        &u(&format!("/steps/locals/{}", "x".repeat(65))),
    ]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Request has bas step name"}"#)
    );
    let r = s.curl(&["-X", "PUT", "--data", "[]", &u("/steps/locals/junk")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (422, r#"{"Error":"Parser: State JSON has bad format"}"#)
    );
    assert_eq!(
        s.curl(&[&u("/steps/locals/junk")]).code,
        404,
        "a refused step leaves no trail"
    );
    let r = s.curl(&["-X", "PUT", "--data", "{}", &u("/steps/5")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Method not supported for this endpoint"}"#)
    );
    let r = s.curl(&[
        "-X",
        "PUT",
        "--data",
        &"m".repeat(300),
        &u("/steps/0/commitmsg"),
    ]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (507, r#"{"Error":"Not enough disk space available"}"#)
    );
}

// --- local/services/metadata-crud -----------------------------------------------

#[test]
fn metadata_crud() {
    let s = PvSim::start(&[]);
    for (meta, missing) in [
        ("device-meta", "Device meta does not exist"),
        ("user-meta", "User meta does not exist"),
    ] {
        let key = u(&format!("/{meta}/test-key"));
        assert_eq!(
            s.curl(&["-X", "PUT", "--data", "test-value-123", &key])
                .code,
            200
        );
        assert_eq!(
            s.curl(&[&u(&format!("/{meta}"))]).json()["test-key"],
            json!("test-value-123")
        );
        assert_eq!(
            s.curl(&["-X", "PUT", "--data", "updated-value-456", &key])
                .code,
            200
        );
        assert_eq!(
            s.curl(&[&u(&format!("/{meta}"))]).json()["test-key"],
            json!("updated-value-456")
        );
        assert_eq!(s.curl(&["-X", "DELETE", &key]).code, 200);
        assert!(
            s.curl(&[&u(&format!("/{meta}"))])
                .json()
                .get("test-key")
                .is_none()
        );
        let r = s.curl(&["-X", "DELETE", &u(&format!("/{meta}/nonexistent-key-xyz"))]);
        assert_eq!(
            (r.code, r.body),
            (404, format!(r#"{{"Error":"{missing}"}}"#))
        );
        let word = meta.replace('-', " ");
        let r = s.curl(&["-X", "PUT", "-H", "Content-Length: 0", &key]);
        assert_eq!(
            (r.code, r.body),
            (400, format!(r#"{{"Error":"Cannot add or update {word}"}}"#))
        );
        let r = s.curl(&["-X", "PUT", "--data", &"v".repeat(5000), &key]);
        assert_eq!(r.code, 507);
    }
    // Keys with a dot reach the container they name.
    assert_eq!(
        s.curl(&["-X", "PUT", "--data", "blue", &u("/user-meta/app.color")])
            .code,
        200
    );
    assert_eq!(
        std::fs::read_to_string(s.storage().join("run/user-meta.app/color")).unwrap(),
        "blue"
    );
}

// --- local/security/container-roles ---------------------------------------------

#[test]
fn container_roles_and_log_tree() {
    let s = PvSim::start(&[]);
    let r = curl(&s.app_sock(), &[&u("/containers")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (403, r#"{"Error":"Request not sent from a mgmt platform"}"#)
    );
    let r = curl(&s.app_sock(), &[&u("/steps/0/progress")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (403, r#"{"Error":"Request not sent from mgmt platform"}"#)
    );
    let logs = s.storage().join("logs");
    wait_for("container logs", Duration::from_secs(5), || {
        logs.join("0/app/lxc/console.log").exists()
            && logs.join("0/pv-bridge/var/log/syslog").exists()
    });
    assert_eq!(
        std::fs::read_link(logs.join("current")).unwrap(),
        Path::new("0")
    );
    assert!(logs.join("0/pv-bridge/lxc/lxc.log").exists());
    let pvlog = std::fs::read_to_string(logs.join("0/pantavisor/pantavisor.log")).unwrap();
    let first = pvlog.lines().next().unwrap();
    assert!(first.starts_with("[pantavisor] "), "{first}");
    assert!(
        first.contains(" INFO\t -- [pantavisor]: booted revision 0"),
        "{first}"
    );
    // Logs grow at --log-rate (50 lines/s here).
    let size = || {
        std::fs::metadata(logs.join("0/app/lxc/console.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let before = size();
    wait_for("log growth", Duration::from_secs(5), || size() > before);
    // Split metadata directories, as a mgmt container sees them.
    assert!(
        s.storage()
            .join("run/device-meta.pantavisor/revision")
            .exists()
    );
}

// --- wire quirks ---------------------------------------------------------------------

#[test]
fn gen2_routing_and_host_quirks() {
    let s = PvSim::start(&[]);
    let r = s.curl(&[&u("/containers?all=1")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"unknown endpoint: /containers?all=1"}"#)
    );
    let r = s.curl(&["-X", "DELETE", &u("/containers")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Method not supported for this endpoint"}"#)
    );
    // Another Host: the connection is closed without a word.
    let r = s.curl(&["-H", "Host: example.com", &u("/containers")]);
    assert_eq!(r.exit, 52, "curl: empty reply from server");
    let r = s.curl(&["-H", "Host: localhost:80", &u("/containers")]);
    assert_eq!(r.code, 200, "a port suffix is stripped");
    let r = s.curl(&["-i", &u("/user-meta")]);
    assert!(
        r.body
            .starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"),
        "{:?}",
        r.body
    );
    let r = s.curl(&[
        "-i",
        &u(&format!(
            "/objects/{}",
            sha256(b"greeting=hello from the factory\n")
        )),
    ]);
    assert!(
        r.body.contains("Transfer-Encoding: chunked"),
        "{:?}",
        r.body
    );
    // An empty PUT on a wildcard route that waits for data never gets an answer.
    let r = curl(
        &s.sock(),
        &[
            "--max-time",
            "1",
            "-X",
            "PUT",
            "-H",
            "Content-Length: 0",
            &u("/steps/0/commitmsg"),
        ],
    );
    assert_eq!(r.exit, 28, "curl: timed out");
}

#[test]
fn gen1_wire_format() {
    let s = PvSim::start(&["--generation", "1"]);
    let r = s.curl(&["-i", &u("/user-meta")]);
    assert_eq!(r.body, "HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}");
    let r = s.curl(&["-i", "-X", "PUT", "--data", "v", &u("/user-meta/k")]);
    assert_eq!(r.body, "HTTP/1.1 200 OK\r\n\r\n");
    let r = s.curl(&["-i", "-X", "DELETE", &u("/user-meta/none")]);
    assert!(
        r.body.starts_with("HTTP/1.1 404 Not Found \r\nContent-Length: 36\r\nContent-Type: application/json; charset=utf-8\r\n\r\n{\"Error\":\"User meta does not exist\"}"),
        "{:?}",
        r.body
    );
    let r = s.curl(&[&u("/daemons")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Unknown endpoint"}"#)
    );
    // At most 8 headers.
    let mut args: Vec<String> = (0..8)
        .map(|i| format!("X-H{i}: v"))
        .flat_map(|h| ["-H".to_string(), h])
        .collect();
    args.push(u("/containers"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = s.curl(&refs);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Request has bad format"}"#)
    );
    let r = curl(&s.app_sock(), &[&u("/containers")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (403, r#"{"Error":"Request not sent from mgmt platform"}"#)
    );
}

// --- update life cycle and persistence ------------------------------------------

#[test]
fn curl_driven_reboot_update_and_socket_gap() {
    let s = PvSim::start(&[]);
    let kernel = s.dir.path().join("kernel");
    std::fs::write(&kernel, b"kernel v2").unwrap();
    let sha = sha256(b"kernel v2");
    assert_eq!(
        s.curl(&[
            "-X",
            "PUT",
            "-T",
            kernel.to_str().unwrap(),
            &u(&format!("/objects/{sha}"))
        ])
        .code,
        200
    );
    let mut state = s.curl(&[&u("/steps/current")]).json();
    state["bsp/kernel.img"] = json!(sha);
    assert_eq!(
        s.curl(&[
            "-X",
            "PUT",
            "--data",
            &state.to_string(),
            &u("/steps/locals/k2")
        ])
        .code,
        200
    );
    let r = s.curl(&[
        "-X",
        "POST",
        "--data",
        r#"{"op":"LOCAL_RUN","payload":"locals/k2"}"#,
        &u("/commands"),
    ]);
    assert_eq!(r.code, 200);
    // The socket disappears while the device reboots.
    wait_for("the reboot", Duration::from_secs(5), || {
        s.curl(&[&u("/containers")]).exit == 7
    });
    wait_for("DONE", Duration::from_secs(15), || {
        s.curl(&["-X", "POST", "--data", r#"{"type":"ready"}"#, &u("/signal")]);
        s.curl(&[&u("/steps/locals/k2/progress")])
            .body
            .contains(r#""status":"DONE""#)
    });
    assert_eq!(
        s.curl(&[&u("/device-meta")]).json()["pantavisor.revision"],
        json!("locals/k2")
    );
    assert_eq!(
        std::fs::read_link(s.storage().join("logs/current")).unwrap(),
        Path::new("locals/k2")
    );
}

#[test]
fn kill_dash_nine_loses_nothing() {
    let mut s = PvSim::start(&[]);
    let blob = s.dir.path().join("blob");
    std::fs::write(&blob, b"persistent object").unwrap();
    let sha = sha256(b"persistent object");
    s.curl(&[
        "-X",
        "PUT",
        "-T",
        blob.to_str().unwrap(),
        &u(&format!("/objects/{sha}")),
    ]);
    let mut state = s.curl(&[&u("/steps/current")]).json();
    state["app/root.squashfs"] = json!(sha);
    s.curl(&[
        "-X",
        "PUT",
        "--data",
        &state.to_string(),
        &u("/steps/locals/p1"),
    ]);
    s.curl(&[
        "-X",
        "PUT",
        "--data",
        "staged",
        &u("/steps/locals/p1/commitmsg"),
    ]);
    s.curl(&["-X", "PUT", "--data", "v1", &u("/user-meta/fleet")]);
    s.curl(&["-X", "PUT", "--data", "v2", &u("/device-meta/custom")]);
    let snapshot = |s: &PvSim| {
        (
            s.curl(&[&u("/steps")])
                .json()
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    (
                        x["name"].clone(),
                        x["commitmsg"].clone(),
                        x["progress"].clone(),
                    )
                })
                .collect::<Vec<_>>(),
            s.curl(&[&u("/objects")]).json(),
            s.curl(&[&u("/user-meta")]).json(),
            s.curl(&[&u("/device-meta")]).json()["custom"].clone(),
        )
    };
    let before = snapshot(&s);
    s.kill9_and_restart();
    assert_eq!(snapshot(&s), before);
    // Then run the staged revision to the end after another kill.
    let r = s.curl(&[
        "-X",
        "POST",
        "--data",
        r#"{"op":"LOCAL_RUN","payload":"locals/p1"}"#,
        &u("/commands"),
    ]);
    assert_eq!(r.code, 200);
    wait_for("UPDATED", Duration::from_secs(10), || {
        s.curl(&[&u("/steps/locals/p1/progress")])
            .body
            .contains("UPDATED")
    });
    s.kill9_and_restart();
    // After a power cut an UPDATED revision is tried again and commits.
    wait_for("DONE after the power cut", Duration::from_secs(10), || {
        s.curl(&["-X", "POST", "--data", r#"{"type":"ready"}"#, &u("/signal")]);
        s.curl(&[&u("/steps/locals/p1/progress")])
            .body
            .contains(r#""status":"DONE""#)
    });
}

// --- the remaining error texts of reference §2 --------------------------------------

#[test]
fn remaining_error_texts_gen2() {
    let s = PvSim::start(&[]);
    let put = |path: &str, body: &str| s.curl(&["-X", "PUT", "--data", body, &u(path)]);
    let err = |r: Reply| (r.code, r.body);
    let e = |code: u16, text: &str| (code, format!(r#"{{"Error":"{text}"}}"#));
    assert_eq!(
        err(put("/containers/app", "not json")),
        e(400, "Invalid JSON")
    );
    assert_eq!(
        err(put("/containers/app", "{}")),
        e(400, "Missing 'action' field")
    );
    assert_eq!(
        err(put("/containers/app", r#"{"action":"pause"}"#)),
        e(400, "Invalid action. Use 'start', 'stop', or 'restart'")
    );
    let big = format!(r#"{{"action":"stop","pad":"{}"}}"#, "x".repeat(1100));
    assert_eq!(
        err(put("/containers/app", &big)),
        e(507, "Not enough disk space available")
    );
    assert_eq!(
        err(s.curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Length: 0",
            &u("/steps/locals/empty")
        ])),
        e(422, "Storage: Cannot read state JSON")
    );
    let dots = s.curl(&[
        "--path-as-is",
        "-X",
        "PUT",
        "--data",
        "v",
        &u("/user-meta/.."),
    ]);
    assert_eq!(err(dots), e(500, "Cannot add or update user meta"));
    assert_eq!(err(put("/drivers//load", "")), e(400, "No driver name"));
    let r = s.curl(&["-X", "PATCH", &u("/containers")]);
    assert_eq!(
        r.code, 405,
        "methods outside libevent's set are refused by libevent"
    );
}

#[test]
fn remaining_error_texts_gen1() {
    let s = PvSim::start(&["--generation", "1"]);
    let r = s.curl(&[
        "-X",
        "PUT",
        "--data",
        "{}",
        &u(&format!("/steps/locals/{}", "y".repeat(65))),
    ]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (400, r#"{"Error":"Step name has bad name"}"#)
    );
    let r = s.curl(&["-X", "PUT", "--data", "[]", &u("/steps/locals/bad")]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (422, r#"{"Error":"State verification has failed"}"#)
    );
    let r = s.curl(&[
        "-X",
        "POST",
        "--data",
        r#"{"op":"GO_REMOTE","payload":""}"#,
        &u("/commands"),
    ]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (
            409,
            r#"{"Error":"Cannot do this operation when remote mode is disabled by config"}"#
        )
    );
    let r = s.curl(&[&u(&format!("/objects/{}", "d".repeat(64)))]);
    assert_eq!(
        (r.code, r.body.as_str()),
        (404, r#"{"Error":"Resource does not exist"}"#)
    );
}

#[test]
fn poweroff_ends_the_simulator_cleanly() {
    let mut s = PvSim::start(&[]);
    let r = s.curl(&[
        "-X",
        "POST",
        "--data",
        r#"{"op":"POWEROFF_DEVICE","payload":"bye"}"#,
        &u("/commands"),
    ]);
    assert_eq!(r.code, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "pv-sim still running after POWEROFF_DEVICE"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!s.sock().exists(), "the socket is gone");
}

#[test]
fn a_try_revision_whose_state_rotted_falls_back_to_the_done_one() {
    let mut s = PvSim::start(&[]);
    let k = s.dir.path().join("k");
    std::fs::write(&k, b"kernel v7").unwrap();
    let sha = sha256(b"kernel v7");
    s.curl(&[
        "-X",
        "PUT",
        "-T",
        k.to_str().unwrap(),
        &u(&format!("/objects/{sha}")),
    ]);
    let mut state = s.curl(&[&u("/steps/current")]).json();
    state["bsp/kernel.img"] = json!(sha);
    s.curl(&[
        "-X",
        "PUT",
        "--data",
        &state.to_string(),
        &u("/steps/locals/rot"),
    ]);
    // Stop the device before it runs anything, make it try `locals/rot` at the next
    // boot, and corrupt that revision's state on disk.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let boot = s.storage().join("boot.json");
    std::fs::write(&boot, r#"{"rev":"0","try":"locals/rot","tried":false}"#).unwrap();
    std::fs::write(s.storage().join("trails/locals/rot/.pvr/json"), b"{garbage").unwrap();
    s.child = spawn(&s.args);
    s.wait_up();
    assert_eq!(
        s.curl(&[&u("/device-meta")]).json()["pantavisor.revision"],
        json!("0")
    );
    let p = s.curl(&[&u("/steps/locals/rot/progress")]).json();
    assert_eq!(
        (p["status"].as_str(), p["status-msg"].as_str()),
        (Some("ERROR"), Some("State JSON has bad format"))
    );
}
