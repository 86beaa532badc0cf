//! pv-sim's fleet mode (#17): one process hosting many devices, each with its
//! own socket and storage, the factory objects shared by hard link, driven
//! with `curl --unix-socket` like a single device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn many_devices_in_one_process_share_the_factory_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, sockets) = (dir.path().join("st"), dir.path().join("sock"));
    let _sim = Killed(spawn(&[
        "--storage".into(),
        storage.display().to_string(),
        "--socket".into(),
        sockets.display().to_string(),
        "--devices".into(),
        "25".into(),
        "--id-prefix".into(),
        "gw-".into(),
        "--tick-ms".into(),
        "100".into(),
    ]));
    let last = sockets.join("gw-25").join("pv-ctrl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !last.exists() {
        assert!(Instant::now() < deadline, "25 devices did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each device answers on its own socket, with its own state.
    for id in ["gw-1", "gw-13", "gw-25"] {
        let r = curl(&sockets.join(id).join("pv-ctrl"), &[&u("/buildinfo")]);
        assert_eq!(r.code, 200, "{id}: {r:?}");
    }
    let meta = curl(&sockets.join("gw-2").join("pv-ctrl"), &[&u("/device-meta")]).json();
    assert_eq!(meta["pantavisor.revision"], "0");
    // One copy of each factory object: every device's object is a link to it.
    let objects: Vec<_> = std::fs::read_dir(storage.join("gw-1").join("objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(objects.len() >= 8, "{objects:?}");
    for o in &objects {
        let other = storage
            .join("gw-25")
            .join("objects")
            .join(o.file_name().unwrap());
        let (a, b) = (
            std::fs::metadata(o).unwrap(),
            std::fs::metadata(&other).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "{} is not shared", o.display());
        assert!(a.nlink() >= 26, "{} has {} links", o.display(), a.nlink());
    }
    // No synthetic log lines unless asked: after the boot's own lines, the
    // container logs stay still.
    let logs = storage.join("gw-3").join("logs");
    let count = || -> usize {
        walk(&logs)
            .iter()
            .filter(|p| p.to_string_lossy().contains("/app/"))
            .map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = count();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        count(),
        before,
        "fleet mode writes no synthetic log lines by default"
    );
}

/// The pv-sim process, killed when the test ends (also when it fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fleet_mode_refuses_what_only_one_device_can_have() {
    let refused = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pv-sim"))
            .args(["--storage", "st", "--socket", "s", "--devices", "2"])
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(refused(&["--nonmgmt-socket", "x"]).contains("cannot go with --devices"));
    refused(&["--id-prefix", "a/b"]);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
