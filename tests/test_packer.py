"""Packing processes (``recserve.engine.packer``): a batch whose requests lie in a worker's
shared ring, packed by another process into shared staging memory, must leave exactly the
bytes the thread's ``staging.pack`` leaves; a process that dies, hangs or refuses costs
that batch a pack in the thread, never a request."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from recserve.engine import packer as packer_module
from recserve.engine.demo import random_inputs
from recserve.engine.executor import slice_rows
from recserve.engine.gpu_slots import GpuModel, SlotState, shared_host
from recserve.engine.packer import PackError, PackerUnavailable, PackingProcess
from recserve.engine.shared_memory import SharedInputs, SharedMemory, supported
from recserve.engine.staging import host_buffers, pack, staging_layout
from recserve.kernels.layout import build_layout
from recserve.kernels.model import feature_groups
from recserve.server import channel
from recserve.server.shared_ring import SharedRing, map_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_staging import small_spec  # noqa: E402

pytestmark = pytest.mark.skipif(not supported(), reason="needs memfd_create (Linux)")
SPEC = small_spec("request")


def ring_requests(spec, sizes, seed=0, name="recserve"):
    """Requests written to a worker's ring as the worker does: (their SharedInputs, the
    engine side's decoded inputs)."""
    ring = SharedMemory(1 << 20, name, writable=False)
    writer = SharedRing(map_memory(ring.fd, ring.size, writable=True))
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        frame, data_at = channel.encode_score(1, spec.name, 1, random_inputs(spec, rng, n),
                                              None, spec, ring=writer)
        assert data_at is not None
        shared = SharedInputs(ring, bytes(frame[4:]), channel.decode_shared)
        out.append((shared, channel.decode_shared(shared.payload, ring.view, spec)))
    return ring, out


def model_with_shared_slots(spec, slots=2, max_rows=64):
    layout = staging_layout(spec, feature_groups(spec), max_rows, build_layout(spec).x_request)
    states = []
    for _ in range(slots):
        host, memory = shared_host(layout)
        states.append(SlotState(host, None, None, None, None, shared=memory))
    return GpuModel(spec, None, layout, states)


def used_bytes(host, sizes):
    """Every buffer prefix a batch of ``sizes`` uses (what is copied to the device)."""
    b = sizes.bucket
    views = host.bucket(b)
    parts = [views.row_request, views.request_offsets, views.first_rows, views.ids[:sizes.nnz],
             *(t for pair in views.groups for t in pair)]
    if views.dense is not None:
        parts.append(views.dense)
    if host.weights is not None:
        parts.append(host.weights[:sizes.nnz])
    return [p.tobytes() for p in parts]


@pytest.fixture
def process():
    p = PackingProcess()
    p.start()
    yield p
    p.close()


def test_a_packing_process_writes_the_bytes_the_thread_writes(process):
    ring, requests = ring_requests(SPEC, [5, 17, 1, 30, 9])
    model = model_with_shared_slots(SPEC)
    # a split request (rows 3..11 of the 17), whole ones, a piece at the batch's end
    plan = [(0, 0, 5), (1, 3, 9), (2, 0, 1), (3, 10, 20), (4, 0, 9)]
    pieces = [(requests[i][0], start, count) for i, start, count in plan]
    for slot in (1, 0, 1):  # the same process packs into either slot, again and again
        model.slots[slot].host.block.fill(0xF9)  # poison: it must write what is read
        sizes = process.pack(model.packed, slot, 64, pieces)
    thread_host = host_buffers(model.layout)
    expected = pack(model.layout, thread_host,
                    [slice_rows(SPEC, requests[i][1], start, count) for i, start, count in plan],
                    64)
    assert sizes == expected and sizes.rows == 44 and sizes.requests == 5
    assert used_bytes(model.slots[1].host, sizes) == used_bytes(thread_host, expected)
    assert process.packs == 3 and process.restarts == 0


def test_what_packing_refuses_is_a_pack_error_and_the_process_goes_on(process):
    _, requests = ring_requests(SPEC, [40, 40])
    model = model_with_shared_slots(SPEC)
    pieces = [(shared, 0, 40) for shared, _ in requests]
    with pytest.raises(PackError, match="do not fit bucket 64"):
        process.pack(model.packed, 0, 64, pieces)  # 80 rows in a 64-row bucket
    assert process.pack(model.packed, 0, 64, pieces[:1]).rows == 40
    assert process.restarts == 0


