#!/usr/bin/env bash
# Runs Cairn's whole test suite and its checks (format, layering, clippy, docs). This is the
# README's second command and what CI runs.
#
# As root (CI, a fresh machine) it first installs the Debian packages the tests need
# (scripts/install-deps.sh) and then requires them: tests that need QEMU fail instead of
# skipping. As a normal user it skips the install and the QEMU tests say loudly when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -eq 0 ]]; then
    scripts/install-deps.sh
    # A real S3 server for the object-store tests, built once into a cache outside the clone
    # (~4 min the first time).
    scripts/s3-servers.sh s3s-fs >/dev/null
    export CAIRN_REQUIRE_QEMU=1 CAIRN_REQUIRE_POSTGRES=1 CAIRN_REQUIRE_S3=1
else
    echo "test.sh: not root: not installing packages; tests needing them will say so" >&2
fi

echo "test.sh: formatting check" >&2
cargo fmt --all -- --check

# No crate depends on one above it (scripts/layering.txt); needs no build.
echo "test.sh: layering check" >&2
python3 scripts/check-layering.py

# Lints and docs build in check mode; the test build below reuses the dependencies' builds
# where it can.
echo "test.sh: clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "test.sh: documentation" >&2
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --locked

echo "test.sh: building and testing" >&2
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
