"""Enqueuing one packed batch's device work: copies in, compute, copies out, and the events
that order them and time them (``GpuExecutor`` picks the streams and keeps the counts).

Every CUDA call here hands the GIL over in the engine process (torch releases it in
``copy_``, ``Event.record``, ``wait_event`` and ``replay``), so calls only the timeline
reads are made only with it on (``slot.timed``), and waits between streams only where the
streams differ.
"""

from __future__ import annotations

import torch

from .gpu_slots import GpuModel, SlotState, copy_in, device_step
from .staging_layout import PackedSizes


def issue_streams(model: GpuModel, slot: SlotState, sizes: PackedSizes,
                  h2d: torch.cuda.Stream, compute: torch.cuda.Stream,
                  out: torch.cuda.Stream, outputs_in_graph: bool = False) -> int:
    """Copy in on ``h2d``, replay the bucket's graph (or run the step) on ``compute``, copy
    the scores and flags out on ``out`` (one stream for all three, or three); ends with the
    slot's ``d2h_end`` event. ``outputs_in_graph``: the graph copies them out itself
    (``outputs_step``), and ``d2h_end`` follows the replay on ``compute`` (6 CUDA calls a
    batch instead of 10). Returns the bytes copied in."""
    ev, bucket = slot.events, sizes.bucket
    if slot.timed:
        ev["h2d_start"].record(h2d)
    copied = copy_in(slot, bucket, sizes.nnz, h2d)
    if slot.timed or compute is not h2d:
        ev["h2d_end"].record(h2d)
    if compute is not h2d:
        compute.wait_event(ev["h2d_end"])
    with torch.cuda.stream(compute):
        ev["compute_start"].record(compute)
        if bucket in slot.graphs:
            graph, scores, bad = slot.graphs[bucket]
            graph.replay()
        else:
            scores, bad = device_step(model, slot, bucket)
        if outputs_in_graph:
            ev["d2h_end"].record(compute)
            return copied
        ev["compute_end"].record(compute)
    if out is not compute:
        out.wait_event(ev["compute_end"])
    with torch.cuda.stream(out):
        if slot.timed:
            ev["d2h_start"].record(out)
        slot.scores_out[:sizes.rows].copy_(scores[:sizes.rows], non_blocking=True)
        slot.bad_out[:sizes.requests].copy_(bad[:sizes.requests], non_blocking=True)
        ev["d2h_end"].record(out)
    if bucket not in slot.graphs and out is not compute:
        scores.record_stream(out)  # allocator-owned outputs: keep until copied
        bad.record_stream(out)
    return copied


def issue_whole(slot: SlotState, bucket: int, stream: torch.cuda.Stream) -> int:
    """One replay of the slot's whole-batch graph (``batch_step``: the copies at fixed
    sizes, the forward, the outputs) on ``stream``, between its ``compute_start`` and
    ``d2h_end`` events: three CUDA calls. Returns the bytes it copies in."""
    ev = slot.events
    with torch.cuda.stream(stream):
        ev["compute_start"].record(stream)
        slot.graphs[bucket][0].replay()
        ev["d2h_end"].record(stream)
    views = slot.device.bucket(bucket)
    room = views.ids.shape[0]
    return views.copy_bytes(room) + (room * 4 if slot.device.weights is not None else 0)
