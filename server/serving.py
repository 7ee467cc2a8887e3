"""What ``recserve serve`` runs: the batching engine (or the one-at-a-time baseline) on a device.

``ServeOptions`` (``serve_options``) gathers the command line's choices; ``open_backend``
builds the backend on the running event loop (the engine's executor threads hand results
back to it), loads every model of the repository and warms each one up, so that a backend
it returns is ready to score at full speed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np

from recserve.engine.settings import EngineSettings

from .config import ServerConfig
from .serve_options import DEVICE_DEFAULTS, ServeOptions, resolve_device

log = logging.getLogger("recserve.server")

def executor_factory(device: str, torch_threads: int | None = None,
                     pack_threads: int | None = None, compute_streams: int = 1,
                     pack_processes: bool = False, keep_gil: bool = True):
    """A factory ``settings -> Executor`` for ``cpu``, ``cuda`` or ``null``."""
    if device == "null":
        return _null_executor
    if device == "cuda":
        from recserve.engine.gpu_executor import GpuExecutor

        return lambda settings: GpuExecutor(settings, "cuda", pack_threads=pack_threads,
                                            compute_streams=compute_streams,
                                            pack_processes=pack_processes,
                                            keep_gil=keep_gil)
    from recserve.engine.executor import CpuExecutor

    return lambda settings: CpuExecutor(settings, torch_threads=torch_threads)


def _null_executor(settings: EngineSettings):
    """An executor that scores nothing (zeros at once): ``--device null`` measures the
    network front end and the engine's queueing alone, without any model compute."""
    from types import SimpleNamespace

    from recserve.engine.executor import Executor, JobResult, PieceResult

    class NullExecutor(Executor):
        def start(self) -> None:
            pass

        def build_model(self, spec, weights):
            return SimpleNamespace(spec=spec)

        def free_slots(self) -> int:
            return settings.slots  # every job is done inside submit

        def submit(self, job, done) -> None:
            outputs = len(job.model.spec.outputs)
            done(JobResult(job, tuple(PieceResult(np.zeros((p.count, outputs), np.float32))
                                      for p in job.plan.pieces)))

        def close(self) -> None:
            pass

    return NullExecutor()


def cpu_torch_threads(workers: int = 1) -> int:
    """The CPU executor's default torch threads: the cores torch would use, but no more
    than the process may (a container's CPU limit: torch counts the machine's cores), less
    one for this process's event loop and one per front-end worker process (at least 1).
    Measured with bench/server.py on the 2-core CI machine (demo model, closed loop, 32 in
    flight, runs interleaved): torch's default of 2 threads served 1865-2408 req/s (median
    1900 of 5 runs), 1 thread 1806-2874 (median 2215 of 7): two torch threads and the event
    loop fight over two cores."""
    import torch

    from recserve.engine import cores

    others = 1 + (workers if workers > 1 else 0)
    return max(1, min(torch.get_num_threads(), cores.available_cores()) - others)


async def create_backend(options: ServeOptions):
    """An ``EngineBackend`` with its engine started and no model yet (or, one at a time, a
    ``ReferenceBackend`` already holding every model). Raises ``ValueError`` for an empty
    repository."""
    from recserve.engine.repository import ModelRepository

    from .backend import EngineBackend, ReferenceBackend

    repo = ModelRepository(options.repo)
    listed = repo.models()
    if not listed:
        raise ValueError(f"no models in {options.repo} (expected {options.repo}/<model>/"
                         "<version>/)")
    device = resolve_device(options.device)
    if options.one_at_a_time:
        if device == "null":
            raise ValueError("--one-at-a-time scores with the reference model; not with "
                             "--device null")
        log.info("scoring one request at a time with the reference model on %s", device)
        return ReferenceBackend([repo.load(n, v) for n, v in listed], device)
    from recserve.engine.engine import Engine

    settings = options.settings or DEVICE_DEFAULTS[device]
    threads = options.torch_threads if options.torch_threads is not None else (
        cpu_torch_threads(options.workers) if device == "cpu" else None)
    engine = Engine(settings, executor_factory(device, threads, options.pack_threads,
                                               options.compute_streams,
                                               options.packs_in_processes(device),
                                               options.keep_gil is not False),
                    slow_request_s=options.slow_request_ms / 1e3 or None)
    await engine.start()
    log.info("engine on %s: %s", device, describe(device, settings, options, threads,
                                                   engine.stats()["executor"]))
    return EngineBackend(engine)


