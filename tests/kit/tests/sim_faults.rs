//! pv-sim is as unforgiving as a real device (docs/pv-sim.md, "Failure modes"):
//! partial uploads stay, a full disk answers 200, gen-1 gives up on a stalled body,
//! queued commands die with the power, BLOCK_REBOOT drops commands, 024 keeps an
//! old progress, and log files rotate to `.gz`. Each test drives the `pv-sim`
//! binary over its socket, as a client on a device would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Sends a PUT of `total` bytes but only `sent` of them, then returns the open
/// stream (drop it to break the connection).
fn partial_put(sock: &Path, sha: &str, total: usize, body: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "PUT /objects/{sha} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {total}\r\n\r\n"
    )
    .unwrap();
    s.write_all(body).unwrap();
    s.flush().unwrap();
    s
}

/// `curl -T` of the whole object.
fn put_whole(s: &PvSim, sha: &str, data: &[u8]) -> Reply {
    let blob = s.dir.path().join(format!("blob-{}", &sha[..8]));
    std::fs::write(&blob, data).unwrap();
    s.curl(&[
        "-X",
        "PUT",
        "-T",
        blob.to_str().unwrap(),
        &u(&format!("/objects/{sha}")),
    ])
}

fn listed(s: &PvSim, sha: &str) -> Option<u64> {
    s.curl(&[&u("/objects")])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["sha256"] == sha)
        .map(|o| o["size"].as_str().unwrap().parse().unwrap())
}

fn command(s: &PvSim, op: &str, payload: &str) -> Reply {
    s.curl(&[
        "-X",
        "POST",
        "--data",
        &json!({"op": op, "payload": payload}).to_string(),
        &u("/commands"),
    ])
}

fn progress(s: &PvSim, rev: &str) -> String {
    s.curl(&[&u(&format!("/steps/{rev}/progress"))]).body
}

/// Stages `locals/<name>`: the running state with one new inline file (a
/// non-reboot change of the `app` container's config).
fn stage(s: &PvSim, name: &str) {
    let mut state = s.curl(&[&u("/steps/current")]).json();
    state["app/fault.json"] = json!({"name": name});
    let r = s.curl(&[
        "-X",
        "PUT",
        "--data",
        &state.to_string(),
        &u(&format!("/steps/locals/{name}")),
    ]);
    assert_eq!(r.code, 200, "{r:?}");
}

fn pantavisor_log(s: &PvSim) -> String {
    let logs = s.storage().join("logs");
    let mut text = String::new();
    for rev in std::fs::read_dir(&logs).unwrap().flatten() {
        let p = rev.path().join("pantavisor/pantavisor.log");
        if !rev.file_type().unwrap().is_symlink() {
            text += &std::fs::read_to_string(p).unwrap_or_default();
        }
    }
    text
}

#[test]
fn gen2_keeps_a_broken_upload_as_a_partial_object_until_it_is_sent_again() {
    let s = PvSim::start(&[]);
    let data = vec![7u8; 100_000];
    let sha = sha256(&data);
    let conn = partial_put(&s.sock(), &sha, data.len(), &data[..30_000]);
    std::thread::sleep(Duration::from_millis(300));
    drop(conn);
    wait_for("the partial object listed", Duration::from_secs(5), || {
        listed(&s, &sha) == Some(30_000)
    });
    let got = s.curl(&[&u(&format!("/objects/{sha}"))]);
    assert_eq!(got.code, 200);
    assert_ne!(
        sha256(got.body.as_bytes()),
        sha,
        "the bytes are not the object"
    );
    // A whole PUT replaces it.
    assert_eq!(put_whole(&s, &sha, &data).code, 200);
    assert_eq!(listed(&s, &sha), Some(100_000));
}

#[test]
fn gen2_answers_200_to_an_upload_the_full_disk_cut_short_and_keeps_the_partial_file() {
    let mut s = PvSim::start(&[]);
    let storage = s.curl(&[&u("/device-meta")]).json()["storage"].clone();
    let used = storage["total"].as_u64().unwrap() - storage["free"].as_u64().unwrap();
    // Boot again with room for 64 KiB more.
    let room = 64 * 1024;
    let i = s.args.iter().position(|a| a == "--log-rate").unwrap();
    s.args[i + 1] = "0".into();
    s.args
        .extend(["--capacity".into(), (used + room).to_string()]);
    s.kill9_and_restart();
    let data: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
    let sha = sha256(&data);
    let r = put_whole(&s, &sha, &data);
    assert_eq!(r.code, 200, "gen-2 says OK: {r:?}");
    let size = listed(&s, &sha).expect("the partial file stays");
    assert!(size < data.len() as u64 && size <= room, "{size}");
    assert!(pantavisor_log(&s).contains("Cannot create file"));
}

