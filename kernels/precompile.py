"""Compile a key's tuning candidates at once, on the host's cores, before timing them.

Why: a tuner that launches its candidates one by one compiles them one by one, and a model
load tunes hundreds (dlrmv2: 35 gather candidates, and each GEMM layer's tiles, at every
batch bucket). Triton's compile leaves the GIL for most of its work (MLIR, LLVM, ptxas):
40 GEMM configs took 15.3 s one by one and 7.8 s on 4 threads of this 2-core host (Triton
3.6, sm_90), with the same cubins. On a card's host of 16 cores the compile step of a cold
start should shrink several times; the timing pass is unchanged.

How: ``SafeTuner`` calls ``compile_all``, which runs each candidate's launch with the launch
made compile-only (``launcher``: Triton's ``run(..., warmup=True)``, the same argument
binding and cache key as the launch, so the timing pass finds the kernel compiled) inside
Triton's ``AsyncCompileMode``, whose executor compiles on ``compile_threads()`` threads.
A candidate whose compile fails is left for the timing pass, which compiles it again and
prunes it with the reason, as before. ``RECSERVE_COMPILE_THREADS=1`` compiles one by one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

from . import _common  # noqa: F401  (first: it may switch on the interpreter)

import triton  # isort: skip

THREADS_ENV = "RECSERVE_COMPILE_THREADS"
_compile_only: ContextVar[bool] = ContextVar("recserve_compile_only", default=False)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's cpuset, not the
    node's count where the platform says so)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def compile_threads() -> int:
    """Threads that compile a key's candidates: ``RECSERVE_COMPILE_THREADS``, else half the
    usable cores up to 8 (a server tunes while it may be serving other models)."""
    given = os.environ.get(THREADS_ENV, "").strip()
    if given:
        try:
            threads = int(given)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={given!r}: expected a whole number of threads "
                             "(1 compiles one candidate at a time)") from None
        if threads < 1:
            raise ValueError(f"{THREADS_ENV}={threads}: expected 1 or more")
        return threads
    return max(1, min(8, usable_cores() // 2))


def compiling() -> bool:
    """True while a launch should only compile (``compile_all``): a launch that runs
    something other than a Triton kernel (cuBLAS) skips it then."""
    return _compile_only.get()


def launcher(kernel, grid) -> Callable:
    """``kernel[grid]``, but compile-only (Triton's warmup) inside ``compile_all``."""
    only = _compile_only.get()
    return lambda *args, **kwargs: kernel.run(*args, grid=grid, warmup=only, **kwargs)


def compile_all(configs: Sequence[dict], launch: Callable[[dict], object],
                threads: int | None = None) -> None:
    """Compile every config's kernels through ``launch`` on ``threads`` threads, launching
    nothing; failures are left to the caller's own launch of that config to report."""
    threads = compile_threads() if threads is None else threads
    if threads < 2 or len(configs) < 2:
        return
    token = _compile_only.set(True)
    try:
        with ThreadPoolExecutor(min(threads, len(configs)), "recserve-compile") as pool, \
                triton.AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                try:
                    launch(config)
                except Exception:  # noqa: BLE001 - the timing pass prunes it with the reason
                    continue
    except Exception as exc:  # noqa: BLE001 - e.g. another AsyncCompileMode active
        warnings.warn(f"compiling candidates on {threads} threads failed "
                      f"({type(exc).__name__}: {exc}); they compile one by one", stacklevel=2)
    finally:
        _compile_only.reset(token)
