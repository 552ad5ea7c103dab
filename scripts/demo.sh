#!/usr/bin/env bash
# The README's first command: installs what Cairn needs, builds it, and runs its main job on the
# embedded default — every role in one process, a local directory vault, the SQLite catalog —
# with two or three tiny QEMU guests (ext4 disks, qemu-guest-agent):
#   full backup → guest writes → incremental (dirty bitmap) and an idle VM's incremental →
#   group backup (one storage-unit snapshot, VM snapshots released at once) → restore one VM
#   as a new VM, check its disk bit-exact against the vault and boot it → summary.
#
#   scripts/demo.sh [--keep DIR] [--vms 2|3]
#
# Run as root on a fresh Debian 12 machine (it installs Debian packages and loop-mounts an XFS
# file system for the datastore; without root it says so and falls back to a plain directory).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [[ $(id -u) -eq 0 ]]; then
    scripts/install-deps.sh
else
    echo "demo: not root, skipping package installation" >&2
fi

echo "demo: building the test guest (cached in target/test-guest)" >&2
scripts/build-test-guest.sh "$ROOT/target/test-guest"

echo "demo: building cairn (profile demo: unoptimised, the fastest cold build)" >&2
cargo build --locked -q -p cairn-cli --profile demo

exec "$ROOT/target/demo/cairn" demo --guest "$ROOT/target/test-guest" "$@"
