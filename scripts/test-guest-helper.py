#!/usr/bin/env python3
"""Helpers for scripts/build-test-guest.sh (standard library only).

  vmlinux BZIMAGE OUT
      Extract the uncompressed ELF kernel from a bzImage: look for the magic of each compression
      format the kernel supports, decompress from there with the matching command-line tool, keep
      the first result that is an ELF file, and cut it to the ELF's own size (the decompressors
      may append trailing garbage). The same idea as the kernel's scripts/extract-vmlinux.

  moddeps MODULES_DIR NAME...
      Print the .ko files (relative to MODULES_DIR) needed to load the named modules, each after
      its dependencies, reading the `depends=` entry of each module's .modinfo strings.
"""

import os
import shutil
import struct
import subprocess
import sys

# (name, magic bytes, decompress command reading stdin and writing stdout)
FORMATS = [
    ("lz4", b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    ("gzip", b"\x1f\x8b\x08", ["gzip", "-dc"]),
    ("xz", b"\xfd7zXZ\x00", ["xz", "-dc"]),
    ("zstd", b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    ("lzma", b"\x5d\x00\x00\x00", ["xz", "--format=lzma", "-dc"]),
    ("bzip2", b"BZh", ["bzip2", "-dc"]),
]
MAX_CANDIDATES = 8


def elf_size(data):
    """Size of a 64-bit little-endian ELF file from its header, or None if it is not one."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    (phentsize, phnum, shentsize, shnum) = struct.unpack_from("<HHHH", data, 0x36)
    end = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    # Segments may extend past the section headers (stripped kernels have few sections).
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            return None
        (p_offset,) = struct.unpack_from("<Q", data, off + 8)
        (p_filesz,) = struct.unpack_from("<Q", data, off + 32)
        end = max(end, p_offset + p_filesz)
    return end if end <= len(data) else None


def extract_vmlinux(bzimage, out, tool_dirs):
    data = open(bzimage, "rb").read()
    env = dict(os.environ)
    if tool_dirs:
        env["PATH"] = tool_dirs + os.pathsep + env.get("PATH", "")
    tried = []
    for name, magic, cmd in FORMATS:
        if shutil.which(cmd[0], path=env["PATH"]) is None:
            tried.append(f"{name}: no {cmd[0]}")
            continue
        start = 0
        for _ in range(MAX_CANDIDATES):
            pos = data.find(magic, start)
            if pos < 0:
                break
            start = pos + 1
            proc = subprocess.run(
                cmd, input=data[pos:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
            )
            size = elf_size(proc.stdout)
            if size is not None:
                with open(out + ".tmp", "wb") as f:
                    f.write(proc.stdout[:size])
                os.replace(out + ".tmp", out)
                print(f"vmlinux: {name} payload at offset {pos}, {size} bytes", file=sys.stderr)
                return 0
            tried.append(f"{name}@{pos}")
    print(f"vmlinux: no ELF kernel found in {bzimage} (tried {tried})", file=sys.stderr)
    return 1


def modinfo_depends(path):
    data = open(path, "rb").read()
    pos = data.find(b"\x00depends=")
    if pos < 0:
        return []
    end = data.index(b"\x00", pos + 1)
    value = data[pos + len(b"\x00depends=") : end].decode()
    return [d for d in value.split(",") if d]


def norm(name):
    return name.replace("-", "_")


def moddeps(moddir, names):
    index = {}
    for dirpath, _, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko"):
                index[norm(f[: -len(".ko")])] = os.path.relpath(os.path.join(dirpath, f), moddir)
    builtin = set()
    builtin_list = os.path.join(moddir, "modules.builtin")
    if os.path.exists(builtin_list):
        for line in open(builtin_list):
            builtin.add(norm(os.path.basename(line.strip())[: -len(".ko")]))
    order, state = [], {}

    def visit(name, chain):
        name = norm(name)
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "visiting":
            raise SystemExit(f"moddeps: dependency cycle {' -> '.join(chain + [name])}")
        if name not in index:
            raise SystemExit(f"moddeps: module {name} not found under {moddir}")
        state[name] = "visiting"
        for dep in modinfo_depends(os.path.join(moddir, index[name])):
            visit(dep, chain + [name])
        state[name] = "done"
        order.append(index[name])

    for n in names:
        visit(n, [])
    print("\n".join(order))
    return 0


def main(argv):
    if len(argv) >= 3 and argv[0] == "vmlinux":
        return extract_vmlinux(argv[1], argv[2], argv[3] if len(argv) > 3 else "")
    if len(argv) >= 2 and argv[0] == "moddeps":
        return moddeps(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
