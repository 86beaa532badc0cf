//! What pv-fleet reads from others: a device's `Range` header on the object
//! server, and topics and payloads from the broker (anyone with access to the
//! fleet's topics can publish them) matched against globs and `--where`
//! conditions. None of it may panic, and a satisfiable range stays inside the
//! object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_bridge::fleet::conn::Root;
use pv_bridge::fleet::render::{Row, row_from};
use pv_bridge::fleet::rollout::Amount;
use pv_bridge::fleet::select::{Inventory, absorb, cond, glob};
use pv_bridge::fleet::serve::{Wanted, byte_range};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let (a, b, c, d) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let size = data.len() as u64 * 977;
    if let Wanted::Part(s, e) = byte_range(Some(a), size) {
        assert!(s <= e && e < size, "{a:?} over {size}: {s}-{e}");
    }
    let _ = glob(a, b);
    let _ = a
        .parse::<Amount>()
        .map(|m| (m.wave_of(1000), m.allowance_of(1000)));
    if let Ok(root) = Root::new("pv/<device_id>") {
        let mut inv = Inventory::new();
        absorb(&mut inv, &root, b, c.as_bytes());
        absorb(&mut inv, &root, &format!("pv/{a}/meta/user"), d.as_bytes());
        if let Ok(cd) = cond(a) {
            for dev in inv.values() {
                let _ = cd.matches(dev);
            }
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(d.as_bytes()) {
        let r = row_from(&Row::default(), &v);
        assert!(r.progress <= 100);
    }
});
