#!/usr/bin/env bash
# The demo's story with the vault on a three-node Garage cluster on loopback: every backup's
# segments go to an S3 bucket replicated three times, and the restore reads them back.
#
#   scripts/s3-demo.sh [cairn demo options...]
#
# Builds Garage once into the tool cache (scripts/s3-servers.sh: 15–50 min the first time),
# starts three nodes (each its own metadata and data directories and ports), joins them into
# one layout with replication factor 3, makes a key and a bucket with Garage's own CLI, runs
# `cairn demo --vault s3://cairn-demo/vault`, and stops the nodes (by their PIDs) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
GARAGE=$(scripts/s3-servers.sh garage)
W=$(mktemp -d /var/tmp/cairn-s3-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
s3_ports=()
for i in 0 1 2; do
  rpc=$(free_port); s3=$(free_port); s3_ports+=("$s3")
  mkdir -p "$W/node$i"
  cat >"$W/node$i/garage.toml" <<EOF
metadata_dir = "$W/node$i/meta"
data_dir = "$W/node$i/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3"
EOF
  RUST_LOG=warn "$GARAGE" -c "$W/node$i/garage.toml" server >"$W/node$i/log" 2>&1 &
  pids+=($!)
done
g() { RUST_LOG=warn "$GARAGE" -c "$W/node0/garage.toml" "$@"; }
retry() { for _ in $(seq 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; "$@"; }
echo "s3-demo: three Garage nodes starting in $W" >&2
ids=()
for i in 0 1 2; do
  retry env RUST_LOG=warn "$GARAGE" -c "$W/node$i/garage.toml" node id -q
  ids+=("$(RUST_LOG=warn "$GARAGE" -c "$W/node$i/garage.toml" node id -q 2>/dev/null)")
done
retry g node connect "${ids[1]}"
retry g node connect "${ids[2]}"
for id in "${ids[@]}"; do retry g layout assign -z dc1 -c 1G "${id%%@*}"; done
retry g layout apply --version 1
AK=GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
SK=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
retry g key import --yes -n cairn "$AK" "$SK"
retry g bucket create cairn-demo
retry g bucket allow --read --write --owner cairn-demo --key cairn
g status >&2

export AWS_ENDPOINT_URL=http://127.0.0.1:${s3_ports[0]} AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK
export AWS_REGION=us-east-1 CAIRN_CACHE_DIR=$W/cache
echo "s3-demo: vault at s3://cairn-demo/vault on $AWS_ENDPOINT_URL (replicated on 3 nodes)" >&2
scripts/demo.sh --vault s3://cairn-demo/vault "$@"
echo "s3-demo: the bucket as Garage sees it:" >&2
g bucket info cairn-demo >&2
