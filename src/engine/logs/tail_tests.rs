//! Tests of the tailer: new lines, rotation (replaced, truncated, gzipped by the
//! logserver), cursors across restarts, revisions left behind, rate limits.

use super::*;
use std::io::Write;

fn append(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn tree() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    fs::create_dir_all(logs.join("0")).unwrap();
    std::os::unix::fs::symlink("0", logs.join("current")).unwrap();
    (dir, logs)
}

const FREE: Rate = Rate {
    per_sec: 1e9,
    burst: 1e9,
};

fn msgs(p: &Poll) -> Vec<String> {
    p.records
        .iter()
        .map(|r| format!("{}/{}: {}", r.plat, r.src, r.msg))
        .collect()
}

#[test]
fn reads_complete_new_lines_of_every_source() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
    append(
        &logs.join("0/pantavisor/pantavisor.log"),
        "[pantavisor] 1 INFO\t -- [ctrl]: hello\n",
    );
    append(&logs.join("0/app/lxc/console.log"), "one\ntwo\npart");
    append(&logs.join("0/app/lxc/console.log.1.gz"), "old history\n");
    let p = t.poll();
    assert_eq!(
        msgs(&p),
        [
            "app/lxc/console.log: one",
            "app/lxc/console.log: two",
            "pantavisor/ctrl: hello"
        ]
    );
    append(&logs.join("0/app/lxc/console.log"), "ial\n");
    assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: partial"]);
    assert!(t.poll().records.is_empty());
}

#[test]
fn rotation_by_replacement_or_truncation_starts_over() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
    let f = logs.join("0/app/var/log/syslog");
    append(&f, "a\nb\n");
    assert_eq!(t.poll().records.len(), 2);
    // Replaced: rotated to .gz, a new file started.
    fs::rename(&f, logs.join("0/app/var/log/syslog.1.gz")).unwrap();
    append(&f, "c\n");
    assert_eq!(msgs(&t.poll()), ["app/var/log/syslog: c"]);
    // Truncated in place.
    fs::write(&f, "").unwrap();
    append(&f, "d\n");
    assert_eq!(msgs(&t.poll()), ["app/var/log/syslog: d"]);
}

/// What Pantavisor's logserver does at its size limit: gzip to the next
/// `<name>.<n>.gz`, delete the file.
fn rotate(f: &Path, n: u32) {
    let data = fs::read(f).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &data).unwrap();
    let name = f.file_name().unwrap().to_string_lossy();
    fs::write(
        f.with_file_name(format!("{name}.{n}.gz")),
        gz.finish().unwrap(),
    )
    .unwrap();
    fs::remove_file(f).unwrap();
}

#[test]
fn lines_written_just_before_a_rotation_are_read_back_from_the_gz() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
    let f = logs.join("0/app/lxc/console.log");
    append(&f, "a\nb\n");
    assert_eq!(t.poll().records.len(), 2);
    // Between two polls: more lines, a rotation, a new file.
    append(&f, "c\nd\n");
    rotate(&f, 1);
    append(&f, "e\n");
    assert_eq!(
        msgs(&t.poll()),
        [
            "app/lxc/console.log: c",
            "app/lxc/console.log: d",
            "app/lxc/console.log: e"
        ]
    );
    // Two rotations between polls, and no new file yet.
    append(&f, "f\n");
    rotate(&f, 2);
    append(&f, "g\nh");
    rotate(&f, 3);
    assert_eq!(
        msgs(&t.poll()),
        [
            "app/lxc/console.log: f",
            "app/lxc/console.log: g",
            "app/lxc/console.log: h"
        ]
    );
    assert!(t.poll().records.is_empty(), "nothing read twice");
    append(&f, "i\n");
    assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: i"]);
    // Old rotations are history: a fresh tailer does not read them.
    let mut fresh = Tailer::new(&logs, &dir.path().join("other.json"), FREE);
    assert_eq!(msgs(&fresh.poll()), ["app/lxc/console.log: i"]);
}

#[test]
fn a_revision_left_behind_is_read_to_its_end_then_forgotten() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
    let a = logs.join("0/app/lxc/console.log");
    append(&a, "a1\n");
    assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: a1"]);
    // The last line before a switch (a rollback reboot), then the switch.
    append(&a, "a2\n");
    append(&logs.join("locals/x/app/lxc/console.log"), "x1\n");
    fs::remove_file(logs.join("current")).unwrap();
    std::os::unix::fs::symlink("locals/x", logs.join("current")).unwrap();
    let mut got = msgs(&t.poll());
    got.sort();
    assert_eq!(got, ["app/lxc/console.log: a2", "app/lxc/console.log: x1"]);
    assert!(t.poll().records.is_empty());
    assert!(
        t.cursors.keys().all(|k| k.starts_with("locals/x/")),
        "{:?}",
        t.cursors.keys()
    );
}

