"""The GPU engine's host side on any machine: the real executor with the device simulated.

    python bench/engine_host.py [--compute-ms 0.72] [--slots 6] [--pack-threads N] [--sweep]
                                [--pack-processes] [--issue-calls free|torch|driver]
                                [--driver-call-us US]
                                [--no-graph-outputs] [--traffic KIND ...] [--json FILE]

On the H200 the engine reached 0.43 of its bare forward's samples/s because the host could
not pack batches fast enough (bench/RESULTS.md). This measures that host side without a
GPU: ``SimulatedGpuExecutor`` is ``GpuExecutor`` with its device calls replaced by a clock
(a batch "computes" for ``--compute-ms`` after the previous one, in issue order, and its
copies are free), while the engine, the scheduler, the launcher threads, the packing into
staging buffers, the issue path (its CUDA calls costing what ``--issue-calls`` says), the
completion thread and the slot bookkeeping are the production code.
Workload ``dlrmv2`` (int32 ids, every bag full), 8192-row buckets: (a) 8192-row requests,
(b) ranking-size requests (N in 100..700) in the flat form a worker process sends, (c)
the same per feature, as a single-process server hands them over, and (d) the same as
the engine process of ``serve --workers`` meets them: channel frames, copied once (as a
socket read would), decoded and answered by ``Hub.score`` (``through_hub``; no sockets),
and (e) the same with the arrays in a worker's shared ring (``ranking_via_hub_ring``;
``full_via_hub_ring``: (a) so), which ``--pack-processes`` packs in packing processes.
Ratio = samples/s over the simulated device's (batch / compute time): the ceiling the host
side allows, on this machine. CPU per request: the event loop's thread, and all of the
engine process's threads (a ``--busy-thread`` included; packing processes not). Default
compute time: the H200's bare dlrmv2 forward at B=8192 (0.72 ms). The H200's host packed
about 3x slower per thread than the 2-core CI machine, so read figures from here as
relative.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import workloads as wl  # noqa: E402

from engine import run_loop  # noqa: E402
from recserve.engine.cuda_driver import TorchCalls  # noqa: E402
from recserve.engine.engine import Engine  # noqa: E402
from recserve.engine.gpu_executor import GpuExecutor  # noqa: E402
from recserve.engine.gpu_slots import GpuModel, SlotState, shared_host  # noqa: E402
from recserve.engine.settings import EngineSettings  # noqa: E402
from recserve.engine.shared_memory import SharedMemory  # noqa: E402
from recserve.engine.staging import host_buffers, staging_layout  # noqa: E402
from recserve.engine.tensor_buffers import allocate, as_tensors  # noqa: E402
from recserve.kernels.layout import build_layout  # noqa: E402
from recserve.kernels.model import feature_groups  # noqa: E402
from recserve.server.serve_options import DEVICE_DEFAULTS  # noqa: E402

TRAFFIC = ("full_batches", "ranking_requests", "ranking_per_feature", "ranking_via_hub",
           "ranking_via_hub_ring", "full_via_hub_ring")


ISSUE_CALLS = ("free", "torch", "driver")
DRIVER_CALL_S = 3e-6
"""A driver call's host time (an asynchronous copy, event record or graph launch: a few
microseconds; assumed, not measured here)."""
PACK_MIN_S = 0.0
"""``--pack-ms``: the least a pack takes (a slower host's memory, emulated by sleeping out
the rest with the GIL released, as numpy's copies release it); 0: as this host packs."""


def _hold_gil(seconds: float) -> None:
    """Keep this thread busy, GIL held, for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SimulatedCalls(TorchCalls):
    """The calls of the real issue (``gpu_issue.issue_streams``) against the simulated
    device, each costing the host what ``kind`` says: ``free`` nothing; ``torch`` a GIL
    hand-off (``time.sleep(0)``: torch gives the GIL up in each CUDA call it wraps, and
    getting it back waits for whichever thread took it); ``driver`` 3 us with the GIL kept
    (``cuda_driver.DriverCalls``, ``GpuExecutor(keep_gil=True)``). A graph's launch puts
    its batch on the device clock. ``calls`` counts them."""

    def __init__(self, kind: str) -> None:
        if kind not in ISSUE_CALLS:
            raise ValueError(f"issue calls {kind!r}; expected one of {ISSUE_CALLS}")
        self.name, self.calls = f"simulated {kind}", 0
        self._cost = {"free": lambda: None, "torch": functools.partial(time.sleep, 0),
                      "driver": functools.partial(_hold_gil, DRIVER_CALL_S)}[kind]

    def copy(self, dst, src, stream) -> int:
        self._call()
        return src.numel() * src.element_size()

    def record(self, event, stream) -> None:
        self._call()

    def wait(self, stream, event) -> None:
        self._call()

    def replay(self, graph, stream) -> None:
        self._call()
        graph.launch()

    def _call(self) -> None:
        self.calls += 1  # (under the launch lock: one issue at a time)
        self._cost()


class _SimulatedGraph:
    """A slot's graph for one bucket: launching it occupies the simulated device for the
    executor's compute time, after the batch before it (batches run in issue order)."""

    def __init__(self, executor: SimulatedGpuExecutor, slot: SlotState) -> None:
        self.executor, self.slot = executor, slot

    def launch(self) -> None:
        ex = self.executor
        start = max(time.perf_counter(), ex._device_free)
        ex._device_free = start + ex.compute_s
        ex._due[id(self.slot)] = ex._device_free


class SimulatedGpuExecutor(GpuExecutor):
    """``GpuExecutor`` whose device is a clock: see the module docstring. Scores are zeros.
    ``issue_calls``: what each CUDA call of the issue costs (``SimulatedCalls``)."""

    def __init__(self, settings: EngineSettings, compute_ms: float,
                 pack_threads: int | None = None, pack_processes: bool = False,
                 issue_calls: str = "free", graph_outputs: bool = True) -> None:
        super().__init__(settings, "cpu", pack_threads=pack_threads,
                         pack_processes=pack_processes, graph_outputs=graph_outputs)
        self.compute_s = compute_ms / 1e3
        self.simulated_calls = SimulatedCalls(issue_calls)
        self._device_free = 0.0
        self._due: dict[int, float] = {}

    def _open_device(self) -> None:
        # streams are names here: the real issue compares them and hands them to its calls
        self._streams = {"h2d": "h2d", "d2h": "d2h"}
        self._compute, self._per_slot = ["compute"], []

    def _issue_calls(self) -> SimulatedCalls:
        return self.simulated_calls

    def _bind_thread(self) -> None:
        pass

    def build_model(self, spec, weights) -> GpuModel:
        """Host staging per slot (as the real one) and a device set in host memory, which
        nothing reads (the issue's copies are simulated); a graph per bucket; no weights."""
        layout = staging_layout(spec, feature_groups(spec), self.settings.max_batch_rows,
                                build_layout(spec).x_request)
        rows, outputs = layout.max_rows, len(spec.outputs)
        slots = []
        for _ in range(self.settings.slots):
            host, memory = shared_host(layout) if self.pack_processes \
                else (host_buffers(layout), None)
            slot = SlotState(host, allocate(layout, "cpu"), torch.zeros(rows, outputs),
                             torch.zeros(rows + 1, dtype=torch.bool), None, shared=memory,
                             host_tensors=as_tensors(host),
                             events={f"{s}_{e}": f"{s}_{e}" for s in ("h2d", "compute", "d2h")
                                     for e in ("start", "end")})
            for bucket in self.settings.buckets:
                slot.graphs[bucket] = (_SimulatedGraph(self, slot),
                                       torch.zeros(bucket, outputs),
                                       torch.zeros(bucket + 1, dtype=torch.bool))
            slots.append(slot)
        return GpuModel(spec, None, layout, slots)

    def _pack(self, model, slot_index: int, job, packer):
        started = time.perf_counter()
        sizes = super()._pack(model, slot_index, job, packer)
        rest = PACK_MIN_S - (time.perf_counter() - started)
        if rest > 0:
            time.sleep(rest)
        return sizes

    def _wait_done(self, slot: SlotState) -> None:
        wait = self._due[id(slot)] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)

    def _account(self, seq: int, slot: SlotState) -> None:
        self.busy_ms += self.compute_s * 1e3
        self.batches += 1


