"""Slow requests: the rate-limited log line (``SlowRequestLog``) and the engine's use of it
(what it says of a request that waited for the device, and of one that never left the
queue), with a fake clock; and the serve option that sets it."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
from test_engine import SETTINGS, SPEC, Recording, run

from recserve.engine.demo import random_inputs
from recserve.engine.engine import Engine
from recserve.engine.scheduler import EngineError, Priority
from recserve.engine.slow_log import SlowRequestLog
from recserve.engine.weights import init_weights


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slow_answers_are_logged_at_a_bounded_rate(caplog):
    clock = FakeClock()
    slow = SlowRequestLog(0.5, clock, burst=2, refill_s=2.0)
    with caplog.at_level(logging.WARNING, logger="recserve.engine"):
        assert not slow.observe("m v1, 3 candidates", 0.499, 0.1, 1, "ok")
        assert caplog.records == []
        assert slow.observe("m v1, 3 candidates", 0.75, 0.7, 2, "ok")
        assert caplog.records[-1].getMessage() == (
            "slow request: m v1, 3 candidates took 750.0 ms (queued 700.0 ms before its "
            "first batch, 2 batches), ok")
        assert slow.observe("m v1, 9 candidates", 1.0, None, 0, "deadline_exceeded")
        assert "never dispatched, 0 batches), deadline_exceeded" in caplog.records[-1].getMessage()
        for _ in range(7):  # the burst is spent: counted, not logged
            assert slow.observe("m v1, 1 candidates", 2.0, 0.0, 1, "ok")
        assert len(caplog.records) == 2 and slow.unlogged == 7
        clock.now += 2.0  # one line's worth of refill
        slow.observe("m v1, 4 candidates", 0.6, 0.5, 1, "ok")
        assert len(caplog.records) == 3
        assert caplog.records[-1].getMessage().endswith(
            "; 7 more slow requests since the last line")
        assert slow.unlogged == 0
    with pytest.raises(ValueError, match="expected > 0"):
        SlowRequestLog(0, clock)


def test_the_engine_says_where_a_slow_request_waited(caplog):
    clock = FakeClock()

    async def main():
        gate = threading.Event()
        engine = Engine(SETTINGS, lambda s: Recording(s, gate=gate), clock=clock,
                        slow_request_s=1.0)
        await engine.start()
        await engine.load("tiny", 1, SPEC, init_weights(SPEC, 0))
        rng = np.random.default_rng(5)
        running = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 5),
                                                   priority=Priority.HIGH))
        await asyncio.sleep(0)
        clock.now += 0.25  # the second arrives while the first holds the only slot
        queued = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 7)))
        expiring = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 2),
                                                    deadline=clock.now + 1.5))
        await asyncio.sleep(0)
        clock.now += 2.0  # the device is slow (the third's deadline passes meanwhile)
        gate.set()
        await running
        await queued
        with pytest.raises(EngineError):
            await expiring
        counters = dict(engine.counters)
        await engine.close()
        return counters

    with caplog.at_level(logging.WARNING, logger="recserve.engine"):
        counters = run(main())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow")]
    assert lines == [  # in answer order: the slot frees, the expired one goes, the next runs
        "slow request: tiny v1, 5 candidates, priority high took 2250.0 ms "
        "(queued 0.0 ms before its first batch, 1 batch), ok",
        "slow request: tiny v1, 2 candidates, priority normal took 2000.0 ms "
        "(never dispatched, 0 batches), deadline_exceeded",
        "slow request: tiny v1, 7 candidates, priority normal took 2000.0 ms "
        "(queued 2000.0 ms before its first batch, 1 batch), ok"]
    assert counters["slow"] == 3


def test_serve_sets_the_threshold_and_refuses_a_bad_one(tmp_path):
    from recserve.server.cli import build_parser
    from recserve.server.serve_options import ServeOptions

    assert build_parser().parse_args(["serve"]).slow_request_ms == 1000.0
    assert build_parser().parse_args(["serve", "--slow-request-ms", "0"]).slow_request_ms == 0
    ServeOptions(tmp_path, "cpu", slow_request_ms=0)
    for bad in (-1, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="slow_request_ms"):
            ServeOptions(tmp_path, "cpu", slow_request_ms=bad)
