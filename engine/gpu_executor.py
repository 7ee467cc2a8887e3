"""GPU executor: the only code that owns CUDA streams, events, pinned memory and graphs.

Per slot and model: pinned host staging and device buffers (allocated once, in
``build_model``) and one CUDA graph per batch bucket, captured after a warm-up that
also autotunes every kernel for that shape. A batch goes through three streams:

  launcher threads (``pack_threads``, default one per slot where cores allow): pack pieces
                   into the slot's pinned buffers (numpy views, no allocation), then issue
                   the stream work. With ``pack_processes`` a batch whose requests all lie
                   in a worker's shared ring is packed by the thread's packing process
                   (``packer``) into the slot's shared, CUDA-pinned staging memory, off this
                   process's GIL. The host bounds the engine on a GPU: a slot is held from
                   its pack to its scores' hand-back, and every CUDA call torch makes gives
                   the GIL up (bench/notes-engine.md; ``keep_gil``: the issue's calls go to
                   the driver and keep it, ``cuda_driver``).
  copy-in stream:  the batch block up to its last id (+ weights) -> device  -> event h2d
                   (the block holds the bad-id flags, zeroed: no kernel clears them)
  compute stream:  (waits h2d) replay the bucket's graph (fp32 dense inputs go straight
                   into the first bottom layer, which rounds them as it loads), which also copies
                   the scores and bad-id flags out to pinned memory (``graph_outputs``,
                   the default with graphs)                           -> event done
                   (``compute_streams`` > 1: batches take the compute streams in turn,
                   so one batch's gather, bound by memory, may run beside the previous
                   batch's GEMMs, bound by arithmetic; each slot has its own graphs and
                   buffers, so their replays share nothing but the weights)
  copy-out stream: (``graph_outputs=False`` or no graphs: waits compute) scores and
                   bad-id flags -> pinned                             -> event done
  completion thread: waits ``done`` (off the launcher), resolves the pieces, frees the slot
  (``slot_streams``: copy-in, compute and copy-out of a batch on its slot's own stream
  instead, without the events and waits between streams)

So while batch k computes, batch k+1 is being copied in and batch k-1's scores copied
out (at its graph's end, or on the copy-out stream); nothing on the hot path
synchronizes the device. A request whose ids fall outside a table is flagged by the
gather kernel and fails alone; an exception while launching (an out-of-memory, say)
re-runs the batch's pieces one by one without graphs.
"""

from __future__ import annotations

import functools
import gc
import logging
import queue
import threading
import time

import numpy as np
import torch

from . import shared_memory
from .cores import default_pack_threads
from .cuda_driver import TORCH_CALLS, TimedCalls, TorchCalls, issue_calls
from .demo import random_inputs
from .executor import Done, Executor, Job, JobResult, slice_rows
from .gpu_issue import issue_streams, issue_whole
from .gpu_results import piece_results, score_one_by_one
from .gpu_slots import (
    GpuModel,
    SlotState,
    batch_step,
    capture,
    copy_in,
    device_step,
    new_slot,
    outputs_step,
)
from .packer import PackerUnavailable, PackingProcess, PackingProcesses
from .progress import Progress
from .settings import EngineSettings
from .spec import ModelSpec
from .staging import PackedSizes, pack, staging_layout

log = logging.getLogger("recserve.engine")
_STAGES = ("h2d", "compute", "d2h")


