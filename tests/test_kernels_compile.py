"""Every autotune config of every kernel compiles to a cubin (the interpreter proves nothing
about the compiler). Runs Triton's ahead-of-time path in a subprocess: no GPU needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_params import ptxas_available


@pytest.mark.parametrize("where", [
    pytest.param("host", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="the gpu variant compiles for the card itself")),
    pytest.param("card", marks=pytest.mark.gpu),
])
# Its own limit: gpu_check's 60 s a test cut the card's run short on the H200 (twelfth
# session: every config of the eleventh session's candidates, beside 3 other test workers).
@pytest.mark.timeout(400)
def test_every_kernel_config_compiles(where):
    if not ptxas_available():
        pytest.skip("this Triton install has no ptxas to compile with")
    arch = 90
    if where == "card":
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    result = subprocess.run(
        [sys.executable, "-m", "recserve.kernels.compile_check", "--quick", "--arch", str(arch)],
        env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 failure(s)" in result.stdout
    assert result.stdout.count("OK ") >= 20


def test_sliced_epilogue_keeps_the_large_cross_tile_off_local_memory():
    """128x256 cross tiles with the whole tile's x0 and x live spill on sm_90 (why they
    never won DCNv2's V); the epilogue in 4 column slices (``SUBTILE``) does not. Counted
    in the SASS of the very jobs ``compile_check --spills`` reports (its cross variant)."""
    if not ptxas_available():
        pytest.skip("this Triton install has no ptxas to compile with")
    code = """
import os
os.environ["TRITON_INTERPRET"] = "0"
from recserve.kernels import compile_check as cc
for fn, sig, const, options, div16 in cc._linear_jobs(quick=True):
    if (const["CROSS"] and (const["BLOCK_M"], const["BLOCK_N"]) == (128, 256)
            and options["num_stages"] == 3 and not const["EPILOGUE_FIRST"]
            and const["SUBTILE"] in (1, 4)):
        kernel = cc.compile_kernel(fn, sig, const, options, 90, div16)
        print(const["SUBTILE"], cc.local_spills(kernel.asm["cubin"]))
"""
    result = subprocess.run([sys.executable, "-c", code],
                            env={**os.environ, "TRITON_INTERPRET": "0"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = dict(line.split() for line in result.stdout.split("\n") if line.strip())
    if spills["1"] == "None":
        pytest.skip("no nvdisasm in this Triton install")
    assert int(spills["1"]) > 50  # the whole tile's epilogue: spilled
    assert int(spills["4"]) == 0  # sliced: none
