"""bench/triton_cache.py: a packed Triton cache is found by Triton in its new place, carries
only what a cache hit loads, stays under its transfer limit, and refuses names that would
leave the cache; gpu_check.sh restores one before its steps and packs one when asked."""

from __future__ import annotations

import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from kernel_params import ptxas_available

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from triton_cache import CacheArchiveError, pack, unpack  # noqa: E402

IR = (".source", ".ttir", ".ttgir", ".llir", ".ptx")


def _fake_kernel(cache: Path, key: str, name: str, cubin: bytes) -> None:
    """One key as Triton writes it: every stage, and a group naming them by absolute path."""
    d = cache / key
    d.mkdir(parents=True)
    files = {f"{name}{ext}": b"ir text " * 100 for ext in IR}
    files[f"{name}.cubin"] = cubin
    files[f"{name}.json"] = json.dumps({"name": name}).encode()
    for file, data in files.items():
        (d / file).write_bytes(data)
    group = {"child_paths": {file: str(d / file) for file in files}}
    (d / f"__grp__{name}.json").write_text(json.dumps(group))


def test_a_round_trip_keeps_metadata_cubins_and_launchers_and_rewrites_the_groups(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _fake_kernel(old, "K1", "_linear_kernel", b"\x7fELF linear")
    _fake_kernel(old, "K2", "_embedding_bag_kernel", os.urandom(4096))
    (old / "L1").mkdir()
    (old / "L1" / "__triton_launcher.so").write_bytes(b"\x7fELF launcher")
    (old / "tmp.pid_1_x").mkdir()  # a write in progress
    (old / "tmp.pid_1_x" / "half.cubin").write_bytes(b"partial")
    archive = tmp_path / "cache.tar.xz"
    assert pack(old, archive, 2**20) == (3, 3)  # two kernels, one launcher
    restored, modules, skipped = unpack(archive, new)
    assert (restored, modules, skipped) == (2, 1, 0)
    assert sorted(p.name for p in new.iterdir()) == ["K1", "K2", "L1"]
    for key, name in (("K1", "_linear_kernel"), ("K2", "_embedding_bag_kernel")):
        group = json.loads((new / key / f"__grp__{name}.json").read_text())["child_paths"]
        assert group == {f"{name}.cubin": str(new / key / f"{name}.cubin"),
                         f"{name}.json": str(new / key / f"{name}.json")}
        cubin = f"{name}.cubin"
        assert (new / key / cubin).read_bytes() == (old / key / cubin).read_bytes()
        assert not any((new / key / f"{name}{ext}").exists() for ext in IR)
    assert (new / "L1" / "__triton_launcher.so").read_bytes() == b"\x7fELF launcher"
    # a key already there is left as it is (it may be the newer compile)
    assert unpack(archive, new) == (0, 0, 3)


def test_over_the_limit_the_least_recently_compiled_kernels_stay_behind(tmp_path):
    cache = tmp_path / "cache"
    for i in range(12):
        _fake_kernel(cache, f"K{i:02d}", "_k", os.urandom(64 * 1024))  # incompressible
        os.utime(cache / f"K{i:02d}", (1000 + i, 1000 + i))
    archive = tmp_path / "cache.tar.xz"
    packed, found = pack(cache, archive, 400 * 1024)
    assert found == 12 and 0 < packed < 12
    assert archive.stat().st_size <= 400 * 1024
    unpack(archive, tmp_path / "new")
    kept = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert kept == [f"K{i:02d}" for i in range(12 - packed, 12)]  # the newest


@pytest.mark.parametrize("name", ["../escape.cubin", "/abs/x.cubin", "K/../../x", "K",
                                  "K/sub/x.cubin"])
def test_a_name_outside_its_keys_folder_is_refused_before_anything_is_written(tmp_path, name):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for member in ("GOOD/_k.cubin", name):
            info = tarfile.TarInfo(member)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    archive = tmp_path / "bad.tar.xz"
    archive.write_bytes(lzma.compress(raw.getvalue()))
    cache = tmp_path / "cache"
    with pytest.raises(CacheArchiveError, match="is not KEY/FILE"):
        unpack(archive, cache)
    assert not cache.exists() and not (tmp_path / "escape.cubin").exists()


def test_triton_finds_a_restored_kernel_in_the_new_place_without_compiling(tmp_path):
    """The real thing: a kernel compiled for sm_90 into one cache dir, packed, restored
    into another, compiled again there: Triton's lookup hits (no IR stage is written
    again) and loads the same cubin."""
    if not ptxas_available():
        pytest.skip("this Triton install has no ptxas to compile with")
    code = """
import os, sys
from recserve.kernels import compile_check as cc
fn, sig, const, options, div16 = next(iter(cc._embedding_jobs(quick=True)))
kernel = cc.compile_kernel(fn, sig, const, options, 90, div16)
sys.stdout.write(kernel.asm["cubin"].hex())
"""

    def compile_in(cache: Path) -> str:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache)}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = compile_in(tmp_path / "a")
    pack(tmp_path / "a", tmp_path / "cache.tar.xz", 2**24)
    assert unpack(tmp_path / "cache.tar.xz", tmp_path / "b")[0] == 1
    assert compile_in(tmp_path / "b") == first
    assert not list((tmp_path / "b").rglob("*.ptx"))  # a miss would have written its stages


def test_gpu_check_restores_a_cache_before_its_steps_and_packs_one_when_asked(tmp_path):
    given = tmp_path / "given"
    _fake_kernel(given, "K1", "_k", b"cubin")
    archive = tmp_path / "in.tar.xz"
    pack(given, archive, 2**20)
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "STEPS": "save-cache", "PYTHON": sys.executable,
           "RECSERVE_COMMIT": "test", "TRITON_CACHE_DIR": str(cache),
           "TRITON_CACHE_IN": str(archive)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert f"restored 1 compiled kernels and 0 launcher modules from {archive}" in summary
    assert "packed 1 of 1 cache keys" in summary and "step save-cache rc=0" in summary
    assert unpack(out / "triton-cache.tar.xz", tmp_path / "again")[0] == 1
    # a named archive that is not there says so, and the steps still run
    env["TRITON_CACHE_IN"] = str(tmp_path / "missing.tar.xz")
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "o2")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "no such file; every kernel compiles" in (tmp_path / "o2" / "summary.txt").read_text()
