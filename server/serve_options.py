"""``recserve serve``'s choices: the devices, each device's engine defaults, ``ServeOptions``
(what the command line chose, checked) and the engine settings they make.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recserve.engine.settings import EngineSettings

from .shared_ring import DEFAULT_RING_BYTES

DEVICES = ("auto", "cpu", "cuda", "null")
PACK_IN = ("auto", "thread", "process")

# Per-device engine defaults. cuda: the engine's own buckets (a CUDA graph per bucket and
# slot), 6 slots (packed by 4 threads, cores.default_pack_threads): a slot is held from its
# pack to its scores' hand-back (2.5-4.5 ms on H100 hosts at 8192 rows), so 2 slots left the
# card idle between batches (0.57 of the bare forward, eighth session). On the seventeenth
# session's H200, 8192-row requests, paired runs: 6 slots 0.92 and 0.91 of the bare forward,
# 4 slots 0.91 and 0.77; ranking-sized requests 0.29 and 0.25 against 0.28 and 0.29, bound by
# packing either way; on the nineteenth's H200 host, which packed slower, 6 slots 0.70
# against 0.72 and 0.77 with 4: no clear winner yet (bench/RESULTS.md). cpu: measured on
# a 2-core machine with bench/server.py (demo model, ranking traffic over loopback); see
# DEFAULTS_NOTE.
DEVICE_DEFAULTS = {
    "cuda": EngineSettings(slots=6),
    "cpu": EngineSettings(max_batch_rows=2048, buckets=(256, 512, 1024, 2048), slots=1),
    "null": EngineSettings(max_batch_rows=2048, buckets=(256, 512, 1024, 2048), slots=1),
}
# Measured 2026-11-26 with bench/server.py (2 load processes, 32 in flight, other jobs on the
# machine; each setting twice): 1 slot, 2048 rows: 2260-2285 req/s closed loop, p99 9-10 ms
# at half of that offered (Poisson), no refusals at 0.8. 4096 rows: 2568 req/s (+13%) but
# p99 14-20 ms at half load and refusals at 0.8. 2 slots: 1980-2290 req/s, p99 15-31 ms at
# half load (two batches' torch threads fight over 2 cores). A fill wait only added latency
# in earlier runs: under load the queue fills batches by itself.
DEFAULTS_NOTE = ("on cpu: 1 slot, batches up to 2048 rows, no fill wait, chosen from "
                 "bench/server.py runs on 2 cores")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How ``recserve serve`` scores requests."""

    repo: Path
    """Model repository; the highest version of every model in it is served."""
    device: str = "auto"
    """``cpu``, ``cuda``, or ``auto`` (cuda when torch sees a GPU)."""
    settings: EngineSettings | None = None
    """Engine batching settings (None: the device's defaults; unused with one_at_a_time)."""
    one_at_a_time: bool = False
    """Score with the reference model one request at a time (the benchmark baseline)."""
    torch_threads: int | None = None
    """Intra-op threads of the CPU executor; None keeps torch's default."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus endpoint."""
    metrics_port: int | None = None
    """Port of the Prometheus endpoint; None: no endpoint."""
    workers: int = 1
    """Front-end processes: 1 serves from this process; more start that many worker
    processes that parse and validate, and keep only the engine here (``hub``)."""
    log_level: str = "INFO"
    """Log level of worker processes."""
    pack_threads: int | None = None
    """Host threads packing batches for the GPU executor; None: one per slot, at most 4
    (``cores.default_pack_threads``)."""
    compute_streams: int = 1
    """CUDA streams the GPU executor's batches take in turn (at most the slots; the CPU and
    null executors have none and ignore it)."""
    worker_ring_mb: int = DEFAULT_RING_BYTES >> 20
    """Shared memory per worker process for requests' arrays (``shared_ring``); 0: they
    travel through the worker's socket."""
    pack_in: str = "auto"
    """Where the GPU executor packs batches of requests that lie in a worker's ring:
    ``thread`` (its launcher threads), ``process`` (a packing process per launcher thread,
    off this process's GIL: ``recserve.engine.packer``; needs workers and rings) or
    ``auto`` (process where it can run, else thread: ``packs_in_processes``)."""
    keep_gil: bool | None = None
    """The GPU executor's issue makes its CUDA calls through the driver, keeping the GIL
    (``recserve.engine.cuda_driver``); False: through torch, which gives it up at each.
    None (default): on wherever there is a GPU executor."""
    slow_request_ms: float = 1000.0
    """The engine logs each request it answers later than this after it arrived (queued
    time and batches included; rate-limited) and counts them; 0: off."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"ServeOptions.device is {self.device!r}; expected one of {DEVICES}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not (
                1 <= self.workers <= 256):
            raise ValueError(f"ServeOptions.workers is {self.workers!r}; expected 1..256")
        for name in ("torch_threads", "pack_threads", "compute_streams"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"ServeOptions.{name} is {value!r}; expected a positive int "
                                 "or None")
        if (isinstance(self.worker_ring_mb, bool) or not isinstance(self.worker_ring_mb, int)
                or not 0 <= self.worker_ring_mb <= 1 << 16):
            raise ValueError(f"ServeOptions.worker_ring_mb is {self.worker_ring_mb!r}; "
                             "expected 0..65536")
        if self.pack_in not in PACK_IN:
            raise ValueError(f"ServeOptions.pack_in is {self.pack_in!r}; expected one of "
                             f"{PACK_IN}")
        if self.pack_in == "process" and self.device not in ("cuda", "auto"):
            raise ValueError(f"--pack-in process packs batches for the GPU; on {self.device} "
                             "there is nothing to pack (leave it out)")
        if self.pack_in == "process" and (self.workers < 2 or not self.worker_ring_mb):
            raise ValueError("--pack-in process packs requests that lie in front-end "
                             "workers' shared rings: it needs --workers 2 or more and "
                             "--worker-ring-mb above 0")
        if (isinstance(self.slow_request_ms, bool)
                or not isinstance(self.slow_request_ms, (int, float))
                or not 0 <= self.slow_request_ms <= 3_600_000):
            raise ValueError(f"ServeOptions.slow_request_ms is {self.slow_request_ms!r}; "
                             "expected 0 (off) to 3600000")
        if self.keep_gil is True and self.device not in ("cuda", "auto"):
            raise ValueError(f"--keep-gil is about the GPU executor's CUDA calls; on "
                             f"{self.device} there are none (leave it out)")
        slots = (self.settings or DEVICE_DEFAULTS["cuda"]).slots
        if self.device == "cuda" and self.compute_streams > slots:  # (others: no streams)
            raise ValueError(f"{self.compute_streams} compute streams for {slots} slots: a "
                             "stream without a batch to run is of no use; raise --slots")

    def packs_in_processes(self, device: str) -> bool:
        """Whether the engine on ``device`` (resolved: ``cuda``, ``cpu`` or ``null``) packs
        ring requests in packing processes. ``auto`` does wherever it can (a GPU, front-end
        workers with rings): on H100 hosts they kept the card about 1.5x as busy as threads
        did with ranking-sized ring requests, and 0.96-1.15x as busy with 8192-row ones
        (bench/RESULTS.md, eighth session)."""
        if self.one_at_a_time or self.pack_in == "thread":  # (no engine, or not asked)
            return False
        if self.pack_in == "process":
            return True
        return device == "cuda" and self.workers >= 2 and self.worker_ring_mb > 0


def engine_settings(device: str, max_batch_rows: int | None = None,
                    buckets: tuple[int, ...] | None = None, slots: int | None = None,
                    max_queued_rows: int | None = None,
                    fill_wait_ms: float | None = None,
                    aging_ms: float | None = None) -> EngineSettings:
    """``device``'s default settings with the given values replacing them.

    ``max_batch_rows`` alone trims (or extends) the default buckets to end at it;
    ``buckets`` alone sets ``max_batch_rows`` to its last entry; ``aging_ms`` 0 turns
    aging off (strict priority).
    """
    base = DEVICE_DEFAULTS[device]
    if buckets is None:
        buckets = base.buckets
        if max_batch_rows is not None:
            buckets = tuple(b for b in buckets if b < max_batch_rows) + (max_batch_rows,)
    if max_batch_rows is None:
        max_batch_rows = buckets[-1] if buckets else base.max_batch_rows
    return EngineSettings(
        max_batch_rows=max_batch_rows, buckets=tuple(buckets),
        slots=base.slots if slots is None else slots,
        max_queued_rows=base.max_queued_rows if max_queued_rows is None else max_queued_rows,
        fill_wait_s=base.fill_wait_s if fill_wait_ms is None else fill_wait_ms / 1e3,
        aging_s=base.aging_s if aging_ms is None else (aging_ms / 1e3 or None))


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` value; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "null":
        return device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device
