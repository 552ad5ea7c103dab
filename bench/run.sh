#!/usr/bin/env bash
# Runs the shared benchmark harness (../shared/bench) with Cairn beside restic, borg and casync.
#   bench/run.sh                      # corpus (if missing) + tool matrix + report
#   REPS=1 TOOLS=cairn bench/run.sh   # quicker: only Cairn's variants
# Results land in $RES (default /tmp/cairn-bench/results-s$SCALE); see docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SHARED=${SHARED:-$ROOT/../shared}
cargo build --release --locked -q -p cairn-cli
export CAIRN=$ROOT/target/release/cairn
export EXTRA_TOOLS=$ROOT/bench/cairn-tools.json
if [[ $# -eq 0 ]]; then set -- deps corpus tools report; fi
exec "$SHARED/bench/bench.sh" "$@"
