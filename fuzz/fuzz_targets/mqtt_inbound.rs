//! Every MQTT message the device takes from a broker: `revision/set` offers,
//! `meta/user/set`, `cmd/<name>`. Never panics; a payload over the cap is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_adapter_mqtt::protocol::{
    RevisionSet, command_id, parse_command, parse_revision_set, parse_user_meta_set,
};

const CAP: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    let over = payload.len() > CAP;
    match which % 4 {
        0 => {
            let r = parse_revision_set("pv/d/revision/set", payload, CAP, None);
            if over {
                assert!(r.is_err(), "an offer over the cap was taken");
            }
            if let Ok(RevisionSet::Offer(o)) = r {
                assert!(pv_adapter_api::valid_offer_id(&o.id), "{:?}", o.id);
            }
        }
        1 => {
            let r = parse_user_meta_set("pv/d/meta/user/set", payload, CAP);
            assert!(!(over && r.is_ok()), "user-meta over the cap was taken");
        }
        2 => {
            for name in ["reboot", "gc", "ssh", "cancel", "nonsense"] {
                let r = parse_command(&format!("pv/d/cmd/{name}"), name, payload, CAP);
                assert!(!(over && r.is_ok()), "a command over the cap was taken");
            }
        }
        _ => {
            let _ = command_id(payload);
        }
    }
});