#[test]
fn a_failed_revision_asked_for_is_read_once() {
    let (dir, logs) = tree();
    let requests = super::super::LogRequests::default();
    let mut t =
        Tailer::new(&logs, &dir.path().join("cursors.json"), FREE).with_requests(requests.clone());
    append(
        &logs.join("locals/bad/pantavisor/pantavisor.log"),
        "[pantavisor] 3 ERROR\t -- [updater]: boom\n",
    );
    assert!(t.poll().records.is_empty(), "not the running revision");
    requests.lock().unwrap().insert("locals/bad".into());
    let p = t.poll();
    assert_eq!(p.records.len(), 1);
    assert_eq!(
        (p.records[0].lvl.as_str(), p.records[0].msg.as_str()),
        ("ERROR", "boom")
    );
    assert!(t.poll().records.is_empty());
    assert!(requests.lock().unwrap().is_empty(), "done with it");
    assert_eq!(revision_of("locals/bad/app/x.log"), Some("locals/bad"));
    assert_eq!(revision_of("12/app/x.log"), Some("12"));
}

#[test]
fn a_growing_file_past_the_fingerprint_is_not_mistaken_for_a_rotation() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
    let f = logs.join("0/app/lxc/console.log");
    append(&f, "short\n");
    assert_eq!(t.poll().records.len(), 1);
    append(&f, &format!("{}\n", "x".repeat(1000)));
    assert_eq!(t.poll().records.len(), 1);
    append(&f, "tail\n");
    assert_eq!(
        msgs(&t.poll()),
        ["app/lxc/console.log: tail"],
        "nothing read twice"
    );
}

#[test]
fn cursors_survive_a_restart_and_follow_current() {
    let (dir, logs) = tree();
    let cursors = dir.path().join("cursors.json");
    let f = logs.join("0/app/lxc/console.log");
    append(&f, "before\n");
    let mut t = Tailer::new(&logs, &cursors, FREE);
    assert_eq!(t.poll().records.len(), 1);
    t.save().unwrap();
    append(&f, "after\n");
    let mut t = Tailer::new(&logs, &cursors, FREE);
    assert_eq!(msgs(&t.poll()), ["app/lxc/console.log: after"]);
    // A new revision runs: its tree is followed.
    fs::create_dir_all(logs.join("locals/r1/pantavisor")).unwrap();
    append(
        &logs.join("locals/r1/pantavisor/pantavisor.log"),
        "[pantavisor] 0 INFO\t -- [pantavisor]: booted revision locals/r1\n",
    );
    fs::remove_file(logs.join("current")).unwrap();
    std::os::unix::fs::symlink("locals/r1", logs.join("current")).unwrap();
    assert_eq!(
        msgs(&t.poll()),
        ["pantavisor/pantavisor: booted revision locals/r1"]
    );
}

#[test]
fn singlefile_layout_is_parsed_as_json() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(&logs, &dir.path().join("cursors.json"), FREE);
    append(
        &logs.join("0/pv.log"),
        "{\"tsec\":5,\"tnano\":0,\"platform\":\"app\",\"lvl\":\"WARN\",\"src\":\"lxc/console.log\",\"msg\":\"hot\"}\n",
    );
    let p = t.poll();
    assert_eq!(
        (p.records[0].plat.as_str(), p.records[0].lvl.as_str()),
        ("app", "WARN")
    );
}

#[test]
fn floods_are_limited_per_source_and_counted() {
    let (dir, logs) = tree();
    let mut t = Tailer::new(
        &logs,
        &dir.path().join("cursors.json"),
        Rate {
            per_sec: 0.001,
            burst: 10.0,
        },
    );
    append(&logs.join("0/app/lxc/console.log"), &"spam\n".repeat(100));
    append(&logs.join("0/other/lxc/console.log"), "quiet\n");
    let p = t.poll();
    assert_eq!(
        p.records.len(),
        11,
        "10 of the flood, and the quiet source untouched"
    );
    assert_eq!(p.dropped, 90);
}
