"""Engine vs one-forward-per-request, in process, at the same open-loop offered load.

Traffic is the demo model's ``ranking`` shape (N in 100..700, Zipf ids). Arrivals are
Poisson at each offered rate; latency runs from a request's intended send time to its
scores, so queueing behind a late sender or a busy model counts (no coordinated
omission). Offered rates are multiples of the one-at-a-time path's measured capacity,
so the runs above 1.0 show what batching buys when single requests can't keep up.

    python bench/engine.py --duration 2 --repeat 3 --loads 0.5,0.9,1.3,1.8 --out results/

Prints a table and writes one JSON file into ``--out``. ``--device cuda`` runs both on the
GPU: the baseline as the PyTorch reference model, the engine on its GPU executor (Triton
kernels, CUDA graphs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import provenance  # bench/ is on sys.path: this file runs as a script
import torch

from recserve.engine.demo import demo_spec, random_inputs, ranking_candidates
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.inputs import collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.scheduler import EngineError
from recserve.engine.weights import init_weights
from recserve.server.app import freeze_heap
from recserve.server.serve_options import engine_settings


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    if not latencies:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"),
                "max_ms": float("nan")}
    ms = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "max_ms": float(ms.max())}


def summary(arrivals: np.ndarray, done: list[float], latencies: list[float],
            refused: int) -> dict:
    """Requests/s over the span from the first arrival to the last answer, and latencies."""
    span = (max(done) if done else arrivals[-1]) - arrivals[0]
    return {"completed": len(latencies), "refused": refused,
            "requests_per_s": len(latencies) / span if span > 0 else float("nan"),
            **percentiles(latencies)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one_at_a_time(model: ReferenceModel, requests: list, arrivals: np.ndarray,
                  device: str) -> dict:
    """A single loop: wait for each request's send time, then forward it alone."""
    spec, latencies, done = model.spec, [], []
    t0 = time.perf_counter()
    for i, at in enumerate(arrivals):
        wait = at - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        scores = model.forward(collate(spec, [requests[i % len(requests)]]))
        scores.cpu()
        sync(device)
        finished = time.perf_counter() - t0
        done.append(finished)
        latencies.append(finished - at)
    return summary(arrivals, done, latencies, 0)


async def through_engine(engine: Engine, requests: list, arrivals: np.ndarray) -> dict:
    """Send each request at its arrival time (without waiting for answers).

    A sender thread sleeps to each send time and wakes the loop as a socket would: the
    loop's own timers round to milliseconds, which would add their lateness to every
    request's latency.
    """
    latencies, done, refused, tasks = [], [], [0], []
    loop = asyncio.get_running_loop()
    all_sent = loop.create_future()

    async def one(i: int, at: float) -> None:
        try:
            await engine.score("demo", requests[i % len(requests)])
        except EngineError:
            refused[0] += 1
            return
        finished = time.perf_counter() - t0
        done.append(finished)
        latencies.append(finished - at)

    def launch(i: int, at: float) -> None:
        tasks.append(asyncio.create_task(one(i, at)))
        if len(tasks) == len(arrivals):
            all_sent.set_result(None)

    def sender() -> None:
        for i, at in enumerate(arrivals):
            wait = at - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
            loop.call_soon_threadsafe(launch, i, float(at))

    t0 = time.perf_counter()
    thread = threading.Thread(target=sender, name="bench-sender")
    thread.start()
    await all_sent
    await asyncio.gather(*tasks)
    thread.join()
    return summary(arrivals, done, latencies, refused[0])


def executor_factory(device: str, torch_threads: int | None):
    """The executor the engine runs on ``device``."""
    if device == "cuda":
        from recserve.engine.gpu_executor import GpuExecutor

        return lambda settings: GpuExecutor(settings, "cuda")
    return lambda settings: CpuExecutor(settings, torch_threads=torch_threads)


async def engine_run(factory, settings, spec, weights, requests, arrivals, warmup) -> tuple:
    async with Engine(settings, factory) as engine:
        await engine.load("demo", 1, spec, weights)
        await asyncio.gather(*(engine.score("demo", r) for r in warmup))
        engine.counters.clear()
        result = await through_engine(engine, requests, arrivals)
        counters = dict(engine.counters)
    return result, counters


def run_loop(coro):
    """Run on uvloop when installed, as the server does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def capacity(model: ReferenceModel, requests: list, device: str, seconds: float) -> float:
    """One-at-a-time requests/s, back to back (closed loop)."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.forward(collate(model.spec, [requests[count % len(requests)]])).cpu()
        sync(device)
        count += 1
    return count / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--duration", type=float, default=2.0,
                   help="seconds of arrivals per run (max 60)")
    p.add_argument("--loads", default="0.5,0.9,1.3,1.8",
                   help="offered rates as multiples of the one-at-a-time capacity")
    p.add_argument("--max-batch-rows", type=int,
                   help="default: what `recserve serve` uses on the device")
    p.add_argument("--slots", type=int, help="default: what `recserve serve` uses on the device")
    p.add_argument("--engine-threads", type=int, default=1,
                   help="torch threads while the engine runs (its slots run in parallel)")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="torch threads for one-at-a-time scoring (0: the fewest threads "
                        "within 15%% of the best capacity measured from 1 to the core count)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each path per load, alternating; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    args = p.parse_args()
    if not 0 < args.duration <= 60:
        p.error(f"--duration is {args.duration}; expected (0, 60]")
    if args.repeat < 1:
        p.error(f"--repeat is {args.repeat}; expected >= 1")
    return args


