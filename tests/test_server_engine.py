"""The server over the batching engine (EngineBackend, CPU executor): same answers and
error codes as over the reference backend, with many requests batched together."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from server_fixtures import (
    RawConnection,
    ServerThread,
    loaded,
    multi_spec,
    reference_scores,
    small_spec,
    wait_for,
)

from recserve.engine.demo import random_inputs, to_wire
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.settings import EngineSettings
from recserve.server import AsyncClient, NotFound
from recserve.server.backend import EngineBackend

SMALL = loaded(small_spec(), version=4, seed=11)
MULTI = loaded(multi_spec(), version=1, seed=12)


@pytest.fixture(scope="module")
def server():
    settings = EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=1)
    engine = Engine(settings, lambda s: CpuExecutor(s, torch_threads=1))
    backend = EngineBackend(engine)

    async def setup():
        await engine.start()
        await backend.load(SMALL)
        await backend.load(MULTI)

    thread = ServerThread(backend, loop="uvloop", setup=setup, max_candidates=64)
    yield thread
    thread.stop()


def wire(model, n, seed):
    inputs = random_inputs(model.spec, np.random.default_rng(seed), n)
    return inputs, to_wire(model.spec, inputs)


def test_pipelined_requests_through_the_engine_match_the_reference(server):
    requests = [(SMALL if i % 3 else MULTI, 1 + (i * 7) % 40, i) for i in range(30)]

    async def go():
        async with await AsyncClient.connect(server.host, server.port) as client:
            return await asyncio.gather(*(client.infer(m.spec.name, wire(m, n, s)[1])
                                          for m, n, s in requests))

    results = asyncio.run(go())
    for (model, n, seed), scores in zip(requests, results, strict=True):
        expected = reference_scores(model, wire(model, n, seed)[0])
        assert scores.shape == expected.shape
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_engine_refusals_arrive_as_wire_codes(server):
    async def go():
        async with await AsyncClient.connect(server.host, server.port) as client:
            with pytest.raises(NotFound, match="version 9"):
                await client.infer("small", wire(SMALL, 2, 0)[1], version=9)
            models = await client.models()
            assert [(m["name"], m["version"]) for m in models] == [("multi", 1), ("small", 4)]

    asyncio.run(go())
    conn = RawConnection(server.port)
    conn.send({"id": 1, "op": "infer", "model": "small", "candidates": 65, "inputs": {}})
    assert conn.receive()["error"]["code"] == "too_large"
    conn.close()


def test_priority_on_the_wire_orders_queued_requests():
    """Requests queued behind a running batch go into batches by their ``priority``: high,
    then normal (the default), then low, whatever order they arrived in."""
    gate = threading.Event()
    engine, thread = gated_server(gate, max_queued_rows=65536)
    try:
        conn = RawConnection(thread.port)
        _, inputs = wire(SMALL, 16, 0)  # 16 rows: each request is a batch of its own
        order = [("first", None), ("low", "low"), ("default", None), ("high", "high"),
                 ("normal", "normal")]
        for i, (_, priority) in enumerate(order):
            message = {"id": i, "op": "infer", "model": "small", "candidates": 16,
                       "inputs": inputs}
            if priority is not None:
                message["priority"] = priority
            conn.send(message)
            if i == 0:  # the first one runs (held at the gate); the rest queue behind it
                assert wait_for(lambda: engine.pending_requests == 1)
        assert wait_for(lambda: engine.queued_rows == 64)
        gate.set()
        answered = [conn.receive() for _ in order]
        conn.close()
    finally:
        gate.set()
        thread.stop()
    assert all(a["ok"] for a in answered)
    assert [order[a["id"]][0] for a in answered] == ["first", "high", "default", "normal",
                                                     "low"]


def gated_server(gate: threading.Event, max_queued_rows: int) -> tuple[Engine, ServerThread]:
    """A server over an engine of 16-row batches, one slot, strict priority, whose every
    batch waits at ``gate`` before its forward."""
    settings = EngineSettings(max_batch_rows=16, buckets=(16,), slots=1,
                              max_queued_rows=max_queued_rows, aging_s=None)
    engine = Engine(settings, lambda s: CpuExecutor(s, torch_threads=1,
                                                    fault=lambda batch: gate.wait(10)))

    async def start() -> None:
        await engine.start()
        await EngineBackend(engine).load(SMALL)

    return engine, ServerThread(EngineBackend(engine), setup=start, max_candidates=16)


def test_a_full_queue_refuses_before_reading_the_inputs():
    """With no room in the engine's queue for a request's rows at its priority, the server
    answers ``overloaded`` before validating its inputs (a refusal costs no validation);
    a request that has room is validated as usual."""
    gate = threading.Event()
    engine, thread = gated_server(gate, max_queued_rows=32)
    try:
        conn = RawConnection(thread.port)
        _, inputs = wire(SMALL, 16, 0)
        for i in range(3):  # one runs (held at the gate), two fill the queue's 32 rows
            conn.send({"id": i, "op": "infer", "model": "small", "candidates": 16,
                       "inputs": inputs})
            assert wait_for(lambda want=i + 1: engine.pending_requests == want)
        codes = {}
        for rid, priority in ((10, "normal"), (11, "low"), (12, "high")):
            conn.send({"id": rid, "op": "infer", "model": "small", "candidates": 2,
                       "inputs": {"bogus": 1}, "priority": priority})
            answer = conn.receive()
            codes[priority] = (answer["error"]["code"], answer["error"]["message"])
        gate.set()
        assert all(conn.receive()["ok"] for _ in range(3))
        conn.send({"id": 20, "op": "stats"})
        counted = {(r["priority"], r["code"]): r["count"]
                   for r in conn.receive()["stats"]["server"]["priorities"]}
        conn.close()
    finally:
        gate.set()
        thread.stop()
    # the server counts infer answers by priority (no priority sent: normal)
    assert counted == {("normal", "ok"): 3, ("normal", "overloaded"): 1,
                       ("low", "overloaded"): 1, ("high", "bad_request"): 1}
    assert codes["normal"][0] == codes["low"][0] == "overloaded"
    assert "no room for 2 rows at normal priority" in codes["normal"][1]
    assert codes["high"][0] == "bad_request"  # high may queue past the bound: validated
