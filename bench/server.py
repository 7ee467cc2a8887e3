"""Server load over loopback: requests/s and latency percentiles of `recserve serve`.

Traffic is the demo model's ``ranking`` shape (N from ``ranking_candidates``, Zipf ids),
pre-encoded once so the load generator spends its CPU on sockets, not on msgpack. Each
configuration is a real ``recserve serve`` process; for each one the bench first finds
its capacity (closed loop: ``--concurrency`` requests kept in flight), then offers
Poisson arrivals at fractions of that capacity (open loop: latency counts from the
intended send time, so a stalled server cannot hide its queue).

    python bench/server.py --duration 3 --out results/                 # default configs
    python bench/server.py --config "engine=" --config "oaat=--one-at-a-time"

Prints a table and writes ``server-<time>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

from recserve.engine.demo import build_demo_repository, demo_request, demo_spec, ranking_candidates
from recserve.server.codec import HEADER, FrameDecoder, encode_message

DEFAULT_CONFIGS = ["one-at-a-time=--one-at-a-time --device cpu",
                   "engine=--device cpu --workers 1", "engine-2w=--device cpu --workers 2",
                   "null=--device null --workers 1", "null-2w=--device null --workers 2"]


def request_bodies(count: int, seed: int) -> tuple[list[bytes], list[int]]:
    """``count`` infer requests as msgpack map bodies without their id (the id is spliced in
    per send), and their candidate counts."""
    spec, rng = demo_spec(), np.random.default_rng(seed)
    bodies, sizes = [], []
    for _ in range(count):
        n = ranking_candidates(rng)
        fields = {"op": "infer", "model": "demo", "candidates": n,
                  "inputs": demo_request(spec, rng, n, zipf=True)}
        frame = encode_message(fields)[HEADER.size:]
        # A fixmap header (0x80 | k) leads; we add one entry ("id") in front of the rest.
        assert frame[0] & 0xF0 == 0x80
        bodies.append(bytes([frame[0] + 1]) + msgpack.packb("id") + b"\xcf"
                      + b"\x00" * 8 + frame[1:])
        sizes.append(n)
    return bodies, sizes


def frame_with_id(body: bytes, rid: int) -> bytes:
    """A full frame: the body with ``rid`` written into its uint64 id slot."""
    out = bytearray(HEADER.pack(len(body)) + body)
    out[HEADER.size + 5:HEADER.size + 13] = rid.to_bytes(8, "big")
    return bytes(out)


class Load:
    """Requests sent and answered over a set of connections."""

    def __init__(self, bodies: list[bytes], closed_until: float | None) -> None:
        self.bodies = bodies
        self.closed_until = closed_until  # closed loop: resend on each answer until then
        self.started: dict[int, float] = {}
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.next_id = 0

    def send(self, conn: LoadProtocol, at: float | None = None) -> None:
        """One request on ``conn``; latency counts from ``at`` (default: now)."""
        self.next_id += 1
        rid = self.next_id
        self.started[rid] = time.perf_counter() if at is None else at
        conn.transport.write(frame_with_id(self.bodies[rid % len(self.bodies)], rid))

    def answered(self, conn: LoadProtocol, response: dict, now: float) -> None:
        start = self.started.pop(response["id"], None)
        if start is None:
            return
        if response.get("ok"):
            self.latencies.append(now - start)
        else:
            code = response["error"]["code"]
            self.errors[code] = self.errors.get(code, 0) + 1
        if self.closed_until is not None and now < self.closed_until:
            self.send(conn)


class LoadProtocol(asyncio.Protocol):
    """One client connection of a ``Load``."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.decoder = FrameDecoder(64 << 20)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        for payload in self.decoder.feed(data):
            self.load.answered(self, msgpack.unpackb(payload, raw=False), now)


async def run_load(port: int, bodies: list[bytes], seconds: float, connections: int,
                   rate: float | None, concurrency: int, seed: int) -> dict:
    """Open loop at ``rate`` requests/s (Poisson), or closed loop at ``concurrency``."""
    loop = asyncio.get_running_loop()
    begin = time.perf_counter()
    load = Load(bodies, begin + seconds if rate is None else None)
    conns = [(await loop.create_connection(lambda: LoadProtocol(load), "127.0.0.1", port))[1]
             for _ in range(connections)]
    rng = np.random.default_rng(seed)
    if rate is None:
        for i in range(concurrency):
            load.send(conns[i % connections])
        await asyncio.sleep(seconds)
    else:
        due = begin
        while (now := time.perf_counter()) - begin < seconds:
            while due <= now:
                # latency from the intended send time: no coordinated omission
                load.send(conns[load.next_id % connections], at=due)
                due += rng.exponential(1.0 / rate)
            await asyncio.sleep(max(0.0, min(due - time.perf_counter(), 0.002)))
    sent = load.next_id
    end_wait = time.perf_counter() + 10.0
    while load.started and time.perf_counter() < end_wait:
        await asyncio.sleep(0.005)
    span = time.perf_counter() - begin
    for c in conns:
        c.transport.close()
    return {"sent": sent, "latencies": load.latencies, "errors": load.errors,
            "unanswered": len(load.started), "span": span}


