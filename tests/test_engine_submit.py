"""Engine.submit / cancel (the callback face the server's engine process uses) and
backend.submit over both kinds of backend."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import numpy as np
import pytest
from server_fixtures import small_spec
from test_engine import SETTINGS, SPEC, expected, run, settle, started

from recserve.engine.demo import random_inputs
from recserve.engine.scheduler import EngineError, Priority
from recserve.server import backend as backend_module
from recserve.server import channel
from recserve.server.backend import EngineBackend, ModelHandle, ReferenceBackend, submit
from recserve.server.codec import FrameDecoder
from recserve.server.config import ServerConfig
from recserve.server.errors import Overloaded, TooLarge
from recserve.server.hub import EngineSide, Hub


def test_submit_answers_each_request_once_with_its_scores():
    async def main():
        engine, _, weights = await started()
        rng = np.random.default_rng(1)
        requests = [random_inputs(SPEC, rng, n) for n in (5, 70, 0, 12)]
        outcomes = {i: [] for i in range(len(requests))}
        done = asyncio.get_running_loop().create_future()

        def on_done(i, outcome):
            outcomes[i].append(outcome)
            if all(outcomes.values()) and not done.done():
                done.set_result(None)

        ids = [engine.submit("tiny", r, lambda o, i=i: on_done(i, o))
               for i, r in enumerate(requests)]
        await done
        await settle()  # a second call would land here
        await engine.close()
        return ids, requests, outcomes, weights["tiny"]

    ids, requests, outcomes, weights = run(main())
    assert ids[2] == 0 and len(set(ids)) == 4  # the empty request needs no id
    for i, inputs in enumerate(requests):
        (scores,) = outcomes[i]  # exactly once
        assert scores.shape == (inputs.num_candidates, 2)
        if inputs.num_candidates:
            np.testing.assert_allclose(scores, expected(SPEC, weights, inputs), rtol=1e-5,
                                       atol=1e-6)


def test_cancelled_requests_are_never_answered_and_refusals_raise_at_once():
    async def main():
        gate = threading.Event()
        engine, _, _ = await started(gate=gate)
        rng = np.random.default_rng(2)
        calls = []
        running = engine.submit("tiny", random_inputs(SPEC, rng, 64), calls.append)
        queued = engine.submit("tiny", random_inputs(SPEC, rng, 9), calls.append)
        await settle()
        assert engine.cancel(running) and engine.cancel(queued)
        assert not engine.cancel(queued)  # already gone
        with pytest.raises(EngineError) as refused:
            engine.submit("nope", random_inputs(SPEC, rng, 3), calls.append)
        gate.set()
        await engine.score("tiny", random_inputs(SPEC, rng, 4))  # the running batch is done
        await settle()
        counters = dict(engine.counters)
        await engine.close()
        return calls, refused.value, counters

    calls, refused, counters = run(main())
    assert calls == [] and counters["cancelled"] == 2
    assert refused.code == "not_found"


def test_a_failing_callback_costs_only_its_own_request():
    async def main():
        engine, _, _ = await started()
        rng = np.random.default_rng(3)

        def broken(outcome):
            raise RuntimeError("a caller's bug")

        engine.submit("tiny", random_inputs(SPEC, rng, 6), broken)
        scores = await engine.score("tiny", random_inputs(SPEC, rng, 6))  # same batch
        await engine.close()
        return scores

    assert run(main()).shape == (6, 2)


def backend_of(kind: str, engine, weights):
    """The engine behind the Backend interface, or the one-at-a-time reference backend."""
    if kind == "engine":
        return EngineBackend(engine)

    class Loaded:
        name, version, spec = "tiny", 1, SPEC
    Loaded.weights = weights["tiny"]
    return ReferenceBackend([Loaded()])


@pytest.mark.parametrize("kind", ["engine", "one_at_a_time"])
def test_backend_submit_gives_scores_or_wire_errors_and_cancels(kind):
    async def main():
        engine, _, weights = await started()
        backend = backend_of(kind, engine, weights)
        rng = np.random.default_rng(4)
        inputs = random_inputs(SPEC, rng, 8)
        released = []  # each request's inputs are released once, answered or cancelled
        got = asyncio.get_running_loop().create_future()
        submit(backend, "tiny", 1, inputs, None, got.set_result, lambda: released.append(1))
        scores = await got
        late = []  # a deadline long past: the backend answers with a wire error
        expired = asyncio.get_running_loop().create_future()
        try:
            submit(backend, "tiny", 1, inputs, 0.0, expired.set_result,
                   lambda: released.append(2))
            error = await expired
        except Exception as exc:  # (or refuses at once)
            error = exc
            released.append(2)
        cancel = submit(backend, "tiny", 1, inputs, None, late.append,
                        lambda: released.append(3))
        cancel()
        await until(lambda: len(released) == 3)
        await settle()
        if kind != "engine":
            await backend.close()
        await engine.close()
        assert sorted(released) == [1, 2, 3]
        return scores, error, late, weights["tiny"], inputs

    scores, error, late, weights, inputs = run(main())
    np.testing.assert_allclose(scores, expected(SPEC, weights, inputs), rtol=1e-5, atol=1e-6)
    assert getattr(error, "code", None) == "deadline_exceeded", error
    assert late == []
    assert not isinstance(error, EngineError)  # wire errors, not the engine's own


def test_engine_backend_submit_raises_wire_errors_for_refusals():
    async def main():
        engine, _, _ = await started()
        backend = EngineBackend(engine)
        await engine.close()  # closed: everything is refused with overloaded
        with pytest.raises(Overloaded):
            submit(backend, "tiny", 1, random_inputs(SPEC, np.random.default_rng(5), 3), None,
                   print)

    run(main())


class FakeSide:
    """A worker's channel end as the hub sees it (its state, and what it sends)."""

    index = 0

    def __init__(self, ring=None):
        self.ring, self.running, self.holding, self.sent = ring, {}, set(), []

    def send_soon(self, data):
        self.sent.append(data)

    release = EngineSide.release


