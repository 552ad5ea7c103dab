#!/usr/bin/env bash
# Encrypted against plain repositories through `cairn image backup/restore` on one image file.
#
#   CAIRN=target/release/cairn SIZE_MIB=1024 REPS=3 bench/encryption.sh [WORKDIR]
#
# The image is a third random, a third text-like (compressible), a third zeros, in 1 MiB
# blocks; day 2 rewrites 64 scattered 64 KiB regions of it. Per mode and repetition: a fresh
# repository, a full backup of day 1 (timed), a restore of it (timed), a backup of day 2 (a
# whole read; its new bytes give the day-2 dedup) and a backup of a clone of day 1 under
# another name (its new bytes give the clone dedup). Prints one line per run and the medians.
#
# Times are the commands' own `duration_ms` (from the opened repository to the end), the same
# for both modes. The encrypted repository is opened with a key file, as the storage agent
# opens it; what a passphrase adds instead (one Argon2id derivation per command, whatever the
# size) is measured apart as `passphrase_ms`: the wall time of `repo key export` with
# CAIRN_PASSWORD minus the same with --key-file.
set -euo pipefail
CAIRN=${CAIRN:-target/release/cairn}
SIZE_MIB=${SIZE_MIB:-1024}
REPS=${REPS:-3}
W=${1:-$(mktemp -d /var/tmp/cairn-enc-bench.XXXXXX)}
mkdir -p "$W"
python3 - "$W" "$SIZE_MIB" <<'EOF'
import os, random, sys
w, mib = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
text = bytes((j % 97) + 32 for j in range(1 << 20))
day1 = os.path.join(w, "day1.img")
if not os.path.exists(day1):
    with open(day1, "wb") as f:
        for i in range(mib):
            f.write(rng.randbytes(1 << 20) if i % 3 == 0 else text if i % 3 == 1 else bytes(1 << 20))
day2 = os.path.join(w, "day2.img")
if not os.path.exists(day2):
    os.system(f"cp --reflink=auto {day1} {day2}")
    with open(day2, "r+b") as f:
        for _ in range(64):
            f.seek(rng.randrange(0, (mib << 20) - (64 << 10)) & ~4095)
            f.write(rng.randbytes(64 << 10))
EOF
export CAIRN_PASSWORD=bench-passphrase
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
out=$W/results.txt
: >"$out"
for rep in $(seq 1 "$REPS"); do
  for mode in plain encrypted; do
    r=$W/repo-$mode
    rm -rf "$r" "$W/restored.img"
    key=()
    if [ "$mode" = encrypted ]; then
      rm -f "$W/bench.key"
      key=(--key-file "$W/bench.key")
      "$CAIRN" "${key[@]}" repo init --encrypt "$r" >/dev/null
      CAIRN_NEW_PASSWORD=$CAIRN_PASSWORD "$CAIRN" "${key[@]}" repo key add "$r" >/dev/null  # and a passphrase
    else "$CAIRN" repo init "$r" >/dev/null; fi
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    b=$("$CAIRN" "${key[@]}" image backup --repo "$r" --name disk --json "$W/day1.img")
    rs=$("$CAIRN" "${key[@]}" image restore --repo "$r" --json disk "$W/restored.img")
    cmp -s "$W/day1.img" "$W/restored.img" || { echo "restore differs" >&2; exit 1; }
    d2=$("$CAIRN" "${key[@]}" image backup --repo "$r" --name disk --json "$W/day2.img")
    cl=$("$CAIRN" "${key[@]}" image backup --repo "$r" --name clone --json "$W/day1.img")
    pass=0
    if [ "$mode" = encrypted ]; then
      t0=$(date +%s%N); "$CAIRN" repo key export "$r" "$W/x.key" >/dev/null; t1=$(date +%s%N)
      rm -f "$W/x.key"
      "$CAIRN" "${key[@]}" repo key export "$r" "$W/x.key" >/dev/null; t2=$(date +%s%N)
      rm -f "$W/x.key"
      pass=$(( ((t1 - t0) - (t2 - t1)) / 1000000 ))
    fi
    line="$mode rep=$rep backup_ms=$(echo "$b" | field duration_ms) restore_ms=$(echo "$rs" | field duration_ms) stored=$(echo "$b" | field bytes_stored) day2_new=$(echo "$d2" | field bytes_new) clone_new=$(echo "$cl" | field bytes_new) passphrase_ms=$pass"
    echo "$line" | tee -a "$out"
  done
done
python3 - "$out" "$SIZE_MIB" <<'EOF'
import re, statistics, sys
rows = [dict(re.findall(r"(\w+)=(\S+)", l)) | {"mode": l.split()[0]} for l in open(sys.argv[1])]
mib = int(sys.argv[2])
med = {}
for mode in ("plain", "encrypted"):
    rs = [r for r in rows if r["mode"] == mode]
    m = {k: statistics.median(int(r[k]) for r in rs) for k in ("backup_ms", "restore_ms", "stored", "day2_new", "clone_new")}
    spread = {k: (min(int(r[k]) for r in rs), max(int(r[k]) for r in rs)) for k in ("backup_ms", "restore_ms")}
    med[mode] = m
    print(f"{mode}: backup {m['backup_ms']} ms ({mib / m['backup_ms'] * 1000:.0f} MiB/s, range {spread['backup_ms']}), "
          f"restore {m['restore_ms']} ms ({mib / m['restore_ms'] * 1000:.0f} MiB/s, range {spread['restore_ms']}), "
          f"stored {m['stored']}, day-2 new {m['day2_new']}, clone new {m['clone_new']}")
p, e = med["plain"], med["encrypted"]
print(f"throughput encrypted/plain: backup {p['backup_ms'] / e['backup_ms']:.2f}, restore {p['restore_ms'] / e['restore_ms']:.2f}")
pm = statistics.median(int(r["passphrase_ms"]) for r in rows if r["mode"] == "encrypted")
print(f"a passphrase instead of a key file adds {pm} ms per command (Argon2id), median")
EOF
