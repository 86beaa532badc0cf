//! The JSON bodies pv-ctrl answers with (every generation's shapes are parsed
//! leniently): progress, objects, steps, containers, groups, metadata, config,
//! GC reports. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_bridge::pvctrl::{
    ConfigEntry, Container, GcReport, Group, ObjectInfo, Progress, PvStatus, Step,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<Progress>(data) {
        let _ = (p.status.is_final(), p.status.as_str().len());
    }
    let _ = serde_json::from_slice::<Vec<ObjectInfo>>(data);
    let _ = serde_json::from_slice::<Vec<Step>>(data);
    let _ = serde_json::from_slice::<Vec<Container>>(data);
    let _ = serde_json::from_slice::<Vec<Group>>(data);
    let _ = serde_json::from_slice::<Vec<ConfigEntry>>(data);
    let _ = serde_json::from_slice::<GcReport>(data);
    let _ = serde_json::from_slice::<std::collections::BTreeMap<String, serde_json::Value>>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = PvStatus::parse(s);
    }
});
