//! The `pv-fake-hub` binary driven with `curl`, as a device and as `pvr` call it:
//! the quirks of pantacor-hub-api.md seen by a real HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Hub {
    child: Child,
    base: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Hub {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_pv-fake-hub"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "pv-fake-hub did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Hub {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// Runs curl; returns (status, headers, body).
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-s", "-g", "-D", "/dev/stderr", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is needed: apt-get install -y curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.trim().parse().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        body.to_owned(),
    )
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn a_device_and_a_user_through_curl() {
    let h = start();
    let u = |p: &str| format!("{}{p}", h.base);
    let ua = "Pantavisor/2 (Linux; x86_64) PV/019 Date/2026-01-01";

    // Collection roots need their slash; Go's mux redirects.
    let (code, head, _) = curl(&["-X", "POST", "-A", ua, &u("/devices")]);
    assert_eq!(code, 301);
    assert!(head.contains("Location: /devices/"), "{head}");
    // No User-Agent: refused with the hub's error shape.
    let (code, _, body) = curl(&["-X", "POST", "-H", "User-Agent:", &u("/devices/")]);
    assert_eq!(code, 403);
    let e = json(&body);
    assert_eq!(e["msg"], "Incompatible Client; upgrade pantavisor");
    assert!(e["error"].as_str().unwrap().starts_with("REST-ERR-ID-"));
    assert_eq!(e["code"], 403);

    // Registration as Pantavisor does it: no body.
    let (code, _, body) = curl(&["-X", "POST", "-A", ua, &u("/devices/")]);
    assert_eq!(code, 200);
    let dev = json(&body);
    let id = dev["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 24);
    assert!(
        dev["nick"]
            .as_str()
            .unwrap()
            .starts_with("__unregistered__")
    );
    assert_eq!(dev["secret"].as_str().unwrap().len(), 15);
    let challenge = dev["challenge"].as_str().unwrap().to_owned();
    assert_eq!(challenge.split('-').count(), 3);

    // Login: JSON only (415 otherwise), then a token.
    let creds = format!(
        "{{\"username\":\"prn:::devices:/{id}\",\"password\":\"{}\"}}",
        dev["secret"].as_str().unwrap()
    );
    let (code, _, _) = curl(&[
        "-A",
        ua,
        "-H",
        "Content-Type: text/plain",
        "-d",
        &creds,
        &u("/auth/login"),
    ]);
    assert_eq!(code, 415);
    let (code, _, body) = curl(&[
        "-A",
        ua,
        "-H",
        "Content-Type: application/json",
        "-d",
        &creds,
        &u("/auth/login"),
    ]);
    assert_eq!(code, 200);
    let token = json(&body)["token"].as_str().unwrap().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    let bearer = format!("Authorization: Bearer {token}");

    // Trails: canonical JSON with its header; unsynced device = [].
    let (code, head, body) = curl(&["-A", ua, "-H", &bearer, &u("/trails/")]);
    assert_eq!((code, body.as_str()), (200, "[]"));
    assert!(
        head.contains("PhJsonFormat: gibson042-canonicaljson"),
        "{head}"
    );
    // A trailing slash on a device path is a router miss.
    let (code, _, body) = curl(&["-A", ua, "-H", &bearer, &u(&format!("/devices/{id}/"))]);
    assert_eq!(
        (code, json(&body)["Error"].as_str()),
        (404, Some("Resource not found"))
    );
    // Unclaimed: owner empty, challenge shown, no secret.
    let (_, _, body) = curl(&["-A", ua, "-H", &bearer, &u(&format!("/devices/{id}"))]);
    let rec = json(&body);
    assert_eq!(
        (rec["owner"].as_str(), rec["challenge"].as_str()),
        (Some(""), Some(challenge.as_str()))
    );
    assert!(rec.get("secret").is_none());

    // The user claims it the way pvr does.
    let (_, _, body) = curl(&[
        "-A",
        "pvr",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"username\":\"user1\",\"password\":\"user1pass\"}",
        &u("/auth/login"),
    ]);
    let user = format!(
        "Authorization: Bearer {}",
        json(&body)["token"].as_str().unwrap()
    );
    let (code, _, _) = curl(&[
        "-X",
        "PUT",
        "-A",
        "pvr",
        "-H",
        &user,
        &u(&format!("/devices/{id}?challenge=wrong-one-here")),
    ]);
    assert_eq!(code, 403);
    let (code, _, body) = curl(&[
        "-X",
        "PUT",
        "-A",
        "pvr",
        "-H",
        &user,
        &u(&format!("/devices/{id}?challenge={challenge}")),
    ]);
    assert_eq!(code, 200);
    assert_eq!(json(&body)["owner"], "prn:pantahub.com:auth:/user1");

    // Pantavisor's pending-steps query, byte for byte; an unknown step is a 500.
    let q = "/trails/ID/steps?progress.status=%7B%22$in%22:%5B%22NEW%22,%22DOWNLOADING%22,%22INPROGRESS%22,%22TESTING%22,%22QUEUED%22%5D%7D"
        .replace("ID", &id);
    let (code, _, _) = curl(&["-A", ua, "-H", &bearer, &u(&q)]);
    assert_eq!(code, 500, "no trail yet: the hub answers 500");
    let (code, _, _) = curl(&["-A", ua, "-H", "Authorization: Bearer nope", &u("/trails/")]);
    assert_eq!(code, 401);

    // The token predates the claim: its owner is empty until the device logs in
    // again, so owner-scoped calls are refused.
    let (code, _, _) = curl(&["-A", ua, "-H", &bearer, "-d", "{}", &u("/trails/")]);
    assert_eq!(code, 403);
    let (_, _, body) = curl(&[
        "-A",
        ua,
        "-H",
        "Content-Type: application/json",
        "-d",
        &creds,
        &u("/auth/login"),
    ]);
    let bearer = format!(
        "Authorization: Bearer {}",
        json(&body)["token"].as_str().unwrap()
    );
    // An empty factory state is allowed; a second trail is a 500.
    let (code, head, body) = curl(&["-A", ua, "-H", &bearer, "-d", "{}", &u("/trails/")]);
    assert_eq!(code, 200, "{body}");
    assert!(head.contains("PhJsonFormat"), "{head}");
    assert!(
        !body.contains(' ') && !body.contains('\n'),
        "canonical: {body}"
    );
    let (code, _, _) = curl(&["-A", ua, "-H", &bearer, "-d", "{}", &u("/trails/")]);
    assert_eq!(code, 500);
    // Not found, the hub's ways: unknown step 500, unknown object 403, bad sha 400.
    let (code, _, body) = curl(&[
        "-A",
        ua,
        "-H",
        &bearer,
        &u(&format!("/trails/{id}/steps/7")),
    ]);
    assert_eq!(
        (code, json(&body)["msg"].as_str()),
        (500, Some("No access"))
    );
    let (code, _, body) = curl(&[
        "-A",
        ua,
        "-H",
        &bearer,
        &u(&format!("/objects/{}", "ab".repeat(32))),
    ]);
    assert_eq!(
        (code, json(&body)["msg"].as_str()),
        (403, Some("No Access"))
    );
    let (code, _, _) = curl(&["-A", ua, "-H", &bearer, &u("/objects/xyz")]);
    assert_eq!(code, 400);
    // Progress of rev 0 by the device: echoed with the hub's fields only.
    let (code, _, body) = curl(&[
        "-X",
        "PUT",
        "-A",
        ua,
        "-H",
        &bearer,
        "-d",
        "{\"status\":\"DONE\",\"status-msg\":\"Factory revision\",\"progress\":100,\"retries\":3}",
        &u(&format!("/trails/{id}/steps/0/progress")),
    ]);
    assert_eq!(code, 200);
    let p = json(&body);
    assert_eq!(p["status"], "DONE");
    assert!(p.get("retries").is_none(), "{p}");
}
