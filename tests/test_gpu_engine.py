"""The engine on a GPU: GpuExecutor against the reference model (run with -m gpu)."""

import asyncio

import numpy as np
import pytest

from recserve.engine.demo import demo_spec, random_inputs
from recserve.engine.engine import Engine
from recserve.engine.inputs import SparseInput, collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.scheduler import EngineError
from recserve.engine.settings import EngineSettings
from recserve.engine.weights import init_weights

pytestmark = pytest.mark.gpu

SETTINGS = EngineSettings(max_batch_rows=1024, buckets=(128, 512, 1024), slots=3)


def gpu_engine(**options) -> tuple[Engine, list]:
    """An engine on GpuExecutor(**options), and the list its executor lands in."""
    from recserve.engine.gpu_executor import GpuExecutor

    executors = []

    def factory(settings):
        executors.append(GpuExecutor(settings, "cuda", **options))
        return executors[-1]

    return Engine(SETTINGS, factory), executors


def requests_with_a_bad_id(spec, rng, bad: int) -> list:
    """24 demo requests (1..699 candidates); request ``bad`` has one title id past the end
    of its table."""
    requests = [random_inputs(spec, rng, int(n)) for n in rng.integers(1, 700, 24)]
    titles = requests[bad].sparse["title_id"]
    values = titles.values.copy()
    values[0] = spec.table("titles").rows  # one past the end
    requests[bad].sparse["title_id"] = SparseInput(values, titles.lengths)
    return requests


ENGINE_OPTIONS = [
    {}, {"use_graphs": False}, {"compute_streams": 2}, {"slot_streams": True},
    {"use_graphs": False, "slot_streams": True}, {"slot_streams": True, "graph_copies": True},
    # the default copies the outputs in the graphs; these on the copy-out stream
    {"graph_outputs": False}, {"compute_streams": 2, "graph_outputs": False},
    # the CUDA calls through torch (the default goes to the driver: cuda_driver)
    {"keep_gil": False}, {"keep_gil": False, "use_graphs": False},
    {"keep_gil": False, "compute_streams": 2, "graph_outputs": True},
    {"keep_gil": False, "slot_streams": True, "graph_copies": True},
]


@pytest.mark.parametrize("options", ENGINE_OPTIONS,
                         ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_engine_on_gpu_matches_reference_and_isolates_bad_ids(options):
    spec = demo_spec()
    weights = init_weights(spec, seed=4)
    rng = np.random.default_rng(0)
    requests = requests_with_a_bad_id(spec, rng, 5)
    reference = ReferenceModel(spec, weights)
    engine, executors = gpu_engine(**options)

    async def run():
        async with engine:
            await engine.load("demo", 1, spec, weights)
            footprint = engine.handle("demo", 1).device_bytes
            return footprint, await asyncio.gather(*(engine.score("demo", r) for r in requests),
                                                   return_exceptions=True)

    footprint, results = asyncio.run(run())
    # the slots' graphs live in private pools: new device memory, counted (and logged)
    assert footprint.keys() == {"weights", "slots"} and footprint["slots"] > 0
    # keep_gil (the default) must not have fallen back to torch's calls (libcuda is on
    # every GPU host)
    assert executors[0].stats()["issue_calls"] == ("driver" if options.get("keep_gil", True)
                                                  else "torch")
    assert isinstance(results[5], EngineError) and results[5].code == "bad_request"
    assert "title_id" in results[5].message
    for i, (req, got) in enumerate(zip(requests, results, strict=True)):
        if i == 5:
            continue
        want = reference.forward(collate(spec, [req]))[:, 0].numpy()
        # bf16 weights and activations on the GPU against the fp32 reference.
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)
        assert np.abs(got - want).mean() < 5e-3


@pytest.mark.parametrize("compute_streams, slot_streams, outputs, keep_gil",
                         [(1, False, False, True), (2, False, False, True),
                          (1, True, False, True), (1, False, True, True),
                          (1, False, False, False)])
