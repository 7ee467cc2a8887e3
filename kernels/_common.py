"""Shared kernel plumbing: interpreter fallback, a compile-failure-proof autotuner, checks.

Without a CUDA device the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``,
set here before any ``@triton.jit`` decorates, because Triton reads it at decoration time),
so the CPU tests and a CPU host run the same kernel code as the card.

``SafeTuner`` replaces ``triton.autotune``: Triton's autotuner only skips configs that run
out of resources, while a config can also fail inside an MLIR pass (Triton 3.6 failed
``TritonGPURemoveLayoutConversions`` on a masked 2-D row gather at 32+ rows per program).
Here every config is tried, any exception drops that config, and the fastest survivor is
cached per key. Tuning launches kernels and synchronizes, so warm up (call once per shape
bucket) before capturing a CUDA graph. Under the interpreter, or with
``RECSERVE_AUTOTUNE=0`` (quick GPU test runs), the first config is used untimed (on a
GPU, the first that compiles and launches). A kernel whose configs all compute the same
bits (the gather: same sums, same order) passes ``outputs``: every config's result is
then compared bit for bit with the first one's before it is timed, and a config that
differs (a miscompile that still runs) is dropped like one that fails to compile.
With ``RECSERVE_TUNING_CACHE`` set, picks persist across processes (``tuning_cache``).
Before timing a key's candidates, the tuner compiles them all at once on several threads
(``precompile``, ``RECSERVE_COMPILE_THREADS``).
``RECSERVE_TUNE_BY=graph`` times candidates as the engine runs them, replayed in a CUDA
graph, and ``auto`` in a graph only where an eager launch is too short to time
(``tune_by``); the default times eager launches.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402  (must come after the interpreter switch above)

from .tuning_cache import shared_cache  # noqa: E402


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRIAL_ENV = "RECSERVE_TRIAL_CONFIGS"
"""Set to 1 to also tune the trial candidates (``trial_configs``)."""


def trial_configs() -> bool:
    """Whether the tuners also try the trial candidates: configs built for a measured gap
    that lost on the H200 when it tuned them, whose result there was not recorded
    (bench/RESULTS.md, twelfth, seventeenth and nineteenth sessions, the last for the
    deep pipelines), kept for other cards and Triton versions to try
    (``RECSERVE_TRIAL_CONFIGS=1``, which ``bench/kernel_variants.py --trial-configs`` sets),
    but not tuned at every server start, where each would add its compiles and timings."""
    return os.environ.get(TRIAL_ENV, "0") == "1"


PDL_ENV = "RECSERVE_PDL"
"""Set to 1 for programmatic dependent launch (``pdl``); off: measured on the H100 and the
H200 it does not pay (bench/RESULTS.md; within 2.5% either way on the H200)."""


def pdl() -> bool:
    """Whether kernels launch with programmatic dependent launch (``RECSERVE_PDL=1``, a
    Hopper or newer card, never under the interpreter). A PDL kernel may start while the
    kernel before it on the stream finishes its last programs; each of ours then waits
    (``griddepcontrol.wait``) before it reads or writes any memory, so results are the
    same, and a chain of short kernels (a B=512 forward launches about 15) overlaps each
    one's launch and ramp with the previous one's tail."""
    if os.environ.get(PDL_ENV, "0") != "1" or interpreting():
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def pdl_launch() -> dict:
    """Launch options and the kernels' ``USE_GDC`` flag for the current ``pdl`` setting."""
    return {"USE_GDC": True, "launch_pdl": True} if pdl() else {}


FUSED_BOTTOM_ENV = "RECSERVE_FUSED_BOTTOM"
"""Set to 1 to run a model's bottom MLP in one launch (``fused_bottom``)."""


def fused_bottom() -> bool:
    """Whether a new ``TritonModel`` runs its bottom MLP (2 or 3 ReLU layers) in one launch
    (``RECSERVE_FUSED_BOTTOM=1``: the server's models too; see ``TritonModel.
    set_fused_bottom`` and ``mlp``); off: not yet measured on a card."""
    return os.environ.get(FUSED_BOTTOM_ENV, "0") == "1"


FUSED_DOT_ENV = "RECSERVE_FUSED_DOT"
"""Set to 1 to form dot models' interaction inside the gather's launch (``fused_dot``)."""


def fused_dot() -> bool:
    """Whether a new ``TritonModel`` of a dot model forms its interaction inside the last
    gather launch (``RECSERVE_FUSED_DOT=1``: the server's models too; see
    ``TritonModel.set_fused_dot`` and ``gather_dot``); off: slower on the H200 (385 us
    against 320 for the dlrm-dot forward at B=8192)."""
    return os.environ.get(FUSED_DOT_ENV, "0") == "1"


