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

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target"
fi
build=(build --release --locked --quiet --target "$target" --no-default-features --features "$features" --bin pv-bridge)
if [ "$arch" = x86_64 ]; then
    # ring's C builds with the host gcc for x86_64 musl.
    CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-gcc}" cargo "${build[@]}"
else
    # Cross: cargo-zigbuild (pip install ziglang cargo-zigbuild) brings the C toolchain.
    command -v cargo-zigbuild >/dev/null || { echo "cross builds need cargo-zigbuild: pip install ziglang cargo-zigbuild" >&2; exit 2; }
    cargo zigbuild "${build[@]:1}"
fi
bin="target/$target/release/pv-bridge"

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
