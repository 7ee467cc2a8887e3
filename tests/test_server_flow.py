"""Many requests on one connection: out-of-order answers by id, backpressure, admission,
deadlines, backend failures. A controlled backend decides when each request finishes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_fixtures import (
    LOOPS,
    RawConnection,
    ServerThread,
    loaded,
    reference_scores,
    small_spec,
)

from recserve.engine.demo import random_inputs, to_wire
from recserve.server import AsyncClient, DeadlineExceeded, InternalError, Overloaded
from recserve.server.backend import ReferenceBackend
from recserve.server.codec import encode_message

MODEL = loaded(small_spec(), seed=5)


@pytest.fixture(params=LOOPS)
def loop(request):
    return request.param


class ControlledBackend:
    """ReferenceBackend whose requests finish in a set order of N, or wait, or fail.

    ``order``: request sizes N in the order they may finish; ``held``: sizes that wait
    for ``release()``; ``failing``: sizes that raise.
    """

    def __init__(self, order=(), held=(), failing=(), truncating=()):
        self.inner = ReferenceBackend([MODEL])
        self.order = list(order)
        self.held, self.failing = set(held), set(failing)
        self.truncating = set(truncating)
        self._turn: asyncio.Condition | None = None
        self._release: asyncio.Event | None = None
        self.active = self.peak = 0

    def models(self):
        return self.inner.models()

    def resolve(self, name, version):
        return self.inner.resolve(name, version)

    async def score(self, model, version, inputs, deadline=None, priority=None):
        n = inputs.num_candidates
        self._turn = self._turn or asyncio.Condition()
        self._release = self._release or asyncio.Event()
        if n in self.failing:
            raise RuntimeError(f"boom at {n}")
        self.active += 1
        self.peak = max(self.peak, self.active)
        if n in self.held:
            await self._release.wait()
        self.active -= 1
        if n in self.order:
            async with self._turn:
                await self._turn.wait_for(lambda: self.order[0] == n)
        scores = await self.inner.score(model, version, inputs, deadline)
        if n in self.order:
            async with self._turn:
                self.order.pop(0)
                self._turn.notify_all()
        return scores[:-1] if n in self.truncating else scores

    async def release(self):
        self._release = self._release or asyncio.Event()
        self._release.set()

    async def close(self):
        await self.inner.close()


def wire(n, seed=0):
    inputs = random_inputs(MODEL.spec, np.random.default_rng(seed), n)
    return inputs, to_wire(MODEL.spec, inputs)


def plain(inputs):
    return {k: ({kk: vv.tolist() for kk, vv in v.items()} if isinstance(v, dict)
                else v.tolist()) for k, v in inputs.items()}


def infer_message(rid, n, **extra):
    return {"id": rid, "op": "infer", "model": "small", "candidates": n,
            "inputs": plain(wire(n, seed=n)[1]), **extra}


def test_responses_come_back_in_completion_order_matched_by_id(loop):
    thread = ServerThread(ControlledBackend(order=[5, 3, 1, 4, 2]), loop=loop)
    try:
        conn = RawConnection(thread.port)
        # ids 10..14 carry N = 1..5; all are sent before any is answered.
        for n in range(1, 6):
            conn.send(infer_message(9 + n, n))
        responses = [conn.receive() for _ in range(5)]
        conn.close()
    finally:
        thread.stop()
    assert [r["id"] for r in responses] == [14, 12, 10, 13, 11]
    for r in responses:
        n = r["id"] - 9
        got = np.frombuffer(r["scores"]["data"], "<f4")
        np.testing.assert_allclose(got, reference_scores(MODEL, wire(n, seed=n)[0]),
                                   rtol=1e-5, atol=1e-6)


def test_async_client_pipelines_and_matches_out_of_order_answers(loop):
    thread = ServerThread(ControlledBackend(order=[6, 2, 4, 1, 5, 3]), loop=loop)

    async def go():
        async with await AsyncClient.connect(thread.host, thread.port) as client:
            calls = [client.infer("small", wire(n, seed=n)[1]) for n in range(1, 7)]
            return await asyncio.gather(*calls)

    try:
        results = asyncio.run(go())
    finally:
        thread.stop()
    for n, scores in enumerate(results, start=1):
        np.testing.assert_allclose(scores, reference_scores(MODEL, wire(n, seed=n)[0]),
                                   rtol=1e-5, atol=1e-6)


def test_reading_pauses_and_resumes_with_one_request_allowed_per_connection(loop):
    thread = ServerThread(ReferenceBackend([MODEL]), max_pending_per_connection=1, loop=loop)

    async def go():
        async with await AsyncClient.connect(thread.host, thread.port) as client:
            return await asyncio.gather(*(client.infer("small", wire(n % 4 + 1, seed=n)[1])
                                          for n in range(40)))

    try:
        results = asyncio.run(go())
    finally:
        thread.stop()
    for n, scores in enumerate(results):
        inputs = wire(n % 4 + 1, seed=n)[0]
        np.testing.assert_allclose(scores, reference_scores(MODEL, inputs), rtol=1e-5,
                                   atol=1e-6)


def test_a_connection_never_has_more_than_its_pending_limit_in_the_backend(loop):
    backend = ControlledBackend(held=[2])
    thread = ServerThread(backend, max_pending_per_connection=2, loop=loop)
    try:
        conn = RawConnection(thread.port)
        # Five held requests and a ping in one write: one chunk, so a server that
        # handled every frame it received would start all five.
        frames = [infer_message(rid, 2) for rid in range(1, 6)] + [{"id": 6, "op": "ping"}]
        conn.sock.sendall(b"".join(encode_message(f) for f in frames))
        other = RawConnection(thread.port)  # another connection is not held up
        other.send({"id": 1, "op": "ping"})
        assert other.receive()["ok"] is True
        other.close()
        assert thread.run(_peak_when_quiet(backend)) == 2
        thread.run(backend.release())
        ids = [conn.receive()["id"] for _ in range(6)]
        assert sorted(ids) == [1, 2, 3, 4, 5, 6]
        assert ids.index(6) >= 2  # the ping waited behind the backlog, as it must
        conn.close()
    finally:
        thread.stop()


async def _peak_when_quiet(backend):
    for _ in range(50):  # let the server run everything it is willing to run
        await asyncio.sleep(0.01)
    return backend.peak


def test_admission_limit_answers_overloaded_and_keeps_the_accepted_request(loop):
    backend = ControlledBackend(held=[2])
    thread = ServerThread(backend, max_in_flight=1, loop=loop)
    try:
        conn = RawConnection(thread.port)
        conn.send(infer_message(1, 2))  # held: occupies the only slot
        conn.send({"id": 2, "op": "ping"})  # pings are not admitted work
        assert conn.receive()["id"] == 2
        conn.send(infer_message(3, 3))
        refused = conn.receive()
        assert refused["id"] == 3 and refused["error"]["code"] == "overloaded"
        thread.run(backend.release())
        accepted = conn.receive()
        assert accepted["id"] == 1 and accepted["ok"] is True
        conn.send(infer_message(4, 3))  # the slot is free again
        assert conn.receive()["ok"] is True
        conn.close()
    finally:
        thread.stop()


def test_clients_raise_overloaded_deadline_and_internal_as_subclasses(loop):
    backend = ControlledBackend(held=[2], failing=[4], truncating=[5])
    thread = ServerThread(backend, max_in_flight=1, loop=loop)

    async def go():
        async with await AsyncClient.connect(thread.host, thread.port) as client:
            with pytest.raises(DeadlineExceeded, match="deadline_ms=20"):
                await client.infer("small", wire(2)[1], deadline_ms=20)
            held = asyncio.ensure_future(client.infer("small", wire(2)[1]))
            while client.in_flight < 1 or thread.server.dispatcher.in_flight < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await client.infer("small", wire(3)[1])
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(backend.release(),
                                                                       thread.loop))
            assert (await held).shape == (2,)
            with pytest.raises(InternalError, match="RuntimeError: boom at 4"):
                await client.infer("small", wire(4)[1])
            with pytest.raises(InternalError, match="scores of shape \\[4\\]; expected \\[5\\]"):
                await client.infer("small", wire(5)[1])
            assert (await client.infer("small", wire(3)[1])).shape == (3,)

    try:
        asyncio.run(go())
    finally:
        thread.stop()


def test_an_id_already_in_flight_is_refused_without_disturbing_the_first(loop):
    backend = ControlledBackend(held=[2])
    thread = ServerThread(backend, loop=loop)
    try:
        conn = RawConnection(thread.port)
        conn.send(infer_message(7, 2))
        conn.send(infer_message(7, 3))
        duplicate = conn.receive()
        assert duplicate["id"] == 7 and duplicate["error"]["code"] == "bad_request"
        assert "already in flight" in duplicate["error"]["message"]
        thread.run(backend.release())
        first = conn.receive()
        assert first["id"] == 7 and first["ok"] is True and first["scores"]["shape"] == [2]
        conn.close()
    finally:
        thread.stop()


def test_a_client_that_disconnects_mid_request_frees_its_slot(loop):
    backend = ControlledBackend(held=[2])
    thread = ServerThread(backend, max_in_flight=1, loop=loop)
    try:
        conn = RawConnection(thread.port)
        conn.send(infer_message(1, 2))
        conn.send({"id": 2, "op": "ping"})
        assert conn.receive()["id"] == 2  # the held request is in flight now
        conn.close()
        other = RawConnection(thread.port)
        for rid in range(100, 400):  # until the server has noticed the close
            other.send(infer_message(rid, 3))
            if other.receive()["ok"]:
                break
        else:
            pytest.fail("the disconnected client's request kept its admission slot")
        other.close()
    finally:
        thread.stop()
