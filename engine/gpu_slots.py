"""Per-slot GPU state for one model: buffers, graphs, events, and the device step of a batch.

``GpuExecutor`` owns the threads and streams; this module owns what one slot holds
(allocated once per model when it is built) and the work a CUDA graph captures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec import ModelSpec
from .staging import Buffers, PackedSizes, StagingLayout, allocate


@dataclass(slots=True)
class SlotState:
    """One slot's buffers, graphs and events for one model."""

    host: Buffers
    device: Buffers
    dense_compute: torch.Tensor | None
    scores_out: torch.Tensor
    bad_out: torch.Tensor
    pool: object
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    events: dict[str, torch.cuda.Event] = field(default_factory=dict)


@dataclass(slots=True)
class GpuModel:
    """A TritonModel with its staging layout and per-slot state (see ``build_model``)."""

    spec: ModelSpec
    triton: object
    layout: StagingLayout
    slots: list[SlotState]


def new_slot(triton_model, layout: StagingLayout, device: torch.device,
             stages: tuple[str, ...]) -> SlotState:
    """Allocate one slot's pinned host set, device set, outputs and stage events."""
    rows, outputs = layout.max_rows, len(layout.spec.outputs)
    dense_compute = None
    host = allocate(layout, "cpu", pin=True)
    on_device = allocate(layout, device)
    if on_device.dense is not None:
        dense_compute = torch.zeros_like(on_device.dense, dtype=triton_model.dtype)
    events = {f"{s}_{edge}": torch.cuda.Event(enable_timing=True)
              for s in stages for edge in ("start", "end")}
    return SlotState(host, on_device, dense_compute,
                     torch.zeros(rows, outputs, pin_memory=True),
                     torch.zeros(rows + 1, dtype=torch.bool, pin_memory=True),
                     torch.cuda.graph_pool_handle(), events=events)


def copy_in(model: GpuModel, slot: SlotState, sizes: PackedSizes,
            stream: torch.cuda.Stream) -> int:
    """Enqueue the used prefix of every host buffer to the device on ``stream``; bytes sent."""
    host, dev, b = slot.host, slot.device, sizes.bucket
    pairs = [(dev.row_request, host.row_request, b),
             (dev.request_offsets, host.request_offsets, b + 2),
             (dev.first_rows, host.first_rows, b + 1)]
    if dev.dense is not None:
        pairs.append((dev.dense, host.dense, b + 1 if model.layout.dense_per_request else b))
    pairs.append((dev.ids, host.ids, sizes.nnz))
    if dev.weights is not None:
        pairs.append((dev.weights, host.weights, sizes.nnz))
    for (d_starts, d_ends), (h_starts, h_ends), used in zip(dev.groups, host.groups,
                                                            sizes.bounds, strict=True):
        pairs += [(d_starts, h_starts, used), (d_ends, h_ends, used)]
    copied = 0
    with torch.cuda.stream(stream):
        for device_buf, host_buf, n in pairs:
            if n:
                device_buf[:n].copy_(host_buf[:n], non_blocking=True)
                copied += host_buf[:n].numel() * host_buf.element_size()
    return copied


def device_step(model: GpuModel, slot: SlotState, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device work of one batch on the slot's device buffers (what a graph captures)."""
    from recserve.kernels.prepare import PreparedBatch

    dev, layout = slot.device, model.layout
    r_cap = bucket + 1
    dense = None
    if slot.dense_compute is not None:
        rows = r_cap if layout.dense_per_request else bucket
        dense = slot.dense_compute[:rows]
        dense.copy_(dev.dense[:rows])  # fp32 staging -> compute dtype, on the device
    groups = []
    for group, (starts, ends) in zip(layout.groups, dev.groups, strict=True):
        used = group.bounds_used(bucket)
        groups.append((dev.ids, starts[:used], ends[:used], dev.weights))
    prepared = PreparedBatch(bucket, r_cap, dev.row_request[:bucket],
                             dev.request_offsets[:r_cap + 1], dev.first_rows[:r_cap], dense,
                             tuple(groups))
    return model.triton.forward_prepared(prepared)


def capture(step, pool, device: torch.device):
    """``step`` warmed up (autotuning its kernels), captured and replayed once: (graph,
    scores, bad). A graph's first launch also uploads it to the device; doing that here
    keeps it out of the first request that lands in this slot and bucket."""
    from recserve.kernels.model import capture_graph

    graph, (scores, bad) = capture_graph(step, pool=pool, device=device)
    graph.replay()
    return graph, scores, bad
