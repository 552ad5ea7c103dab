#!/usr/bin/env bash
# The vault on S3 beside the vault in a local directory and beside restic on the same S3
# server, in one run: full backup and restore of one image, each REPS times, plus the S3
# requests Cairn sent per GiB of new data.
#
#   CAIRN=target/release/cairn SIZE_MIB=2048 REPS=3 bench/s3.sh [WORKDIR]
#
# The S3 server is s3s-fs from scripts/s3-servers.sh (or Garage's single node when
# SERVER=garage and it is built), on loopback, its files on WORKDIR's file system. The image
# is a third random, a third text-like, a third zeros (1 MiB blocks), as in encryption.sh.
# Caches are dropped before each timed step (when root). Times: Cairn's own `duration_ms`
# (the command's work after the repository is open); restic's wall time of the command.
# Cairn runs plain and encrypted (key file); restic always encrypts.
set -euo pipefail
cd "$(dirname "$0")/.."
CAIRN=${CAIRN:-target/release/cairn}
SIZE_MIB=${SIZE_MIB:-2048}
REPS=${REPS:-3}
SERVER=${SERVER:-s3s-fs}
W=${1:-/var/tmp/cairn-s3-bench}
rm -rf "$W"; mkdir -p "$W"
out=$W/results.txt

if ! command -v restic >/dev/null; then
  apt-get install -y -o DPkg::Lock::Timeout=600 restic >/dev/null
fi

python3 - "$W/disk.img" "$SIZE_MIB" <<'EOF'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(7)
text = (b"the storage server keeps every segment once; " * 30000)[: 1 << 20]
with open(path, "wb") as f:
    for i in range(mib):
        k = i % 3
        f.write(rnd.randbytes(1 << 20) if k == 0 else text if k == 1 else bytes(1 << 20))
EOF

AK=bench-access; SK=bench-secret-0123456789; BUCKET=bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
case $SERVER in
  s3s-fs)
    bin=$(scripts/s3-servers.sh s3s-fs)
    mkdir -p "$W/s3/$BUCKET"
    "$bin" --host 127.0.0.1 --port "$port" --access-key $AK --secret-key $SK "$W/s3" \
      >"$W/server.log" 2>&1 &
    ;;
  garage)
    bin=$(scripts/s3-servers.sh garage)
    mkdir -p "$W/garage"
    cat >"$W/garage.toml" <<EOF
metadata_dir = "$W/garage/meta"
data_dir = "$W/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port"
EOF
    GARAGE_DEFAULT_ACCESS_KEY=GK$(printf '%024x' 1) GARAGE_DEFAULT_SECRET_KEY=$(printf '%064x' 2) \
      GARAGE_DEFAULT_BUCKET=$BUCKET "$bin" -c "$W/garage.toml" server --single-node --default-bucket \
      >"$W/server.log" 2>&1 &
    AK=GK$(printf '%024x' 1); SK=$(printf '%064x' 2)
    ;;
esac
server_pid=$!
trap 'kill $server_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
sleep 1

export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK
export AWS_REGION=us-east-1 CAIRN_CACHE_DIR=$W/cache RESTIC_PASSWORD=bench
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

for rep in $(seq 1 "$REPS"); do
  for mode in local s3 s3-encrypted restic; do
    rm -rf "$W/out.img" "$W/restic-out" "$W/cache"
    key=()
    case $mode in
      local) repo=$W/local-$rep ;;
      s3) repo=s3://$BUCKET/cairn-$rep ;;
      s3-encrypted) repo=s3://$BUCKET/cairn-enc-$rep; rm -f "$W/k"; key=(--key-file "$W/k") ;;
      restic) repo=s3:http://127.0.0.1:$port/$BUCKET/restic-$rep ;;
    esac
    if [ "$mode" = restic ]; then
      restic -q -r "$repo" init >/dev/null
      drop; t0=$(date +%s%N)
      restic -q -r "$repo" backup "$W/disk.img" >/dev/null
      b=$(ms "$t0")
      drop; t0=$(date +%s%N)
      restic -q -r "$repo" restore latest --target "$W/restic-out" >/dev/null
      r=$(ms "$t0")
      cmp -s "$W/disk.img" "$W/restic-out$W/disk.img" || { echo "restic restore differs" >&2; exit 1; }
      line="$mode rep=$rep backup_ms=$b restore_ms=$r requests=-"
    else
      if [ "$mode" = s3-encrypted ]; then "$CAIRN" "${key[@]}" repo init --encrypt "$repo" >/dev/null
      else "$CAIRN" repo init "$repo" >/dev/null; fi
      drop
      bj=$(CAIRN_LOG=cairn_vault::store::s3=info "$CAIRN" "${key[@]}" image backup --repo "$repo" \
        --name disk --json "$W/disk.img" 2>"$W/backup.log")
      drop
      rj=$("$CAIRN" "${key[@]}" image restore --repo "$repo" --json disk "$W/out.img")
      cmp -s "$W/disk.img" "$W/out.img" || { echo "restore differs ($mode)" >&2; exit 1; }
      req=$(python3 - "$W/backup.log" "$(echo "$bj" | field bytes_new)" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
m = re.findall(r"GET (\d+) PUT (\d+) HEAD (\d+) DELETE (\d+)", text)
if not m: print("-"); sys.exit()
n = sum(int(x) for x in m[-1]); gib = int(sys.argv[2]) / (1 << 30)
print(f"{n}({n / gib:.0f}/GiB)" if gib else n)
EOF
)
      line="$mode rep=$rep backup_ms=$(echo "$bj" | field duration_ms) restore_ms=$(echo "$rj" | field duration_ms) requests=$req"
    fi
    echo "$line" | tee -a "$out"
  done
done

python3 - "$out" "$SIZE_MIB" <<'EOF'
import statistics, sys
rows = [dict(kv.split("=") for kv in l.split()[1:]) | {"mode": l.split()[0]} for l in open(sys.argv[1])]
mib = int(sys.argv[2])
med = {}
for mode in ("local", "s3", "s3-encrypted", "restic"):
    rs = [r for r in rows if r["mode"] == mode]
    b = sorted(int(r["backup_ms"]) for r in rs); r_ = sorted(int(r["restore_ms"]) for r in rs)
    med[mode] = (statistics.median(b), statistics.median(r_))
    print(f"{mode:13} backup {med[mode][0]:.0f} ms ({mib / med[mode][0] * 1000:.0f} MiB/s; {b[0]}–{b[-1]})"
          f"  restore {med[mode][1]:.0f} ms ({r_[0]}–{r_[-1]})  requests {rs[-1]['requests']}")
l, s, e, x = med["local"], med["s3"], med["s3-encrypted"], med["restic"]
print(f"S3 ÷ local throughput: backup {l[0] / s[0]:.2f}, restore {l[1] / s[1]:.2f}")
print(f"Cairn on S3 ÷ restic on S3 throughput: backup {x[0] / s[0]:.2f} (encrypted {x[0] / e[0]:.2f}), "
      f"restore {x[1] / s[1]:.2f} (encrypted {x[1] / e[1]:.2f})")
EOF