def processors(device: torch.device) -> int:
    """The device's streaming multiprocessors, which a persistent kernel's grid is sized by
    (under the interpreter 2, so a CPU test walks several tiles per program)."""
    if interpreting() or device.type != "cuda":
        return 2
    return _properties(_index(device)).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


INTERPRETER_L2_BYTES = 64 * 1024
"""What ``l2_bytes`` says off a card: small, so the CPU tests' small tables split into kept
and streamed ones (the hint changes no value, only what the card's L2 keeps)."""


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache in bytes (50 MB on an H100; 0 if torch does not say)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_L2_BYTES
    # (0 where a torch does not report it: then no table is kept, the hint is not tried)
    return getattr(_properties(_index(device)), "L2_cache_size", 0)


def ieee_dot(dtype: torch.dtype) -> bool:
    """Whether a kernel's ``tl.dot`` must upcast to fp32 with exact (IEEE) products: for fp32
    operands (no TF32), and for bf16 under the interpreter, whose bf16 dot returns garbage
    (Triton 3.9); bf16 x bf16 products are exact in fp32, so results match the card's."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


TUNE_BY_ENV = "RECSERVE_TUNE_BY"
TUNE_BY = ("eager", "graph", "auto")
LAUNCH_BOUND = 1.5
"""``RECSERVE_TUNE_BY=auto`` times a key's candidates in a CUDA graph when its first
candidate's eager timing is over this many times its graph timing: the eager one then
times mostly the host's launch. On the H200 (nineteenth session) the best candidates of the
dlrmv2 layers at B=512 timed 1.6-16x longer eagerly than in a graph (12.9-47 us against
2.9-11), and the graph-tuned forward was the faster in three runs of three (up to 5%); at
B=8192 every layer's timed 0.9-1.5x (those over 1.2x picked the same config or one within
2% either way), and the eager-tuned forward was the faster in one run of three (4%): a
graph timing keeps a layer's operands in the L2, which the forward does
not (V tuned at 91.7 us in a graph took 108.7 in the forward; bench/RESULTS.md)."""


def tune_by() -> str:
    """How ``SafeTuner`` times a candidate (``RECSERVE_TUNE_BY``): ``eager`` (default:
    ``triton.testing.do_bench``, one launch at a time from Python, L2 flushed between) or
    ``graph`` (``do_bench_cudagraph``: many launches replayed in one CUDA graph, the
    device's time alone, as the engine replays its forward; but no L2 flush between them,
    so operands that fit the L2 stay there, which a forward after the gather may not
    find: ``kernel_variants.py``'s ``graph_tuned`` section judges by whole forwards). They
    can disagree where a launch is short: on the H100 at B=512 the tuner's eager timings
    put split-K configs (two launches) behind single-kernel ones, while the chosen configs
    of the cross layers' U products took 11.5 us of device time each in the graph for
    3.5 MB of weights (bench/RESULTS.md, kernel_variants.json's per-kernel times).
    ``auto`` (not yet measured on a card) times each key's first candidate both ways, then
    all of them in a graph where the eager timing was over ``LAUNCH_BOUND`` times the
    graph's, else eagerly: the graph where an eager timing sees only the launch, eager
    launches where the L2's state matters."""
    value = os.environ.get(TUNE_BY_ENV, "eager")
    if value not in TUNE_BY:
        raise ValueError(f"{TUNE_BY_ENV}={value!r}; expected one of {TUNE_BY}")
    return value


def _auto_method(first: dict, launch: Launch) -> str:
    """``RECSERVE_TUNE_BY=auto``'s choice for one key: "graph" when ``first``'s eager
    timing is over ``LAUNCH_BOUND`` times its timing in a CUDA graph, else "eager" (also
    when ``first`` fails either way: timing every candidate then reports why)."""
    try:
        eager = triton.testing.do_bench(lambda: launch(first), warmup=5, rep=20,
                                        return_mode="median")
        torch.cuda.current_stream().synchronize()  # (see _time_each)
        graph = triton.testing.do_bench_cudagraph(lambda: launch(first), rep=10,
                                                  return_mode="median")
    except Exception:  # noqa: BLE001 - _time_each prunes it and reports the error
        return "eager"
    return "graph" if eager > LAUNCH_BOUND * graph else "eager"


_TUNERS: list[SafeTuner] = []
Outputs = Callable[[], Sequence[tuple[torch.Tensor, float | torch.Tensor]]]
"""What a launch writes, each tensor with what to fill it with first (``SafeTuner.run``)."""
Launch = Callable[[dict], object]
"""Launches a kernel with one config; may return the compiled kernel it launched (Triton's
launch does), whose register spills the tuner reads (``spills``)."""


def spills(launched: object) -> int:
    """Local memory a launched Triton kernel uses (ptxas spills, in 4-byte words), or 0
    when unknown (another launch's return, the interpreter, cuBLAS)."""
    n = getattr(launched, "n_spills", 0)
    return n if isinstance(n, int) else 0


def forget_tuning() -> None:
    """Drop every tuner's picks in this process (benchmarks: tune again another way)."""
    for tuner in _TUNERS:
        tuner.best.clear()
        tuner.timings.clear()


class SafeTuner:
    """Pick the fastest config per key among those that compile and run."""

    def __init__(self, name: str, configs: Sequence[dict]) -> None:
        if not configs:
            raise ValueError(f"{name}: no configs to tune over")
        _TUNERS.append(self)
        self.name = name
        self.configs = list(configs)
        self.best: dict[tuple, dict] = {}
        self.timings: dict[tuple, list[tuple[float, dict]]] = {}
        """Per tuned key, every config that ran and its median ms, fastest first, those
        that spill registers after those that do not (for the benchmarks' reports: which
        variant won, and by how much)."""
        self.spilled: dict[tuple, list[dict]] = {}
        """Per tuned key, the configs whose kernels spilled registers (never the pick while
        one that does not spill runs)."""

    def run(self, key: tuple, launch: Launch,
            candidates: Sequence[dict] | None = None,
            outputs: Outputs | None = None) -> dict:
        """Launch with the cached best config for ``key``, tuning on first sight.

        ``outputs`` (for kernels whose configs must agree bit for bit): the tensors a launch
        writes, each with a value to fill it with first (so a config that writes nothing
        cannot pass for one that writes the right thing), or a tensor to copy in (for an
        output a launch adds to, such as flags earlier launches set)."""
        configs = list(candidates) if candidates is not None else self.configs
        if key in self.best:
            launch(self.best[key])
            return self.best[key]
        if interpreting():
            configs = configs[:1]  # tests exercise the first config; a failure must show
        if len(configs) == 1 or os.environ.get("RECSERVE_AUTOTUNE") == "0":
            return self._first_that_runs(key, launch, configs)
        method = tune_by()
        cache, cache_name = shared_cache(), self.name if method == "eager" else \
            f"{self.name}@{method}"  # (picks by one method do not stand for another)
        cached = cache.get(cache_name, key) if cache is not None else None
        if cached is not None and cached in configs:
            try:  # tuned by an earlier process for this card, compiler and kernel source
                launch(cached)
            except Exception as exc:  # noqa: BLE001 - then tune as if it were not there
                warnings.warn(f"{self.name}: cached config {cached} failed for key "
                              f"{_brief(key)} ({type(exc).__name__}); tuning again",
                              stacklevel=2)
            else:
                self.best[key] = cached
                return cached
        from .precompile import compile_all  # (here: precompile imports this module)

        compile_all(configs, launch)  # every candidate compiled at once, then timed one by one
        if method == "auto":
            method = _auto_method(configs[0], launch)
        timings, errors, spilled = self._time_each(configs, launch, outputs, method)
        if not timings and method == "graph":  # (a launch that cannot be captured)
            warnings.warn(f"{self.name}: no config could be timed in a CUDA graph for key "
                          f"{_brief(key)}; timing eager launches", stacklevel=2)
            timings, errors, spilled = self._time_each(configs, launch, outputs, "eager")
        if not timings:
            raise RuntimeError(f"{self.name}: every config failed for key {key}:\n  "
                               + "\n  ".join(errors))
        if errors:
            why = (" (an output that differs is another summation order, such as a long bag's "
                   "over another number of lanes with int8 or weighted rows, or a miscompile: "
                   "either way dropped, so whichever config wins gives the same bits)"
                   if any("its output differs" in e for e in errors) else "")
            warnings.warn(f"{self.name}: pruned {len(errors)} of {len(configs)} config(s) for "
                          f"key {_brief(key)}: " + "; ".join(errors) + why, stacklevel=2)
        # A config whose registers spill to local memory is picked only when every one
        # does: a tuning run times a layer alone, where spills may cost less than in the
        # forward, and an eager timing of a small layer is mostly its launch. (The H200's
        # ncu run found serving's tuning had put DCNv2's V on a 256x128 tile that spills,
        # and the first bottom layer on one too: bench/notes-kernels.md.)
        timings.sort(key=lambda t: (any(t[1] is c for c in spilled), t[0]))
        self.timings[key] = timings
        self.spilled[key] = spilled
        best = timings[0][1]
        self.best[key] = best
        if cache is not None:
            cache.put(cache_name, key, best)
        launch(best)  # leave the outputs of the chosen config in place
        return best

    @staticmethod
    def _time_each(configs: list[dict], launch: Launch,
                   outputs: Outputs | None,
                   method: str) -> tuple[list[tuple[float, dict]], list[str], list[dict]]:
        """(median ms, config) for each config that runs (and, with ``outputs``, gives the
        first one's bits), why each other one was dropped, and which of them spill."""
        timings, errors, spilled, reference = [], [], [], None
        for config in configs:
            try:
                if outputs is not None:
                    result, launched = _bits_of(launch, config, outputs)
                    if reference is None:
                        reference = (config, result)
                    elif not all(torch.equal(a, b) for a, b in zip(reference[1], result,
                                                                    strict=True)):
                        errors.append(f"{config}: its output differs from {reference[0]}'s")
                        continue
                else:
                    launched = launch(config)  # (compiles it, and says whether it spills)
                if spills(launched):
                    spilled.append(config)
                if method == "graph":
                    # do_bench_cudagraph first launches on a new stream that does not wait
                    # for ours: let what ours still has queued (the inputs' producers,
                    # the launch above) finish first. The one unordered access found after
                    # a warm process (nothing compiling to slow the host) gave a wrong int8
                    # gather tuned this way on the H200 (bench/RESULTS.md, tenth session);
                    # with this wait the H200 tuned it right in the one warm process tried
                    # since (twelfth session): too few runs to call the cause found.
                    torch.cuda.current_stream().synchronize()
                    ms = triton.testing.do_bench_cudagraph(lambda c=config: launch(c), rep=10,
                                                           return_mode="median")
                else:
                    ms = triton.testing.do_bench(lambda c=config: launch(c), warmup=5, rep=20,
                                                 return_mode="median")
                timings.append((ms, config))
            except Exception as exc:  # noqa: BLE001 - any compile or launch failure prunes
                errors.append(f"{config}: {type(exc).__name__}: {str(exc)[:200]}")
        return timings, errors, spilled

    def _first_that_runs(self, key: tuple, launch: Launch,
                         configs: list[dict]) -> dict:
        """Untimed: the first config that compiles and launches (later ones are fallbacks)."""
        for i, config in enumerate(configs):
            try:
                launch(config)
            except Exception as exc:  # noqa: BLE001 - a failing config falls through
                if i == len(configs) - 1:
                    raise
                warnings.warn(f"{self.name}: config {config} failed for key {_brief(key)} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); trying the next",
                              stacklevel=3)
                continue
            self.best[key] = config
            return config
        raise AssertionError("unreachable: configs is never empty")


def _brief(key: tuple, limit: int = 160) -> str:
    """A tuning key for a message: a gather's key holds every feature (26 for dlrmv2), which
    buried the warning it was part of."""
    text = repr(key)
    return text if len(text) <= limit else text[:limit - 15] + f"... ({len(text)} chars)"


def _bits_of(launch: Launch, config: dict,
             outputs: Outputs) -> tuple[list[torch.Tensor], object]:
    """Fill ``outputs`` (each with its value, or a copy of its tensor), launch ``config``,
    and return the outputs' bytes (NaN-proof) and what the launch returned."""
    written = outputs()
    for tensor, fill in written:
        if isinstance(fill, torch.Tensor):
            tensor.copy_(fill)
        else:
            tensor.fill_(fill)
    launched = launch(config)
    return [t.contiguous().view(torch.uint8).clone() for t, _ in written], launched


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the GEMM and interaction kernels take."""


def weight_dtypes(input_dtype: torch.dtype) -> Sequence[torch.dtype]:
    """The weight dtypes a GEMM kernel (``linear``, ``mlp``) takes with inputs of
    ``input_dtype``: the same, or any float one for fp32 inputs, each rounded to the
    weights' dtype as it loads (the same products as rounding first: the engine stages
    dense inputs in fp32 and the first bottom layer takes them so)."""
    return FLOAT_DTYPES if input_dtype == torch.float32 else (input_dtype,)


def output(out: torch.Tensor | None, rows: int, cols: int, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """A launcher's output: ``out`` checked to be [rows, cols] of ``dtype`` on ``device``
    (any strides), or a new one."""
    if out is None:
        return torch.empty(rows, cols, device=device, dtype=dtype)
    check_tensor("out", out, dtypes=[dtype], ndim=2, device=device)
    if list(out.shape) != [rows, cols]:
        raise ValueError(f"out has shape {list(out.shape)}; expected [{rows}, {cols}]")
    return out


def check_tensor(what: str, t: torch.Tensor, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None, device: torch.device | None = None) -> None:
    """Raise ValueError naming ``what`` when ``t`` has the wrong dtype, rank or device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{what} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{what} has shape {list(t.shape)}; expected {ndim} dimensions")
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{what} is on {t.device}; expected {device}")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where ``cuda`` matches ``cuda:0`` (the current device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def next_pow2(n: int, low: int = 1) -> int:
    """Smallest power of two >= max(n, low)."""
    return max(low, triton.next_power_of_2(max(1, n)))
