#!/usr/bin/env python3
"""Fails when a workspace crate depends on a workspace crate scripts/layering.txt does not
allow it (normal and build dependencies, from `cargo metadata --no-deps`), or on a crate the
allow list marks `dev-only` (test doubles) other than as a dev-dependency.

Usage: scripts/check-layering.py [ALLOW_LIST]   (run from anywhere in the repository)
"""

import json
import pathlib
import subprocess
import sys


def read_allow_list(path):
    allowed = {}
    dev_only = set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        crate, sep, deps = line.partition(":")
        if not sep or not crate.strip():
            sys.exit(f"{path}:{number}: expected `crate: allowed crates`, got {raw!r}")
        crate = crate.strip()
        if crate == "dev-only":
            dev_only.update(deps.split())
            continue
        if crate in allowed:
            sys.exit(f"{path}:{number}: {crate} listed twice")
        allowed[crate] = set(deps.split())
    for crate in sorted(dev_only - allowed.keys()):
        sys.exit(f"{path}: dev-only {crate} is not placed in the layering")
    return allowed, dev_only


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    allow_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / "scripts" / "layering.txt"
    allowed, dev_only = read_allow_list(allow_path)
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=root,
            check=True,
            stdout=subprocess.PIPE,
        ).stdout
    )
    members = {p["name"] for p in meta["packages"]}
    errors = []
    for name in sorted(members - allowed.keys()):
        errors.append(f"{name} is not in {allow_path.name}: add it where it belongs")
    for name in sorted(allowed.keys() - members):
        errors.append(f"{allow_path.name} names {name}, which is not a workspace crate")
    edges = 0
    for p in sorted(meta["packages"], key=lambda p: p["name"]):
        ok = allowed.get(p["name"], set())
        for d in p["dependencies"]:
            if d["name"] not in members or d.get("kind") == "dev":
                continue
            edges += 1
            if d["name"] in dev_only:
                errors.append(f"{p['name']} may have {d['name']} (dev-only) as a dev-dependency only")
            elif "*" not in ok and d["name"] not in ok:
                kind = "build-dependency" if d.get("kind") == "build" else "dependency"
                errors.append(f"{p['name']} has the forbidden {kind} {d['name']}")
    if errors:
        print("layering check failed:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        sys.exit(1)
    print(f"layering: {len(members)} crates, {edges} edges between them, all allowed")


if __name__ == "__main__":
    main()
