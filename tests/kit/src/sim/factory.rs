//! The factory revision `0` a new simulated device starts with: a BSP, the mgmt
//! container `pv-bridge` (status goal READY, restart policy container) and an `app`
//! container, each backed by real, deterministic blobs.

use std::io;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::device::{hex, progress_json};
use super::store::{Boot, Store, write_atomic};

/// Deterministic pseudo-random bytes (xorshift64*, seeded from the name).
pub fn blob(name: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Stores `data` as an object and returns its sha256.
pub fn put_object(store: &Store, data: &[u8]) -> io::Result<String> {
    put_shared(store, data, None)
}

/// Stores `data` as an object, hard-linked from `pool` when given (many
/// simulated devices then share one copy of the factory's objects; objects
/// are never written in place, so a link is as good as a copy).
pub fn put_shared(store: &Store, data: &[u8], pool: Option<&Path>) -> io::Result<String> {
    let sha = hex(&Sha256::digest(data));
    let path = store.object(&sha);
    if path.exists() {
        return Ok(sha);
    }
    if let Some(pool) = pool {
        let shared = pool.join(&sha);
        if !shared.exists() {
            std::fs::create_dir_all(pool)?;
            write_atomic(&shared, data)?;
        }
        if std::fs::hard_link(&shared, &path).is_ok() {
            return Ok(sha);
        }
    }
    write_atomic(&path, data)?;
    Ok(sha)
}

/// The factory state JSON; objects are written to `store` (linked from
/// `pool` when given).
pub fn state(store: &Store, pool: Option<&Path>) -> io::Result<Value> {
    let put_object = |store: &Store, data: &[u8]| put_shared(store, data, pool);
    let obj = |name: &str, len: usize| put_object(store, &blob(name, len));
    let text = |s: &str| s.as_bytes().to_vec();
    let lxc = |c: &str| {
        text(&format!(
            "lxc.uts.name = {c}\nlxc.rootfs.path = overlayfs:/volumes/{c}/root.squashfs\n"
        ))
    };
    Ok(json!({
        "#spec": "pantavisor-service-system@1",
        "bsp/run.json": {"addons": [], "firmware": "firmware.squashfs", "initrd": "pantavisor",
                          "initrd_config": "", "linux": "kernel.img", "modules": "modules.squashfs"},
        "bsp/kernel.img": obj("bsp/kernel.img", 128 * 1024)?,
        "bsp/pantavisor": obj("bsp/pantavisor", 64 * 1024)?,
        "bsp/modules.squashfs": obj("bsp/modules.squashfs", 256 * 1024)?,
        "bsp/firmware.squashfs": obj("bsp/firmware.squashfs", 64 * 1024)?,
        "bsp/src.json": {"#spec": "bsp-manifest-src@1", "pvr": "pv-sim factory bsp"},
        "pv-bridge/run.json": {"#spec": "service-manifest-run@1", "name": "pv-bridge", "type": "lxc",
            "config": "lxc.container.conf", "root-volume": "root.squashfs", "group": "platform",
            "roles": ["mgmt"], "status_goal": "READY", "restart_policy": "container", "volumes": [],
            "storage": {"docker--storage-pv-bridge": {"persistence": "permanent"},
                        "lxc-overlay": {"persistence": "boot"}}},
        "pv-bridge/lxc.container.conf": put_object(store, &lxc("pv-bridge"))?,
        "pv-bridge/root.squashfs": obj("pv-bridge/root.squashfs", 256 * 1024)?,
        "pv-bridge/src.json": {"#spec": "service-manifest-src@1", "args": {"PV_ROLES": ["mgmt"]}},
        "app/run.json": {"#spec": "service-manifest-run@1", "name": "app", "type": "lxc",
            "config": "lxc.container.conf", "root-volume": "root.squashfs", "group": "app",
            "roles": ["nobody"], "volumes": [], "storage": {"lxc-overlay": {"persistence": "boot"}}},
        "app/lxc.container.conf": put_object(store, &lxc("app"))?,
        "app/root.squashfs": obj("app/root.squashfs", 128 * 1024)?,
        "_config/app/etc/app.conf": put_object(store, &text("greeting=hello from the factory\n"))?,
    }))
}

/// Creates revision `0` (DONE, "Factory revision") and the boot record.
pub fn create(store: &Store, pool: Option<&Path>) -> io::Result<Boot> {
    let state = state(store, pool)?;
    let rev = super::revision::Rev::parse(state.to_string().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let pretty = serde_json::to_vec_pretty(&state).map_err(io::Error::other)?;
    store.put_state_json("0", &pretty)?;
    store.link_revision("0", &rev.objects(), &rev.jsons());
    store.set_progress("0", &progress_json("DONE", "Factory revision"))?;
    store.mark_done("0")?;
    let boot = Boot {
        rev: "0".into(),
        try_rev: None,
        tried: false,
    };
    store.set_boot(&boot)?;
    Ok(boot)
}