@pytest.mark.parametrize("when", ["inside submit", "later"])
def test_hub_keeps_no_entry_for_an_answered_request(when):
    """The engine process's hub answers a worker's request through backend.submit; an
    answer given before submit returns (a deadline passing inside it) must not leave a
    cancel entry behind, and a later one must remove its entry."""
    spec = small_spec()
    inputs = random_inputs(spec, np.random.default_rng(6), 3)

    class Backend:
        def __init__(self):
            self.pending = []

        def models(self):
            return [ModelHandle(spec.name, 1, spec)]

        def resolve(self, name, version):
            return ModelHandle(spec.name, 1, spec)

        def submit(self, model, version, inputs, deadline, on_done, on_release, priority):
            self.priority = priority  # (as the worker sent it)
            if when == "inside submit":
                on_done(np.zeros(inputs.num_candidates, np.float32))
            else:
                self.pending.append(on_done)
            return lambda: None

    async def main():
        backend, side = Backend(), FakeSide()
        hub = Hub(backend, ServerConfig(), 2)
        frame, _ = channel.encode_score(7, spec.name, 1, inputs, None, spec,
                                        priority=Priority.LOW)
        (payload,) = FrameDecoder().feed(frame)
        hub.score(side, memoryview(payload))
        assert backend.priority is Priority.LOW
        waiting = dict(side.running)
        for on_done in backend.pending:
            on_done(np.ones(inputs.num_candidates, np.float32))
        return waiting, dict(side.running), side.sent

    waiting, left, sent = asyncio.run(main())
    assert left == {} and len(sent) == 1  # one reply, nothing left to cancel
    assert 7 in waiting if when == "later" else waiting == {}


