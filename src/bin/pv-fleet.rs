//! pv-fleet: the operator's side of pv-bridge's MQTT protocol v1; see
//! `pv_bridge::fleet` and docs/pv-fleet.md.

fn main() {
    std::process::exit(pv_bridge::fleet::main());
}