def test_timeline_orders_each_batch_copy_in_compute_copy_out(compute_streams, slot_streams,
                                                             outputs, keep_gil):
    from recserve.engine.gpu_executor import GpuExecutor

    spec = demo_spec()
    weights = init_weights(spec, seed=1)
    rng = np.random.default_rng(2)
    requests = [random_inputs(spec, rng, 1024) for _ in range(24)]
    executors = []

    def factory(settings):
        executor = GpuExecutor(settings, "cuda", compute_streams=compute_streams,
                               slot_streams=slot_streams, graph_outputs=outputs,
                               keep_gil=keep_gil)
        executor.timeline_limit = 1000
        executors.append(executor)
        return executor

    async def run():
        async with Engine(SETTINGS, factory) as engine:
            await engine.load("demo", 1, spec, weights)
            await asyncio.gather(*(engine.score("demo", r) for r in requests))

    asyncio.run(run())
    timeline = executors[0].timeline
    stages = {(seq, stage): (start, end) for seq, stage, start, end in timeline}
    seqs = sorted({seq for seq, _ in stages})
    assert len(seqs) >= 20
    slack = 1e-3  # ms: event timestamps have microsecond resolution
    for seq in seqs:
        h2d, compute = stages[(seq, "h2d")], stages[(seq, "compute")]
        assert h2d[0] <= h2d[1] + slack and compute[0] <= compute[1] + slack
        assert h2d[1] <= compute[0] + slack, (seq, h2d, compute)
        if outputs:  # (the copy out is inside the compute span's graph)
            assert (seq, "d2h") not in stages
        else:
            d2h = stages[(seq, "d2h")]
            assert compute[1] <= d2h[0] + slack, (seq, compute, d2h)
        host = [stages[(seq, s)] for s in ("host_queue", "host_pack", "host_issue",
                                           "host_wait", "host_resolve")]
        for (start, end), (next_start, _) in zip(host[:-1], host[1:], strict=True):  # in order
            assert start <= end <= next_start + slack, (seq, host)
    assert executors[0].busy_ms > 0 and executors[0].bytes_in > 0
    computes = [stages[(seq, "compute")] for seq in seqs]
    longest = max(end - start for start, end in computes)
    span = max(end for _, end in computes) - min(start for start, _ in computes)
    # busy time is the union of the compute spans: never less than one, never more than all
    assert longest - slack <= executors[0].busy_ms <= span + slack
    # How much copying overlapped compute is a measurement: bench/engine.py reports it.


@pytest.mark.parametrize("keep_gil", [False, True])
def test_ring_requests_packed_in_processes_score_as_the_reference(keep_gil):
    """Requests in a worker's ring, through the hub (which leaves their decoding to the
    packing processes), packed into shared staging memory CUDA pinned: the reference's
    scores; a bad id, and bag bounds past a request's ids (a worker's bug the packing
    process refuses), each fail their own request alone."""
    import dataclasses

    from recserve.engine.flat import with_flat
    from recserve.engine.gpu_executor import GpuExecutor
    from recserve.engine.shared_memory import SharedMemory
    from recserve.server import channel
    from recserve.server.backend import EngineBackend
    from recserve.server.config import ServerConfig
    from recserve.server.hub import EngineSide, Hub
    from recserve.server.shared_ring import SharedRing, map_memory

    spec = demo_spec()
    weights = init_weights(spec, seed=4)
    rng = np.random.default_rng(7)
    requests = requests_with_a_bad_id(spec, rng, 3)
    last = with_flat(spec, requests[-1])
    bounds = last.flat.bounds.copy()
    bounds[-1] += 1
    broken = dataclasses.replace(last, flat=dataclasses.replace(last.flat, bounds=bounds))
    ring = SharedMemory(64 << 20, writable=False)
    writer = SharedRing(map_memory(ring.fd, ring.size, writable=True))

    class Side:  # a worker's channel end as the hub sees it, keeping the replies
        index, release = 0, EngineSide.release

        def __init__(self):
            self.ring, self.running, self.holding, self.replies = ring, {}, set(), {}

        def send_soon(self, data):
            if data[4:5] == b"R":
                reply = channel.decode_reply(memoryview(data)[4:])
                self.replies[reply.rid] = reply

    async def run():
        engine = Engine(SETTINGS, lambda s: GpuExecutor(s, "cuda", pack_processes=True,
                                                        keep_gil=keep_gil))
        async with engine:
            await engine.load("demo", 1, spec, weights)
            pinned = all(slot.shared is not None for slot in engine.handle("demo", 1).slots)
            hub = Hub(EngineBackend(engine), ServerConfig(), 2, defer_ring_decode=True)
            side = Side()
            for rid, r in enumerate(requests + [broken]):
                frame, data_at = channel.encode_score(rid, "demo", 1, r, None, spec,
                                                      ring=writer)
                assert data_at is not None
                hub.score(side, memoryview(bytearray(frame[4:])))
            while len(side.replies) < len(requests) + 1:
                await asyncio.sleep(0.01)
            return pinned, engine.stats()["executor"], side.replies

    pinned, stats, replies = asyncio.run(run())
    assert pinned  # CUDA registered every slot's shared staging memory
    assert stats["issue_calls"] == ("driver" if keep_gil else "torch")
    assert stats["packed_in_processes"] > 0 and stats["packing_process_restarts"] == 0
    assert replies[3].error is not None and replies[3].error["code"] == "bad_request"
    malformed = replies[len(requests)].error
    assert malformed is not None and "malformed sparse inputs" in malformed["message"]
    reference = ReferenceModel(spec, weights)
    for rid, req in enumerate(requests):
        if rid == 3:
            continue
        want = reference.forward(collate(spec, [req]))[:, 0].numpy()
        np.testing.assert_allclose(replies[rid].scores.reshape(-1), want, atol=2e-2, rtol=0)
