#!/usr/bin/env bash
# Builds the pv-bridge Pantavisor container for one architecture:
#   container/build.sh [x86_64|aarch64|armv7] [OUT]   (default x86_64, target/container/<arch>)
# Produces in OUT:
#   rootfs/                 what the image holds (also the Dockerfile's context)
#   root.squashfs           the image (reproducible: fixed times, root-owned)
#   run.json, lxc.container.conf, src.json
#   fragment.json           the state-JSON keys to merge into a device revision
#   objects/<sha256>        the objects the fragment names
#   pvr/pv-bridge/          the same files by name, to copy into a `pvr` checkout
# Environment: FEATURES (default local,mqtt,pantahub,azure,dbus; add hawkbit for the
# hawkBit backend, about 250 KB more: docs/performance.md), SOURCE_DATE_EPOCH (default 0).
# aarch64 and armv7 need cargo-zigbuild (.venv-cross, see the README's install step);
# armv7 also the nightly toolchain with rust-src.
set -euo pipefail
cd "$(dirname "$0")/.."

arch="${1:-x86_64}"
out="${2:-target/container/$arch}"
features="${FEATURES:-local,mqtt,pantahub,azure,dbus}"
epoch="${SOURCE_DATE_EPOCH:-0}"

case "$arch" in
    x86_64) target=x86_64-unknown-linux-musl ;;
    aarch64) target=aarch64-unknown-linux-musl ;;
    armv7) target=armv7-unknown-linux-musleabihf ;;
    *) echo "unknown architecture $arch (x86_64, aarch64, armv7)" >&2; exit 2 ;;
esac
command -v mksquashfs >/dev/null || { echo "mksquashfs is needed: apt-get install -y squashfs-tools" >&2; exit 2; }

# The device build (ADR 0019): the `device` profile (panic = "abort" under the
# supervisor), non-PIE, no unwinder lookup table.
flags="-C relocation-model=static -C link-arg=-Wl,--no-eh-frame-hdr"
build=(build --profile device --locked --quiet --target "$target" --no-default-features --features "$features" --bin pv-bridge)
cross() {
    # Cross builds: cargo-zigbuild brings the C toolchain (ring) and the linker.
    # The README's install step puts it in .venv-cross.
    if ! command -v cargo-zigbuild >/dev/null && [ -x .venv-cross/bin/cargo-zigbuild ]; then
        PATH="$PWD/.venv-cross/bin:$PATH"
    fi
    command -v cargo-zigbuild >/dev/null || { echo "cross builds need cargo-zigbuild: python3 -m venv .venv-cross && .venv-cross/bin/pip install -r container/cross-requirements.txt" >&2; exit 2; }
}
case "$arch" in
    x86_64)
        rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"
        # ring's C builds with the host gcc for x86_64 musl.
        CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-gcc}" \
            CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$flags" cargo "${build[@]}"
        ;;
    aarch64)
        cross
        rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$flags" cargo zigbuild "${build[@]:1}"
        ;;
    armv7)
        # No prebuilt armv7 musl std can be downloaded for the stable toolchain:
        # nightly builds std from source (rust-src) for the target (ADR 0020).
        cross
        cargo +nightly --version >/dev/null 2>&1 || { echo "armv7 needs the nightly toolchain: rustup toolchain install nightly --profile minimal" >&2; exit 2; }
        rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' \
            || rustup component add rust-src --toolchain nightly
        # zig brings musl's start files (link-self-contained=no).
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_MUSLEABIHF_RUSTFLAGS="$flags -C link-self-contained=no -A linker-messages" \
            cargo +nightly zigbuild -Zbuild-std=std,panic_abort "${build[@]:1}"
        ;;
esac
bin="target/$target/device/pv-bridge"

rm -rf "$out"
mkdir -p "$out/rootfs/usr/bin" "$out/rootfs/etc/pv-bridge" "$out/rootfs/etc/ssl/certs" \
    "$out/rootfs/storage/pv-bridge" "$out/rootfs/pantavisor" "$out/rootfs/tmp" "$out/objects"
install -m 0755 "$bin" "$out/rootfs/usr/bin/pv-bridge"
install -m 0644 container/config.toml "$out/rootfs/etc/pv-bridge/config.toml"
ca=/etc/ssl/certs/ca-certificates.crt
[ -f "$ca" ] || { echo "no CA bundle at $ca: apt-get install -y ca-certificates" >&2; exit 2; }
install -m 0644 "$ca" "$out/rootfs/etc/ssl/certs/ca-certificates.crt"
find "$out/rootfs" -exec touch -h -d "@$epoch" {} +

# mksquashfs takes its file and image times from SOURCE_DATE_EPOCH.
SOURCE_DATE_EPOCH="$epoch" mksquashfs "$out/rootfs" "$out/root.squashfs" \
    -noappend -all-root -no-xattrs -comp gzip -quiet >/dev/null
cp container/run.json container/lxc.container.conf container/src.json "$out/"

sha() { sha256sum "$1" | cut -d' ' -f1; }
root_sha=$(sha "$out/root.squashfs")
conf_sha=$(sha "$out/lxc.container.conf")
cp "$out/root.squashfs" "$out/objects/$root_sha"
cp "$out/lxc.container.conf" "$out/objects/$conf_sha"
# The same files by name, for a pvr checkout (`cp -r pvr/pv-bridge <checkout>/`).
mkdir -p "$out/pvr/pv-bridge"
cp "$out/root.squashfs" "$out/run.json" "$out/src.json" "$out/lxc.container.conf" "$out/pvr/pv-bridge/"
python3 - "$out" "$root_sha" "$conf_sha" <<'PY'
import json, sys
out, root, conf = sys.argv[1:4]
frag = {
    "pv-bridge/run.json": json.load(open(f"{out}/run.json")),
    "pv-bridge/src.json": json.load(open(f"{out}/src.json")),
    "pv-bridge/lxc.container.conf": conf,
    "pv-bridge/root.squashfs": root,
}
json.dump(frag, open(f"{out}/fragment.json", "w"), indent=2, sort_keys=True)
PY
echo "built $out: root.squashfs $(stat -c %s "$out/root.squashfs") B ($root_sha), binary $(stat -c %s "$bin") B for $target"