def test_no_process_to_be_had_means_packing_in_the_thread(process, monkeypatch):
    _, requests = ring_requests(SPEC, [7])
    model = model_with_shared_slots(SPEC)
    process.close()  # (as after a failure: the next pack starts one)

    def no_process(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(packer_module.subprocess, "Popen", no_process)
    with pytest.raises(PackerUnavailable, match="no packing process"):
        process.pack(model.packed, 0, 16, [(requests[0][0], 0, 7)])
    monkeypatch.undo()
    assert process.pack(model.packed, 0, 16, [(requests[0][0], 0, 7)]).rows == 7


def test_a_dead_process_costs_one_batch_and_another_starts(process):
    _, requests = ring_requests(SPEC, [7])
    model = model_with_shared_slots(SPEC)
    pieces = [(requests[0][0], 0, 7)]
    assert process.pack(model.packed, 0, 16, pieces).rows == 7
    process._proc.kill()
    process._proc.wait()
    with pytest.raises(PackerUnavailable):
        process.pack(model.packed, 0, 16, pieces)
    # the next batch starts another process, which is told every memory and model again
    assert process.pack(model.packed, 1, 16, pieces).rows == 7
    assert process.restarts == 1 and process.packs == 2


def test_a_hung_process_is_dropped_after_the_timeout(monkeypatch):
    monkeypatch.setattr(packer_module, "TIMEOUT_S", 0.5)
    process = PackingProcess()
    process.start()
    try:
        _, requests = ring_requests(SPEC, [7])
        model = model_with_shared_slots(SPEC)
        process._proc.send_signal(19)  # SIGSTOP: alive, answering nothing
        with pytest.raises(PackerUnavailable, match="timed out"):
            process.pack(model.packed, 0, 16, [(requests[0][0], 0, 7)])
        assert process._sock is None  # dropped (and killed); the next pack starts another
        assert process._proc.wait(5) != 0
        monkeypatch.undo()
        assert process.pack(model.packed, 0, 16, [(requests[0][0], 0, 7)]).rows == 7
        assert process.restarts == 1
    finally:
        process.close()


def test_a_plan_too_large_for_one_message_is_refused_without_losing_the_process(
        process, monkeypatch):
    _, requests = ring_requests(SPEC, [3] * 20)
    model = model_with_shared_slots(SPEC)
    pieces = [(shared, 0, 3) for shared, _ in requests]
    monkeypatch.setattr(packer_module, "MAX_MESSAGE", 1000)
    with pytest.raises(PackerUnavailable, match="bytes"):
        process.pack(model.packed, 0, 64, pieces)
    monkeypatch.undo()
    assert process.pack(model.packed, 0, 64, pieces).rows == 60
    assert process.restarts == 0


def test_memories_and_models_gone_are_forgotten(process):
    model = model_with_shared_slots(SPEC)
    ring, requests = ring_requests(SPEC, [4])
    process.pack(model.packed, 0, 16, [(requests[0][0], 0, 4)])
    ring_key, model_key = ring.key, model.packed.key
    assert ring_key in process._memories and model_key in process._models
    del ring, requests, model
    other = model_with_shared_slots(SPEC)
    _, more = ring_requests(SPEC, [4], seed=1)
    process.pack(other.packed, 0, 16, [(more[0][0], 0, 4)])
    assert ring_key not in process._memories and model_key not in process._models


def test_the_executor_packs_ring_requests_in_its_processes_and_others_in_threads():
    """Through the hub with the device simulated (bench/engine_host.py): ring requests go
    to the packing processes; requests that are not in a ring still pack in the thread."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import engine_host

    from recserve.engine.engine import Engine
    from recserve.engine.settings import EngineSettings

    rng = np.random.default_rng(4)
    requests = [random_inputs(SPEC, rng, int(n)) for n in rng.integers(1, 90, 30)]
    frames = engine_host.worker_frames(SPEC, requests, shared=True)
    settings = EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=2,
                              max_queued_rows=100_000, aging_s=None)
    executors = []

    def factory(s):
        executors.append(engine_host.SimulatedGpuExecutor(s, 0.1, 2, pack_processes=True))
        return executors[-1]

    async def main():
        async with Engine(settings, factory) as engine:
            await engine.load(SPEC.name, 1, SPEC, {})
            await engine_host.through_hub(engine, requests, frames, 128)
            scores = await engine.score(SPEC.name, requests[0])  # in-process: a thread
            return scores, engine.stats()["executor"]

    scores, stats = asyncio.run(main())
    assert scores.shape[0] == requests[0].num_candidates
    assert stats["packed_in_processes"] >= -(-sum(r.num_candidates for r in requests) // 64)
    assert stats["packing_process_restarts"] == 0 and stats["packing_threads_given_up"] == 0
    assert executors[0].free_slots() == settings.slots
    assert all(p._proc is None for p in executors[0]._packing.processes)  # closed with it


def test_a_packing_process_does_not_load_torch():
    """Packing is numpy alone: a packing process that has read a model's layout and a ring
    request's decoder must not have pulled torch in (about 190 MB and a second of start-up
    per process; the GPU engine runs one per packing thread)."""
    import pickle
    import subprocess

    model = model_with_shared_slots(SPEC)
    message = pickle.dumps((model.layout, channel.decode_shared))
    code = ("import pickle, sys, recserve.engine.packer_process; "
            "pickle.loads(sys.stdin.buffer.read()); sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], input=message,
                          timeout=60).returncode == 0


def test_processes_failing_in_a_row_are_given_up_on(monkeypatch, caplog):
    """A process that cannot work (here: none can be started) is tried MAX_FAILURES times,
    then the thread packs every batch itself, saying so once."""
    _, requests = ring_requests(SPEC, [7])
    model = model_with_shared_slots(SPEC)
    process = PackingProcess()

    def no_process(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(packer_module.subprocess, "Popen", no_process)
    with caplog.at_level("ERROR", logger="recserve.engine"):
        for _ in range(packer_module.MAX_FAILURES + 2):
            with pytest.raises(PackerUnavailable):
                process.pack(model.packed, 0, 16, [(requests[0][0], 0, 7)])
    assert process.given_up and process.failures == packer_module.MAX_FAILURES
    assert caplog.text.count("failed in a row") == 1


def test_the_switch_interval_is_short_while_packing_processes_run_and_restored_after():
    from recserve.engine.packer import SWITCH_INTERVAL_S, PackingProcesses

    before = sys.getswitchinterval()
    group = PackingProcesses(1)
    group.start()
    try:
        assert sys.getswitchinterval() == min(before, SWITCH_INTERVAL_S)
        assert group.stats() == {"packed_in_processes": 0, "packing_process_restarts": 0,
                                 "packing_threads_given_up": 0}
    finally:
        group.close()
    assert sys.getswitchinterval() == before
    assert PackingProcesses(0).stats() == {}


def test_a_packing_process_ignores_the_signals_its_engine_handles(process):
    """Ctrl-C reaches the whole process group; a draining server must keep packing."""
    import signal

    _, requests = ring_requests(SPEC, [7])
    model = model_with_shared_slots(SPEC)
    pieces = [(requests[0][0], 0, 7)]
    process.pack(model.packed, 0, 16, pieces)  # (running: past its imports)
    process._proc.send_signal(signal.SIGINT)
    process._proc.send_signal(signal.SIGTERM)
    assert process.pack(model.packed, 0, 16, pieces).rows == 7
    assert process._proc.poll() is None and process.restarts == 0


def test_a_forgotten_ring_leaves_nothing_open_in_the_packing_process(process):
    """A ring the engine has dropped (a worker replaced, say) must be freed in the packing
    process too once it is told to forget it: no descriptor may keep it alive there."""
    model = model_with_shared_slots(SPEC)
    ring, requests = ring_requests(SPEC, [7], name="recserve-test-old-ring")
    process.pack(model.packed, 0, 16, [(requests[0][0], 0, 7)])
    fds = Path(f"/proc/{process._proc.pid}/fd")

    def old_ring_open() -> bool:
        return any("recserve-test-old-ring" in os.readlink(p) for p in fds.iterdir())

    assert old_ring_open()  # (mapped)
    del ring, requests
    _, more = ring_requests(SPEC, [7], seed=1)
    process.pack(model.packed, 0, 16, [(more[0][0], 0, 7)])  # (says: forget the old ring)
    assert not old_ring_open()
