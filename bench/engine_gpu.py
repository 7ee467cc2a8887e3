"""The engine on a GPU at full load, against the kernels' bare forward on the same card.

    python bench/engine_gpu.py OUTDIR [--max-rows 4000000] [--batches 48] [--sweep]
    python bench/engine_gpu.py OUTDIR --pack-only      (no GPU needed)

Workload ``dlrmv2`` (bench/workloads.py) at B = 8192. The bare forward is the CUDA graph
the engine itself replays for that bucket, timed alone with ``do_bench`` on inputs
already on the device. The engine run submits requests from the event loop as fast as
the queue takes them: (a) 8192-row requests, one per batch; (b) ranking-sized requests
(N in 100..700) that the scheduler packs into 8192-row batches. samples/s of each run is
compared with the bare forward's, and the event timeline of the run says how much of the
copy-in time overlapped another batch's compute; the host stages (queued, pack, issue,
wait for the copy-out, resolve) say where a batch's host time goes. ``--sweep`` repeats
both runs with one packing thread, with 2 slots, with 2 compute streams (consecutive
batches on alternate streams, so one's gather may overlap the other's GEMMs; each run also
times two slots' graphs replayed at once on two streams, the device's ceiling for that)
and with a 0.5 ms interpreter switch interval (a packing thread that gave up the GIL for a
copy waits up to the interval, 5 ms by default, for a busy Python thread to return it), to
find what bounds the engine; one thread's packing time alone (pinned and pageable buffers)
is measured first, then the full batches a second 1, 2, 4 and 6 threads pack together with
nothing else running (the host's packing ceiling: against the bare forward's batches a
second, whether this host can feed the card at all), and each run says how much longer a
pack took inside the engine.
Writes OUTDIR/engine_gpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import workloads as wl  # noqa: E402
from engine_host import through_hub, worker_frames  # noqa: E402
from host_packing import pack_only, pack_times, packing_ceiling  # noqa: E402

from engine import run_loop  # noqa: E402
from recserve.engine.engine import Engine  # noqa: E402
from recserve.engine.gpu_executor import GpuExecutor  # noqa: E402
from recserve.engine.gpu_slots import capture, device_step  # noqa: E402
from recserve.engine.settings import EngineSettings  # noqa: E402
from recserve.engine.weights import init_weights  # noqa: E402
from recserve.kernels._common import PDL_ENV  # noqa: E402
from recserve.server.serve_options import DEVICE_DEFAULTS  # noqa: E402

import triton  # noqa: E402  isort: skip


def overlap_fraction(timeline: list[tuple[int, str, float, float]]) -> float:
    """Share of copy-in time that ran while some other batch was computing."""
    computes = [(s, e) for _, stage, s, e in timeline if stage == "compute"]
    copies = [(seq, s, e) for seq, stage, s, e in timeline if stage == "h2d"]
    total = covered = 0.0
    for _, start, end in copies:
        total += end - start
        for c_start, c_end in computes:
            covered += max(0.0, min(end, c_end) - max(start, c_start))
    return covered / total if total else float("nan")


def two_stream_replay_ms(graphs: list) -> float:
    """Milliseconds for two batches' graphs replayed at once on two streams (do_bench)."""
    streams = [torch.cuda.Stream() for _ in graphs]

    def both() -> None:
        current = torch.cuda.current_stream()
        for stream, graph in zip(streams, graphs, strict=True):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            current.wait_stream(stream)

    return triton.testing.do_bench(both, warmup=25, rep=200, return_mode="median")