def summarize(parts: list[dict], rate: float | None, concurrency: int) -> dict:
    """One run's figures from the raw results of every load process."""
    latencies = [x for p in parts for x in p["latencies"]]
    errors: dict[str, int] = {}
    for p in parts:
        for code, count in p["errors"].items():
            errors[code] = errors.get(code, 0) + count
    span = max(p["span"] for p in parts)
    ms = np.asarray(latencies) * 1e3
    pct = np.percentile(ms, [50, 90, 99]).tolist() if len(ms) else [float("nan")] * 3
    return {"offered_per_s": rate, "concurrency": None if rate else concurrency,
            "sent": sum(p["sent"] for p in parts), "completed": len(latencies),
            "errors": errors, "unanswered": sum(p["unanswered"] for p in parts),
            "requests_per_s": len(latencies) / span,
            "p50_ms": pct[0], "p90_ms": pct[1], "p99_ms": pct[2]}


_BODIES: list[bytes] = []


def _init_client(count: int) -> None:
    _BODIES.extend(request_bodies(count, seed=0)[0])


def _client_run(port: int, seconds: float, connections: int, rate: float | None,
                concurrency: int, seed: int) -> dict:
    import uvloop

    return uvloop.run(run_load(port, _BODIES, seconds, connections, rate, concurrency, seed))


class LoadClients:
    """``count`` load-generating processes (one is not enough to saturate a server with
    many front-end workers); each gets an equal share of connections, rate and concurrency."""

    def __init__(self, count: int, requests: int) -> None:
        import multiprocessing

        self.count = count
        self.pool = multiprocessing.get_context("spawn").Pool(
            count, initializer=_init_client, initargs=(requests,))

    def run(self, port: int, seconds: float, connections: int, rate: float | None,
            concurrency: int, seed: int) -> dict:
        k = self.count
        jobs = [(port, seconds, max(1, connections // k), None if rate is None else rate / k,
                 max(1, concurrency // k), seed * 1000 + i) for i in range(k)]
        return summarize(self.pool.starmap(_client_run, jobs), rate, concurrency)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds used so far by ``pid`` ("main") and by its children ("workers")."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(p: int) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    def used(fields: list[str]) -> float:
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    out = {"main": used(stat(pid)), "workers": 0.0}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                fields = stat(int(entry))
            except OSError:
                continue
            if int(fields[1]) == pid:  # ppid
                out["workers"] += used(fields)
    return out


def start_server(repo: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    """``recserve serve`` on a free port; (process, port) once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "recserve.server.cli", "serve", "--port",
                             "0", "--model-repo", str(repo), "--log-level", "info", *extra],
                            stderr=subprocess.PIPE, text=True)
    port = None
    seen: list[str] = []
    for line in proc.stderr:
        seen = [*seen[-20:], line]
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        port = int(match.group(1)) if match else port
        if port is not None and "ready: every model is loaded" in line:
            # keep reading its log, or a chatty server would block on a full pipe
            threading.Thread(target=lambda: all(proc.stderr), daemon=True).start()
            return proc, port
    raise RuntimeError(f"serve {extra} exited before listening:\n{''.join(seen)}")


def bench_config(name: str, extra: list[str], repo: Path, clients: LoadClients,
                 args: argparse.Namespace) -> dict:
    """Capacity, then open-loop runs at ``args.loads`` times that capacity."""
    proc, port = start_server(repo, extra)
    try:
        run = clients.run
        run(port, 1.0, args.connections, None, args.concurrency, 1)  # warm-up
        before = cpu_seconds(proc.pid)
        cap = run(port, args.duration, args.connections, None, args.concurrency, 2)
        after = cpu_seconds(proc.pid)
        # CPU per answered request, per process kind: where the front end's time goes.
        cap["cpu_us_per_request"] = {k: 1e6 * (after[k] - before[k]) / max(1, cap["completed"])
                                     for k in after}
        runs = [cap]
        for i, load in enumerate(args.loads):
            rate = load * cap["requests_per_s"]
            runs.append(run(port, args.duration, args.connections, rate, args.concurrency,
                            3 + i) | {"load": load})
    finally:
        proc.terminate()
        proc.wait(30)
    return {"name": name, "args": extra, "capacity_per_s": cap["requests_per_s"], "runs": runs}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", metavar="NAME=ARGS",
                   help="a server configuration: a name and `recserve serve` flags "
                   f"(repeatable; default: {DEFAULT_CONFIGS})")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    p.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")],
                   default=[0.5, 0.8], help="open-loop rates as fractions of capacity")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop requests in flight")
    p.add_argument("--connections", type=int, default=4, help="client connections")
    p.add_argument("--requests", type=int, default=256, help="distinct requests to cycle")
    p.add_argument("--clients", type=int, default=1, help="load-generating processes")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    _, sizes = request_bodies(args.requests, seed=0)
    clients = LoadClients(args.clients, args.requests)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        build_demo_repository(repo)
        for config in args.config or DEFAULT_CONFIGS:
            name, _, flags = config.partition("=")
            result = bench_config(name, shlex.split(flags), repo, clients, args)
            results.append(result)
            for r in result["runs"]:
                what = (f"load {r['load']:.2f}" if r["offered_per_s"] else
                        f"closed c={r['concurrency']}")
                cpu = r.get("cpu_us_per_request")
                cpu = (f"  cpu/req main {cpu['main']:.0f} us, workers {cpu['workers']:.0f} us"
                       if cpu else "")
                print(f"{name:<16} {what:<14} {r['requests_per_s']:8.1f} req/s  p50 "
                      f"{r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}"
                      f"{cpu}", flush=True)
    clients.close()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"server-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({
            "bench": "server", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "mean_candidates": float(np.mean(sizes)), "duration_s": args.duration,
            "concurrency": args.concurrency, "connections": args.connections,
            "clients": args.clients,
            "configs": results}, indent=2))
        print(path)


if __name__ == "__main__":
    main()
