//! The log spool reopened on whatever a power cut or bad flash left in a segment:
//! it opens, reads and appends, and never panics.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pv_bridge::engine::logs::spool::{Spool, SpoolOptions};

/// One directory for every input (a fresh one each time costs most of the run).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("pv-spool-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    // Only the segment under test: nothing left from the previous input.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if std::fs::write(dir.join("0.jsonl"), data).is_err() {
        return;
    }
    let backends = vec!["b".to_owned()];
    let Ok(mut s) = Spool::open(dir, SpoolOptions::default(), &backends) else {
        return;
    };
    let before = s.next_position();
    if let Ok(b) = s.read("b", 1000, 1 << 20) {
        assert!(b.records.len() <= 1000);
        assert!(b.next >= b.first);
    }
    let _ = s.append(Vec::new());
    assert_eq!(s.next_position(), before);
});
