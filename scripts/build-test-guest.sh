#!/usr/bin/env bash
# Build Cairn's tiny Linux test guest: an uncompressed `vmlinux` (PVH entry, boots ~2x faster than
# the bzImage under TCG) and a busybox initramfs running qemu-guest-agent.
#
#   scripts/build-test-guest.sh [OUTDIR]      (default: <repo>/target/test-guest)
#
# Nothing is installed system-wide: the Debian packages are fetched with `apt-get download` and
# unpacked with `dpkg -x` into a scratch directory (the package lists must exist: run
# scripts/install-deps.sh or `apt-get update` once).
#
# Output, complete only once OUTDIR/stamp exists (a second run with the same recipe exits at once):
#   OUTDIR/vmlinux     the kernel, to pass with -kernel
#   OUTDIR/initrd.gz   the initramfs, to pass with -initrd
#   OUTDIR/stamp       recipe hash and the versions used
#
# The guest's /init mounts proc, sysfs and devtmpfs, loads the virtio and SCSI modules, mounts
# /dev/vda (ext4) at /mnt when present, starts `qemu-ga` on the virtio-serial port named
# org.qemu.guest_agent.0 and prints `CAIRN-GUEST-READY` on the console (ttyS0).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
OUTDIR=${1:-$REPO_ROOT/target/test-guest}
HELPER=$SCRIPT_DIR/test-guest-helper.py
APT=(apt-get -q -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root)

KERNEL_META=linux-image-cloud-amd64
GUEST_PACKAGES=(busybox-static qemu-guest-agent)
MODULES=(virtio_pci virtio_blk virtio_console virtio_scsi sd_mod)

log() { printf 'build-test-guest: %s\n' "$*" >&2; }

# Test binaries run in parallel and may all call this script at once: the first builds while
# the others wait here, then find the guest up to date.
mkdir -p "$OUTDIR"
exec 9>"$OUTDIR/.build.lock"
flock 9

# The recipe is this script plus its helper: change either and the guest is rebuilt.
recipe=$(cat "$0" "$HELPER" | sha256sum | cut -d' ' -f1)
if [[ -f $OUTDIR/stamp && -f $OUTDIR/vmlinux && -f $OUTDIR/initrd.gz ]] &&
    grep -qx "recipe=$recipe" "$OUTDIR/stamp"; then
    log "up to date: $OUTDIR"
    exit 0
fi

if ! apt-cache show busybox-static >/dev/null 2>&1; then
    log "APT has no package lists: run scripts/install-deps.sh (or apt-get update) first"
    exit 1
fi

mkdir -p "$OUTDIR"
rm -f "$OUTDIR/stamp"
WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/debs" "$WORK/pkgroot" "$WORK/initramfs"

# Download into debs/ and unpack into pkgroot/.
fetch() {
    (cd "$WORK/debs" && "${APT[@]}" download "$@" >&2)
    local deb
    for pkg in "$@"; do
        for deb in "$WORK/debs/${pkg%%=*}"_*.deb; do
            dpkg -x "$deb" "$WORK/pkgroot"
        done
    done
}

# 1. Packages: the kernel image the cloud meta-package points at, busybox, qemu-ga.
kernel_pkg=$(apt-cache depends "$KERNEL_META" | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1)
if [[ -z $kernel_pkg ]]; then
    log "cannot resolve $KERNEL_META to a kernel image package"
    exit 1
fi
log "fetching $kernel_pkg ${GUEST_PACKAGES[*]}"
fetch "$kernel_pkg" "${GUEST_PACKAGES[@]}"

kver=${kernel_pkg#linux-image-}
vmlinuz=$WORK/pkgroot/boot/vmlinuz-$kver
moddir=$WORK/pkgroot/lib/modules/$kver
[[ -f $vmlinuz && -d $moddir ]] || {
    log "unexpected layout of $kernel_pkg"
    exit 1
}

# 2. The uncompressed kernel. The decompressor comes from the host, or from its Debian package.
tooldir=""
if ! command -v lz4 >/dev/null; then
    log "no lz4 on the host: fetching the lz4 package"
    fetch lz4
    tooldir=$WORK/pkgroot/usr/bin
fi
python3 "$HELPER" vmlinux "$vmlinuz" "$WORK/vmlinux" "$tooldir"

# 3. The initramfs tree.
ir=$WORK/initramfs
mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,run,tmp,etc,var,lib/modules}
ln -s ../run "$ir/var/run"
cp "$WORK/pkgroot/bin/busybox" "$ir/bin/busybox"
"$ir/bin/busybox" --list | grep -q '^insmod$'

