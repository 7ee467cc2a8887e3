"""Carry Triton's compile cache from one GPU call to the next (bench/gpu_check.sh).

    python bench/triton_cache.py pack CACHE_DIR OUT.tar.xz [--limit-mib 15]
    python bench/triton_cache.py unpack OUT.tar.xz CACHE_DIR

Why: a session's device time is 15 minutes, and a call that finds the machine gone back
starts a bare one, which compiles every kernel again. On the seventeenth session's H200,
`pytest -m gpu` took over 180 s cold and 38 s with the compile caches warm. So one call
packs the cache it compiled (`STEPS="... save-cache"`, into OUTDIR), and the next call
carries that file back (`.gpu-cache/`, or `TRITON_CACHE_IN`) and starts warm.

What travels, per compiled kernel: its metadata and its cubin, the only files Triton loads
on a cache hit (the IR stages, 5x the bytes, stay behind), and the launcher modules Triton
builds with the host's C compiler. Triton's groups name their files by absolute path, so
`pack` stores names and `unpack` writes the paths of the new place. A kernel compiled by
another Triton, Python or kernel source has another key, and is simply never looked up:
a stale file costs its bytes, never a wrong kernel.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import sys
import tarfile
import time
from pathlib import Path

GROUP_PREFIX = "__grp__"
KEPT_IN_GROUPS = (".json", ".cubin")  # what CompiledKernel reads on a hit (cuda)
KEPT_ALONE = (".so",)  # launchers and driver utilities, found by name (get_file)


class CacheArchiveError(ValueError):
    """A cache archive this tool will not unpack (a name that leaves its key's folder)."""


def kernel_files(key_dir: Path) -> dict[str, bytes]:
    """The files of one cache key worth carrying, by name: each group with its kept
    children (the group rewritten to name them without a folder), and lone modules."""
    files: dict[str, bytes] = {}
    in_groups: set[str] = set()
    for group in sorted(key_dir.glob(f"{GROUP_PREFIX}*.json")):
        try:
            children = json.loads(group.read_text()).get("child_paths") or {}
        except (ValueError, AttributeError):  # (a group another process is writing)
            continue
        in_groups.update(children)
        kept = {name: name for name in children
                if name.endswith(KEPT_IN_GROUPS) and (key_dir / name).is_file()}
        if len(kept) < 2:  # (no cubin: nothing a hit could load)
            continue
        files[group.name] = json.dumps({"child_paths": kept}).encode()
        for name in kept:
            files[name] = (key_dir / name).read_bytes()
    for path in key_dir.iterdir():
        if (path.is_file() and path.name.endswith(KEPT_ALONE) and path.name not in in_groups
                and not path.name.startswith(GROUP_PREFIX)):
            files[path.name] = path.read_bytes()
    return files


def _archive(entries: list[tuple[str, dict[str, bytes]]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for key, files in entries:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}/{name}")
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
    return lzma.compress(raw.getvalue(), preset=6)


def pack(cache_dir: Path, out: Path, limit_bytes: int) -> tuple[int, int]:
    """Write ``out`` (tar.xz) from ``cache_dir``; returns (keys packed, keys found: a key
    holds one kernel or one launcher module). Over
    ``limit_bytes`` (a transfer limit), the least recently written keys are left out."""
    keys = [d for d in cache_dir.iterdir() if d.is_dir() and not d.name.startswith("tmp.")]
    keys.sort(key=lambda d: d.stat().st_mtime, reverse=True)  # newest first
    entries = [(d.name, files) for d in keys if (files := kernel_files(d))]
    found, data = len(entries), _archive(entries)
    while len(data) > limit_bytes and entries:
        keep = max(0, min(len(entries) - 1, int(len(entries) * limit_bytes / len(data) * 0.95)))
        entries = entries[:keep]
        data = _archive(entries)
    out.write_bytes(data)
    return len(entries), found


def _member_path(name: str) -> tuple[str, str]:
    parts = name.split("/")
    if (len(parts) != 2 or any(p in ("", ".", "..") for p in parts) or name.startswith("/")
            or "\\" in name):
        raise CacheArchiveError(f"cache archive member {name!r} is not KEY/FILE; is this "
                                "a file bench/triton_cache.py packed?")
    return parts[0], parts[1]


def unpack(archive: Path, cache_dir: Path) -> tuple[int, int, int]:
    """Restore ``archive`` into ``cache_dir``; returns (kernels restored, lone modules
    restored, keys skipped because ``cache_dir`` already holds them). Every name is checked
    before anything is written, and a group is written last, so a group never names a
    missing file."""
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(archive.read_bytes()))) as tar:
        by_key: dict[str, dict[str, bytes]] = {}  # (read whole before any write)
        for m in tar.getmembers():
            key, name = _member_path(m.name)
            if not m.isfile():
                raise CacheArchiveError(f"cache archive member {m.name!r} is not a file")
            by_key.setdefault(key, {})[name] = tar.extractfile(m).read()
    restored = modules = skipped = 0
    for key, files in by_key.items():
        key_dir = cache_dir / key
        if key_dir.exists():
            skipped += 1
            continue
        key_dir.mkdir(parents=True)
        groups = {n: d for n, d in files.items() if n.startswith(GROUP_PREFIX)}
        for name, data in files.items():
            if name not in groups:
                (key_dir / name).write_bytes(data)
                modules += name.endswith(KEPT_ALONE)
        for name, data in groups.items():
            children = json.loads(data)["child_paths"]
            paths = {c: str(key_dir / c) for c in children if c in files}
            (key_dir / name).write_text(json.dumps({"child_paths": paths}))
            restored += 1
    return restored, modules, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="pack CACHE_DIR's kernels into a .tar.xz")
    p.add_argument("cache_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--limit-mib", type=float, default=15.0,
                   help="largest file to write (the device tool returns files up to 16 MiB)")
    u = sub.add_parser("unpack", help="restore a packed cache into CACHE_DIR")
    u.add_argument("archive", type=Path)
    u.add_argument("cache_dir", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        if not args.cache_dir.is_dir():
            print(f"no Triton cache at {args.cache_dir}: nothing to pack", file=sys.stderr)
            return 2
        packed, found = pack(args.cache_dir, args.out, int(args.limit_mib * 2**20))
        print(f"packed {packed} of {found} cache keys (kernels, launchers) into {args.out} "
              f"({os.path.getsize(args.out) / 2**20:.1f} MiB)")
        return 0
    try:
        restored, modules, skipped = unpack(args.archive, args.cache_dir)
    except (CacheArchiveError, lzma.LZMAError, tarfile.TarError, OSError) as error:
        print(f"Triton cache not restored from {args.archive}: {error}", file=sys.stderr)
        return 2
    print(f"restored {restored} compiled kernels and {modules} launcher modules from "
          f"{args.archive} into {args.cache_dir}"
          + (f" ({skipped} keys already there)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