async def engine_run(v: Variant, spec, weights, requests, repeats: int) -> dict:
    settings, via_ring, graph_copies = v.settings, v.via_ring, v.graph_copies
    executors = []

    def factory(s):
        executor = GpuExecutor(s, "cuda", pack_threads=v.pack_threads,
                               compute_streams=v.compute_streams,
                               pack_processes=v.pack_processes, slot_streams=v.slot_streams,
                               graph_copies=graph_copies, graph_outputs=v.graph_outputs,
                               blocking_wait=v.blocking_wait, keep_gil=v.keep_gil)
        executors.append(executor)
        return executor

    frames = worker_frames(spec, requests, shared=True) if via_ring else None
    async with Engine(settings, factory) as engine:
        await engine.load(spec.name, 1, spec, weights)
        if via_ring:  # warm (packing processes start: 0.1 s of imports)
            await through_hub(engine, requests[:4], frames, 0, v.pack_processes)
        else:
            await asyncio.gather(*(engine.score(spec.name, r) for r in requests[:4]))
        executor = executors[0]
        executor.timeline.clear()
        executor.timeline_limit = 100_000
        busy0 = executor.busy_ms
        rows = sum(r.num_candidates for r in requests) * repeats
        start, cpu_start = time.perf_counter(), time.process_time()
        # clients keep two batches per slot outstanding (not a burst: see closed_loop)
        every = [r for _ in range(repeats) for r in requests]
        if via_ring:  # as the engine process of serve --workers meets them
            await through_hub(engine, every, frames, 2 * settings.slots * settings.max_batch_rows,
                              v.pack_processes)  # (as serve: processes decode ring requests)
        else:
            await wl.closed_loop(engine, spec.name, every,
                                 2 * settings.slots * settings.max_batch_rows)
        wall = time.perf_counter() - start
        # this process's cores in use (its threads; packing processes not counted)
        process_cores = (time.process_time() - cpu_start) / wall
        stats = executor.stats()
        packed_in_processes = stats.get("packed_in_processes", 0)
        issue_calls = stats["issue_calls"]  # (keep_gil: "driver" unless it fell back)
        issue_call_us = stats["issue_call_us"]  # mean wall time a call, per kind
        model = engine.handle(spec.name, 1)  # the built GpuModel: its graphs, for timing
        slot = model.slots[0]
        graph = slot.graphs[settings.max_batch_rows][0]
        if graph_copies or executor.graph_outputs:  # graphs with copies: the bare forward apart
            graph = capture(functools.partial(device_step, model, slot, settings.max_batch_rows),
                            torch.cuda.graph_pool_handle(), torch.device("cuda", 0))[0]
        bare_ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        pair_ms = two_stream_replay_ms([s.graphs[settings.max_batch_rows][0]
                                        for s in model.slots[:2]]) \
            if len(model.slots) > 1 and not graph_copies else float("nan")
        return {"rows": rows, "wall_s": wall, "samples_per_s": rows / wall,
                "process_cores": process_cores,
                "packed_in_processes": packed_in_processes, "issue_calls": issue_calls,
                "graph_outputs": executor.graph_outputs,  # (as resolved: None -> default)
                "issue_call_us": issue_call_us,
                "gpu_busy_fraction": (executor.busy_ms - busy0) / 1e3 / wall,
                "copy_overlap_fraction": overlap_fraction(executor.timeline),
                "batches": len({t[0] for t in executor.timeline}),
                "stage_mean_ms": stage_means(executor.timeline),
                "compute_start_gap_ms": float(np.mean(np.diff(sorted(
                    s for _, st, s, _ in executor.timeline if st in ("compute", "batch"))))),
                "bare_forward_us": bare_ms * 1e3,
                "timeline_head": [(seq, stage, round(a, 3), round(b, 3)) for seq, stage, a, b
                                  in sorted(executor.timeline, key=lambda t: t[2])[:400]],
                "bare_samples_per_s": settings.max_batch_rows / (bare_ms / 1e3),
                # the ceiling of --compute-streams 2: two batches' graphs at once, no host
                "bare_two_streams_samples_per_s": 2 * settings.max_batch_rows / (pair_ms / 1e3)}


def stage_means(timeline: list[tuple[int, str, float, float]]) -> dict:
    """Mean ms of each stage (device and host) over the recorded batches."""
    spans: dict[str, list[float]] = {}
    for _, stage, start, end in timeline:
        spans.setdefault(stage, []).append(end - start)
    return {stage: round(float(np.mean(v)), 3) for stage, v in spans.items()}


def summarize(name: str, traffic: str, r: dict, pack_ms: dict) -> str:
    """Add the ratios to engine run ``r`` (``engine_run``'s result) and describe it."""
    r["ratio_to_bare"] = r["samples_per_s"] / r["bare_samples_per_s"]
    # a pack inside the engine over one alone (one thread, the same batch again and again,
    # so cache-hot: about 2x on the CI machine); far above that is packing threads waiting
    # for the GIL (or for cores)
    form = "per_feature" if traffic.endswith("per_feature") else "flat"
    alone = pack_ms.get(f"{traffic.split('_')[0]}_{form}_pinned")
    r["pack_in_engine_over_alone"] = (r["stage_mean_ms"].get("host_pack", float("nan"))
                                      / alone if alone else float("nan"))
    return (f"{name:13s} {traffic:19s} engine {r['samples_per_s'] / 1e6:6.2f} M samples/s, "
            f"bare forward {r['bare_samples_per_s'] / 1e6:6.2f} M/s "
            f"({r['bare_forward_us']:.0f} us; two graphs on two streams "
            f"{r['bare_two_streams_samples_per_s'] / 1e6:.2f} M/s), ratio "
            f"{r['ratio_to_bare']:.2f}; GPU busy {r['gpu_busy_fraction']:.0%}, copy-in "
            f"overlapped {r['copy_overlap_fraction']:.0%} over {r['batches']} batches; a pack "
            f"took {r['pack_in_engine_over_alone']:.1f}x its time alone; compute starts every "
            f"{r['compute_start_gap_ms']:.2f} ms; engine process {r['process_cores']:.1f} "
            f"cores; issue calls {r.get('issue_calls', '?')} (us a call: "
            f"{r.get('issue_call_us', {})}); stage ms {r['stage_mean_ms']}")


