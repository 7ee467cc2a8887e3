"""The engine and the CPU executor: batching, errors, deadlines, hot swap, cancel (real threads,
a gate instead of sleeps)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import numpy as np
import pytest
import torch

from recserve.engine.demo import random_inputs
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor, slice_rows
from recserve.engine.inputs import collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.scheduler import EngineError, Priority
from recserve.engine.settings import EngineSettings
from recserve.engine.spec import (
    DenseFeature,
    Interaction,
    ModelSpec,
    Output,
    SparseFeature,
    Table,
)
from recserve.engine.weights import init_weights

SPEC = ModelSpec(
    name="tiny",
    tables=(Table("items", 50, 8), Table("users", 20, 8)),
    sparse=(SparseFeature("history", "items", "mean", "request", max_bag=6),
            SparseFeature("user", "users", "sum", "request"),
            SparseFeature("item", "items", "sum", "candidate", max_bag=3, weighted=True)),
    dense=(DenseFeature("ctx", 3, "request"), DenseFeature("feat", 2, "candidate")),
    bottom_mlp=(8,),
    interaction=Interaction("dot"),
    top_mlp=(16, 2),
    outputs=(Output("click"), Output("watch", "logit")),
)
SPEC1 = ModelSpec(name="single", tables=(Table("t", 30, 4),),
                  sparse=(SparseFeature("id", "t", "sum", "candidate"),),
                  interaction=Interaction("cat"), top_mlp=(1,))
SETTINGS = EngineSettings(max_batch_rows=64, buckets=(16, 32, 64), slots=1, aging_s=None)
OPEN = threading.Event()
OPEN.set()


class Recording(CpuExecutor):
    """The CPU executor, recording every plan; its workers wait at ``gate`` before a forward."""

    def __init__(self, settings, gate=OPEN, fault=None):
        def hook(batch):
            assert gate.wait(10), "the test never opened the gate"
            if fault is not None:
                fault(batch)
        super().__init__(settings, fault=hook)
        self.plans = []

    def submit(self, job, done):
        self.plans.append(job.plan)
        super().submit(job, done)


def expected(spec, weights, inputs):
    scores = ReferenceModel(spec, weights).forward(collate(spec, [inputs])).numpy()
    return scores[:, 0] if scores.shape[1] == 1 else scores


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def settle():
    for _ in range(20):  # let created tasks reach their first await
        await asyncio.sleep(0)


async def started(settings=SETTINGS, specs=(SPEC,), **kw):
    executors = []

    def factory(s):
        executors.append(Recording(s, **kw))
        return executors[0]
    engine = Engine(settings, factory)
    await engine.start()
    weights = {}
    for seed, spec in enumerate(specs):
        weights[spec.name] = init_weights(spec, seed)
        await engine.load(spec.name, 1, spec, weights[spec.name])
    return engine, executors[0], weights


def test_slice_rows_matches_the_same_rows_of_the_whole_request():
    rng = np.random.default_rng(0)
    inputs = random_inputs(SPEC, rng, 9)
    model = ReferenceModel(SPEC, init_weights(SPEC, 3))
    whole = model.forward(collate(SPEC, [inputs])).numpy()
    part = slice_rows(SPEC, inputs, 3, 4)
    assert part.num_candidates == 4 and part.dense["ctx"] is inputs.dense["ctx"]
    np.testing.assert_allclose(model.forward(collate(SPEC, [part])).numpy(), whole[3:7],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        slice_rows(SPEC, inputs, 8, 2)


def test_batched_scores_equal_one_at_a_time_scores():
    async def main():
        settings = EngineSettings(max_batch_rows=64, buckets=(16, 32, 64), slots=2)
        engine, executor, weights = await started(settings, specs=(SPEC, SPEC1))
        rng = np.random.default_rng(1)
        reqs = [(SPEC if i % 3 else SPEC1, random_inputs(SPEC if i % 3 else SPEC1, rng,
                                                         int(rng.integers(1, 150))))
                for i in range(16)]
        got = await asyncio.gather(*(engine.score(s.name, r) for s, r in reqs))
        await engine.close()
        return executor, weights, reqs, got
    executor, weights, reqs, got = run(main())
    for (spec, inputs), scores in zip(reqs, got, strict=True):
        np.testing.assert_allclose(scores, expected(spec, weights[spec.name], inputs),
                                   rtol=1e-5, atol=1e-6)
    assert got[1].shape == (reqs[1][1].num_candidates, 2) and got[0].ndim == 1
    plans = executor.plans
    assert all(len({p.model}) == 1 and p.rows <= 64 for p in plans)
    assert any(len(p.pieces) > 1 for p in plans)  # requests were packed together
    assert any(p.start > 0 for plan in plans for p in plan.pieces)  # and split


def test_a_numpy_integer_candidate_count_is_scored():
    async def main():
        engine, _, weights = await started()
        inputs = random_inputs(SPEC, np.random.default_rng(5), 4)
        numpy_count = dataclasses.replace(inputs, num_candidates=np.int64(4))
        got = await engine.score("tiny", numpy_count)
        np.testing.assert_allclose(got, expected(SPEC, weights["tiny"], inputs), rtol=1e-5,
                                   atol=1e-6)
        await engine.close()
    run(main())


def test_priority_order_when_slots_free_up():
    async def main():
        gate = threading.Event()
        engine, executor, _ = await started(gate=gate)
        rng = np.random.default_rng(2)
        tasks = [asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 64),
                                                  priority=prio))
                 for prio in (Priority.NORMAL, Priority.LOW, Priority.NORMAL, Priority.HIGH)]
        await settle()
        gate.set()
        await asyncio.gather(*tasks)
        await engine.close()
        return [plan.pieces[0].request_id for plan in executor.plans]
    assert run(main()) == [1, 4, 3, 2]


def test_deadline_expires_queued_request_while_the_slot_is_busy():
    async def main():
        gate = threading.Event()
        engine, executor, weights = await started(gate=gate)
        rng = np.random.default_rng(3)
        first = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 10)))
        late = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 10),
                                                deadline=engine.clock() + 0.05))
        with pytest.raises(EngineError) as info:
            await late  # the timer expires it although the only slot never freed
        assert info.value.code == "deadline_exceeded" and not first.done()
        gate.set()
        assert (await first).shape == (10, 2)
        with pytest.raises(EngineError) as info:
            await engine.score("tiny", random_inputs(SPEC, rng, 5), deadline=engine.clock())
        assert info.value.code == "deadline_exceeded"
        await engine.close()
        return executor.plans
    plans = run(main())
    assert [p.request_id for plan in plans for p in plan.pieces] == [1]


def test_admission_control_refuses_at_once():
    async def main():
        gate = threading.Event()
        settings = EngineSettings(max_batch_rows=64, buckets=(64,), slots=1, max_queued_rows=100)
        engine, _, _ = await started(settings, gate=gate)
        rng = np.random.default_rng(4)
        tasks = [asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, n)))
                 for n in (64, 60, 40)]  # 64 running, 100 queued
        await settle()
        with pytest.raises(EngineError) as info:
            await engine.score("tiny", random_inputs(SPEC, rng, 1))
        assert info.value.code == "overloaded" and engine.queued_rows == 100
        gate.set()
        assert [len(s) for s in await asyncio.gather(*tasks)] == [64, 60, 40]
        assert len(await engine.score("tiny", random_inputs(SPEC, rng, 1))) == 1
        with pytest.raises(EngineError) as info:
            await engine.score("nope", random_inputs(SPEC, rng, 1))
        assert info.value.code == "not_found"
        assert info.value.message == "model 'nope' is not served here; models: ['tiny']"
        with pytest.raises(EngineError) as info:
            await engine.score("tiny", random_inputs(SPEC, rng, 1), version=9)
        assert info.value.message == "model 'tiny' has no version 9 loaded; versions: [1]"
        await engine.close()
    run(main())


def poison(batch):
    if bool((batch.dense["ctx"] == 777.0).any()):
        raise RuntimeError("poisoned request")


def test_a_failing_request_fails_alone():
    async def main():
        gate = threading.Event()
        engine, executor, weights = await started(gate=gate, fault=poison)
        rng = np.random.default_rng(5)
        good = [random_inputs(SPEC, rng, 10) for _ in range(3)]
        bad_index = random_inputs(SPEC, rng, 10)
        bad_index.sparse["item"].values[3] = 50  # table "items" has 50 rows
        poisoned = random_inputs(SPEC, rng, 10)
        poisoned.dense["ctx"][0] = 777.0
        order = [good[0], bad_index, good[1], poisoned, good[2]]
        tasks = [asyncio.create_task(engine.score("tiny", r)) for r in order]
        await settle()
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await engine.close()
        return executor.plans, weights, order, results
    plans, weights, order, results = run(main())
    assert len(plans[1].pieces) == 4  # the bad ones shared a batch with good ones
    assert results[1].code == "bad_request" and "table 'items' has 50 rows" in results[1].message
    assert results[3].code == "internal" and "poisoned request" in results[3].message
    for i in (0, 2, 4):
        np.testing.assert_allclose(results[i], expected(SPEC, weights["tiny"], order[i]),
                                   rtol=1e-5, atol=1e-6)


def test_out_of_memory_splits_the_batch_and_keeps_serving():
    attempts = []

    def small_memory(batch):
        attempts.append(batch.num_rows)
        if batch.num_rows > 25:
            raise torch.OutOfMemoryError("simulated: batch too large")

    async def main():
        gate = threading.Event()
        engine, executor, weights = await started(gate=gate, fault=small_memory)
        rng = np.random.default_rng(6)
        order = [random_inputs(SPEC, rng, n) for n in (5, 12, 12, 30, 3)]
        tasks = [asyncio.create_task(engine.score("tiny", r)) for r in order]
        await settle()
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        after = await engine.score("tiny", order[0])
        await engine.close()
        return weights, order, results, after
    weights, order, results, after = run(main())
    assert results[3].code == "internal" and "out of memory" in results[3].message
    assert attempts == [5, 57, 24, 33, 30, 3, 5]  # halves, then the request alone
    for i in (0, 1, 2, 4):
        np.testing.assert_allclose(results[i], expected(SPEC, weights["tiny"], order[i]),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after, results[0], rtol=1e-6)


def test_hot_swap_loses_nothing_in_flight():
    async def main():
        gate = threading.Event()
        engine, executor, weights = await started(gate=gate)
        rng = np.random.default_rng(7)
        old = [random_inputs(SPEC, rng, n) for n in (50, 100, 20)]
        before = [asyncio.create_task(engine.score("tiny", r)) for r in old]
        await settle()
        new_weights = init_weights(SPEC, 99)
        first = engine.handle("tiny", 1)
        await engine.load("tiny", 2, SPEC, new_weights)
        assert engine.models() == [("tiny", 2)]
        assert engine.handle("tiny") is not first and engine.handle("tiny").spec == SPEC
        after = asyncio.create_task(engine.score("tiny", old[0]))
        with pytest.raises(EngineError) as info:
            await engine.load("tiny", 3, SPEC1, new_weights)
        assert info.value.code == "bad_request" and "missing tensor" in info.value.message
        assert engine.models() == [("tiny", 2)]  # the failed load changed nothing
        with pytest.raises(EngineError) as info:
            await engine.score("tiny", old[0], version=1)
        assert info.value.code == "not_found"
        await settle()
        gate.set()
        results = await asyncio.gather(*before, after)
        remaining = engine._models.loaded()
        await engine.close()
        return weights["tiny"], new_weights, old, results, remaining
    w1, w2, old, results, remaining = run(main())
    for inputs, scores in zip(old, results[:3], strict=True):
        np.testing.assert_allclose(scores, expected(SPEC, w1, inputs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[3], expected(SPEC, w2, old[0]), rtol=1e-5, atol=1e-6)
    assert list(remaining) == [("tiny", 2)]  # version 1 freed once drained


def test_cancel_drops_queued_and_unsent_work():
    async def main():
        gate = threading.Event()
        engine, executor, weights = await started(gate=gate)
        rng = np.random.default_rng(8)
        big = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 200)))
        queued = asyncio.create_task(engine.score("tiny", random_inputs(SPEC, rng, 10)))
        await settle()
        assert engine.queued_rows == 200 - 64 + 10
        big.cancel()
        queued.cancel()
        await settle()
        assert engine.queued_rows == 0 and engine.pending_requests == 0
        gate.set()
        inputs = random_inputs(SPEC, rng, 7)
        scores = await engine.score("tiny", inputs)
        await engine.close()
        return executor.plans, weights, inputs, scores, big, queued
    plans, weights, inputs, scores, big, queued = run(main())
    assert big.cancelled() and queued.cancelled()
    assert [[p.request_id for p in plan.pieces] for plan in plans] == [[1], [3]]
    np.testing.assert_allclose(scores, expected(SPEC, weights["tiny"], inputs), rtol=1e-5,
                               atol=1e-6)


def test_fill_wait_holds_a_small_batch_then_the_timer_sends_it():
    async def main():
        settings = EngineSettings(max_batch_rows=64, buckets=(64,), slots=1, fill_wait_s=0.05)
        engine, executor, weights = await started(settings)
        rng = np.random.default_rng(9)
        order = [random_inputs(SPEC, rng, 10) for _ in range(2)]
        first = asyncio.create_task(engine.score("tiny", order[0]))
        await settle()
        assert engine.queued_rows == 10 and not executor.plans  # waiting for more rows
        results = await asyncio.gather(first, engine.score("tiny", order[1]))
        await engine.close()
        return executor.plans, weights, order, results
    plans, weights, order, results = run(main())
    assert [[p.request_id for p in plan.pieces] for plan in plans] == [[1, 2]]
    for inputs, scores in zip(order, results, strict=True):
        np.testing.assert_allclose(scores, expected(SPEC, weights["tiny"], inputs), rtol=1e-5,
                                   atol=1e-6)


def test_gpu_executor_checks_its_threads_and_streams():
    from recserve.engine.gpu_executor import GpuExecutor

    with pytest.raises(ValueError, match="pack_threads is 0"):
        GpuExecutor(EngineSettings(), "cuda", pack_threads=0)
    for streams in (0, 3):  # at least one, and no more than the slots that could use them
        with pytest.raises(ValueError, match=f"compute_streams is {streams}"):
            GpuExecutor(EngineSettings(slots=2), "cuda", compute_streams=streams)