class GpuExecutor(Executor):
    """Runs batch plans on one CUDA device with the fused Triton forward."""

    def __init__(self, settings: EngineSettings, device: str = "cuda", *,
                 use_graphs: bool = True, pack_threads: int | None = None,
                 compute_streams: int = 1, pack_processes: bool = False,
                 slot_streams: bool = False, graph_copies: bool = False,
                 graph_outputs: bool | None = None, blocking_wait: bool = False,
                 keep_gil: bool = True) -> None:
        if pack_threads is not None and pack_threads < 1:
            raise ValueError(f"pack_threads is {pack_threads}; expected at least 1")
        if not 1 <= compute_streams <= settings.slots:
            raise ValueError(f"compute_streams is {compute_streams}; expected 1 to the "
                             f"number of slots ({settings.slots})")
        if slot_streams and compute_streams != 1:
            raise ValueError("slot_streams gives each slot a stream of its own for its copies "
                             f"and compute; compute_streams ({compute_streams}) does not apply")
        if graph_copies and not (slot_streams and use_graphs):
            raise ValueError("graph_copies captures each batch's copies in its slot's graphs, "
                             "replayed on the slot's stream: it needs slot_streams and graphs")
        if graph_outputs is None:  # the default wherever the graphs can hold the copy out
            graph_outputs = use_graphs and not graph_copies
        if graph_outputs and (graph_copies or not use_graphs):
            raise ValueError("graph_outputs captures the copies out in the graphs: it needs "
                             "graphs, and graph_copies has them there already")
        self.compute_streams = compute_streams
        self.slot_streams = slot_streams
        """Each slot's batch runs its copies in, compute and copies out on the slot's own
        stream: no cross-stream event waits (three CUDA calls, GIL hand-offs, fewer a
        batch), and consecutive batches overlap as with ``compute_streams`` = slots."""
        self.graph_copies = graph_copies
        """Each slot's graphs hold the batch's copies in and out too (fixed sizes: the
        bucket's whole ids room), so a batch is one replay: three CUDA calls. The timeline
        then has one ``batch`` span per batch, and busy time includes the copies."""
        self.graph_outputs = graph_outputs
        """The graphs copy each batch's scores and flags out too (fixed sizes: the bucket's
        rows), on the compute stream; the copy-in stays apart, on its own stream, at the
        batch's size. 6 CUDA calls a batch instead of 10, each a GIL hand-off; the
        timeline's ``compute`` span then includes the copy out, and there is no ``d2h``.
        On by default with graphs: on the H200 (twelfth session) each call took 10-39 us,
        and issuing a batch took 0.19-0.22 ms with 6 against 0.27-0.33 with 10 in all five
        pairs of runs; samples/s were equal within the runs' spread (0.70-0.88 of the bare
        forward either way: packing bounds the engine there), and the simulated device
        at 25 us a call gains 0.18-0.25 once the host has room (bench/RESULTS.md). The
        scores are a few KB: a stream of their own buys nothing. ``graph_outputs=False``
        copies them out on the copy-out stream."""
        self._device_end = "d2h_end" if graph_copies or graph_outputs else "compute_end"
        self.blocking_wait = blocking_wait
        """The completion thread sleeps until a batch is done instead of spinning a core
        (CUDA spins in ``Event.synchronize`` by default while cores outnumber contexts):
        a core back, for some wake-up latency; to be measured (``engine_gpu.py``)."""
        self.keep_gil = keep_gil
        """The issue's CUDA calls go straight to the driver and keep the GIL
        (``cuda_driver``): no hand-off a call; falls back to torch's calls, with a warning,
        where the driver library does not load (``stats()["issue_calls"]`` says which).
        On by default: on the H200 (tenth session) it issued a batch in 0.22-0.26 ms
        against torch's 1.0-1.3 and kept the card busier in every paired run."""
        self._calls = TimedCalls(TORCH_CALLS)
        self.pack_processes = pack_processes and shared_memory.supported()
        """Each launcher thread has a packing process (``packer``) for batches whose
        requests lie in shared memory; their slots' staging is shared memory, pinned."""
        self._packing = PackingProcesses(0)
        self.settings = settings
        self.pack_threads = pack_threads or default_pack_threads(settings.slots)
        self.device = torch.device(device)
        if self.device.index is None:  # set_device and streams need an explicit index
            self.device = torch.device(self.device.type, 0)
        self.use_graphs = use_graphs
        self.timeline: list[tuple[int, str, float, float]] = []
        """(batch seq, stage, start ms, end ms) for the first ``timeline_limit`` entries:
        device stages (h2d, compute, d2h) from CUDA events, and host stages (host_queue:
        submitted -> a launcher takes it; host_pack; host_issue: stream work enqueued;
        host_wait: the completer waits for d2h; host_resolve: results handed back) from
        the host clock, both in ms since ``start`` (the two clocks agree to ~0.1 ms)."""
        self.timeline_limit = 0
        self.busy_ms = 0.0
        """Time the device spent computing (the union of the batches' compute spans)."""
        self._busy_until = 0.0
        self._issued = 0
        self.pack_ms = 0.0
        """Host time spent packing batches, summed over the packing threads."""
        self.batches = 0
        self.bytes_in = 0
        self._lock = threading.Lock()
        self._launch_lock = threading.Lock()  # stream work is issued one batch at a time
        # one model build at a time: its kernels tune without another build's launches on
        # the card, and the device memory it reserves is its own (``build_model``)
        self._build_lock = threading.Lock()
        self._free: list[int] = []
        self._launch_q: queue.SimpleQueue = queue.SimpleQueue()
        self._done_q: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Create the streams and start the launcher and completion threads."""
        if self._threads:
            return
        self._open_device()
        self._calls = TimedCalls(self._issue_calls())
        self._host_origin = time.perf_counter()
        self._free = list(range(self.settings.slots))
        if self.pack_processes:
            self._packing = PackingProcesses(self.pack_threads)
            self._packing.start()
        targets = [(functools.partial(self._launcher, i), f"launch-{i}")
                   for i in range(self.pack_threads)]
        for target, name in [*targets, (self._completer, "complete")]:
            thread = threading.Thread(target=target, name=f"recserve-gpu-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _open_device(self) -> None:
        """Streams and the timeline's origin event (the only device state besides models)."""
        self._bind_thread()
        self._streams = {s: torch.cuda.Stream(self.device) for s in ("h2d", "d2h")}
        self._compute = [torch.cuda.Stream(self.device) for _ in range(self.compute_streams)]
        self._per_slot = [torch.cuda.Stream(self.device) for _ in range(self.settings.slots)] \
            if self.slot_streams else []
        self._origin = torch.cuda.Event(enable_timing=True)
        self._origin.record()

    def _issue_calls(self) -> TorchCalls:
        """What makes the issue's CUDA calls: the driver's, keeping the GIL, or torch's."""
        return issue_calls(self.keep_gil)

    def _bind_thread(self) -> None:
        """Make this executor's device current on the calling thread."""
        torch.cuda.set_device(self.device)

    def _wait_done(self, slot: SlotState) -> None:
        """Block the completion thread until the slot's batch has been copied back."""
        slot.events["d2h_end"].synchronize()

    def build_model(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> GpuModel:
        """Upload weights, allocate every slot's buffers, warm up and capture the graphs;
        log (and keep in ``device_bytes``) the device memory the weights and the slots took.
        The count is of the device's reserved memory before and after, so another model
        running batches without graphs (``use_graphs=False``: its activations come from the
        shared pool) while this one loads can move it by that batch's activations."""
        with self._build_lock:
            torch.cuda.set_device(self.device)  # runs on a loader thread
            # Unreachable objects still holding device memory (a closed engine's slots and
            # graphs, in reference cycles) would otherwise be freed by a collection during
            # the build and count against this model (the likely cause of the -16 MiB of
            # slots the H200's GPU test once counted, right after another engine's test).
            gc.collect()
            torch.cuda.empty_cache()  # (cached blocks nobody holds: not this model's)
            start = torch.cuda.memory_reserved(self.device)
            model, with_weights = self._build(spec, weights)
            torch.cuda.empty_cache()  # (tuning's scratch: only what the model holds stays)
            model.device_bytes = {"weights": with_weights - start,
                                  "slots": torch.cuda.memory_reserved(self.device)
                                  - with_weights}
        mib, slots = model.device_bytes, len(model.slots)
        log.info("%s on %s: %.0f MiB of device memory for weights, %.0f MiB for %d slots "
                 "(%.0f MiB a slot: staging, activations and a CUDA graph per bucket; "
                 "--slots sets how many)", spec.name, self.device, mib["weights"] / 2**20,
                 mib["slots"] / 2**20, slots, mib["slots"] / 2**20 / slots)
        return model

    def _build(self, spec: ModelSpec, weights: dict[str, torch.Tensor]
               ) -> tuple[GpuModel, int]:
        """The model (see ``build_model``) and the device memory reserved once its weights
        were uploaded."""
        from recserve.kernels.model import TritonModel

        triton_model = TritonModel(spec, weights, self.device)
        torch.cuda.empty_cache()  # (the upload's temporaries: only the weights stay)
        weights_reserved = torch.cuda.memory_reserved(self.device)
        layout = staging_layout(spec, [names for _, _, names in triton_model.groups],
                                self.settings.max_batch_rows, triton_model.layout.x_request)
        slots = [new_slot(layout, self.device, _STAGES, self.pack_processes,
                          self.blocking_wait) for _ in range(self.settings.slots)]
        model = GpuModel(spec, triton_model, layout, slots)
        rng = np.random.default_rng(0)
        progress = Progress(f"building {spec.name} on {self.device} (a CUDA graph per slot "
                            "and bucket; the first ones autotune their kernels)",
                            len(slots) * len(self.settings.buckets))
        for index, slot in enumerate(slots):
            for bucket in self.settings.buckets:
                sizes = pack(layout, slot.host, [random_inputs(spec, rng, bucket)], bucket)
                copy_in(slot, bucket, sizes.nnz, torch.cuda.current_stream(self.device))
                if self.use_graphs:
                    step = functools.partial(
                        batch_step if self.graph_copies else
                        outputs_step if self.graph_outputs else device_step, model, slot, bucket)
                    slot.graphs[bucket] = capture(step, slot.pool, self.device)
                else:
                    device_step(model, slot, bucket)
                progress.step(f"slot {index + 1}, bucket {bucket}")
        torch.cuda.synchronize(self.device)
        return model, weights_reserved

    def free_slots(self) -> int:
        """Slots not holding a job."""
        with self._lock:
            return len(self._free)

    def submit(self, job: Job, done: Done) -> None:
        """Claim a slot and queue ``job`` for the launcher thread (never blocks)."""
        with self._lock:
            if not self._free:
                raise RuntimeError(f"all {self.settings.slots} slots are busy")
            slot = self._free.pop()
        self._launch_q.put((job, slot, done, self._now_ms()))

    def close(self) -> None:
        """Finish queued jobs, then stop both threads."""
        if not self._threads:
            return
        *launchers, completer = self._threads
        for _ in launchers:
            self._launch_q.put(None)
        for thread in launchers:
            thread.join()
        self._done_q.put(None)
        completer.join()
        self._threads.clear()
        self._packing.close()

    def stats(self) -> dict:
        """Counters: batches run, GPU busy time from CUDA events, bytes copied in, and the
        host's packing time (its threads' sum: near ``pack_threads`` x wall time, the host
        is what bounds the engine)."""
        stats = {"batches": self.batches, "gpu_busy_ms": self.busy_ms,
                 "bytes_in": self.bytes_in, "pack_ms": self.pack_ms,
                 "pack_threads": self.pack_threads, "compute_streams": self.compute_streams,
                 "issue_calls": self._calls.name, "issue_call_us": self._calls.mean_us()}
        return {**stats, **self._packing.stats()}

    def _launcher(self, index: int) -> None:
        self._bind_thread()
        self._calls.bind_thread(self.device.index)
        packer = self._packing.processes[index] if self._packing.processes else None
        while (item := self._launch_q.get()) is not None:
            job, slot_index, done, submitted = item
            self._host_stage(job.plan.seq, "host_queue", submitted)
            try:
                self._launch(job, slot_index, done, packer)
            except Exception as exc:  # OOM or a bug: isolate per piece, keep serving
                self._release(slot_index)
                done(JobResult(job, score_one_by_one(job, exc)))

    def _launch(self, job: Job, slot_index: int, done: Done,
                packer: PackingProcess | None = None) -> None:
        model: GpuModel = job.model
        slot = model.slots[slot_index]
        plan = job.plan
        started = self._now_ms()
        sizes = self._pack(model, slot_index, job, packer)
        packed = self._host_stage(plan.seq, "host_pack", started)
        with self._lock:
            self.pack_ms += packed - started
        with self._launch_lock:  # the completion queue stays in stream order
            self._issue(model, slot, plan, sizes, slot_index)
            self._host_stage(plan.seq, "host_issue", packed)
            self._done_q.put((job, slot_index, sizes, done))

    def _pack(self, model: GpuModel, slot_index: int, job: Job,
              packer: PackingProcess | None) -> PackedSizes:
        """Pack the job's pieces into the slot's host staging: in the packing process when
        every request lies in shared memory (and it can), else in this thread."""
        plan = job.plan
        if packer is not None and model.packed is not None \
                and all(inputs.shared is not None for inputs in job.inputs):
            try:
                return packer.pack(model.packed, slot_index, plan.bucket,
                                   [(inputs.shared, p.start, p.count)
                                    for p, inputs in zip(plan.pieces, job.inputs, strict=True)])
            except PackerUnavailable:
                pass
        pieces = [slice_rows(model.spec, inputs, p.start, p.count)
                  for p, inputs in zip(plan.pieces, job.inputs, strict=True)]
        return pack(model.layout, model.slots[slot_index].host, pieces, plan.bucket)

    def _issue(self, model: GpuModel, slot: SlotState, plan, sizes: PackedSizes,
               slot_index: int) -> None:
        """Enqueue one packed batch's device work (``gpu_issue``) on the copy-in, compute
        and copy-out streams, or on the slot's own (``slot_streams``, ``graph_copies``)."""
        slot.timed = len(self.timeline) < self.timeline_limit  # (its events, recorded)
        if self.graph_copies:
            self.bytes_in += issue_whole(slot, plan.bucket, self._per_slot[slot_index],
                                         self._calls)
            return
        if self._per_slot:
            h2d = compute = out = self._per_slot[slot_index]
        else:
            h2d, out = self._streams["h2d"], self._streams["d2h"]
            compute = self._compute[self._issued % len(self._compute)]  # in turn (launch lock)
            self._issued += 1
        self.bytes_in += issue_streams(model, slot, sizes, h2d, compute, out,
                                       self.graph_outputs, self._calls)

    def _completer(self) -> None:
        while (item := self._done_q.get()) is not None:
            job, slot_index, sizes, done = item
            model: GpuModel = job.model
            slot = model.slots[slot_index]
            waiting = self._now_ms()
            self._wait_done(slot)  # this thread's only wait: the batch is done
            synced = self._host_stage(job.plan.seq, "host_wait", waiting)
            scores = slot.scores_out[:sizes.rows].numpy().copy()
            bad = slot.bad_out[:sizes.requests].numpy() != 0  # (a new array)
            self._account(job.plan.seq, slot)
            self._release(slot_index)
            done(JobResult(job, piece_results(job, scores, bad)))
            self._host_stage(job.plan.seq, "host_resolve", synced)

    def _account(self, seq: int, slot: SlotState) -> None:
        ev = slot.events
        start = self._origin.elapsed_time(ev["compute_start"])
        end = self._origin.elapsed_time(ev[self._device_end])
        # batches complete in issue order; with several compute streams their spans may
        # overlap, and only the time not already counted is busy time
        self.busy_ms += max(0.0, end - max(start, self._busy_until))
        self._busy_until = max(self._busy_until, end)
        self.batches += 1
        if not (slot.timed and len(self.timeline) < self.timeline_limit):
            return
        if self.graph_copies:
            self.timeline.append((seq, "batch", start, end))  # (copies and compute, one span)
        elif self.graph_outputs:  # (the copy out inside compute's span)
            self.timeline.append((seq, "h2d", self._origin.elapsed_time(ev["h2d_start"]),
                                  self._origin.elapsed_time(ev["h2d_end"])))
            self.timeline.append((seq, "compute", start, end))
        else:
            for stage in _STAGES:
                start = self._origin.elapsed_time(ev[f"{stage}_start"])
                end = self._origin.elapsed_time(ev[f"{stage}_end"])
                self.timeline.append((seq, stage, start, end))

    def _now_ms(self) -> float:
        return (time.perf_counter() - self._host_origin) * 1e3

    def _host_stage(self, seq: int, stage: str, start_ms: float) -> float:
        """Record host stage ``stage`` of batch ``seq`` from ``start_ms`` to now; now."""
        now = self._now_ms()
        if len(self.timeline) < self.timeline_limit:
            self.timeline.append((seq, stage, start_ms, now))
        return now

    def _release(self, slot_index: int) -> None:
        with self._lock:
            self._free.append(slot_index)
