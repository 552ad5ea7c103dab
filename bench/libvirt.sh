#!/usr/bin/env bash
# Cairn's libvirt driver and virtnbdbackup on the same domain and disk, in turn (the ignored
# e2e test `bench_libvirt_vs_virtnbdbackup` in crates/cairn-cli/tests/e2e/libvirt_peers.rs):
# full backup wall, guest freeze window (both read from libvirtd's debug log: freeze command
# sent to the thaw's reply), bytes each adds to its store after 1% of the disk's 64 KiB blocks
# are rewritten, and the restore of the newest incremental as a new domain.
#
#   sudo bench/libvirt.sh                  (root: libvirtd, qemu:///system)
#
# Environment: CAIRN_BENCH_REPS (rounds, default 3), CAIRN_BENCH_DISK_MIB (default 1024).
# Packages: scripts/install-deps.sh installs libvirt and virtnbdbackup.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
[[ $(id -u) == 0 ]] || { echo "libvirt.sh: run as root" >&2; exit 1; }
bash scripts/install-deps.sh
uptime
exec cargo test -q --locked -p cairn-cli --test e2e bench_libvirt_vs_virtnbdbackup -- \
    --ignored --nocapture