def describe(device: str, settings: EngineSettings, options: ServeOptions,
             torch_threads: int | None, executor: dict) -> str:
    """The settings in effect on ``device``, defaults resolved, for the start-up log."""
    parts = [f"batches up to {settings.max_batch_rows} rows in buckets "
             f"{','.join(map(str, settings.buckets))}", f"{settings.slots} slot(s)",
             f"queue bound {settings.max_queued_rows} rows",
             f"fill wait {settings.fill_wait_s * 1e3:g} ms",
             "strict priority" if settings.aging_s is None
             else f"aging {settings.aging_s * 1e3:g} ms",
             f"{options.workers} front-end worker(s)" if options.workers > 1
             else "one process (no front-end workers)"]
    if torch_threads is not None:
        parts.append(f"{torch_threads} torch thread(s)")
    for key in ("pack_threads", "compute_streams"):
        if key in executor:
            parts.append(f"{key.replace('_', ' ')} {executor[key]}")
    if "packed_in_processes" in executor:
        parts.append("ring requests packed in packing processes")
    if executor.get("issue_calls") == "driver":
        parts.append("CUDA calls keep the GIL")
    parts.append(f"slow requests logged from {options.slow_request_ms:g} ms"
                 if options.slow_request_ms else "no slow-request log")
    from recserve.kernels.tuning_cache import ENV

    tuning = os.environ.get(ENV)
    if device == "cuda" and tuning is not None:
        parts.append(f"tuning cache {tuning or 'off'}")
    return ", ".join(parts)


async def load_models(backend, repo_root: Path) -> None:
    """Load and warm up the highest version of every model in the repository (nothing to do
    for a ``ReferenceBackend``, built with its models)."""
    from recserve.engine.repository import ModelRepository

    if not hasattr(backend, "load"):
        return
    repo = ModelRepository(repo_root)
    for name, version in repo.models():
        started = time.perf_counter()
        loaded = await asyncio.to_thread(repo.load, name, version)
        await backend.load(loaded)
        await warm_up(backend, name, version)
        log.info("loaded %s version %d in %.1f s", name, version,
                 time.perf_counter() - started)


async def open_backend(options: ServeOptions):
    """``create_backend`` then ``load_models``: a backend ready to score at full speed."""
    backend = await create_backend(options)
    try:
        await load_models(backend, options.repo)
    except BaseException:
        await backend.close()
        raise
    return backend


async def warm_up(backend, name: str, version: int) -> None:
    """Score a few random requests so first-use costs (allocations, kernel caches) are paid
    before traffic arrives; the GPU executor already captured its graphs in ``load``."""
    from recserve.engine.demo import random_inputs

    spec = backend.engine.spec(name, version)
    rng = np.random.default_rng(0)
    for rows in sorted({1, backend.engine.settings.buckets[0]}):
        await backend.score(name, version, random_inputs(spec, rng, rows))


async def serve(options: ServeOptions, config: ServerConfig) -> int:
    """Run ``recserve serve`` until SIGTERM or SIGINT; the exit status.

    The server listens (live, not ready) while the models load, then reports ready. The
    first signal drains: no new connections, new requests answered ``overloaded``, every
    accepted request answered within ``config.drain_s``; then exit 0. A second signal
    exits at once (status 1). A model that fails to load at start exits 1.
    """
    from recserve.engine.monitor import GpuMonitor

    from .app import Server
    from .hub import Hub

    backend = await create_backend(options)
    monitor = GpuMonitor().start()
    if options.workers > 1:
        server = Hub(backend, config, options.workers, repository=options.repo,
                     monitor=monitor, log_level=options.log_level,
                     ring_bytes=options.worker_ring_mb << 20,
                     defer_ring_decode=options.packs_in_processes(
                         resolve_device(options.device)))
    else:
        server = Server(backend, config, repository=options.repo, monitor=monitor)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal (%s): exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        log.info("recserve stopping: draining for up to %g s", config.drain_s)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    exporter = None
    try:
        await server.start()
        exporter = await _start_metrics(server, options)
        status = await _until_stopped(server, backend, options, stop)
        if status == 0 and not await server.drain(config.drain_s):
            log.warning("drain time over: %d requests still in flight are answered "
                        "overloaded", server.dispatcher.active)
        return status
    finally:
        await server.close()
        if exporter is not None:
            await exporter.close()
        monitor.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("recserve stopped")


async def _until_stopped(server, backend, options: ServeOptions, stop: asyncio.Event) -> int:
    """Load the models (then mark ready) and wait for the stop signal; 1 if a load fails."""
    from .app import freeze_heap

    loading = asyncio.ensure_future(load_models(backend, options.repo))
    waiting = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        waiting.cancel()
        log.error("loading the models failed: %s", loading.exception())
        return 1
    if not loading.done():  # stopped while loading: never became ready
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        return 0
    server.mark_ready()
    freeze_heap()  # after the models: a full GC pass never walks them again
    log.info("ready: every model is loaded and warmed up")
    await waiting
    return 0


async def _start_metrics(server, options: ServeOptions):
    """The Prometheus endpoint, when asked for and built in (``server/metrics.py``)."""
    if options.metrics_port is None:
        return None
    try:
        from .metrics import start_metrics
    except ImportError:
        log.warning("--metrics-port given, but this build has no metrics endpoint")
        return None
    try:
        return await start_metrics(server, options.metrics_host, options.metrics_port)
    except OSError as exc:  # another replica on this host has the port: keep serving
        log.warning("no metrics endpoint: cannot listen on %s:%d (%s); pick another with "
                    "--metrics-port or turn it off with --no-metrics", options.metrics_host,
                    options.metrics_port, exc.strerror or exc)
        return None
