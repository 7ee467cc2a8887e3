"""Engine.submit / cancel (the callback face the server's engine process uses) and
backend.submit over both kinds of backend."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from test_engine import SPEC, expected, run, settle, started

from recserve.engine.demo import random_inputs
from recserve.engine.scheduler import EngineError
from recserve.server.backend import EngineBackend, ReferenceBackend, submit
from recserve.server.errors import Overloaded


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


@pytest.mark.parametrize("kind", ["engine", "one_at_a_time"])
def test_backend_submit_gives_scores_or_wire_errors_and_cancels(kind):
    async def main():
        engine, _, weights = await started()
        if kind == "engine":
            backend = EngineBackend(engine)
        else:
            class Loaded:
                name, version, spec = "tiny", 1, SPEC
            Loaded.weights = weights["tiny"]
            backend = ReferenceBackend([Loaded()])
        rng = np.random.default_rng(4)
        inputs = random_inputs(SPEC, rng, 8)
        got = asyncio.get_running_loop().create_future()
        submit(backend, "tiny", 1, inputs, None, got.set_result)
        scores = await got
        late = []  # a deadline long past: the backend answers with a wire error
        expired = asyncio.get_running_loop().create_future()
        try:
            submit(backend, "tiny", 1, inputs, 0.0, expired.set_result)
            error = await expired
        except Exception as exc:  # (or refuses at once)
            error = exc
        cancel = submit(backend, "tiny", 1, inputs, None, late.append)
        cancel()
        await settle()
        if kind != "engine":
            await backend.close()
        await engine.close()
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


@pytest.mark.parametrize("when", ["inside submit", "later"])
def test_hub_keeps_no_entry_for_an_answered_request(when):
    """The engine process's hub answers a worker's request through backend.submit; an
    answer given before submit returns (a deadline passing inside it) must not leave a
    cancel entry behind, and a later one must remove its entry."""
    from server_fixtures import small_spec

    from recserve.server import channel
    from recserve.server.backend import ModelHandle
    from recserve.server.codec import FrameDecoder
    from recserve.server.config import ServerConfig
    from recserve.server.hub import Hub

    spec = small_spec()
    inputs = random_inputs(spec, np.random.default_rng(6), 3)

    class Backend:
        def __init__(self):
            self.pending = []

        def models(self):
            return [ModelHandle(spec.name, 1, spec)]

        def resolve(self, name, version):
            return ModelHandle(spec.name, 1, spec)

        def submit(self, model, version, inputs, deadline, on_done):
            if when == "inside submit":
                on_done(np.zeros(inputs.num_candidates, np.float32))
            else:
                self.pending.append(on_done)
            return lambda: None

    class Side:
        index = 0

        def __init__(self):
            self.sent = []

        def send_soon(self, data):
            self.sent.append(data)

    async def main():
        backend, side = Backend(), Side()
        hub = Hub(backend, ServerConfig(), 2)
        frame = channel.encode_score(7, spec.name, 1, inputs, None, spec)
        (payload,) = FrameDecoder().feed(frame)
        hub.score(side, memoryview(payload))
        waiting = dict(hub._running)
        for on_done in backend.pending:
            on_done(np.ones(inputs.num_candidates, np.float32))
        return waiting, dict(hub._running), side.sent

    waiting, left, sent = asyncio.run(main())
    assert left == {} and len(sent) == 1  # one reply, nothing left to cancel
    assert (0, 7) in waiting if when == "later" else waiting == {}
