"""The batching policy, driven with a fake clock and fake executors (no torch, no sleeps)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recserve.engine.scheduler import EngineError, Piece, Priority, Scheduler
from recserve.engine.settings import EngineSettings


def make(max_rows=100, buckets=(25, 50, 100), **kw) -> Scheduler:
    return Scheduler(EngineSettings(max_batch_rows=max_rows, buckets=buckets, **kw))


@pytest.mark.parametrize("kwargs, text", [
    ({"max_batch_rows": 0, "buckets": (0,)}, "max_batch_rows is 0"),
    ({"max_batch_rows": 100, "buckets": (50, 50, 100)}, "strictly ascending"),
    ({"max_batch_rows": 100, "buckets": (50,)}, "must equal max_batch_rows"),
    ({"max_batch_rows": 100, "buckets": ()}, "non-empty"),
    ({"max_batch_rows": 100, "buckets": (100,), "slots": 0}, "slots is 0"),
    ({"max_batch_rows": 100, "buckets": (100,), "fill_wait_s": -1.0}, "fill_wait_s is -1.0"),
    ({"max_batch_rows": 100, "buckets": (100,), "aging_s": 0}, "aging_s is 0"),
    ({"max_batch_rows": 100, "buckets": (100,), "max_queued_rows": 2.5}, "max_queued_rows is"),
])
def test_settings_reject_bad_values(kwargs, text):
    with pytest.raises(ValueError, match=text):
        EngineSettings(**kwargs)


def test_bucket_rounds_up():
    s = EngineSettings(max_batch_rows=100, buckets=(25, 50, 100))
    assert [s.bucket_for(n) for n in (1, 25, 26, 50, 51, 100)] == [25, 25, 50, 50, 100, 100]
    with pytest.raises(ValueError, match="101 rows"):
        s.bucket_for(101)


def test_packs_several_requests_in_submit_order():
    sched = make()
    for rid, rows in ((1, 10), (2, 20), (3, 5)):
        sched.submit(rid, "m", rows, now=0.0)
    plan = sched.next_batch(1.0).plan
    assert plan.pieces == (Piece(1, 0, 10), Piece(2, 0, 20), Piece(3, 0, 5))
    assert (plan.model, plan.rows, plan.bucket, plan.padding) == ("m", 35, 50, 15)
    assert sched.queued_rows == 0 and sched.queued_requests == 0
    assert sched.next_batch(1.0).plan is None


def test_splits_a_request_across_batches_and_finishes_it_first():
    sched = make()
    sched.submit(1, "m", 70, now=0.0)
    sched.submit(2, "m", 250, now=0.0)
    sched.submit(3, "m", 10, now=0.0)
    plans = [sched.next_batch(1.0).plan for _ in range(4)]
    assert [p.pieces for p in plans] == [
        (Piece(1, 0, 70), Piece(2, 0, 30)),
        (Piece(2, 30, 100),),
        (Piece(2, 130, 100),),
        (Piece(2, 230, 20), Piece(3, 0, 10)),
    ]
    assert [p.bucket for p in plans] == [100, 100, 100, 50]
    assert [p.seq for p in plans] == [1, 2, 3, 4]


def test_higher_priority_first_fifo_within_a_level():
    sched = make(max_rows=10, buckets=(10,), aging_s=None)
    sched.submit(1, "m", 10, now=0.0, priority=Priority.LOW)
    sched.submit(2, "m", 10, now=0.0, priority=Priority.NORMAL)
    sched.submit(3, "m", 10, now=0.0, priority=Priority.HIGH)
    sched.submit(4, "m", 10, now=0.0, priority=Priority.NORMAL)
    sched.submit(5, "m", 10, now=0.0, priority=Priority.HIGH)
    order = [sched.next_batch(100.0).plan.pieces[0].request_id for _ in range(5)]
    assert order == [3, 5, 2, 4, 1]


def test_aging_lets_low_priority_pass_fresh_high_work():
    sched = make(max_rows=10, buckets=(10,), aging_s=1.0)
    sched.submit(1, "m", 10, now=0.0, priority=Priority.LOW)
    sched.submit(2, "m", 10, now=1.5, priority=Priority.HIGH)
    # At t=1.5 the LOW request has aged one level (NORMAL): HIGH still goes first.
    assert sched.next_batch(1.5).plan.pieces[0].request_id == 2
    sched.submit(3, "m", 10, now=2.0, priority=Priority.HIGH)
    # At t=2.0 it has aged two levels and is older than request 3.
    assert sched.next_batch(2.0).plan.pieces[0].request_id == 1
    assert sched.next_batch(2.0).plan.pieces[0].request_id == 3


def test_without_aging_low_priority_waits_behind_high():
    sched = make(max_rows=10, buckets=(10,), aging_s=None)
    sched.submit(1, "m", 10, now=0.0, priority=Priority.LOW)
    sched.submit(2, "m", 10, now=50.0, priority=Priority.HIGH)
    assert sched.next_batch(100.0).plan.pieces[0].request_id == 2


def test_expired_requests_are_reported_and_never_planned():
    sched = make()
    sched.submit(1, "m", 10, now=0.0, deadline=5.0)
    sched.submit(2, "m", 10, now=0.0, deadline=20.0)
    sched.submit(3, "m", 10, now=0.0)
    assert sched.next_deadline() == 5.0
    decision = sched.next_batch(5.0)
    assert decision.expired == (1,)
    assert [p.request_id for p in decision.plan.pieces] == [2, 3]
    assert sched.next_deadline() is None


def test_expiry_drops_the_unsent_rest_of_a_split_request():
    sched = make()
    sched.submit(1, "m", 250, now=0.0, deadline=10.0)
    assert sched.next_batch(1.0).plan.pieces == (Piece(1, 0, 100),)
    assert sched.queued_rows == 150
    assert sched.expire(10.0) == (1,)
    assert sched.queued_rows == 0
    assert sched.next_batch(10.0).plan is None


def test_fully_sent_request_does_not_expire():
    sched = make()
    sched.submit(1, "m", 10, now=0.0, deadline=10.0)
    sched.next_batch(1.0)
    assert sched.expire(11.0) == ()


def test_submit_with_a_past_deadline_is_refused():
    sched = make()
    with pytest.raises(EngineError) as info:
        sched.submit(1, "m", 10, now=5.0, deadline=5.0)
    assert info.value.code == "deadline_exceeded"
    assert sched.queued_requests == 0


def test_admission_control_refuses_past_the_bound():
    sched = make(max_queued_rows=150)
    sched.submit(1, "m", 100, now=0.0)
    sched.submit(2, "m", 50, now=0.0)
    with pytest.raises(EngineError) as info:
        sched.submit(3, "m", 1, now=0.0)
    assert info.value.code == "overloaded"
    assert sched.queued_rows == 150 and sched.queued_requests == 2
    sched.next_batch(0.0)  # dispatching frees queue room
    sched.submit(3, "m", 100, now=0.0)
    with pytest.raises(EngineError) as info:
        sched.submit(4, "m", 151, now=0.0)
    assert info.value.code == "too_large"


def test_overload_sheds_low_priority_first_and_keeps_room_for_high():
    sched = make(max_queued_rows=800)
    sched.submit(1, "m", 400, now=0.0, priority=Priority.LOW)  # up to half the bound
    with pytest.raises(EngineError, match="bound of 400 for low priority"):
        sched.submit(2, "m", 1, now=0.0, priority=Priority.LOW)
    sched.submit(3, "m", 400, now=0.0)  # normal: up to the bound
    with pytest.raises(EngineError, match="bound of 800 for normal priority"):
        sched.submit(4, "m", 1, now=0.0)
    sched.submit(5, "m", 100, now=0.0, priority=Priority.HIGH)  # an eighth past it
    with pytest.raises(EngineError, match="bound of 900 for high priority") as info:
        sched.submit(6, "m", 1, now=0.0, priority=Priority.HIGH)
    assert info.value.code == "overloaded" and sched.queued_rows == 900
    with pytest.raises(EngineError) as info:
        sched.submit(7, "m", 801, now=0.0, priority=Priority.HIGH)
    assert info.value.code == "too_large"  # one request never above the bound itself
    assert (sched.room(Priority.HIGH), sched.room(), sched.room(Priority.LOW)) == (0, -100, -500)
    sched.cancel(5)
    assert (sched.room(Priority.HIGH), sched.room(), sched.room(Priority.LOW)) == (100, 0, -400)
    sched.cancel(1)
    sched.cancel(3)
    assert sched.room(Priority.HIGH) == sched.room() == 800  # one request: at most the bound


def test_cancel_drops_queued_and_unsent_rows():
    sched = make()
    sched.submit(1, "m", 250, now=0.0)
    sched.submit(2, "m", 10, now=0.0)
    sched.submit(3, "m", 10, now=0.0)
    sched.next_batch(0.0)
    assert sched.cancel(1) is True
    assert sched.cancel(3) is True
    assert sched.cancel(3) is False and sched.cancel(99) is False
    assert sched.queued_rows == 10
    assert sched.next_batch(0.0).plan.pieces == (Piece(2, 0, 10),)
    assert sched.cancel(2) is False  # fully sent: nothing left to drop


def test_models_are_batched_separately():
    sched = make(aging_s=None)
    sched.submit(1, ("a", 1), 10, now=0.0)
    sched.submit(2, ("b", 1), 10, now=0.0, priority=Priority.HIGH)
    sched.submit(3, ("a", 1), 10, now=0.0)
    assert sched.next_batch(0.0, model=("a", 1)).plan.pieces == (Piece(1, 0, 10), Piece(3, 0, 10))
    assert sched.next_batch(0.0, model=("a", 1)).plan is None
    plan = sched.next_batch(0.0).plan
    assert plan.model == ("b", 1) and plan.pieces == (Piece(2, 0, 10),)


def test_next_batch_picks_the_model_with_the_most_urgent_request():
    sched = make(aging_s=None)
    sched.submit(1, "a", 10, now=0.0)
    sched.submit(2, "b", 10, now=0.0)
    sched.submit(3, "b", 10, now=0.0, priority=Priority.HIGH)
    assert sched.next_batch(0.0).plan.model == "b"
    assert sched.next_batch(0.0).plan.model == "a"


def test_fill_wait_holds_a_small_batch_until_full_or_timed_out():
    sched = make(fill_wait_s=0.5)
    sched.submit(1, "m", 30, now=1.0)
    decision = sched.next_batch(1.2)
    assert decision.plan is None and decision.wake_at == 1.5
    sched.submit(2, "m", 30, now=1.3)
    assert sched.next_batch(1.4).plan is None
    assert sched.next_batch(1.5).plan.rows == 60
    sched.submit(3, "m", 60, now=2.0)
    sched.submit(4, "m", 60, now=2.0)
    assert sched.next_batch(2.0).plan.rows == 100  # a full batch never waits


requests = st.lists(st.tuples(st.integers(1, 700), st.sampled_from(list(Priority)),
                              st.sampled_from(["a", "b"])), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(requests, st.lists(st.integers(0, 4), min_size=1, max_size=200),
       st.sampled_from([None, 0.5]))
def test_every_row_scheduled_exactly_once_in_order(reqs, actions, aging):
    """Interleaved submits, batch requests from a fake executor, and cancels."""
    sched = Scheduler(EngineSettings(max_batch_rows=256, buckets=(64, 128, 256), aging_s=aging))
    covered: dict[int, int] = {}
    cancelled: set[int] = set()
    sizes = {}
    pending = list(enumerate(reqs))
    now = 0.0
    for action in actions + [0] * len(reqs) + [1] * 1000:
        now += 0.1
        if action == 0 and pending:
            rid, (rows, prio, model) = pending.pop(0)
            sched.submit(rid, model, rows, now, priority=prio)
            sizes[rid], covered[rid] = (rows, model), 0
        elif action == 4 and sizes:
            rid = max(sizes)  # the newest request: queued, partly sent or done
            if sched.cancel(rid):
                cancelled.add(rid)
        else:
            plan = sched.next_batch(now).plan
            if plan is None:
                assert sched.queued_rows == 0  # work conserving: nothing left behind
                if not pending:
                    break
                continue
            assert 0 < plan.rows <= 256 and plan.rows == sum(p.count for p in plan.pieces)
            assert plan.bucket == min(b for b in (64, 128, 256) if b >= plan.rows)
            assert len({p.request_id for p in plan.pieces}) == len(plan.pieces)
            for piece in plan.pieces:
                assert sizes[piece.request_id][1] == plan.model
                assert piece.start == covered[piece.request_id] and piece.count > 0
                covered[piece.request_id] += piece.count
    assert not pending and sched.queued_rows == 0 and sched.queued_requests == 0
    for rid, (rows, _) in sizes.items():
        if rid in cancelled:
            assert covered[rid] < rows
        else:
            assert covered[rid] == rows
