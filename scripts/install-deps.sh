#!/usr/bin/env bash
# Install the Debian packages Cairn's tests need, on a fresh Debian 12 (bookworm) machine.
#
# Run as root. Idempotent: a second run installs nothing and skips `apt-get update` when the
# package lists are already there.
#
# QEMU: the machine ships qemu-utils 10.x from bookworm-backports. Debian 12's own
# qemu-system-x86 (7.2) would *remove* it (Breaks: on qemu-system-common < 8.0), so every package
# here is installed from bookworm-backports (`-t`), whose mirror is derived from the machine's own
# /etc/apt/sources.list.d/debian.sources.
#
# Other crates add their packages to CAIRN_APT_PACKAGES below (or export CAIRN_EXTRA_APT_PACKAGES).
set -euo pipefail

# Everything the test suites need from Debian, in one list. `-t bookworm-backports` only raises the
# priority of backports: a package that is not there comes from bookworm itself.
#   qemu-utils        qemu-img, qemu-io, qemu-storage-daemon (preinstalled on our machines)
#   qemu-system-x86   qemu-system-x86_64 for the hypervisor tests
#   e2fsprogs         mke2fs -d, e2fsck, debugfs: guest data disks and their checks
#   python3, lz4      scripts/build-test-guest.sh (vmlinux extraction)
#   procps            kill(1), used by tests to stop and resume QEMU
#   libnbd-bin        nbdinfo --map / nbdcopy: oracle for the NBD client and fleecing exports
#   xfsprogs          mkfs.xfs: a reflink-capable file system for storage-unit snapshots
#   btrfs-progs       mkfs.btrfs: the other reflink-capable file system
#   postgresql        the catalog's migrations are tested on a real PostgreSQL
#   dosfstools        mkfs.fat: FAT12/16/32 test images for cairn-fs
#   mtools            mcopy: fills FAT test images without mounting
#   ntfs-3g           mkntfs: NTFS test images for cairn-fs
#   wimtools          wimlib-imagex capture/apply: fills NTFS test images without mounting
#   lvm2              pvcreate/vgcreate/lvcreate/vgcfgrestore: LVM test images (never activated)
#   cryptsetup-bin    cryptsetup luksFormat: a LUKS volume the catalog must name, not read
#   fdisk             sfdisk: GPT and MBR partition tables on plain image files
#   libvirt-*         libvirtd + virtlogd + virsh: the host agent's libvirt driver and its tests
#   libvirt-dev       headers for the `libvirt` cargo feature (the `virt` crate links libvirt.so)
#   pkg-config        how the `virt` crate's build finds libvirt
#   virtnbdbackup     the peer the libvirt coexistence test and benchmark compare against
CAIRN_APT_PACKAGES="
  qemu-utils
  qemu-system-x86
  e2fsprogs
  python3
  lz4
  procps
  libnbd-bin
  xfsprogs
  btrfs-progs
  postgresql
  dosfstools
  mtools
  ntfs-3g
  wimtools
  lvm2
  cryptsetup-bin
  fdisk
  libvirt-daemon-system
  libvirt-daemon-driver-qemu
  libvirt-clients
  libvirt-dev
  pkg-config
  virtnbdbackup
  ${CAIRN_EXTRA_APT_PACKAGES:-}
"

APT_LOCK=(-o DPkg::Lock::Timeout=600)
DEBIAN_SOURCES=/etc/apt/sources.list.d/debian.sources
BACKPORTS_SOURCES=/etc/apt/sources.list.d/cairn-bookworm-backports.sources

log() { printf 'install-deps: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

# 1. A deb822 source for bookworm-backports, on the same mirror as the machine's bookworm source.
need_update=0
if [[ ! -f $BACKPORTS_SOURCES ]]; then
    if [[ ! -f $DEBIAN_SOURCES ]]; then
        log "$DEBIAN_SOURCES not found: cannot derive the mirror for bookworm-backports"
        exit 1
    fi
    # The URIs: line of the stanza whose Suites: include plain `bookworm` (not the security one).
    uris_line=$(sed -n '/^URIs:/h; /^Suites:.*[[:space:]]bookworm\([[:space:]]\|$\)/{x;p;q}' "$DEBIAN_SOURCES")
    if [[ -z $uris_line ]]; then
        log "no URIs: line for suite bookworm in $DEBIAN_SOURCES"
        exit 1
    fi
    signed_by=$(sed -n '/^URIs:/h; /^Suites:.*[[:space:]]bookworm\([[:space:]]\|$\)/{n;:a;/^Signed-By:/{p;q};/^$/q;n;ba}' "$DEBIAN_SOURCES")
    signed_by=${signed_by:-Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg}
    tmp=$(mktemp "$BACKPORTS_SOURCES.XXXXXX")
    {
        echo "# Written by cairn scripts/install-deps.sh: QEMU matching the preinstalled qemu-utils."
        echo "Types: deb"
        echo "$uris_line"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        echo "$signed_by"
    } >"$tmp"
    chmod 0644 "$tmp"
    mv "$tmp" "$BACKPORTS_SOURCES"
    log "wrote $BACKPORTS_SOURCES ($uris_line)"
    need_update=1
fi

# 2. `apt-get update` only when some list is missing.
if ! compgen -G '/var/lib/apt/lists/*_dists_bookworm-backports_*Packages*' >/dev/null ||
    ! compgen -G '/var/lib/apt/lists/*_dists_bookworm_*Packages*' >/dev/null; then
    need_update=1
fi
if [[ $need_update -eq 1 ]]; then
    log "apt-get update"
    apt-get "${APT_LOCK[@]}" update -q
fi

# 3. Install what is missing.
missing=()
for pkg in $CAIRN_APT_PACKAGES; do
    if [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true) != ii* ]]; then
        missing+=("$pkg")
    fi
done
# QEMU's system emulator must be the very version of the preinstalled qemu-utils: pin it when the
# archive still has that version (otherwise take backports' candidate and let step 4 check it).
utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
for i in "${!missing[@]}"; do
    case ${missing[$i]} in
    qemu-system-*)
        if [[ -n $utils_version ]] &&
            apt-cache show "${missing[$i]}=$utils_version" >/dev/null 2>&1; then
            missing[i]="${missing[$i]}=$utils_version"
        fi
        ;;
    esac
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing: ${missing[*]}"
    apt-get "${APT_LOCK[@]}" install -y -q --no-install-recommends \
        -t bookworm-backports "${missing[@]}"
else
    log "all packages already installed"
fi

# 4. The preinstalled qemu-utils must have survived, and QEMU's parts must agree on the version.
img_version=$(qemu-img --version | sed -n '1s/^qemu-img version \([0-9][0-9.]*\).*/\1/p')
case $img_version in
10.*) ;;
*)
    log "qemu-img is '$img_version', expected 10.x: qemu-utils was replaced"
    exit 1
    ;;
esac
if command -v qemu-system-x86_64 >/dev/null; then
    sys_version=$(qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
    if [[ ${sys_version%%.*} != "${img_version%%.*}" ]]; then
        log "warning: qemu-system-x86_64 $sys_version vs qemu-img $img_version"
    fi
    log "ok: qemu-img $img_version, qemu-system-x86_64 $sys_version"
else
    log "qemu-system-x86_64 missing after install"
    exit 1
fi