@pytest.mark.parametrize("kind", ["engine", "one_at_a_time"])
def test_the_hub_frees_a_ring_region_only_once_the_backend_released_it(kind, monkeypatch):
    """A request whose arrays lie in the worker's ring: the reply says the region is free
    when nothing reads it any more; a cancelled request (nothing to reply) or one answered
    while a batch still reads it gets an ``F`` once the backend lets go."""
    from recserve.engine.shared_memory import SharedMemory
    from recserve.server import shared_ring
    from recserve.server.shared_ring import SharedRing

    reader = SharedMemory(1 << 16, writable=False)  # the engine side keeps the descriptor
    writer = SharedRing(shared_ring.map_memory(reader.fd, reader.size, writable=True))

    gate = threading.Event()
    forward = backend_module._forward

    def gated(*args):
        assert gate.wait(10)
        return forward(*args)

    monkeypatch.setattr(backend_module, "_forward", gated)

    async def main():
        engine, _, weights = await started(gate=gate)
        backend = backend_of(kind, engine, weights)
        hub, side = Hub(backend, ServerConfig(), 2), FakeSide(reader)
        rng = np.random.default_rng(8)
        regions = {}

        def send(rid, n):
            frame, regions[rid] = channel.encode_score(rid, "tiny", 1, random_inputs(SPEC, rng, n),
                                                       None, SPEC, ring=writer)
            assert regions[rid] is not None
            (payload,) = FrameDecoder().feed(frame)
            hub.score(side, memoryview(payload))

        send(1, 8)  # runs, held at the gate
        send(2, 5)  # queued behind it
        await settle()
        hub.on_control(side, {"kind": "cancel", "rid": 1})  # its batch still reads it
        hub.on_control(side, {"kind": "cancel", "rid": 2})  # queued only: free at once
        early = list(side.sent)
        gate.set()
        await until(lambda: len(side.sent) == 2)
        send(3, 4)
        await until(lambda: len(side.sent) == 3)
        if kind != "engine":
            await backend.close()
        await engine.close()
        return early, side

    early, side = run(main())
    frees = [channel.decode_free(memoryview(f)[4:]) for f in side.sent if f[4:5] == b"F"]
    replies = [channel.decode_reply(memoryview(f)[4:]) for f in side.sent if f[4:5] == b"R"]
    if kind == "engine":  # (the one-at-a-time backend cannot drop a queued request early)
        assert [channel.decode_free(memoryview(f)[4:]) for f in early] == [2]
    assert sorted(frees) == [1, 2]
    (reply,) = replies
    assert reply.rid == 3 and reply.released and reply.scores.shape == (4, 2)
    assert side.running == {} and side.holding == set()


async def until(condition, timeout=10.0):
    """Wait (on the loop) until ``condition()`` holds; fails the test after ``timeout``."""
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


def test_inputs_are_released_once_no_batch_reads_them():
    """``on_release`` says when the memory a request's inputs view may be reused: before
    its answer when no batch holds them, else only when the last batch holding a piece is
    done, though a failed piece or a cancel answers the request earlier."""
    settings = replace(SETTINGS, slots=2)

    async def main():
        hold = threading.Event()  # batches without the poisoned row wait here

        def fault(batch):
            if bool((batch.dense["feat"] == 777.0).any()):
                raise RuntimeError("poisoned row")
            assert hold.wait(10)

        engine, _, _ = await started(settings, fault=fault)
        rng = np.random.default_rng(7)
        events = []

        def submit(tag, inputs):
            return engine.submit("tiny", inputs, lambda o: events.append((tag, "done", o)),
                                 on_release=lambda: events.append((tag, "released")))

        split = random_inputs(SPEC, rng, 100)  # 64 + 36 rows: two batches, both running
        split.dense["feat"][80] = 777.0  # the second piece fails at once
        submit("split", split)
        await settle()
        await asyncio.sleep(0.2)  # (the failing batch answers from its worker thread)
        answered_early = list(events)
        hold.set()
        await until(lambda: len(events) == 2)
        after_split = list(events)
        hold.clear()
        cancelled = submit("cancelled", random_inputs(SPEC, rng, 10))
        await settle()
        engine.cancel(cancelled)
        cancelled_early = [e for e in events if e[0] == "cancelled"]
        hold.set()
        await until(lambda: cancelled_early != [e for e in events if e[0] == "cancelled"])
        submit("plain", random_inputs(SPEC, rng, 5))
        submit("empty", random_inputs(SPEC, rng, 0))
        await until(lambda: sum(e[0] in ("plain", "empty") for e in events) == 4)
        await engine.close()
        return answered_early, after_split, cancelled_early, events

    answered_early, after_split, cancelled_early, events = run(main())
    assert [e[:2] for e in answered_early] == [("split", "done")]  # held by batch one
    assert answered_early[0][2].code == "internal"
    assert [e[:2] for e in after_split] == [("split", "done"), ("split", "released")]
    assert cancelled_early == []  # cancelled, but its batch still reads it
    by_tag = {}
    for event in events:
        by_tag.setdefault(event[0], []).append(event[1])
    assert by_tag["cancelled"] == ["released"]  # never answered, released once
    assert by_tag["plain"] == ["released", "done"]  # nothing holds it: released first
    assert by_tag["empty"] == ["released", "done"]


