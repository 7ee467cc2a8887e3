"""What bench/load.py reports: one summary per run, a progress bar, a table, JSON, CSV, a plot.

Kept apart from the traffic generation so each file stays small; nothing here touches
the network.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from recserve.engine.histogram import quantile_from

PERCENTILES = (50, 90, 99, 99.9)
CSV_FIELDS = ("server", "mode", "concurrency", "rate_per_s", "sent", "completed", "unanswered",
              "errors", "requests_per_s", "rows_per_s", "p50_ms", "p90_ms", "p99_ms",
              "p99.9_ms", "mean_batch_rows", "p99_batch_rows", "mean_batch_requests",
              "engine_gpu_busy", "gpu_util_pct")


def _delta_hist(after: dict | None, before: dict | None) -> dict | None:
    if after is None:
        return None
    counts = list(after["counts"])
    total = after["sum"]
    if before is not None:
        counts = [a - b for a, b in zip(counts, before["counts"], strict=True)]
        total -= before["sum"]
    return {"bounds": after["bounds"], "counts": counts, "sum": total, "count": sum(counts)}


def server_side(before: dict, after: dict, span: float) -> dict:
    """The server's batch sizes and device busy time over a run, from two ``stats``."""
    eng, old = after.get("engine", {}), before.get("engine", {})
    hists, old_hists = eng.get("histograms", {}), old.get("histograms", {})
    rows = _delta_hist(hists.get("batch_rows"), old_hists.get("batch_rows"))
    reqs = _delta_hist(hists.get("batch_requests"), old_hists.get("batch_requests"))
    nan = float("nan")
    busy = (eng.get("executor", {}).get("gpu_busy_ms", 0.0)
            - old.get("executor", {}).get("gpu_busy_ms", 0.0))
    return {
        "backend": eng.get("kind", "unknown"),
        "batches": rows["count"] if rows else 0,
        "mean_batch_rows": rows["sum"] / rows["count"] if rows and rows["count"] else nan,
        "p99_batch_rows": quantile_from(rows["bounds"], rows["counts"], 0.99) if rows else nan,
        "mean_batch_requests": reqs["sum"] / reqs["count"] if reqs and reqs["count"] else nan,
        "engine_gpu_busy": busy / 1e3 / span if eng.get("executor") else nan,
        "gpu_available": bool(after.get("gpu", {}).get("available")),
        "gpu_reason": after.get("gpu", {}).get("reason", ""),
    }


def summarize(raw: dict, before: dict, after: dict, *, label: str, mode: str,
              concurrency: int | None, rate: float | None) -> dict:
    """One run's figures: client-side throughput and percentiles, server-side batches, GPU."""
    ms = np.asarray(raw["latencies"], dtype=np.float64) * 1e3
    pct = np.percentile(ms, PERCENTILES).tolist() if len(ms) else [float("nan")] * 4
    span = raw["span"]
    samples = raw.get("gpu_util_samples", [])
    out = {"server": label, "mode": mode, "concurrency": concurrency, "rate_per_s": rate,
           "sent": raw["sent"], "completed": len(ms), "unanswered": raw["unanswered"],
           "errors": dict(sorted(raw["errors"].items())), "span_s": span,
           "requests_per_s": len(ms) / span, "rows_per_s": raw["rows"] / span,
           "mean_ms": float(ms.mean()) if len(ms) else float("nan"),
           "gpu_util_pct": float(np.mean(samples)) if samples else float("nan")}
    out.update({f"p{p:g}_ms": v for p, v in zip(PERCENTILES, pct, strict=True)})
    out.update(server_side(before, after, span))
    by_priority = {}
    errors = raw.get("errors_by_priority", {})
    for priority, seconds in sorted(raw.get("latencies_by_priority", {}).items()):
        part = np.asarray(seconds, dtype=np.float64) * 1e3
        by_priority[priority] = {"completed": len(part),
                                 "errors": dict(sorted(errors.get(priority, {}).items())), **{
            f"p{p:g}_ms": float(v) for p, v in zip(PERCENTILES, np.percentile(part, PERCENTILES),
                                                  strict=True)}}
    if by_priority:
        out["by_priority"] = by_priority
    return out


