//! Pantavisor's log lines as the tailer reads them: `pantavisor.log`'s own
//! format, singlefile JSON lines, raw container lines. Never panics, keeps the
//! text (nothing dropped silently).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_bridge::engine::logs::parse;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let now = (1_790_000_000, 0);
    let r = parse::pantavisor(&line, now);
    assert!(
        !r.msg.is_empty() || line.trim().is_empty() || line.contains("]:"),
        "{line:?}"
    );
    let _ = parse::singlefile(&line, now);
    let r = parse::raw("app", "lxc/console.log", &line, now);
    assert_eq!(r.plat, "app");
});
