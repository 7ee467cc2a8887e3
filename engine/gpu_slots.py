"""Per-slot GPU state for one model: buffers, graphs, events, and the device step of a batch.

``GpuExecutor`` owns the threads and streams; this module owns what one slot holds
(allocated once per model when it is built) and the work a CUDA graph captures.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import weakref
from dataclasses import dataclass, field

import torch

from .cuda_driver import TORCH_CALLS, TorchCalls
from .packer import PackedModel
from .shared_memory import SharedMemory
from .spec import ModelSpec
from .staging_layout import HostBuffers, StagingLayout, host_buffers, host_bytes
from .tensor_buffers import TensorBuffers, allocate, as_tensors, pinned_host

log = logging.getLogger("recserve.engine")
_model_keys = itertools.count(1)


@dataclass(slots=True)
class SlotState:
    """One slot's buffers, graphs and events for one model."""

    host: HostBuffers
    """What packing writes (numpy; pinned, or shared memory CUDA pinned)."""
    device: TensorBuffers
    scores_out: torch.Tensor
    bad_out: torch.Tensor
    """Each request's bad-id flag as the forward leaves it (int32, nonzero: bad)."""
    pool: object
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    events: dict[str, torch.cuda.Event] = field(default_factory=dict)
    shared: SharedMemory | None = None
    """The memory ``host`` lies in, when packing processes share it (``packer``)."""
    timed: bool = False
    """Whether its batch in flight records every stage's events (the timeline is on)."""
    host_tensors: TensorBuffers | None = None
    """``host`` as torch tensors: what the copies to the device read."""


@dataclass(slots=True)
class GpuModel:
    """A TritonModel with its staging layout and per-slot state (see ``build_model``)."""

    spec: ModelSpec
    triton: object
    layout: StagingLayout
    slots: list[SlotState]
    packed: PackedModel | None = None
    """What packing processes need of it; None when its slots' staging is not shared."""
    device_bytes: dict[str, int] = field(default_factory=dict)
    """Device memory it took: "weights", and "slots" (every slot's buffers and graphs)."""

    def __post_init__(self) -> None:
        if self.packed is None and self.slots and all(s.shared for s in self.slots):
            self.packed = PackedModel(next(_model_keys), self.layout,
                                      [s.shared for s in self.slots])


def shared_host(layout: StagingLayout) -> tuple[HostBuffers, SharedMemory]:
    """A host set of staging buffers in new shared memory (zeroed, whole pages)."""
    memory = SharedMemory(-(-host_bytes(layout) // mmap.PAGESIZE) * mmap.PAGESIZE,
                          "recserve-staging")
    return host_buffers(layout, memory.view), memory


def pin_shared(memory: SharedMemory) -> bool:
    """Register ``memory`` with CUDA as pinned (so copies from it run asynchronously at
    full speed), unregistered when it goes; False, with a warning, when CUDA refuses."""
    cudart = torch.cuda.cudart()
    address = torch.frombuffer(memory.view, dtype=torch.uint8).data_ptr()
    error = int(cudart.cudaHostRegister(address, memory.size, 0))
    if error:
        log.warning("CUDA did not pin shared staging memory (cudaError %d): batches are "
                    "packed in threads", error)
        return False
    weakref.finalize(memory, cudart.cudaHostUnregister, address)
    return True


def new_slot(layout: StagingLayout, device: torch.device,
             stages: tuple[str, ...], shared: bool = False,
             blocking: bool = False) -> SlotState:
    """Allocate one slot's pinned host set (in shared memory when ``shared``, and CUDA
    pins it), device set, outputs and stage events (``blocking``: a host thread waiting
    on one sleeps instead of spinning a core, ``cudaEventBlockingSync``)."""
    rows, outputs = layout.max_rows, len(layout.spec.outputs)
    memory = None
    if shared:
        host, memory = shared_host(layout)
        if not pin_shared(memory):
            memory = None
    if memory is None:
        host = pinned_host(layout)
    on_device = allocate(layout, device)
    events = {f"{s}_{edge}": torch.cuda.Event(enable_timing=True, blocking=blocking)
              for s in stages for edge in ("start", "end")}
    return SlotState(host, on_device,
                     torch.zeros(rows, outputs, pin_memory=True),
                     torch.zeros(rows + 1, dtype=torch.int32, pin_memory=True),
                     torch.cuda.graph_pool_handle(), events=events, shared=memory,
                     host_tensors=as_tensors(host))


def copy_in(slot: SlotState, bucket: int, nnz: int, stream: torch.cuda.Stream | None,
            calls: TorchCalls = TORCH_CALLS) -> int:
    """Enqueue, through ``calls`` on ``stream`` (None: the current one), what a batch of
    ``bucket`` rows and ``nnz`` ids uses of the slot's host set: the block (rows, requests,
    bag bounds, dense inputs and ids: one copy, see block_parts) and the weights, if any;
    bytes sent."""
    host, dev = slot.host_tensors, slot.device
    pairs = [(dev.block, host.block, dev.bucket(bucket).copy_bytes(nnz))]
    if dev.weights is not None:
        pairs.append((dev.weights, host.weights, nnz))
    return sum(calls.copy(device_buf[:n], host_buf[:n], stream)
               for device_buf, host_buf, n in pairs if n)


def device_step(model: GpuModel, slot: SlotState, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device work of one batch on the slot's device buffers (what a graph captures)."""
    from recserve.kernels.prepare import PreparedBatch

    dev, r_cap = slot.device, bucket + 1
    views = dev.bucket(bucket)
    weights = None if dev.weights is None else dev.weights[:views.ids.shape[0]]  # (as long)
    groups = [(views.ids, starts, ends, weights) for starts, ends in views.groups]
    prepared = PreparedBatch(bucket, r_cap, views.row_request, views.request_offsets,
                             views.first_rows, views.dense, tuple(groups), views.bad_flags)
    return model.triton.forward_prepared(prepared)


def outputs_step(model: GpuModel, slot: SlotState, bucket: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``device_step``, then the scores and bad-id flags of every row of the bucket out to
    the slot's pinned outputs (fixed sizes), on the current stream: what a graph captures
    with ``GpuExecutor(graph_outputs=True)``."""
    scores, bad = device_step(model, slot, bucket)
    slot.scores_out[:bucket].copy_(scores[:bucket], non_blocking=True)
    slot.bad_out[:bucket + 1].copy_(bad[:bucket + 1], non_blocking=True)
    return scores, bad


def batch_step(model: GpuModel, slot: SlotState, bucket: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``outputs_step`` after the batch's copy in at a fixed size (what a whole-batch graph
    captures, ``GpuExecutor(graph_copies=True)``): the block up to the end of the bucket's
    whole ids room (and as many weights), on the current stream."""
    copy_in(slot, bucket, slot.device.bucket(bucket).ids.shape[0], None)  # (current stream)
    return outputs_step(model, slot, bucket)


def capture(step, pool, device: torch.device):
    """``step`` warmed up (autotuning its kernels), captured and replayed once: (graph,
    scores, bad). A graph's first launch also uploads it to the device; doing that here
    keeps it out of the first request that lands in this slot and bucket."""
    from recserve.kernels.model import capture_graph

    graph, (scores, bad) = capture_graph(step, pool=pool, device=device)
    graph.replay()
    return graph, scores, bad
