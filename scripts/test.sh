#!/usr/bin/env bash
# Runs Cairn's whole test suite. This is the README's second command and what CI runs.
#
# As root (CI, a fresh machine) it first installs the Debian packages the tests need
# (scripts/install-deps.sh) and then requires them: tests that need QEMU fail instead of
# skipping. As a normal user it skips the install and the QEMU tests say loudly when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -eq 0 ]]; then
    scripts/install-deps.sh
    export CAIRN_REQUIRE_QEMU=1 CAIRN_REQUIRE_POSTGRES=1
else
    echo "test.sh: not root: not installing packages; tests needing them will say so" >&2
fi

echo "test.sh: formatting check" >&2
cargo fmt --all -- --check

echo "test.sh: building and testing" >&2
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