class _CountingSide:
    """A worker's channel end as the hub sees it: counts the replies, wakes the feeder."""

    index = 0

    def __init__(self, ring: SharedMemory | None) -> None:
        from recserve.server.hub import EngineSide

        self.ring, self.running, self.holding = ring, {}, set()
        self.release = functools.partial(EngineSide.release, self)
        self.answered = 0
        self.wake: asyncio.Future | None = None

    def send_soon(self, data: bytes) -> None:
        if data[4:5] != b"R":  # (an F: a region freed)
            return
        self.answered += 1
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


def worker_frames(spec, requests: list, shared: bool) -> tuple[dict, SharedMemory | None]:
    """Each distinct request's channel frame payload as a worker sends it (by ``id`` of
    the request), and, with ``shared``, the engine side's ring (read-only) their arrays
    were written to (once each, before the run: a worker process writes them, not the
    engine's)."""
    from recserve.server import channel, shared_ring

    distinct = list({id(r): r for r in requests}.values())
    payloads = {id(r): bytes(channel.encode_score(0, spec.name, 1, r, None, spec)[0][4:])
                for r in distinct}
    if not shared:
        return payloads, None
    ring = SharedMemory(2 * sum(map(len, payloads.values())),  # (room for each alignment)
                        writable=False)
    writer = shared_ring.SharedRing(shared_ring.map_memory(ring.fd, ring.size, writable=True))
    for r in distinct:
        data, data_at = channel.encode_score(0, spec.name, 1, r, None, spec, ring=writer)
        assert data_at is not None
        payloads[id(r)] = bytes(data[4:])
    return payloads, ring


