#!/usr/bin/env bash
# Soak: backup, restore, prune, GC and verify cycles on a directory repository, with random
# faults, for a given time. Prints what it did and anything lost; exits 1 if anything was.
#
#   scripts/soak.sh [SECONDS] [WORKDIR]        (default: 600 s in a fresh temporary directory)
#
# Faults, chosen at random per step: none; SIGKILL of the `cairn` process after a random delay;
# a fault point (CAIRN_FAULT_POINT) that dies as SIGKILL would, before a manifest is written or
# in the middle of GC. Every committed snapshot is remembered with the SHA-256 of the image it
# was taken from; a snapshot that disappears without being pruned, a restore that differs, or
# a verify that fails counts as lost. Not run by CI (it runs for as long as it is told to).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_RUN=${1:-600}
W=${2:-$(mktemp -d)}
mkdir -p "$W"
cargo build --quiet --bin cairn
# A copy: later builds in this tree must not change the binary under a running soak.
cp target/debug/cairn "$W/cairn"
CAIRN=$W/cairn
REPO=$W/repo
IMG=$W/disk.img
OUT=$W/restored.img
declare -A HASH=()          # snapshot id -> sha256 of the image it holds
declare -A GONE=()          # snapshot ids forgotten by prune
cycles=0 faults=0 committed=0 restores=0 lost=0 verifies=0 gcs=0 prunes=0
say() { printf 'soak: %s\n' "$*" >&2; }

rm -rf "$REPO"
$CAIRN repo init "$REPO" >/dev/null
# A 48 MiB image: random and text-like regions, some zeros.
python3 - "$IMG" <<'EOF'
import os, sys, random
random.seed(1)
with open(sys.argv[1], "wb") as f:
    for i in range(48):
        k = i % 3
        if k == 0: f.write(os.urandom(1 << 20))
        elif k == 1: f.write(bytes((j * 7 + i) % 251 for j in range(1 << 20)))
        else: f.write(bytes(1 << 20))
EOF
SIZE=$(stat -c %s "$IMG")
CHANGED=$W/changed.txt
: > "$CHANGED"
PARENT=""

snapshots() { $CAIRN image list --repo "$REPO" --json | python3 -c 'import json,sys; print("\n".join(s["id"] for s in json.load(sys.stdin)))'; }

# Runs "$@" with a random fault; returns the command's exit code (137/134 when killed).
faulty() {
    local r=$((RANDOM % 4)) rc=0
    case $r in
        0|1) "$@" >/dev/null 2>&1 || rc=$? ;;
        2) faults=$((faults + 1))
           "$@" >/dev/null 2>&1 & local pid=$!
           sleep "0.$((RANDOM % 9))$((RANDOM % 10))"
           kill -9 "$pid" 2>/dev/null || true
           wait "$pid" 2>/dev/null || rc=$? ;;
        3) faults=$((faults + 1))
           local points=(vault.commit.before_manifest storage.backup.before_commit vault.gc.after_repack vault.gc.after_index)
           CAIRN_FAULT_POINT=${points[$((RANDOM % 4))]} "$@" >/dev/null 2>&1 || rc=$? ;;
    esac
    return $rc
}

end=$((SECONDS + SECONDS_TO_RUN))
while (( SECONDS < end )); do
    cycles=$((cycles + 1))
    # Change 1-8 random 4 KiB blocks and remember where.
    for _ in $(seq $((1 + RANDOM % 8))); do
        off=$(( (RANDOM * 32768 + RANDOM) % (SIZE / 4096) * 4096 ))
        dd if=/dev/urandom of="$IMG" bs=4096 count=1 seek=$((off / 4096)) conv=notrunc status=none
        echo "$off 4096" >> "$CHANGED"
    done
    sort -n -u "$CHANGED" -o "$CHANGED"
    h=$(sha256sum "$IMG" | cut -d' ' -f1)
    before=$(snapshots)
    if [[ -n $PARENT && $((RANDOM % 3)) -ne 0 ]]; then
        faulty $CAIRN image backup --repo "$REPO" --name disk --parent "$PARENT" --changed "$CHANGED" "$IMG" || true
    else
        faulty $CAIRN image backup --repo "$REPO" --name disk "$IMG" || true
    fi
    # Whatever appeared holds the image as it is now (even if the process died after commit).
    for id in $(comm -13 <(echo "$before" | sort) <(snapshots | sort)); do
        HASH[$id]=$h; committed=$((committed + 1)); PARENT=$id; : > "$CHANGED"
    done
    # Every snapshot ever committed and not pruned must still be listed.
    now=$(snapshots)
    for id in "${!HASH[@]}"; do
        if [[ -z ${GONE[$id]:-} ]] && ! grep -qx "$id" <<<"$now"; then
            say "LOST: snapshot $id disappeared"; lost=$((lost + 1)); GONE[$id]=lost
        fi
    done
    if (( cycles % 4 == 0 )); then
        prunes=$((prunes + 1))
        keep=$((2 + RANDOM % 4))
        $CAIRN repo prune "$REPO" --keep-last "$keep" --json > "$W/prune.json" 2>/dev/null || true
        for id in $(python3 -c 'import json,sys; print("\n".join(f[0] for f in json.load(open(sys.argv[1]))["forget"]))' "$W/prune.json" 2>/dev/null); do
            GONE[$id]=pruned
            [[ $PARENT == "$id" ]] && PARENT=""
        done
        gcs=$((gcs + 1))
        faulty $CAIRN repo gc "$REPO" || true
    fi
    if (( cycles % 3 == 0 )); then
        verifies=$((verifies + 1))
        if ! $CAIRN repo verify "$REPO" > "$W/verify.txt" 2>&1; then
            say "LOST: verify failed in cycle $cycles"; cat "$W/verify.txt" >&2; lost=$((lost + 1))
        fi
        # Restore a random live snapshot and compare.
        live=()
        for id in "${!HASH[@]}"; do [[ -z ${GONE[$id]:-} ]] && live+=("$id"); done
        if (( ${#live[@]} > 0 )); then
            id=${live[$((RANDOM % ${#live[@]}))]}
            restores=$((restores + 1))
            if ! $CAIRN image restore --force --repo "$REPO" "$id" "$OUT" >/dev/null 2>"$W/restore.err" \
                || [[ $(sha256sum "$OUT" | cut -d' ' -f1) != "${HASH[$id]}" ]]; then
                say "LOST: snapshot $id does not restore to its image"; cat "$W/restore.err" >&2
                lost=$((lost + 1))
            fi
        fi
    fi
    if (( cycles % 25 == 0 )); then
        say "$cycles cycles, $faults faults, $committed committed, $restores restores checked, $lost lost"
    fi
done
# Last: one clean GC and a verify of what is left.
$CAIRN repo gc "$REPO" >/dev/null
$CAIRN repo verify "$REPO" > "$W/verify.txt" 2>&1 || { say "LOST: final verify failed"; lost=$((lost + 1)); }
printf '{"seconds": %d, "cycles": %d, "faults_injected": %d, "backups_committed": %d, "prunes": %d, "gcs": %d, "verifies": %d, "restores_checked": %d, "lost": %d}\n' \
    "$SECONDS_TO_RUN" "$cycles" "$faults" "$committed" "$prunes" "$gcs" "$verifies" "$restores" "$lost"
(( lost == 0 ))
