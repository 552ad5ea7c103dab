#!/usr/bin/env bash
# The file catalog on the file systems guests run: one 1 GiB image each of XFS, btrfs
# (plain and zstd-compressed) and ext4, made by the real tools from the same ~830 MB tree of
# real files (/usr/share and /usr/lib/python3*), then the catalog benchmark on each:
# indexing through the storage agent's scan of a vault snapshot, and a single-file restore
# (the file closest to 10 MiB) with the bytes it fetched from the vault.
#
#   bench/catalog-fs.sh [WORKDIR]        (default /var/tmp/cairn-catalog-fs; ~6 GB)
#
# Prints one JSON line per run (3 per image: the first after dropping the page cache).
# Targets: indexing ≤ 2 s per image; vault bytes read for a file ≤ 2× its size.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/var/tmp/cairn-catalog-fs}
SRC=$W/src
mkdir -p "$W"

if [ ! -d "$SRC" ]; then
    mkdir -p "$SRC.tmp"
    cp -a /usr/share "$SRC.tmp/share"
    cp -a /usr/lib/python3* "$SRC.tmp/"
    # XFS protofiles and our comparison want plain names: drop names with white space.
    find "$SRC.tmp" -depth -name '* *' -exec rm -rf {} +
    mv "$SRC.tmp" "$SRC"
fi

# An mkfs.xfs protofile (xfsprogs 6.1 has no directory option): one line per entry,
# `name type+suid+sgid+mode uid gid [source|target]`, `$` closing each directory.
proto() {
    python3 - "$1" <<'EOF'
import os, stat, sys
def walk(path, depth):
    out = []
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        st = os.lstat(p)
        mode = "%03o" % (st.st_mode & 0o777)
        ind = " " * depth
        if stat.S_ISDIR(st.st_mode):
            out.append(f"{ind}{name} d--{mode} {st.st_uid} {st.st_gid}")
            out += walk(p, depth + 1)
            out.append(f"{ind}$")
        elif stat.S_ISLNK(st.st_mode):
            out.append(f"{ind}{name} l--{mode} {st.st_uid} {st.st_gid} {os.readlink(p)}")
        elif stat.S_ISREG(st.st_mode):
            out.append(f"{ind}{name} ---{mode} {st.st_uid} {st.st_gid} {p}")
    return out
root = sys.argv[1]
st = os.stat(root)
print("/dev/null\n0 0\nd--%03o 0 0" % (st.st_mode & 0o777))
print("\n".join(walk(root, 1)))
print("$")
EOF
}

build() {
    local kind=$1 img=$W/$1.img
    [ -f "$img" ] && return
    rm -f "$img.tmp"
    truncate -s 1G "$img.tmp"
    local t0=$SECONDS
    case $kind in
        xfs)
            proto "$SRC" > "$W/xfs.proto"
            mkfs.xfs -q -f -p "$W/xfs.proto" "$img.tmp" ;;
        btrfs) mkfs.btrfs -q -f --rootdir "$SRC" "$img.tmp" ;;
        btrfs-zstd) mkfs.btrfs -q -f --rootdir "$SRC" --compress zstd "$img.tmp" ;;
        ext4)
            mke2fs -q -F -t ext4 -d "$SRC" "$img.tmp"
            e2fsck -fyD "$img.tmp" > /dev/null || true ;;
    esac
    mv "$img.tmp" "$img"
    echo "built $kind in $((SECONDS - t0)) s" >&2
}

# PROFILE=release (the figures in docs/BENCHMARKS.md) or dev (our crates at -O1).
PROFILE=${PROFILE:-release}
cargo build -q --profile "$PROFILE" -p cairn-server --example catalog_bench
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/examples/catalog_bench
for kind in xfs btrfs btrfs-zstd ext4; do
    build "$kind"
    # The first invocation backs the image up into its vault (not timed); then the page
    # cache is dropped so that each image's first run reads the vault cold.
    [ -d "$W/work-$kind/repo" ] || "$BIN" "$W/$kind.img" "$W/work-$kind" > /dev/null
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    echo "== $kind" >&2
    "$BIN" "$W/$kind.img" "$W/work-$kind" | sed "s/^{/{\"fs\":\"$kind\",/"
done
