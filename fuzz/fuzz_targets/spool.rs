//! The log spool reopened on whatever a power cut or bad flash left in a segment:
//! it opens, reads and appends, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_bridge::engine::logs::spool::{Spool, SpoolOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    if std::fs::write(dir.path().join("0.jsonl"), data).is_err() {
        return;
    }
    let backends = vec!["b".to_owned()];
    let Ok(mut s) = Spool::open(dir.path(), SpoolOptions::default(), &backends) else {
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
