"""Load generator: the ``ranking`` workload against a recserve server, with latency percentiles.

    recserve bench load --concurrency 1,8,32 --duration 5           # a server on :7700
    recserve bench load --start --baseline --plot p99.png           # starts its own servers
    python bench/load.py --rate 50,100 --json out.json              # the same, as a script

Closed loop (``--concurrency C``): C requests kept in flight. Open loop (``--rate R``):
Poisson arrivals at R requests/s, each request's latency counted from its intended send
time, so a server that falls behind shows the queue it builds (no coordinated omission).
Requests (N candidates from ``ranking_candidates``: 100..700, mean about 270; Zipf or
uniform ids) are built from the server's ``models`` answer and encoded once, as in
bench/server.py, whose frame splicing and connection protocol this reuses. Each run is
bounded by ``--duration`` and ``--max-requests``; the server's ``stats`` before and after
give its batch sizes and GPU busy time during the run, and ``stats`` polled while it runs
gives the NVML utilization.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from recserve.engine.demo import build_demo_repository, ranking_candidates, sample_ids
from recserve.server.aclient import AsyncClient
from recserve.server.client import Client
from recserve.server.codec import HEADER, encode_message


def _sibling(name: str):
    """A module of this folder, imported by path (bench/ is not a package)."""
    key = f"recserve_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


bench_server = _sibling("server")
report = _sibling("load_report")
provenance = _sibling("provenance")


def ranking_inputs(model: dict, rng: np.random.Generator, n: int, zipf: bool) -> dict:
    """A random valid ``inputs`` map for one ``models`` entry, ids Zipf or uniform."""
    inputs: dict = {}
    for spec in model["inputs"]:
        name, request_scope = spec["name"], spec["scope"] == "request"
        if spec["kind"] == "dense":
            shape = (spec["dim"],) if request_scope else (n, spec["dim"])
            inputs[name] = rng.standard_normal(shape, dtype=np.float32)
            continue
        max_bag = int(spec["max_bag"])
        lengths = None if request_scope else rng.integers(1, max_bag + 1, n, dtype=np.int64)
        total = int(rng.integers(1, max_bag + 1)) if lengths is None else int(lengths.sum())
        entry: dict = {"values": sample_ids(rng, int(spec["rows"]), total, zipf)}
        if lengths is not None:
            entry["lengths"] = lengths
        if spec.get("weighted"):
            entry["weights"] = rng.random(total, dtype=np.float32)
        inputs[name] = entry if len(entry) > 1 else entry["values"]
    return inputs


def encode_requests(answer: dict, model: str, count: int, seed: int, zipf: bool,
                    high_share: float = 0.0) -> tuple[list[bytes], list[int], list[str]]:
    """``count`` infer request bodies with an id slot for ``frame_with_id``, their N, and
    their priority ("" when none is sent; with ``high_share`` > 0, that share "high" and
    the rest "low")."""
    served = [m for m in answer["models"] if m["name"] == model]
    if not served:
        raise LookupError(f"the server has no model {model!r}; it serves "
                          f"{sorted({m['name'] for m in answer['models']})}")
    desc = max(served, key=lambda m: m["version"])
    cap = int(answer["limits"]["max_candidates"])
    rng = np.random.default_rng(seed)
    bodies, sizes, priorities = [], [], []
    for _ in range(count):
        n = min(ranking_candidates(rng), cap)
        fields = {"op": "infer", "model": model, "candidates": n,
                  "inputs": ranking_inputs(desc, rng, n, zipf)}
        priority = "" if high_share <= 0 else "high" if rng.random() < high_share else "low"
        if priority:
            fields["priority"] = priority
        priorities.append(priority)
        frame = encode_message(fields)[HEADER.size:]
        # bench/server.py's layout: "id" as the map's first key, a uint64 slot to fill per send
        bodies.append(bytes([frame[0] + 1]) + msgpack.packb("id") + b"\xcf" + b"\x00" * 8
                      + frame[1:])
        sizes.append(n)
    return bodies, sizes, priorities


class Run(bench_server.Load):
    """bench/server.py's ``Load`` with a cap on requests sent, rows and answers counted,
    and latencies kept per priority too."""

    def __init__(self, bodies: list[bytes], sizes: list[int], closed_until: float | None,
                 max_requests: int, priorities: list[str] | None = None) -> None:
        super().__init__(bodies, closed_until)
        self.sizes, self.max_requests = sizes, max_requests
        self.priorities = priorities or [""] * len(bodies)
        self.by_priority: dict[str, list[float]] = {}
        self.errors_by_priority: dict[str, dict[str, int]] = {}
        self.rows = self.answers = 0

    def send(self, conn, at: float | None = None) -> None:
        if self.next_id < self.max_requests:
            super().send(conn, at)

    def answered(self, conn, response: dict, now: float) -> None:
        rid = response.get("id")
        if rid in self.started:
            self.answers += 1
            priority = self.priorities[rid % len(self.priorities)]
            if response.get("ok"):
                self.rows += self.sizes[rid % len(self.sizes)]
                if priority:
                    self.by_priority.setdefault(priority, []).append(now - self.started[rid])
            elif priority:
                code = response["error"]["code"]
                errors = self.errors_by_priority.setdefault(priority, {})
                errors[code] = errors.get(code, 0) + 1
            super().answered(conn, response, now)


async def _poll_gpu(host: str, port: int, samples: list[float], period: float = 0.5) -> None:
    """NVML utilization (mean over GPUs) from ``stats`` every ``period`` s, until cancelled."""
    client = await AsyncClient.connect(host, port)
    try:
        while True:
            gpu = (await client.call("stats"))["stats"]["gpu"]
            utils = [g["utilization_pct"] for g in gpu.get("gpus", [])
                     if g.get("utilization_pct") is not None]
            if gpu.get("available") and utils:
                samples.append(sum(utils) / len(utils))
            await asyncio.sleep(period)
    finally:
        await client.close()


async def drive(host: str, port: int, bodies: list[bytes], sizes: list[int], *,
                concurrency: int | None, rate: float | None, duration: float,
                max_requests: int, connections: int, seed: int, tick=None,
                straggler_s: float = 10.0, priorities: list[str] | None = None) -> dict:
    """One closed-loop (``concurrency``) or open-loop (``rate``) run; raw results."""
    loop = asyncio.get_running_loop()
    begin = time.perf_counter()
    run = Run(bodies, sizes, begin + duration if rate is None else None, max_requests,
              priorities)
    conns = [(await loop.create_connection(lambda: bench_server.LoadProtocol(run), host,
                                           port))[1] for _ in range(connections)]
    gpu: list[float] = []
    poller = loop.create_task(_poll_gpu(host, port, gpu))
    rng = np.random.default_rng(seed)
    due = begin
    if rate is None:
        for i in range(concurrency):
            run.send(conns[i % connections])
    while (now := time.perf_counter()) - begin < duration and run.answers < max_requests:
        if rate is not None:
            if run.next_id >= max_requests:
                break
            while due <= now and run.next_id < max_requests:
                run.send(conns[run.next_id % connections], at=due)  # latency from intended time
                due += rng.exponential(1.0 / rate)
        if tick is not None:
            tick(now - begin, run.answers)
        await asyncio.sleep(max(0.0, min(due - time.perf_counter(), 0.002)) if rate
                            else 0.02)
    run.closed_until = 0.0  # closed loop: answers from now on send nothing more
    give_up = time.perf_counter() + straggler_s
    while run.started and time.perf_counter() < give_up:
        await asyncio.sleep(0.005)
    span = time.perf_counter() - begin
    poller.cancel()
    await asyncio.gather(poller, return_exceptions=True)
    for conn in conns:
        conn.transport.close()
    return {"sent": run.next_id, "latencies": run.latencies, "errors": run.errors,
            "rows": run.rows, "unanswered": len(run.started), "span": span,
            "gpu_util_samples": gpu, "latencies_by_priority": run.by_priority,
            "errors_by_priority": run.errors_by_priority}


def run_loads(host: str, port: int, label: str, args: argparse.Namespace,
              progress) -> list[dict]:
    """Every run of the plan against one server; one summary per run."""
    with Client(host, port, timeout=30) as client:
        answer = client.call("models")
    bodies, sizes, priorities = encode_requests(answer, args.model, args.requests, args.seed,
                                                args.ids == "zipf", args.high_share)
    plan = [("closed", c, None) for c in args.concurrency or []]
    plan += [("open", None, r) for r in args.rate or []]
    runner = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # the standard loop is fine, only slower
        pass
    results = []
    for i, (mode, concurrency, rate) in enumerate(plan):
        what = f"c={concurrency}" if mode == "closed" else f"{rate:g}/s"
        tick = progress.start(f"{label} {mode} {what}", args.duration)
        with Client(host, port, timeout=30) as client:
            before = client.call("stats")["stats"]
            raw = runner(drive(host, port, bodies, sizes, concurrency=concurrency, rate=rate,
                               duration=args.duration, max_requests=args.max_requests,
                               connections=args.connections, seed=args.seed + i, tick=tick,
                               priorities=priorities))
            after = client.call("stats")["stats"]
        progress.stop()
        results.append(report.summarize(raw, before, after, label=label, mode=mode,
                                        concurrency=concurrency, rate=rate))
    return results


def run(args: argparse.Namespace) -> int:
    """``recserve bench load``: run, print, write JSON/CSV/plot; 0 when every run had answers."""
    if not args.concurrency and not args.rate:
        args.concurrency = [1, 8, 32]
    if args.plot is not None:
        report.require_matplotlib()
    progress = report.Progress(enabled=not args.quiet)
    if not (args.start or args.baseline):
        results = run_loads(args.host, args.port, "server", args, progress)
    else:
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            repo = args.model_repo or Path(tmp)
            if args.model_repo is None:
                build_demo_repository(repo)
            extra = shlex.split(args.serve_args)
            servers = [("engine", extra)]
            if args.baseline:
                servers.append(("one-at-a-time", [*extra, "--one-at-a-time"]))
            for label, flags in servers:
                proc, port = bench_server.start_server(repo, flags)
                try:
                    results += run_loads("127.0.0.1", port, label, args, progress)
                finally:
                    proc.terminate()
                    proc.wait(30)
    report.print_table(results)
    report.write_outputs(results, args, provenance.commit())
    return 0 if all(r["completed"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    """``python bench/load.py``: the same options as ``recserve bench load``."""
    from recserve.server.tools_cli import LOAD_EXAMPLES, add_load_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=LOAD_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
