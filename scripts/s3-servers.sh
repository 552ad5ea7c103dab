#!/usr/bin/env bash
# Builds the S3 servers the object-store tests and benchmarks run against, once, into a cache
# outside the clone (CAIRN_TOOL_CACHE, default ~/.cache/cairn-tools), and prints where they are.
#
#   scripts/s3-servers.sh s3s-fs   # s3s-fs 0.14.1: ~4 min to build here; the test suite's server
#   scripts/s3-servers.sh garage   # Garage 2.5: 15–50 min to build here; single- and 3-node tests
#
# A second run builds nothing. Both are real S3 servers (files on disk, SigV4 checked), not mocks.
set -euo pipefail
CACHE=${CAIRN_TOOL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cairn-tools}
mkdir -p "$CACHE"

build() { # name version binary [cargo install args...]
  local name=$1 version=$2 bin=$3; shift 3
  local root=$CACHE/$name-$version
  if [[ ! -x $root/bin/$bin ]]; then
    echo "s3-servers: building $name $version into $root (once)" >&2
    # Its own target dir, so a half-finished build resumes and never touches the clone's.
    CARGO_TARGET_DIR=$CACHE/target-$name nice -n 10 \
      cargo install "$name" --version "$version" --locked --root "$root.tmp" "$@" >&2
    rm -rf "$root"; mv "$root.tmp" "$root"
    rm -rf "$CACHE/target-$name"
  fi
  echo "$root/bin/$bin"
}

case ${1:-} in
  s3s-fs) build s3s-fs 0.14.1 s3s-fs --features binary ;;
  garage) build garage 2.5.0 garage ;;
  *) echo "usage: $0 s3s-fs|garage" >&2; exit 2 ;;
esac
