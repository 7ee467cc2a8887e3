"""``recserve top``: a live terminal view of a running server, from its ``stats`` op.

Every ``interval`` seconds it asks the server for ``stats`` over the ordinary client and
shows what changed since the previous answer: requests/s and rows/s from counter
deltas, p50/p99 from latency histogram deltas (so they describe the last interval, not
the whole uptime), batch fill, queue depth, errors by code, and the GPU readings
(or why there are none). ``summarize`` is pure (numbers from two snapshots) and
``render`` turns them into a rich renderable, so both are testable without a terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter

from recserve.engine.histogram import quantile_from

from .client import Client


def _infer_counts(stats: dict) -> Counter[str]:
    """Answered infer requests by code."""
    out: Counter[str] = Counter()
    for row in stats.get("server", {}).get("requests", []):
        if row["op"] == "infer":
            out[row["code"]] += row["count"]
    return out


def _merged_latency(stats: dict) -> tuple[list[float], list[int]]:
    """Every model's infer latency histogram added up (they share bounds)."""
    bounds: list[float] = []
    counts: list[int] = []
    for hist in stats.get("server", {}).get("latency_s", {}).values():
        bounds = hist["bounds"]
        counts = [a + b for a, b in zip(counts, hist["counts"], strict=True)] if counts else list(
            hist["counts"])
    return bounds, counts


def summarize(now: dict, before: dict | None) -> dict:
    """Rates and percentiles over the interval between two ``stats`` snapshots (``before``
    None: since the server started)."""
    span = now["time"] - before["time"] if before else now.get("uptime_s", 0.0)
    span = max(span, 1e-9)
    engine, old_engine = now.get("engine", {}), (before or {}).get("engine", {})
    codes = _infer_counts(now)
    codes.subtract(_infer_counts(before) if before else Counter())
    bounds, counts = _merged_latency(now)
    if before:
        _, old = _merged_latency(before)
        counts = [a - b for a, b in zip(counts, old, strict=False)] if old else counts
    counters = engine.get("counters", {})
    old_counters = old_engine.get("counters", {})
    rows = counters.get("rows", 0) - old_counters.get("rows", 0)
    batches = counters.get("batches", 0) - old_counters.get("batches", 0)
    executor, old_executor = engine.get("executor", {}), old_engine.get("executor", {})
    busy_ms = executor.get("gpu_busy_ms", 0.0) - old_executor.get("gpu_busy_ms", 0.0)
    pack_ms = executor.get("pack_ms", 0.0) - old_executor.get("pack_ms", 0.0)
    in_processes = (executor.get("packed_in_processes", 0)
                    - old_executor.get("packed_in_processes", 0))
    nan = float("nan")
    workers = now.get("server", {}).get("workers")
    old_workers = (before or {}).get("server", {}).get("workers") or {}
    handed = {path: workers.get(f"requests_via_{path}", 0)
              - old_workers.get(f"requests_via_{path}", 0)
              for path in ("ring", "socket")} if workers else {}
    return {
        "span_s": span, "requests_per_s": sum(codes.values()) / span,
        "rows_per_s": rows / span if "rows" in counters else nan,
        "p50_s": quantile_from(bounds, counts, 0.5) if bounds else nan,
        "p99_s": quantile_from(bounds, counts, 0.99) if bounds else nan,
        "rows_per_batch": rows / batches if batches else nan,
        "batch_fill": (rows / batches / engine["max_batch_rows"]
                       if batches and engine.get("max_batch_rows") else nan),
        "queued_rows": engine.get("queued_rows"), "pending": engine.get("pending_requests"),
        "in_flight": now.get("server", {}).get("in_flight", 0),
        "connections": now.get("server", {}).get("connections", 0),
        "errors": {c: n for c, n in sorted(codes.items()) if c != "ok" and n},
        "error_totals": {c: n for c, n in sorted(_infer_counts(now).items()) if c != "ok"},
        "engine_busy": busy_ms / 1e3 / span if "executor" in engine and engine["executor"]
        else nan,
        # share of the packing threads' time spent packing (near 100%: host-bound)
        "pack_busy": (pack_ms / 1e3 / span / executor["pack_threads"]
                      if executor.get("pack_threads") else nan),
        "gpu": now.get("gpu", {}),
        # --workers: processes, and the share of requests whose arrays missed the ring
        "workers": workers.get("processes") if workers else None,
        "via_socket": (handed["socket"] / (handed["ring"] + handed["socket"])
                       if handed and handed["ring"] + handed["socket"] else nan),
        # --pack-in process: the share of batches its processes packed (the rest: threads)
        "in_processes": (in_processes / batches if "packed_in_processes" in executor
                         and batches else nan),
        "packing_restarts": executor.get("packing_process_restarts", 0),
        # device memory each GPU model took at load ("name/version" -> weights, slots)
        "model_memory": engine.get("model_device_bytes", {}),
    }


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{fmt}}{unit}"