def main() -> None:
    args = parse_args()
    factory = executor_factory(args.device, args.engine_threads)
    cores = torch.get_num_threads()
    rng = np.random.default_rng(args.seed)
    spec = demo_spec()
    weights = init_weights(spec, seed=1)
    requests = [random_inputs(spec, rng, ranking_candidates(rng), zipf=True) for _ in range(256)]
    # the server's settings for the device (what users run), unless the flags say otherwise
    settings = engine_settings(args.device, args.max_batch_rows, slots=args.slots)
    model = ReferenceModel(spec, weights, args.device)
    capacity(model, requests, args.device, 0.5)  # warm up
    if args.device == "cuda" and not args.baseline_threads:
        args.baseline_threads = cores  # the GPU does the work: no thread sweep
    choices = [args.baseline_threads] if args.baseline_threads else range(1, cores + 1)
    caps = {}
    for threads in choices:
        torch.set_num_threads(threads)
        caps[threads] = capacity(model, requests, args.device, 1.5)
    # More threads only when clearly faster: a 2-thread forward collapses when another
    # process takes a core, which would flatter the engine.
    args.baseline_threads = min(t for t in caps if caps[t] * 1.15 >= max(caps.values()))
    cap = caps[args.baseline_threads]
    print(f"one-at-a-time capacity {cap:.0f} requests/s with {args.baseline_threads} "
          f"torch threads")
    # As `recserve serve` does once ready: without it a full garbage collection walks every
    # object of torch and the model (~50 ms here), and the engine, which allocates more
    # Python objects per request, meets those stalls more often than one-at-a-time scoring.
    freeze_heap()
    runs = []
    for load in (float(x) for x in args.loads.split(",")):
        runs.append(measure_load(args, factory, settings, model, weights, requests,
                                 load * cap, rng))
        runs[-1]["load"] = load
        report(runs[-1])
    write(args, settings, cap, runs)


def measure_load(args, factory, settings, model, weights, requests, rate, rng) -> dict:
    """Both paths at one offered rate, alternating ``--repeat`` times (the machine may be
    shared: alternating spreads its noise over both); medians of each figure."""
    repeats = []
    for _ in range(args.repeat):
        arrivals = np.cumsum(rng.exponential(1.0 / rate, size=max(1, int(rate * args.duration))))
        load_before = os.getloadavg()[0]
        torch.set_num_threads(args.baseline_threads)
        base = one_at_a_time(model, requests, arrivals, args.device)
        torch.set_num_threads(args.engine_threads)
        eng, counters = run_loop(engine_run(factory, settings, model.spec, weights,
                                            requests, arrivals, requests[:32]))
        repeats.append({"requests": len(arrivals), "one_at_a_time": base, "engine": eng,
                        "engine_counters": counters,
                        "loadavg_1m": [load_before, os.getloadavg()[0]]})
    med = {side: {key: float(np.median([r[side][key] for r in repeats]))
                  for key in repeats[0][side]} for side in ("one_at_a_time", "engine")}
    counters = {key: sum(r["engine_counters"].get(key, 0) for r in repeats)
                for key in ("batches", "rows", "padding_rows", "requests")}
    return {"offered_per_s": rate, "median": med, "engine_counters": counters,
            "ratio_requests_per_s": med["engine"]["requests_per_s"]
            / med["one_at_a_time"]["requests_per_s"],
            "ratio_p99": med["engine"]["p99_ms"] / med["one_at_a_time"]["p99_ms"],
            "repeats": repeats}


def report(run: dict) -> None:
    base, eng = run["median"]["one_at_a_time"], run["median"]["engine"]
    c = run["engine_counters"]
    rows_per_batch = c.get("rows", 0) / max(1, c.get("batches", 0))
    loads = [f"{x:.1f}" for r in run["repeats"] for x in r["loadavg_1m"]]
    print(f"load {run['load']:.2f} ({run['offered_per_s']:.0f}/s offered; medians of "
          f"{len(run['repeats'])}; loadavg {' '.join(loads)})")
    for name, r in (("one-at-a-time", base), ("engine", eng)):
        print(f"  {name:14s} {r['requests_per_s']:8.0f} req/s  p50 {r['p50_ms']:7.2f}  "
              f"p90 {r['p90_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  refused {r['refused']}")
    print(f"  ratio: {run['ratio_requests_per_s']:.2f}x req/s, p99 x{run['ratio_p99']:.2f}; "
          f"engine batches {c.get('batches', 0)}, {rows_per_batch:.0f} rows/batch")


def write(args, settings, cap: float, runs: list) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    commit = provenance.commit()
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    doc = {"bench": "engine", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": commit, "device": device, "torch": torch.__version__,
           "model": "demo", "traffic": "ranking (N 100..700, zipf)",
           "duration_s": args.duration, "settings": {
               "max_batch_rows": settings.max_batch_rows, "buckets": list(settings.buckets),
               "slots": settings.slots, "engine_threads": args.engine_threads,
               "baseline_threads": args.baseline_threads},
           "one_at_a_time_capacity_per_s": cap, "runs": runs}
    path = args.out / f"engine-{args.device}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