async def through_hub(engine: Engine, requests: list, frames: tuple[dict, SharedMemory | None],
                      rows_in_flight: int, defer: bool = False) -> None:
    """Feed ``requests`` the way the engine process of ``serve --workers`` meets them: each
    arrives as the channel frame a worker sends (``worker_frames``), is decoded and
    submitted by ``Hub.score``, and its reply encoded; no sockets. A frame is copied once
    here, as a socket read would; with a ring it carries only the arrays' headers. About
    ``rows_in_flight`` rows stay outstanding. ``defer``: ring requests are left for the
    packing processes to decode (``Hub(defer_ring_decode=)``, as serve does with them)."""
    from recserve.server.backend import EngineBackend
    from recserve.server.config import ServerConfig
    from recserve.server.hub import Hub

    payloads, ring = frames
    hub = Hub(EngineBackend(engine), ServerConfig(), 2, defer_ring_decode=defer)
    side = _CountingSide(ring)
    mean = sum(r.num_candidates for r in requests) / len(requests)
    window = max(1, round(rows_in_flight / mean))
    sent = 0
    while side.answered < len(requests):
        while sent < len(requests) and sent - side.answered < window:
            frame = bytearray(payloads[id(requests[sent])])
            frame[1:9] = sent.to_bytes(8, "little")  # the request id: after the kind byte
            hub.score(side, memoryview(frame))
            sent += 1
        side.wake = asyncio.get_running_loop().create_future()
        await side.wake


async def run(settings: EngineSettings, spec, requests: list, compute_ms: float,
              pack_threads: int | None, via_hub: str | None = None,
              pack_processes: bool = False, busy_thread: bool = False,
              issue_calls: str = "free", graph_outputs: bool = True) -> dict:
    executors: list[SimulatedGpuExecutor] = []

    def factory(s: EngineSettings) -> SimulatedGpuExecutor:
        executors.append(SimulatedGpuExecutor(s, compute_ms, pack_threads, pack_processes,
                                              issue_calls, graph_outputs))
        return executors[-1]

    frames = worker_frames(spec, requests, via_hub == "ring") if via_hub else None
    async with Engine(settings, factory) as engine:
        await engine.load(spec.name, 1, spec, {})
        if via_hub:  # warm (packing processes start: 0.1 s of imports)
            await through_hub(engine, requests[:4], frames, 0, pack_processes)
        else:
            await asyncio.gather(*(engine.score(spec.name, r) for r in requests[:4]))
        executor = executors[0]
        executor.timeline_limit = 1_000_000
        busy0 = executor.busy_ms
        stop = threading.Event()
        if busy_thread:  # Python running beside the engine's threads, holding the GIL
            threading.Thread(target=_spin, args=(stop,), daemon=True).start()
        start, loop_cpu = time.perf_counter(), time.thread_time()
        process_cpu = time.process_time()  # every thread of this (the engine's) process
        # clients keep two batches per slot outstanding (a burst of every request at once
        # would measure the event loop submitting them, not the engine)
        in_flight = 2 * settings.slots * settings.max_batch_rows
        if via_hub:
            await through_hub(engine, requests, frames, in_flight, pack_processes)
        else:
            await wl.closed_loop(engine, spec.name, requests, in_flight)
        wall = time.perf_counter() - start
        loop_cpu = time.thread_time() - loop_cpu  # this (the event loop's) thread only
        process_cpu = time.process_time() - process_cpu
        stop.set()
    rows = sum(r.num_candidates for r in requests)
    spans: dict[str, list[float]] = {}
    for _, stage, a, b in executor.timeline:
        spans.setdefault(stage, []).append(b - a)
    device = settings.max_batch_rows / (compute_ms / 1e3)
    return {"samples_per_s": rows / wall, "ratio_to_device": rows / wall / device,
            "device_busy_fraction": (executor.busy_ms - busy0) / 1e3 / wall,
            "loop_cpu_us_per_request": round(loop_cpu / len(requests) * 1e6, 2),
            # (the GIL-bound process's budget: packing processes' CPU is not in it)
            "process_cpu_us_per_request": round(process_cpu / len(requests) * 1e6, 2),
            "packed_in_processes": executor.stats().get("packed_in_processes", 0),
            "issue_call_us": executor.stats()["issue_call_us"],
            "host_stage_mean_ms": {k: round(float(np.mean(v)), 3) for k, v in spans.items()}}