def _gpu_lines(gpu: dict) -> list[str]:
    if not gpu.get("available"):
        return [f"GPU monitor unavailable: {gpu.get('reason') or 'no reason given'}"]
    lines = []
    for g in gpu.get("gpus", []):
        used, total = g.get("memory_used_bytes"), g.get("memory_total_bytes")
        memory = (f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB" if used is not None
                  and total is not None else "-")
        power = _num(g.get("power_watts"), ".0f", " W")
        if g.get("power_limit_watts") is not None:
            power += f" / {g['power_limit_watts']:.0f} W"
        lines.append(f"GPU {g['index']} {g.get('name') or ''}: util "
                     f"{_num(g.get('utilization_pct'), '.0f', '%')}, memory {memory}, "
                     f"power {power}, {_num(g.get('temperature_c'), 'd', ' C')}, "
                     f"SM {_num(g.get('sm_clock_mhz'), 'd', ' MHz')}")
    return lines


def render(now: dict, before: dict | None, title: str = "recserve"):
    """A rich renderable of the interval between two ``stats`` snapshots."""
    from rich.console import Group
    from rich.table import Table

    s = summarize(now, before)
    table = Table(title=f"{title}  (up {now.get('uptime_s', 0):.0f} s, version "
                  f"{now.get('version', '?')}, last {s['span_s']:.1f} s)",
                  show_header=False, box=None, padding=(0, 2))
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("requests/s", _num(s["requests_per_s"], ".1f"))
    table.add_row("rows/s", _num(s["rows_per_s"], ".0f"))
    table.add_row("latency p50 / p99", f"{_num(s['p50_s'] * 1e3, '.2f', ' ms')} / "
                  f"{_num(s['p99_s'] * 1e3, '.2f', ' ms')}")
    table.add_row("batch fill", f"{_num(s['batch_fill'] * 100, '.0f', '%')} "
                  f"({_num(s['rows_per_batch'], '.0f')} rows per batch)")
    table.add_row("queue", f"{_num(s['queued_rows'], 'd')} rows queued, "
                  f"{_num(s['pending'], 'd')} requests in the engine, {s['in_flight']} in "
                  f"flight, {s['connections']} connections")
    errors = ", ".join(f"{c} {n}" for c, n in s["errors"].items()) or "none"
    totals = ", ".join(f"{c} {n}" for c, n in s["error_totals"].items()) or "none"
    table.add_row("errors", f"{errors} (since start: {totals})")
    table.add_row("engine GPU busy", _num(s["engine_busy"] * 100, ".0f", "%"))
    if not math.isnan(s["pack_busy"]):
        table.add_row("host packing busy", _num(s["pack_busy"] * 100, ".0f", "%")
                      + " of the packing threads (near 100%: the host bounds the GPU)")
    if not math.isnan(s["in_processes"]):
        table.add_row("packing processes", _num(s["in_processes"] * 100, ".0f", "%")
                      + " of batches (below 100%: requests outside the rings, or processes "
                        f"that failed; restarts since start: {s['packing_restarts']})")
    if s["model_memory"]:
        table.add_row("model memory", "; ".join(
            f"{key}: weights {parts.get('weights', 0) / 2**20:.0f} MiB, slots "
            f"{parts.get('slots', 0) / 2**20:.0f} MiB"
            for key, parts in sorted(s["model_memory"].items())))
    if s["workers"]:
        table.add_row("front end", f"{s['workers']} worker processes, "
                      f"{_num(s['via_socket'] * 100, '.0f', '%')} of requests through the "
                      "socket (above 0: a shared ring was full; raise --worker-ring-mb)")
    return Group(table, *_gpu_lines(s["gpu"]))


def as_json(now: dict, before: dict) -> str:
    """One ``--json`` line: the interval's ``summarize`` (NaN, where there was nothing to
    measure, and any other non-finite number as null: strict JSON) and the raw ``stats``
    answer it came from."""
    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return json.dumps({"summary": plain(summarize(now, before)), "stats": plain(now)},
                      allow_nan=False)


def run_top(args: argparse.Namespace) -> int:
    """``recserve top``: refresh every ``args.interval`` s until Ctrl-C (or once)."""
    if getattr(args, "json", False):
        return _run_json(args)
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise ValueError("recserve top needs rich: pip install 'recserve[tools]'") from None
    console = Console()
    title = f"recserve {args.host}:{args.port}"
    with Client(args.host, args.port, timeout=args.timeout) as client:
        def fetch() -> dict:
            return client.call("stats")["stats"]

        before = fetch()
        if args.once:
            time.sleep(args.interval)
            console.print(render(fetch(), before, title))
            return 0
        try:
            if not console.is_terminal:  # piped to a file or a log: one frame after another
                while True:
                    time.sleep(args.interval)
                    now = fetch()
                    console.print(render(now, before, title))
                    before = now
            with Live(render(before, None, title), console=console, auto_refresh=False) as live:
                while True:
                    time.sleep(args.interval)
                    now = fetch()
                    live.update(render(now, before, title), refresh=True)
                    before = now
        except KeyboardInterrupt:
            return 0


def _run_json(args: argparse.Namespace) -> int:
    """``--json``: a line of JSON every interval (with ``--once``, one), for scripts and
    logs; needs no terminal and no rich."""
    with Client(args.host, args.port, timeout=args.timeout) as client:
        before = client.call("stats")["stats"]
        try:
            while True:
                time.sleep(args.interval)
                now = client.call("stats")["stats"]
                print(as_json(now, before), flush=True)
                if args.once:
                    return 0
                before = now
        except KeyboardInterrupt:
            return 0