def test_engine_backend_admits_by_queue_room_and_leaves_too_large_to_the_engine():
    async def main():
        gate = threading.Event()
        engine, _, _ = await started(replace(SETTINGS, max_queued_rows=100), gate=gate)
        backend = EngineBackend(engine)
        rng = np.random.default_rng(9)
        running = engine.submit("tiny", random_inputs(SPEC, rng, 64), print)
        queued = engine.submit("tiny", random_inputs(SPEC, rng, 60), print)
        await settle()
        seen = (backend.admits(40), backend.admits(41), backend.admits(41, Priority.HIGH),
                backend.admits(1, Priority.LOW), backend.admits(101))
        with pytest.raises(TooLarge):
            submit(backend, "tiny", 1, random_inputs(SPEC, rng, 101), None, print)
        engine.cancel(running)
        engine.cancel(queued)
        gate.set()
        await engine.close()
        return seen

    # 60 rows queued of 100: 40 more fit at normal priority, 52 at high (an eighth past the
    # bound), none at low (half of it); more than the whole bound is the engine's too_large
    assert run(main()) == (True, False, True, False, True)


def test_a_hub_deferring_ring_decoding_scores_as_one_decoding_at_once():
    """``Hub(defer_ring_decode=True)`` (serve with packing processes) hands ring requests
    on undecoded (``DeferredInputs``): the engine decodes them where it reads the arrays
    (here the CPU executor's thread), with the same scores, and a request whose bounds
    point past its ids fails alone there, as the undeferred hub refuses it at once."""
    import dataclasses

    from recserve.engine.flat import with_flat
    from recserve.engine.inputs import DeferredInputs
    from recserve.engine.shared_memory import SharedMemory
    from recserve.server import shared_ring
    from recserve.server.shared_ring import SharedRing

    reader = SharedMemory(1 << 18, writable=False)
    writer = SharedRing(shared_ring.map_memory(reader.fd, reader.size, writable=True))
    rng = np.random.default_rng(11)
    requests = [with_flat(SPEC, random_inputs(SPEC, rng, n)) for n in (5, 9, 3)]
    bounds = requests[1].flat.bounds.copy()
    bounds[-1] += 1  # past the request's own ids
    broken = dataclasses.replace(requests[1], flat=dataclasses.replace(requests[1].flat,
                                                                       bounds=bounds))

    async def main(defer):
        engine, _, weights = await started()
        backend, handed = EngineBackend(engine), []
        own_submit = backend.submit

        def spy(model, version, inputs, *args):
            handed.append((type(inputs), getattr(inputs, "_inputs", "decoded")))
            return own_submit(model, version, inputs, *args)

        backend.submit = spy
        hub, side = Hub(backend, ServerConfig(), 2, defer_ring_decode=defer), FakeSide(reader)
        for rid, inputs in enumerate([requests[0], broken, requests[2]]):
            frame, data_at = channel.encode_score(rid, "tiny", 1, inputs, None, SPEC,
                                                  ring=writer)
            assert data_at is not None
            (payload,) = FrameDecoder().feed(frame)
            hub.score(side, memoryview(payload))
        await until(lambda: len(side.sent) == 3)
        await engine.close()
        replies = [channel.decode_reply(memoryview(f)[4:]) for f in side.sent]
        return {r.rid: r for r in replies}, handed, weights["tiny"]

    deferred, handed, weights = run(main(True))
    assert handed == [(DeferredInputs, None)] * 3  # not decoded on the loop
    at_once, handed_at_once, _ = run(main(False))
    assert len(handed_at_once) == 2  # the broken one was refused before the engine
    for replies in (deferred, at_once):
        for rid in (0, 2):
            np.testing.assert_allclose(replies[rid].scores,
                                       expected(SPEC, weights, requests[rid]),
                                       rtol=1e-5, atol=1e-6)
        assert replies[1].error is not None and replies[1].scores is None
    assert "malformed sparse inputs" in deferred[1].error["message"]


def test_deferred_inputs_decode_once_on_the_first_read_of_an_array():
    from recserve.engine.flat import slice_rows
    from recserve.engine.inputs import DeferredInputs

    real = random_inputs(SPEC, np.random.default_rng(12), 4)
    calls = []
    deferred = DeferredInputs(4, None, lambda: calls.append(1) or real)
    assert deferred.num_candidates == 4 and deferred.shared is None and calls == []
    assert slice_rows(SPEC, deferred, 0, 4) is real  # a whole piece: the decoded inputs
    assert deferred.sparse is real.sparse and deferred.dense is real.dense
    assert deferred.flat is real.flat and calls == [1]
