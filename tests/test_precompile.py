"""kernels/precompile.py: a key's candidates compile at once on several threads, and the
tuner's timing pass then finds every one compiled (the same Triton cache keys)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kernel_params import ptxas_available

from recserve.kernels import precompile
from recserve.kernels.precompile import THREADS_ENV, compile_all, compile_threads, compiling


def test_the_thread_count_comes_from_the_environment_or_the_cores(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert compile_threads() == 3
    monkeypatch.delenv(THREADS_ENV)
    for cores, threads in ((1, 1), (4, 2), (16, 8), (64, 8)):  # half the cores, up to 8
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        assert compile_threads() == threads
    for bad, says in (("many", "expected a whole number"), ("0", "expected 1 or more")):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=says):
            compile_threads()


def test_every_config_is_launched_compile_only_and_a_failing_one_is_left_for_later():
    seen = []

    def launch(config):
        seen.append((config["n"], compiling()))
        if config["n"] == 1:
            raise RuntimeError("ptxas failed")  # the timing pass prunes it, with this reason

    compile_all([{"n": 0}, {"n": 1}, {"n": 2}], launch, threads=2)
    assert seen == [(0, True), (1, True), (2, True)]
    assert not compiling()  # launches after it run for real


@pytest.mark.parametrize("threads, configs", [(1, 3), (4, 1)])
def test_one_thread_or_one_config_compiles_nothing_ahead(threads, configs):
    seen = []
    compile_all([{"n": i} for i in range(configs)], seen.append, threads=threads)
    assert seen == []


def test_a_launch_is_a_launch_except_inside_compile_all():
    calls = []

    class Kernel:
        def run(self, *args, grid, warmup, **kwargs):
            calls.append((args, grid, warmup, kwargs))

    precompile.launcher(Kernel(), (4,))(1, 2, BLOCK=8)
    compile_all([{}, {}], lambda config: precompile.launcher(Kernel(), (2,))(3), threads=2)
    assert calls == [((1, 2), (4,), False, {"BLOCK": 8}), ((3,), (2,), True, {}),
                     ((3,), (2,), True, {})]


# A card that is not there: Triton's real JIT (argument binding, cache keys, compile for
# sm_90 with its ptxas) with launches that do nothing and timings that come from the
# config. Each compile records the thread it ran on.
FAKE_CARD = r"""
import os, sys, threading
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
import triton.compiler
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver

class Utils:
    def load_binary(self, name, kernel, shared, device):
        return None, None, 64, 0, 1024
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132}

class Card:
    utils = Utils()
    _real = CudaDriver.__new__(CudaDriver)
    def is_active(self): return True
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")
    def launcher_cls(self, src, metadata): return lambda *args: None
    def __getattr__(self, name): return getattr(self._real, name)

triton.runtime.driver.set_active(Card())
threads, lock, at_once = [], threading.Lock(), [0, 0]  # (now, most)
real_compile = triton.compiler.compile
def compile(*args, **kwargs):
    with lock:
        threads.append(threading.current_thread().name)
        at_once[0] += 1
        at_once[1] = max(at_once)
    try:
        return real_compile(*args, **kwargs)
    finally:
        with lock:
            at_once[0] -= 1
triton.compiler.compile = compile  # (what the JIT binds on its first launch)
def bench(fn, **kwargs):
    fn()
    return 1.0
triton.testing.do_bench = bench

from recserve.kernels import linear as li
a = torch.randn(64, 256).to(torch.bfloat16)
w = torch.randn(128, 256).to(torch.bfloat16)
li.linear(a, w, torch.zeros(128, dtype=torch.bfloat16), activation="relu")
(key, timed), = li._tuner.timings.items()
print("timed", len(timed))
print("compiles", " ".join(sorted(set(threads))), len(threads))
print("at_once", at_once[1])
"""


@pytest.mark.parametrize("threads", ["2", "1"])
def test_the_tuners_timing_pass_finds_every_candidate_compiled_by_the_threads(threads):
    """linear's tuning on a stand-in sm_90 card: with 2 threads the kernels compile two
    at a time on the compile threads, and none again when the candidates are launched and
    timed; with 1 (the control) they compile one by one as they launch."""
    if not ptxas_available():
        pytest.skip("this Triton install has no ptxas to compile with")
    env = {**os.environ, "TRITON_INTERPRET": "0", THREADS_ENV: threads,
           "RECSERVE_AUTOTUNE": "1", "RECSERVE_TUNE_BY": "eager"}
    done = subprocess.run([sys.executable, "-c", FAKE_CARD], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().split("\n"))
    timed = int(lines["timed"])
    names, count = lines["compiles"].rsplit(" ", 1)
    assert timed >= 4 and int(count) == timed  # one compile a candidate, no second one
    if threads == "1":
        assert names == "MainThread" and lines["at_once"] == "1"
    else:
        assert all(n.startswith("recserve-compile") for n in names.split()), names
        assert lines["at_once"] == "2"  # (a launch that waits for its compile gives 1)


@pytest.mark.gpu
def test_on_the_card_tuning_compiles_on_the_threads_and_runs_every_candidate(monkeypatch):
    """The card's own Triton and driver: a layer shape no other test tunes compiles its
    candidates on the compile threads only, each is then launched and timed, and the
    pick computes the layer."""
    import threading

    import torch

    from recserve.kernels import linear as li

    monkeypatch.setenv("RECSERVE_AUTOTUNE", "1")
    monkeypatch.setenv("RECSERVE_TUNE_BY", "eager")
    monkeypatch.setenv(THREADS_ENV, "4")
    kernel = li._linear_kernel
    # (binds its compile, wrapped below; and forgets what it compiled before, so that each
    # candidate compiles here: from Triton's disk cache if an earlier test compiled it)
    kernel.device_caches[torch.cuda.current_device()][0].clear()
    real, threads = kernel.compile, []

    def compile(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "compile", compile)
    a = torch.randn(72, 200, device="cuda").to(torch.bfloat16)  # (K = 200: an odd K)
    w = torch.randn(96, 200, device="cuda").to(torch.bfloat16)
    bias = torch.randn(96, device="cuda").to(torch.bfloat16)
    out = li.linear(a, w, bias, activation="relu")
    key = next(k for k in li._tuner.timings if k[:3] == (72, 96, 200))
    assert len(li._tuner.timings[key]) >= 2
    assert threads and all(n.startswith("recserve-compile") for n in threads), threads
    expected = torch.relu(a.float() @ w.float().T + bias.float())
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.02)