class Progress:
    """A rich progress bar per run (elapsed of ``--duration``, answers so far), or nothing."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None

    def start(self, what: str, duration: float):
        """Begin a run's bar; returns ``tick(elapsed_s, answers)``, or None without a bar."""
        if not self.enabled:
            return None
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:  # rich is optional: run without a bar
            return None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.fields[answers]} answered"), TimeElapsedColumn(),
                            transient=True)
        self.bar.start()
        task = self.bar.add_task(what, total=duration, answers=0)
        return lambda elapsed, answers: self.bar.update(task, completed=elapsed, answers=answers)

    def stop(self) -> None:
        """End the current run's bar."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(results: list[dict]) -> None:
    """One line per run on stdout."""
    print(f"{'server':<14} {'load':<10} {'req/s':>8} {'rows/s':>9} {'p50':>7} {'p90':>7} "
          f"{'p99':>7} {'p99.9':>7} ms  {'batch':>6} {'busy':>5} {'gpu':>4}  errors")
    for r in results:
        load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate_per_s']:g}/s"
        errors = ", ".join(f"{c} {n}" for c, n in r["errors"].items()) or "none"
        if r["unanswered"]:
            errors += f", unanswered {r['unanswered']}"
        print(f"{r['server']:<14} {load:<10} {r['requests_per_s']:8.1f} {r['rows_per_s']:9.0f} "
              f"{_fmt(r['p50_ms']):>7} {_fmt(r['p90_ms']):>7} {_fmt(r['p99_ms']):>7} "
              f"{_fmt(r['p99.9_ms']):>7}     {_fmt(r['mean_batch_rows'], '.0f'):>6} "
              f"{_fmt(r['engine_gpu_busy'] * 100, '.0f'):>5} "
              f"{_fmt(r['gpu_util_pct'], '.0f'):>4}  {errors}", flush=True)
        for priority, part in r.get("by_priority", {}).items():
            refused = ", ".join(f"{c} {n}" for c, n in part["errors"].items()) or "none"
            print(f"{'  ' + priority:<14} {'':<10} {part['completed']:8d} {'answered':>9} "
                  f"{_fmt(part['p50_ms']):>7} {_fmt(part['p90_ms']):>7} "
                  f"{_fmt(part['p99_ms']):>7} {_fmt(part['p99.9_ms']):>7}"
                  f"{'':29}{refused}", flush=True)


def _no_nan(row: dict, blank: object) -> dict:
    return {k: blank if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def write_outputs(results: list[dict], args, commit: str) -> None:
    """``--json``, ``--csv`` and ``--plot``, each when asked for (``commit``: the checkout's)."""
    if args.json is not None:
        meta = {"bench": "load", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": platform.node(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "duration_s": args.duration,
                "max_requests": args.max_requests, "ids": args.ids, "model": args.model,
                "connections": args.connections, "serve_args": args.serve_args,
                "commit": commit}
        runs = [_no_nan(r, None) for r in results]  # strict JSON has no NaN
        args.json.write_text(json.dumps({**meta, "runs": runs}, indent=2) + "\n")
    if args.csv is not None:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in results:
                writer.writerow({**_no_nan(r, ""), "errors": ";".join(
                    f"{c}={n}" for c, n in r["errors"].items())})
    if args.plot is not None:
        plot(results, args.plot)


def require_matplotlib() -> None:
    """Raise ValueError with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib, an optional extra: pip install "
                         "'recserve[plot]' (or pip install matplotlib)") from None


def plot(results: list[dict], path: Path) -> None:
    """p99 latency against throughput, one line per server and mode (log latency axis)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if r["completed"]:
            groups.setdefault((r["server"], r["mode"]), []).append(r)
    colours = {}
    for (server, mode), runs in groups.items():
        runs.sort(key=lambda r: r["concurrency"] or r["rate_per_s"] or 0)  # by offered load
        colour = colours.setdefault(server, f"C{len(colours)}")  # one colour per server
        label = f"{server} ({'closed loop' if mode == 'closed' else 'open loop, Poisson'})"
        ax.plot([r["requests_per_s"] for r in runs], [r["p99_ms"] for r in runs],
                color=colour, linestyle="-" if mode == "closed" else "--",
                marker="o" if mode == "closed" else "s", label=label)
        for r in runs:
            note = f"c={r['concurrency']}" if mode == "closed" else f"{r['rate_per_s']:g}/s"
            ax.annotate(note, (r["requests_per_s"], r["p99_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("throughput (requests/s answered)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title("recserve: p99 latency against throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