def _spin(stop: threading.Event) -> None:
    """Run Python until ``stop``: what a busy event loop (a GPU server's at thousands of
    requests/s) is to the engine's threads, as far as the GIL goes."""
    while not stop.is_set():
        sum(range(200))


def demo_traffic(rng: np.random.Generator, batch: int) -> tuple:
    """The demo model, 4 ``batch``-row requests and 120 ranking ones (N in 100..700, Zipf
    ids), int32 ids in the flat form, as worker processes hand them over."""
    from recserve.engine.demo import demo_spec, random_inputs, ranking_candidates
    from recserve.engine.flat import with_flat
    from recserve.engine.inputs import RequestInputs, SparseInput

    spec = demo_spec()

    def narrowed(inputs: RequestInputs) -> RequestInputs:  # what validation hands on
        sparse = {k: SparseInput(v.values.astype(np.int32), v.lengths, v.weights)
                  for k, v in inputs.sparse.items()}
        return with_flat(spec, RequestInputs(inputs.num_candidates, sparse, inputs.dense))

    full = [narrowed(random_inputs(spec, rng, batch)) for _ in range(4)]
    ranking = [narrowed(random_inputs(spec, rng, ranking_candidates(rng), zipf=True))
               for _ in range(120)]
    return spec, full, ranking


