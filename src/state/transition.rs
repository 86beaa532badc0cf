//! Reboot or non-reboot: the decision Pantavisor makes when it runs a new revision
//! (`state.c: pv_state_stop_platforms`, `pv_state_compare_jsons`,
//! `pv_state_compare_objects`).
//!
//! Only container manifests, services files, inline JSON files and object
//! references are compared. A changed, added or removed entry forces a reboot when
//! it belongs to no container (the BSP, root-level files) or to a container whose
//! restart policy is `system`; otherwise only the owning container restarts. The
//! specially parsed files (`bsp/run.json`, `device.json`, …) and build metadata are
//! not compared at all — a Pantavisor quirk kept here on purpose.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{EntryKind, Platform, RestartPolicy, State, owner_of};

/// How Pantavisor will move to a new revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The device reboots; `reason` names the first entry that forced it.
    Reboot { reason: String },
    /// Only these containers are stopped and (re)started; the set may be empty.
    NonReboot { restarted: BTreeSet<String> },
}

impl Transition {
    pub fn is_reboot(&self) -> bool {
        matches!(self, Self::Reboot { .. })
    }
}

/// What Pantavisor compares: jsons by value, objects by sha256.
fn compared(state: &State) -> (BTreeMap<&str, &Value>, BTreeMap<&str, &str>) {
    let mut jsons = BTreeMap::new();
    let mut objects = BTreeMap::new();
    for (key, kind) in state.entries() {
        match kind {
            EntryKind::ContainerManifest | EntryKind::Services | EntryKind::InlineJson => {
                if let Some(v) = state.value(key) {
                    jsons.insert(key, v);
                }
            }
            EntryKind::Object { sha256 } => {
                objects.insert(key, sha256.as_str());
            }
            EntryKind::Special | EntryKind::BuildMetadata => {}
        }
    }
    (jsons, objects)
}

struct Side {
    platforms: BTreeMap<String, Platform>,
}

impl Side {
    fn owner(&self, key: &str) -> Option<&Platform> {
        self.platforms.get(owner_of(key))
    }
}

fn reboot_reason(key: &str, plat: Option<&Platform>, change: &str) -> Option<String> {
    match plat {
        None => Some(format!("{key} {change} and belongs to no container")),
        Some(p) if p.restart_policy == RestartPolicy::System => Some(format!(
            "{key} {change} and container {:?} has restart_policy system",
            p.name
        )),
        Some(_) => None,
    }
}

/// Compares one kind of entry the way `pv_state_compare_*` does. Returns the reboot
/// reason, if any, and otherwise adds the restarted containers.
fn compare<V: PartialEq>(
    cur: &BTreeMap<&str, V>,
    pend: &BTreeMap<&str, V>,
    cur_side: &Side,
    pend_side: &Side,
    restarted: &mut BTreeSet<String>,
) -> Option<String> {
    // Modified or deleted entries.
    for (key, value) in cur {
        let new = pend.get(key);
        if new == Some(value) {
            continue;
        }
        let change = if new.is_some() {
            "changed"
        } else {
            "was removed"
        };
        let plat = cur_side.owner(key);
        if let Some(reason) = reboot_reason(key, plat, change) {
            return Some(reason);
        }
        if new.is_some() {
            // Pantavisor also consults the pending owner; a missing one would crash
            // it, so treat that as a reboot.
            if let Some(reason) = reboot_reason(key, pend_side.owner(key), change) {
                return Some(reason);
            }
        }
        if let Some(p) = plat {
            restarted.insert(p.name.clone());
        }
    }
    // Added entries.
    for key in pend.keys() {
        if cur.contains_key(key) {
            continue;
        }
        let plat = pend_side.owner(key);
        if let Some(reason) = reboot_reason(key, plat, "was added") {
            return Some(reason);
        }
        if let Some(p) = plat {
            restarted.insert(p.name.clone());
        }
    }
    None
}

/// Decides the transition from the running state to a pending one.
pub fn transition(current: &State, pending: &State) -> Transition {
    let cur_side = Side {
        platforms: current.platforms(),
    };
    let pend_side = Side {
        platforms: pending.platforms(),
    };
    let (cur_jsons, cur_objects) = compared(current);
    let (pend_jsons, pend_objects) = compared(pending);
    let mut restarted = BTreeSet::new();
    if let Some(reason) = compare(
        &cur_jsons,
        &pend_jsons,
        &cur_side,
        &pend_side,
        &mut restarted,
    )
    .or_else(|| {
        compare(
            &cur_objects,
            &pend_objects,
            &cur_side,
            &pend_side,
            &mut restarted,
        )
    }) {
        return Transition::Reboot { reason };
    }
    Transition::NonReboot { restarted }
}
