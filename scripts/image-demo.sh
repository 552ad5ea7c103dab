#!/usr/bin/env bash
# The vault on its own, with disk image files: installs what Cairn needs, builds it, and runs
# image backups on a local directory vault with a real ext4 disk image:
#   full backup → a day of changes → incremental backup of only the changed blocks →
#   restore of both points, checked bit-exact → verify → the same through the vault service.
#
#   scripts/image-demo.sh [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

KEEP=""
if [[ ${1:-} == --keep ]]; then KEEP=${2:?--keep needs a directory}; fi

if [[ $(id -u) -eq 0 ]]; then
    scripts/install-deps.sh
else
    echo "demo: not root, skipping package installation" >&2
fi

echo "demo: building cairn (release)" >&2
cargo build --release --locked -q -p cairn-cli
CAIRN=$ROOT/target/release/cairn

if [[ -n $KEEP ]]; then
    W=$KEEP
    mkdir -p "$W"
else
    W=$(mktemp -d)
    trap 'kill ${VAULT_PID:-} 2>/dev/null || true; rm -rf "$W"' EXIT
fi
say() { printf '\n== %s\n' "$*"; }

say "a 256 MiB ext4 disk image holding /usr/share and random files"
mkdir -p "$W/tree"
cp -r /usr/share/doc "$W/tree/doc" 2>/dev/null || true
cp -r /usr/share/perl5 "$W/tree/perl5" 2>/dev/null || true
head -c $((24 << 20)) /dev/urandom >"$W/tree/random.bin"
rm -f "$W/disk.img"
mke2fs -q -F -t ext4 -d "$W/tree" "$W/disk.img" 256M
ls -lsh "$W/disk.img"

say "repository"
rm -rf "$W/repo"
$CAIRN repo init "$W/repo"

say "full backup"
$CAIRN image backup --repo "$W/repo" --name vm1-disk0 --json "$W/disk.img" | tee "$W/full.json"

say "day 2: 200 random 4 KiB blocks rewritten in place (the list of changed regions is kept)"
cp --sparse=always "$W/disk.img" "$W/day2.img"
python3 - "$W/day2.img" "$W/changed.txt" <<'PY'
import os, random, sys
img, changed = sys.argv[1], sys.argv[2]
size = os.path.getsize(img)
rnd = random.Random(7)
blocks = sorted(rnd.sample(range(size // 4096), 200))
with open(img, "r+b") as f, open(changed, "w") as c:
    for b in blocks:
        f.seek(b * 4096)
        f.write(os.urandom(4096))
        c.write(f"{b * 4096} 4096\n")
PY

say "incremental backup: reads only the changed regions, stores a synthetic full"
$CAIRN image backup --repo "$W/repo" --name vm1-disk0 --parent vm1-disk0 --changed "$W/changed.txt" --json "$W/day2.img" | tee "$W/incr.json"

say "snapshots"
$CAIRN image list --repo "$W/repo"

say "restore both points and compare bit for bit"
FULL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot"])' "$W/full.json")
INCR=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot"])' "$W/incr.json")
$CAIRN image restore --repo "$W/repo" "$FULL" "$W/restored-full.img"
$CAIRN image restore --repo "$W/repo" "$INCR" "$W/restored-day2.img"
cmp "$W/disk.img" "$W/restored-full.img"
echo "full backup restores bit-exact"
cmp "$W/day2.img" "$W/restored-day2.img"
echo "incremental backup restores bit-exact (as a full)"

say "verify: re-hash everything reachable"
$CAIRN repo verify "$W/repo"

say "the same through the vault service (HTTPS on 127.0.0.1, token, pinned certificate)"
$CAIRN vault --repo "$W/served" --listen 127.0.0.1:0 >"$W/vault.json" 2>"$W/vault.log" &
VAULT_PID=$!
for _ in $(seq 100); do [[ -s $W/vault.json ]] && break; sleep 0.1; done
URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listen"])' "$W/vault.json")
export CAIRN_FINGERPRINT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["fingerprint"])' "$W/vault.json")
export CAIRN_TOKEN=$(cat "$W/served/service/token")
$CAIRN image backup --repo "$URL" --name vm1-disk0 --json "$W/disk.img"
$CAIRN image backup --repo "$URL" --name vm1-disk0 --parent vm1-disk0 --changed "$W/changed.txt" --json "$W/day2.img"
$CAIRN image restore --repo "$URL" vm1-disk0 "$W/restored-remote.img"
cmp "$W/day2.img" "$W/restored-remote.img"
echo "restore through the service is bit-exact"
kill "$VAULT_PID"; wait "$VAULT_PID" 2>/dev/null || true

say "summary"
python3 - "$W/full.json" "$W/incr.json" <<'PY'
import json, sys
f, i = (json.load(open(p)) for p in sys.argv[1:3])
mb = lambda b: f"{b / 1e6:.1f} MB"
print(f"full:        read {mb(f['bytes_read'])}, new {mb(f['bytes_new'])}, repository grew {mb(f['bytes_stored'])}, {f['duration_ms']} ms")
print(f"incremental: read {mb(i['bytes_read'])}, new {mb(i['bytes_new'])}, repository grew {mb(i['bytes_stored'])}, {i['duration_ms']} ms")
print("changed:     0.8 MB (200 x 4 KiB)")
PY
[[ -n $KEEP ]] && echo "demo: everything kept in $W"
echo "demo: OK"