#[test]
fn gen1_gives_up_on_a_body_stalled_for_a_second_and_deletes_the_file() {
    let s = PvSim::start(&["--generation", "1"]);
    let data = vec![9u8; 50_000];
    let sha = sha256(&data);
    let mut conn = partial_put(&s.sock(), &sha, data.len(), &data[..10_000]);
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer:?}");
    assert!(answer.contains("Cannot read from socket"), "{answer:?}");
    assert_eq!(listed(&s, &sha), None);
    let leftovers: Vec<_> = std::fs::read_dir(s.storage().join("objects"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&sha[..16]))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A body that keeps coming is taken.
    assert_eq!(put_whole(&s, &sha, &data).code, 200);
    assert_eq!(listed(&s, &sha), Some(50_000));
}

#[test]
fn a_power_cut_loses_the_queued_command() {
    // Ticks of 5 s leave the accepted command in the slot long enough to cut power
    // (the first tick runs at start, the next one 5 s later).
    let mut s = PvSim::start(&["--tick-ms", "5000"]);
    stage(&s, "cut");
    let r = command(&s, "LOCAL_RUN", "locals/cut");
    assert_eq!(r.code, 200);
    s.kill9_and_restart();
    // Two ticks of the new boot.
    std::thread::sleep(Duration::from_millis(5600));
    let p = progress(&s, "locals/cut");
    assert!(
        p.contains(r#""status":"NEW""#),
        "the command died with the power: {p}"
    );
    assert_eq!(
        s.curl(&[&u("/device-meta")]).json()["pantavisor.revision"],
        "0"
    );
}

#[test]
fn block_reboot_drops_every_command_but_defer_reboot() {
    let s = PvSim::start(&[]);
    stage(&s, "held");
    std::fs::create_dir_all(s.storage().join("sim")).unwrap();
    std::fs::write(s.storage().join("sim/debug-shell"), b"").unwrap();
    assert_eq!(command(&s, "REBOOT_DEVICE", "").code, 200);
    wait_for("the reboot held", Duration::from_secs(5), || {
        pantavisor_log(&s).contains("holding on reboot because shell is opened")
    });
    // Answered 200, then dropped.
    assert_eq!(command(&s, "LOCAL_RUN", "locals/held").code, 200);
    wait_for("the command dropped", Duration::from_secs(5), || {
        pantavisor_log(&s).contains("cmd received but ignored. Only defer-reboot cmd allowed")
    });
    assert_eq!(command(&s, "DEFER_REBOOT", "600").code, 200);
    wait_for("defer-reboot carried out", Duration::from_secs(5), || {
        pantavisor_log(&s).contains("defer reboot command received, new timeout '600'")
    });
    assert!(progress(&s, "locals/held").contains(r#""status":"NEW""#));
    assert!(s.sock().exists(), "no reboot while the shell is open");
    // The shell closes: the held reboot happens; the dropped LOCAL_RUN stays lost.
    std::fs::remove_file(s.storage().join("sim/debug-shell")).unwrap();
    wait_for("the reboot", Duration::from_secs(5), || !s.sock().exists());
    s.wait_up();
    std::thread::sleep(Duration::from_millis(500));
    assert!(progress(&s, "locals/held").contains(r#""status":"NEW""#));
    // Without a shell, DEFER_REBOOT is refused (reference §2.4 check 5).
    assert_eq!(command(&s, "DEFER_REBOOT", "600").code, 409);
}

#[test]
fn pantavisor_024_keeps_an_old_progress_and_has_no_storage_gc() {
    let s = PvSim::start(&["--pv-024"]);
    stage(&s, "again");
    let r = s.curl(&[&u("/steps/locals/again/progress")]);
    assert_eq!(r.code, 404, "024 creates no progress when staging: {r:?}");
    assert_eq!(command(&s, "LOCAL_RUN", "locals/again").code, 200);
    wait_for("UPDATED", Duration::from_secs(10), || {
        s.curl(&["-X", "POST", "--data", r#"{"type":"ready"}"#, &u("/signal")]);
        progress(&s, "locals/again").contains("UPDATED")
    });
    // PUT over the trail: 025+ would reset it to NEW; 024 keeps UPDATED.
    stage(&s, "again");
    assert!(progress(&s, "locals/again").contains("UPDATED"));
    let r = s.curl(&["-X", "POST", &u("/storage/gc")]);
    assert_eq!(r.code, 400, "{r:?}");
    assert!(r.body.contains("unknown endpoint"), "{r:?}");
}

#[test]
fn log_files_rotate_to_numbered_gz_files() {
    let s = PvSim::start(&["--log-rotate-bytes", "4096"]);
    let dir = s.storage().join("logs/0/app/lxc");
    wait_for("two rotations", Duration::from_secs(20), || {
        dir.join("console.log.2.gz").exists()
    });
    let gz = std::fs::read(dir.join("console.log.1.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    assert!(
        text.len() >= 4096 && text.contains("synthetic log line"),
        "{text:.200}"
    );
    let live = std::fs::metadata(dir.join("console.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(live < 4096 + 1024, "{live}");
}