def main() -> None:
    global DRIVER_CALL_S, PACK_MIN_S  # (from --driver-call-us and --pack-ms)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compute-ms", type=float, default=0.72,
                   help="simulated device time per batch (default: the H200's dlrmv2 "
                   "forward at B=8192)")
    p.add_argument("--batch", type=int, default=8192, help="rows per batch (one bucket)")
    p.add_argument("--batches", type=int, default=96, help="batches per run")
    p.add_argument("--slots", type=int, default=DEVICE_DEFAULTS["cuda"].slots,
                   help="default: serve's on cuda, %(default)s")
    p.add_argument("--pack-threads", type=int,
                   help="default: one per slot, at most 4, leaving two cores (see "
                   "default_pack_threads)")
    p.add_argument("--sweep", action="store_true", help="also 1 packing thread and 2 slots")
    p.add_argument("--pack-processes", action="store_true",
                   help="also with packing processes (recserve.engine.packer): they take "
                   "the requests that lie in a worker's ring, the *_via_hub_ring traffic")
    p.add_argument("--busy-thread", action="store_true",
                   help="run a thread that only runs Python beside the engine (a busy event "
                   "loop, as far as the GIL goes; bench/gil_handoff.py)")
    p.add_argument("--issue-calls", choices=ISSUE_CALLS, default="free",
                   help="what each CUDA call of the real issue path costs the host (6 a "
                   "batch; 10 with --no-graph-outputs): free (default), torch (a GIL hand-off "
                   "each, as torch's calls make), driver (--driver-call-us each with the "
                   "GIL kept, as GpuExecutor(keep_gil=True) makes them)")
    p.add_argument("--driver-call-us", type=float, default=DRIVER_CALL_S * 1e6,
                   help="a driver call's host time with --issue-calls driver (default 3: an "
                   "asynchronous call's few microseconds; an H200's issue stage took "
                   "0.22-0.26 ms for its ~10 calls, and timed 10-39 us a call (twelfth "
                   "session): try 25)")
    p.add_argument("--pack-ms", type=float, default=0.0,
                   help="a pack takes at least this long (a slower host emulated: the H200 "
                   "host of the twelfth session packed an 8192-row batch in 1.1 ms alone and "
                   "1.9-2.4 ms inside the engine; try 2.2 with --compute-ms 0.72 to see what "
                   "more slots than packing threads do there)")
    p.add_argument("--graph-outputs", action=argparse.BooleanOptionalAction, default=True,
                   help="GpuExecutor(graph_outputs=True), the default: the graphs copy the "
                   "scores out, 4 calls fewer a batch than --no-graph-outputs (the scores "
                   "copied out on a stream of their own)")
    p.add_argument("--switch-ms", type=float,
                   help="the interpreter's switch interval for every run (default: 5 ms)")
    p.add_argument("--traffic", action="append", choices=TRAFFIC,
                   help="run only this traffic (repeatable; default: all)")
    p.add_argument("--model", choices=("dlrmv2", "demo"), default="dlrmv2",
                   help="dlrmv2: 214 ids a row, every feature per candidate; demo: the demo "
                   "model's small requests (a few ids a row, most features per request)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    DRIVER_CALL_S = args.driver_call_us / 1e6
    PACK_MIN_S = args.pack_ms / 1e3
    rng = np.random.default_rng(0)
    if args.model == "dlrmv2":
        spec = wl.dlrmv2_spec(4_000_000)
        full = wl.full_requests(spec, rng, args.batch, 4)
        ranking = wl.ranking_slices(spec, full, rng, 30)
    else:
        spec, full, ranking = demo_traffic(rng, args.batch)
    repeats = max(1, args.batches * args.batch // sum(r.num_candidates for r in ranking))
    traffic = {"full_batches": full * (args.batches // 4), "ranking_requests": ranking * repeats,
               # as a single-process server hands them over (no flat form)
               "ranking_per_feature": wl.per_feature(ranking) * repeats,
               # as worker processes send them to the engine process (the hub's path),
               # through the socket, and in the shared ring
               "ranking_via_hub": ranking * repeats, "ranking_via_hub_ring": ranking * repeats,
               "full_via_hub_ring": full * (args.batches // 4)}
    traffic = {k: v for k, v in traffic.items() if k in (args.traffic or TRAFFIC)}
    settings = EngineSettings(max_batch_rows=args.batch, buckets=(args.batch,), slots=args.slots,
                              max_queued_rows=args.batch * args.batches * 4)
    variants = [("default", settings, args.pack_threads, False)]
    if args.sweep:
        variants += [("pack_threads=1", settings, 1, False),
                     ("slots=2", replace(settings, slots=2), args.pack_threads, False)]
    if args.pack_processes:
        variants += [("pack_processes", settings, args.pack_threads, True)]
    if args.switch_ms is not None:  # (the executor sets 0.5 ms itself with processes)
        sys.setswitchinterval(args.switch_ms / 1e3)
    results = {"commit": provenance.commit(), "compute_ms": args.compute_ms,
               "busy_thread": args.busy_thread, "switch_interval_s": sys.getswitchinterval(),
               "issue_calls": args.issue_calls, "graph_outputs": args.graph_outputs,
               "driver_call_us": args.driver_call_us, "pack_ms": args.pack_ms,
               "cores": os.cpu_count(), "runs": []}
    for name, run_settings, threads, processes in variants:
        for kind, requests in traffic.items():
            via_hub = "ring" if kind.endswith("_ring") else (
                "socket" if kind.endswith("_hub") else None)
            r = run_loop(run(run_settings, spec, requests, args.compute_ms, threads, via_hub,
                             processes, args.busy_thread, args.issue_calls,
                             args.graph_outputs))
            results["runs"].append({"variant": name, "traffic": kind, **r})
            print(f"{name:15s} {kind:19s} {r['samples_per_s'] / 1e6:6.2f} M samples/s = "
                  f"{r['ratio_to_device']:.2f} of the simulated device; event loop "
                  f"{r['loop_cpu_us_per_request']:.1f} us CPU a request (all its threads "
                  f"{r['process_cpu_us_per_request']:.0f}); host stage ms "
                  f"{r['host_stage_mean_ms']}; us a call {r['issue_call_us']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
