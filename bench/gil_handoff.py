"""What a busy Python thread costs the engine's packing: one batch packed alone, and again
beside a thread that only runs Python (as a busy event loop does), at several GIL switch
intervals.

    python bench/gil_handoff.py [--switch-ms 5,0.5,0.1] [--seconds 1]

Packing is numpy copies into staging buffers; each large copy gives the GIL up and takes it
back after. Beside a thread that runs Python, taking it back waits until that thread is
made to drop it, up to the switch interval (5 ms by default) per copy. The table says how
much longer a pack takes there and what share of its solo rate the Python thread kept.
Workload ``dlrmv2`` at 8192 rows: one full request, and ranking-sized requests (flat form).
``--where process`` packs in a separate process instead, this one only waiting on a pipe:
what packing off this interpreter's GIL would cost in hand-offs (one per pack). No GPU
needed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as wl  # noqa: E402

from recserve.engine.staging import host_buffers, pack, staging_layout  # noqa: E402
from recserve.kernels.layout import build_layout  # noqa: E402
from recserve.kernels.model import feature_groups  # noqa: E402


def _spin(stop: list[bool], counted: list[int]) -> None:
    n = 0
    while not stop[0]:
        n += 1
    counted.append(n)


def spin_rate(seconds: float, work=None) -> tuple[float, int, float]:
    """(spinner iterations per second, times ``work`` ran, seconds) over ``seconds``."""
    stop, counted = [False], []
    thread = threading.Thread(target=_spin, args=(stop, counted))
    thread.start()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        if work is None:
            time.sleep(seconds)
        else:
            work()
            runs += 1
    elapsed = time.perf_counter() - start
    stop[0] = True
    thread.join()
    return counted[0] / elapsed, runs, elapsed


def batches() -> tuple:
    """(layout, host buffers, {name: pieces}): one 8192-row dlrmv2 request, and ranking-sized
    ones filling 8192 rows (the same in every process: a fixed seed)."""
    spec = wl.dlrmv2_spec(4_000_000)
    rng = np.random.default_rng(0)
    full = wl.full_requests(spec, rng, 8192, 1)
    pieces = wl.one_batch(wl.ranking_slices(spec, full, rng, 40), 8192)
    layout = staging_layout(spec, feature_groups(spec), 8192, build_layout(spec).x_request)
    return layout, host_buffers(layout), {"full": [full[0]], f"{len(pieces)} req": pieces}


def _packer(conn) -> None:
    """A packing process: packs the named batch into its own buffers on each request (the
    design this measures would pack into shared, pinned staging memory)."""
    layout, host, named = batches()
    while (name := conn.recv()) is not None:
        conn.send(pack(layout, host, named[name], 8192).rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--switch-ms", default="5,0.5,0.1",
                   help="switch intervals to try, comma-separated ms (default: 5,0.5,0.1)")
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    p.add_argument("--where", default="thread,process",
                   help="thread: pack in this process; process: a packing process packs while "
                   "this one waits on a pipe, so it takes the GIL back once per pack, not "
                   "once per copy (default: both)")
    args = p.parse_args()
    layout, host, named = batches()
    child = None
    if "process" in args.where:
        parent_end, child_end = multiprocessing.Pipe()
        child = multiprocessing.get_context("spawn").Process(target=_packer, args=(child_end,),
                                                             daemon=True)
        child.start()
    print(f"{'switch':>8s} {'where':8s} {'batch':8s} {'alone ms':>9s} {'beside ms':>10s} "
          f"{'slower':>7s} {'spinner kept':>13s}")
    default = sys.getswitchinterval()
    try:
        for switch_ms in (float(x) for x in args.switch_ms.split(",")):
            sys.setswitchinterval(switch_ms / 1e3)
            solo, _, _ = spin_rate(args.seconds)
            for where in args.where.split(","):
                for name, batch in named.items():
                    if where == "thread":
                        work = lambda b=batch: pack(layout, host, b, 8192)  # noqa: E731
                    else:
                        def work(n=name):
                            parent_end.send(n)
                            parent_end.recv()
                    work()
                    start = time.perf_counter()
                    for _ in range(20):
                        work()
                    alone = (time.perf_counter() - start) / 20
                    rate, runs, elapsed = spin_rate(args.seconds, work)
                    beside = elapsed / runs
                    print(f"{switch_ms:6g}ms {where:8s} {name:8s} {alone * 1e3:9.3f} "
                          f"{beside * 1e3:10.3f} {beside / alone:6.1f}x {rate / solo:12.0%}")
    finally:
        sys.setswitchinterval(default)
        if child is not None:
            parent_end.send(None)
            child.join(10)


if __name__ == "__main__":
    main()
