#!/usr/bin/env bash
# Issue 14's memory target for the vault service: 16 concurrent uploads of 100 MB of garbage
# with a valid token must keep `cairn vault` under 256 MiB (peak RSS, VmHWM of /proc/PID/status).
# Half the uploads are random bytes, half a frame header promising a 16 MiB frame followed by
# garbage. Prints the service's RSS before and its peak after; fails above the target.
#
#   scripts/vault-rss.sh              measure this tree's `cairn`
#   scripts/vault-rss.sh BINARY       measure another build of `cairn` (e.g. an older one)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 0 ]]; then
    export CAIRN_RSS_BIN=$(realpath "$1")
fi
exec cargo test --locked -q -p cairn-cli --test cli -- --ignored --exact --nocapture \
    vault_service::sixteen_hostile_uploads_keep_the_vault_under_256_mib
