"""Graceful shutdown of a real `recserve serve` process under load: SIGTERM answers every
request it accepted and exits 0; a second signal exits at once."""

from __future__ import annotations

import signal
import time

import pytest
from server_fixtures import (
    RawConnection,
    Sender,
    demo_requests,
    sigterm_under_load,
    start_serve,
    wait_for,
)

from recserve.engine.demo import build_demo_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    build_demo_repository(root)
    return root


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(repo):
    proc, port = start_serve(repo, "--drain-seconds", "20")
    senders = [Sender(port, seed=k) for k in range(3)]
    try:
        signalled = sigterm_under_load(proc, senders)
    finally:
        proc.kill()
        proc.wait()
    proc.reader.join(5)
    log = "".join(proc.log)
    assert "recserve stopping: draining" in log and "recserve stopped" in log
    for s in senders:
        assert s.closed_at is not None  # the server closed it after the drain
        before = [rid for rid, at in s.sent.items() if at < signalled]
        # everything written before the signal was read by the server: answered, not lost
        missing = [rid for rid in before if rid not in s.answers]
        assert missing == [], f"unanswered before SIGTERM: {missing}"
        assert set(s.answers.values()) <= {"ok", "overloaded"}, s.answers
        assert "ok" in {s.answers[rid] for rid in before}


def test_a_second_signal_exits_at_once(repo):
    proc, port = start_serve(repo, "--drain-seconds", "60", "--max-pending-per-connection", "2048",
                       "--max-queued-rows", "1000000")
    try:
        conn = RawConnection(port, timeout=30)
        pool = demo_requests(16, seed=9, n=700)
        for rid in range(1000):  # 700k rows: seconds of work on 2 cores
            conn.send(dict(pool[rid % 16], id=rid))
        probe = RawConnection(port, timeout=30)
        # signal only once the server holds plenty of accepted work (a drain of seconds)
        assert wait_for(lambda: probe.send({"id": 0, "op": "stats"}) or probe.receive()[
            "stats"]["server"]["in_flight"] >= 500)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 1
        conn.close()
        probe.close()
    finally:
        proc.kill()
        proc.wait()
    proc.reader.join(5)
    assert "second signal (SIGINT): exiting now" in "".join(proc.log)

