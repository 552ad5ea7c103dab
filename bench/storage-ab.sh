#!/usr/bin/env bash
# A/B of storage_bench binaries: alternates them ROUNDS times on one mounted reflink file
# system, timing the incremental and its CPU (perf stat over the incremental only), and
# prints medians per binary. Needs root (perf), perf, and the corpus of `bench/run.sh deps
# corpus`. Copy each build of the example to its own file first:
#   cp target/release/examples/storage_bench /tmp/sb-new
#   bench/storage-ab.sh 8 /mnt/xfs /tmp/cairn-bench/work-s0.5 /tmp/sb-old /tmp/sb-new
set -euo pipefail
ROUNDS=$1 MNT=$2 CORPUS=$3
shift 3
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for _ in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    rm -f "$TMP/ctl"
    mkfifo "$TMP/ctl"
    PERF_CTL=$TMP/ctl STORAGE_BENCH_QUICK=1 perf stat -e task-clock --control "fifo:$TMP/ctl" -D -1 \
      -o "$TMP/stat.txt" -- "$bin" "$MNT" "$CORPUS" "$TMP/out.json" >/dev/null 2>&1
    cpu=$(awk '/task-clock/ {print $1}' "$TMP/stat.txt")
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], r['full_backup_s'], r['incremental_s'], sys.argv[3])" \
      "$TMP/out.json" "$bin" "$cpu" >> "$TMP/results.txt"
  done
done
python3 - "$TMP/results.txt" <<'PY'
import collections, statistics as st, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    b, f, i, c = line.split()
    runs[b].append((float(f), float(i), float(c.replace(",", ""))))
for b, v in runs.items():
    print(f"{b}: {len(v)} runs, medians: full {st.median(x[0] for x in v):.3f} s, "
          f"incremental {st.median(x[1] for x in v):.3f} s, ratio {st.median(x[1] / x[0] for x in v):.3f}, "
          f"incremental CPU {st.median(x[2] for x in v):.0f} ms")
PY