def copy_in_rate(megabytes: int = 8) -> dict:
    """Host -> device GB/s from pinned and from pageable memory (the engine's copy-in path)."""
    out = {}
    dev = torch.empty(megabytes << 18, dtype=torch.int32, device="cuda")
    for name, pinned in (("pinned", True), ("pageable", False)):
        host = torch.ones(megabytes << 18, dtype=torch.int32, pin_memory=pinned)
        ms = triton.testing.do_bench(lambda h=host: dev.copy_(h, non_blocking=True),
                                     warmup=10, rep=50, return_mode="median")
        out[f"{name}_GBps"] = (megabytes << 20) / (ms * 1e-3) / 1e9
    return out


# --sweep's runs after the default: what bounds the engine? (8 slots measured slower than 4
# in earlier runs.) A packing thread that gave the GIL up for a copy waits up to the switch
# interval (5 ms by default) for a busy Python thread to hand it back.
SWEEP = ["pack_threads=1", "slots=2", "compute_streams=2", "switch_ms=0.5"]


@dataclass(frozen=True)
class Variant:
    """One engine run's settings: 'default', or '+'-joined changes of it (``variant``)."""

    name: str
    settings: EngineSettings
    pack_threads: int | None = None  # None: one per slot, at most 4 (default_pack_threads)
    compute_streams: int = 1
    switch_s: float | None = None  # the interpreter's switch interval; None: unchanged
    via_ring: bool = False  # requests as workers' rings hand them over (Hub.score)
    pack_processes: bool = False
    slot_streams: bool = False
    graph_copies: bool = False
    graph_outputs: bool | None = None  # None: the executor's default (on, with graphs)
    blocking_wait: bool = False  # the completion thread sleeps on its events, no spinning
    keep_gil: bool = True  # the issue's CUDA calls through the driver, the GIL kept
    pdl: bool = False  # RECSERVE_PDL=1 while the engine builds and runs


_CHANGES = {"via=ring": {"via_ring": True},
            "pack_in=process": {"via_ring": True, "pack_processes": True},  # (ring requests)
            "slot_streams": {"slot_streams": True},
            "graph_copies": {"slot_streams": True, "graph_copies": True},
            "graph_outputs": {"graph_outputs": True},  # (the default since the twelfth session)
            "copy_out_stream": {"graph_outputs": False},
            "blocking_wait": {"blocking_wait": True},
            "keep_gil": {"keep_gil": True},  # (the default since the tenth session)
            "torch_calls": {"keep_gil": False},
            "pdl": {"pdl": True}}


