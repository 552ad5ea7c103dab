#!/usr/bin/env bash
# Storage-agent benchmark on a loop-mounted XFS (reflinks), beside restic's day-2 backup of
# the same corpus in the same run. Needs root (mount), xfsprogs, restic, and the corpus made by
# `bench/run.sh deps corpus`.
#   WORK=/tmp/cairn-bench/work-s0.5 bench/storage.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/cairn-bench/work-s${SCALE:-0.5}}
OUT=${1:-${TMPDIR:-/tmp}/cairn-bench/storage}
mkdir -p "$OUT"
cargo build --release --locked -q -p cairn-storage --example storage_bench
BIN=$ROOT/target/release/examples/storage_bench

IMG=$OUT/xfs.img
MNT=$OUT/mnt
rm -f "$IMG"
truncate -s 24G "$IMG"
mkfs.xfs -q -f "$IMG"
mkdir -p "$MNT"
mount -o loop "$IMG" "$MNT"
trap 'umount "$MNT" 2>/dev/null || true; rm -f "$IMG"' EXIT

echo "storage agent on XFS (reflink):" >&2
"$BIN" "$MNT" "$WORK" "$OUT/storage.json"

echo "restic day-2 on the same corpus, same machine, same run:" >&2
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$OUT/restic.cache
rm -rf "$OUT/restic"
restic -r "$OUT/restic" init -q --repository-version 2
mkdir -p "$OUT/stage"
ln -f "$WORK/img1.raw" "$OUT/stage/disk.raw"
restic -r "$OUT/restic" backup -q --host bench "$OUT/stage/disk.raw"
ln -f "$WORK/day2.raw" "$OUT/stage/disk.raw"
t0=$(date +%s.%N)
restic -r "$OUT/restic" backup -q --host bench "$OUT/stage/disk.raw"
t1=$(date +%s.%N)
python3 - "$OUT/storage.json" "$t0" "$t1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
restic = float(sys.argv[3]) - float(sys.argv[2])
r["restic_day2_s"] = restic
r["incremental_vs_full"] = r["incremental_s"] / r["full_backup_s"]
r["incremental_vs_restic_day2"] = r["incremental_s"] / restic
r["sent_vs_changed"] = r["incremental_bytes_sent"] / r["changed_bytes_written"]
json.dump(r, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: r[k] for k in ("full_backup_s", "incremental_s", "restic_day2_s", "incremental_vs_full",
      "incremental_vs_restic_day2", "sent_vs_changed", "fiemap_diff_s", "restore_bit_exact")}, indent=1))
PY