# Modules, dependencies first, in load order.
python3 "$HELPER" moddeps "$moddir" "${MODULES[@]}" >"$WORK/modules.order"
: >"$ir/lib/modules/load-order"
while read -r rel; do
    cp "$moddir/$rel" "$ir/lib/modules/"
    basename "$rel" >>"$ir/lib/modules/load-order"
done <"$WORK/modules.order"

# qemu-ga and the shared libraries `ldd` lists; libraries the host lacks come from the packages
# qemu-guest-agent depends on (a few rounds, for libraries of libraries).
qga=$WORK/pkgroot/usr/sbin/qemu-ga
libpath=$WORK/pkgroot/lib/x86_64-linux-gnu:$WORK/pkgroot/usr/lib/x86_64-linux-gnu
fetched_deps=" "
for round in 1 2 3 4; do
    missing=$(LD_LIBRARY_PATH=$libpath ldd "$qga" | awk '/not found/ {print $1}')
    [[ -z $missing ]] && break
    log "round $round: libraries missing on the host: $(echo $missing)"
    deps=()
    for pkg in $(dpkg-deb -f "$WORK"/debs/qemu-guest-agent_*.deb Depends | tr ',' '\n' |
        sed 's/[(|].*//; s/ //g') $(ls "$WORK/debs" | sed -n 's/^\(lib[^_]*\)_.*/\1/p'); do
        for dep in $(apt-cache depends "$pkg" 2>/dev/null | sed -n 's/^ *Depends: \(lib[^ <]*\)$/\1/p') "$pkg"; do
            if [[ $dep == lib* && $fetched_deps != *" $dep "* && $dep != libc6 ]]; then
                fetched_deps+="$dep "
                deps+=("$dep")
            fi
        done
    done
    [[ ${#deps[@]} -eq 0 ]] && break
    fetch "${deps[@]}"
done
if LD_LIBRARY_PATH=$libpath ldd "$qga" | grep -q 'not found'; then
    log "qemu-ga still misses libraries:"
    LD_LIBRARY_PATH=$libpath ldd "$qga" | grep 'not found' >&2
    exit 1
fi
cp "$qga" "$ir/usr/sbin/qemu-ga"
LD_LIBRARY_PATH=$libpath ldd "$qga" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' |
    while read -r lib; do
        # Keep the path ldd shows (the loader's default search path), with the real file; a
        # library from an unpacked package goes where the package would have put it.
        dest=${lib#"$WORK/pkgroot"}
        mkdir -p "$ir$(dirname "$dest")"
        cp -L "$lib" "$ir$dest"
    done

cat >"$ir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
for m in $(cat /lib/modules/load-order); do
    insmod /lib/modules/$m || echo "cairn-init: insmod $m failed"
done
# The data disk, when there is one.
i=0
while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /mnt || echo "cairn-init: mounting /dev/vda failed"
fi
# The guest agent's port, found by name.
port=""
i=0
while [ -z "$port" ] && [ $i -lt 50 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] && [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    [ -z "$port" ] && sleep 0.1
    i=$((i + 1))
done
if [ -n "$port" ]; then
    qemu-ga -m virtio-serial -p "$port" -d -t /run || echo "cairn-init: qemu-ga failed"
else
    echo "cairn-init: no org.qemu.guest_agent.0 port"
fi
echo CAIRN-GUEST-READY
while true; do sleep 3600; done
EOF
chmod 0755 "$ir/init"

# 4. Pack: newc cpio (busybox's own), gzip -1.
(cd "$ir" && find . | sort | "$ir/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 >"$WORK/initrd.gz"

mv "$WORK/vmlinux" "$OUTDIR/vmlinux"
mv "$WORK/initrd.gz" "$OUTDIR/initrd.gz"
{
    echo "recipe=$recipe"
    echo "kernel=$kernel_pkg"
    for deb in "$WORK"/debs/*.deb; do
        echo "deb=$(basename "$deb")"
    done
} >"$OUTDIR/stamp.tmp"
mv "$OUTDIR/stamp.tmp" "$OUTDIR/stamp"
log "done: $OUTDIR ($(du -h "$OUTDIR/initrd.gz" | cut -f1) initrd, kernel $kver)"