def variant(name: str, settings: EngineSettings) -> Variant:
    """The run named 'default' or by '+'-joined changes such as
    'compute_streams=2+switch_ms=0.5'."""
    fields: dict = {}
    if name != "default":
        for change in name.split("+"):
            key, _, value = change.partition("=")
            if change in _CHANGES:
                fields.update(_CHANGES[change])
            elif key == "pack_threads":
                fields["pack_threads"] = int(value)
            elif key == "slots":
                settings = replace(settings, slots=int(value))
            elif key == "compute_streams":
                fields["compute_streams"] = int(value)
            elif key == "switch_ms":
                fields["switch_s"] = float(value) / 1e3
            else:
                raise SystemExit(f"unknown variant change {change!r} in {name!r}: use "
                                 "pack_threads=N, slots=N, compute_streams=N, switch_ms=X, "
                                 f"or one of {', '.join(_CHANGES)}")
    return Variant(name, settings, **fields)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--max-rows", type=int, default=4_000_000, help="table row cap")
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--batches", type=int, default=48, help="8192-row batches per run")
    p.add_argument("--slots", type=int, default=DEVICE_DEFAULTS["cuda"].slots,
                   help="slots of the default run (default: serve's on cuda, %(default)s)")
    p.add_argument("--sweep", action="store_true",
                   help="also one packing thread, 2 slots, 2 compute streams, and a 0.5 ms "
                   "switch interval")
    p.add_argument("--variants", default="",
                   help="comma-separated runs instead of default (+ --sweep's), each 'default' "
                   "or '+'-joined changes: pack_threads=N, slots=N, compute_streams=N, "
                   "switch_ms=X, via=ring (requests reach the engine as the channel frames of "
                   "workers with shared rings, through Hub.score), pack_in=process (via=ring, "
                   "packed by packing processes), slot_streams (each slot's copies and "
                   "compute on its own stream: fewer CUDA calls a batch), graph_copies (slot "
                   "streams, the copies captured in the graphs: a batch is one replay), "
                   "graph_outputs (the graphs copy the scores out, the copy in stays apart: "
                   "6 CUDA calls a batch instead of 10; the default), copy_out_stream (the "
                   "scores copied out on a stream of their own: 10 calls), blocking_wait "
                   "(the completion thread sleeps until a batch is done instead of "
                   "spinning a core), torch_calls (the issue's copies, event records, "
                   "waits and graph launches go through torch, which gives the GIL up at "
                   "each, instead of to the CUDA driver: "
                   "the executor's default before the tenth session), pdl "
                   "(RECSERVE_PDL=1: kernels launch while the one before finishes) (e.g. "
                   "default,compute_streams=2+switch_ms=0.5,default: a name given twice is "
                   "run twice, which shows what the run's order costs)")
    p.add_argument("--pack-only", action="store_true",
                   help="only time one thread's packing (runs without a GPU: the engine's "
                   "bottleneck on the H200, so a CPU-measurable proxy); writes engine_pack.json")
    args = p.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    spec = wl.dlrmv2_spec(args.max_rows)
    if args.pack_only:
        pack_only(args.outdir, spec, args.batch)
        return
    weights = init_weights(spec, device="cuda")
    settings = EngineSettings(max_batch_rows=args.batch, buckets=(args.batch,),
                              slots=args.slots, max_queued_rows=args.batch * args.batches * 2)
    rng = np.random.default_rng(0)
    results = {"card": torch.cuda.get_device_name(), "commit": provenance.commit(),
               "torch": torch.__version__,
               "triton": triton.__version__, "workload": "dlrmv2", "batch": args.batch,
               "slots": args.slots, "max_rows": args.max_rows}
    results["copy_in"] = copy_in_rate()
    print(f"host -> device: {results['copy_in']}")
    full = wl.full_requests(spec, rng, args.batch, 4)
    ranking = wl.ranking_slices(spec, full, rng, 30)
    repeats = max(1, args.batches * args.batch // sum(r.num_candidates for r in ranking))
    results["pack_ms"] = pack_times(spec, full[0], ranking)
    print(f"one thread packing one 8192-row batch, ms: {results['pack_ms']}")
    results["packing_ceiling"] = packing_ceiling(spec, full)
    print(f"full batches a second, packed by 1-6 threads at once (nothing else running): "
          f"{results['packing_ceiling']}", flush=True)
    if args.variants:
        names = args.variants.split(",")
    else:
        names = ["default"] + (SWEEP if args.sweep else [])
    variants = [variant(name, settings) for name in names]
    results["runs"] = []
    default_switch = sys.getswitchinterval()
    for v in variants:
        run = {"variant": v.name, "slots": v.settings.slots, "pack_threads": v.pack_threads,
               "compute_streams": v.compute_streams,
               "switch_interval_s": v.switch_s or default_switch, "via_ring": v.via_ring,
               "pack_processes": v.pack_processes, "slot_streams": v.slot_streams,
               "graph_copies": v.graph_copies, "graph_outputs": v.graph_outputs,
               "blocking_wait": v.blocking_wait, "keep_gil": v.keep_gil, "pdl": v.pdl}
        sys.setswitchinterval(v.switch_s or default_switch)
        if v.pdl:
            os.environ[PDL_ENV] = "1"
        else:
            os.environ.pop(PDL_ENV, None)
        traffics = [("full_batches", full, args.batches // 4), ("ranking_requests", ranking,
                                                                repeats)]
        first_default = v.name == "default" and "full_batches" not in results
        if first_default:  # as a single-process server hands them over: per feature
            traffics.append(("ranking_per_feature", wl.per_feature(ranking), repeats))
        for traffic, requests, times in traffics:
            try:  # one variant failing (a new option on this card) must not cost the rest
                run[traffic] = run_loop(engine_run(v, spec, weights, requests, times))
            except Exception as exc:  # noqa: BLE001
                run[f"{traffic}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"{v.name:13s} {traffic:19s} FAILED: {run[f'{traffic}_error']}",
                      flush=True)
        for traffic in ("full_batches", "ranking_requests", "ranking_per_feature"):
            if traffic in run:
                print(summarize(v.name, traffic, run[traffic], results["pack_ms"]), flush=True)
        results["runs"].append(run)
        if first_default:
            results.update({k: run[k] for k in ("full_batches", "ranking_requests") if k in run})
            if "full_batches" in run:  # the host's packing ceiling against the card's rate
                bare = run["full_batches"]["bare_samples_per_s"] / args.batch
                results["packing_ceiling_over_bare"] = {
                    n: round(c["batches_per_s"] / bare, 2)
                    for n, c in results["packing_ceiling"].items()}
                print(f"packing ceiling / bare forward's batches a second, by threads: "
                      f"{results['packing_ceiling_over_bare']}", flush=True)
        # after every variant, so a timeout keeps what was measured
        (args.outdir / "engine_gpu.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
