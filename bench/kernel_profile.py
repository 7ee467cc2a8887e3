"""Where GPU time goes, without the host in the measurement.

- ``graph_us``: ``repeat`` back-to-back calls captured in one CUDA graph and replayed, so
  the time per call is the device's alone (an eager ``do_bench`` of a small batch times the
  Python launch path instead: at B=512 the gather's launch costs more than its kernel).
  This is how the engine runs a batch: one graph replay.
- ``kernel_breakdown``: device time per kernel name per call, and each launch of one call
  in order (which layer is slow), from the PyTorch profiler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_us(fn: Callable[[], object], repeat: int = 20) -> float:
    """Median device microseconds per call of ``fn`` replayed ``repeat`` times in a graph."""
    import triton  # here: importing it first thing would precede the interpreter switch

    from recserve.kernels.model import capture_graph

    graph, _ = capture_graph(lambda: [fn() for _ in range(repeat)])
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median")
    del graph
    return ms * 1e3 / repeat


def kernel_breakdown(fn: Callable[[], object], calls: int = 10, top: int = 12) -> dict:
    """``by_kernel``: the ``top`` kernels by device time (name, us per call of ``fn``,
    launches per call); ``one_call``: the kernels of one call in launch order (name, us)."""
    fn()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:  # CPU ops hold no kernels
            continue
        device_us = getattr(event, "self_device_time_total",
                            getattr(event, "self_cuda_time_total", 0.0))
        rows.append({"kernel": event.key[:80], "us": round(device_us / calls, 2),
                     "launches": round(event.count / calls, 2)})
    rows.sort(key=lambda r: -r["us"])
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    per_call = len(kernels) // calls
    one_call = [{"kernel": e.name[:40], "us": round(e.time_range.elapsed_us(), 2)}
                for e in kernels[per_call:2 * per_call]]  # the second call: warm
    return {"by_kernel": rows[:top], "one_call": one_call}
