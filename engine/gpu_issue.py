"""Enqueuing one packed batch's device work: copies in, compute, copies out, and the events
that order them and time them (``GpuExecutor`` picks the streams and keeps the counts).

Every CUDA call torch makes hands the GIL over in the engine process (torch releases it in
``copy_``, ``Event.record``, ``wait_event`` and ``replay``), so calls only the timeline
reads are made only with it on (``slot.timed``), and waits between streams only where the
streams differ; ``calls`` may be ``cuda_driver.DriverCalls``, which keep it.
"""

from __future__ import annotations

import torch

from .cuda_driver import TORCH_CALLS, TorchCalls
from .gpu_slots import GpuModel, SlotState, copy_in, device_step, outputs_step
from .staging_layout import PackedSizes


def issue_streams(model: GpuModel, slot: SlotState, sizes: PackedSizes,
                  h2d: torch.cuda.Stream, compute: torch.cuda.Stream,
                  out: torch.cuda.Stream, outputs_in_graph: bool = False,
                  calls: TorchCalls = TORCH_CALLS) -> int:
    """Copy in on ``h2d``, replay the bucket's graph (or run the step) on ``compute``, copy
    the scores and flags out on ``out`` (one stream for all three, or three); ends with the
    slot's ``d2h_end`` event. ``outputs_in_graph``: the graph copies them out itself
    (``outputs_step``), and ``d2h_end`` follows the replay on ``compute`` (6 CUDA calls a
    batch instead of 10). ``calls`` makes the copies, records, waits and replays. Returns
    the bytes copied in."""
    ev, bucket = slot.events, sizes.bucket
    if slot.timed:
        calls.record(ev["h2d_start"], h2d)
    copied = copy_in(slot, bucket, sizes.nnz, h2d, calls)
    if slot.timed or compute is not h2d:
        calls.record(ev["h2d_end"], h2d)
    if compute is not h2d:
        calls.wait(compute, ev["h2d_end"])
    calls.record(ev["compute_start"], compute)
    if bucket in slot.graphs:
        graph, scores, bad = slot.graphs[bucket]
        calls.replay(graph, compute)
    else:
        step = outputs_step if outputs_in_graph else device_step  # (no graph: same work)
        with torch.cuda.stream(compute):
            scores, bad = step(model, slot, bucket)
    if outputs_in_graph:
        calls.record(ev["d2h_end"], compute)
        return copied
    calls.record(ev["compute_end"], compute)
    if out is not compute:
        calls.wait(out, ev["compute_end"])
    if slot.timed:
        calls.record(ev["d2h_start"], out)
    calls.copy(slot.scores_out[:sizes.rows], scores[:sizes.rows], out)
    calls.copy(slot.bad_out[:sizes.requests], bad[:sizes.requests], out)
    calls.record(ev["d2h_end"], out)
    if bucket not in slot.graphs and out is not compute:
        scores.record_stream(out)  # allocator-owned outputs: keep until copied
        bad.record_stream(out)
    return copied


def issue_whole(slot: SlotState, bucket: int, stream: torch.cuda.Stream,
                calls: TorchCalls = TORCH_CALLS) -> int:
    """One replay of the slot's whole-batch graph (``batch_step``: the copies at fixed
    sizes, the forward, the outputs) on ``stream``, between its ``compute_start`` and
    ``d2h_end`` events: three CUDA calls. Returns the bytes it copies in."""
    ev = slot.events
    calls.record(ev["compute_start"], stream)
    calls.replay(slot.graphs[bucket][0], stream)
    calls.record(ev["d2h_end"], stream)
    views = slot.device.bucket(bucket)
    room = views.ids.shape[0]
    return views.copy_bytes(room) + (room * 4 if slot.device.weights is not None else 0)
