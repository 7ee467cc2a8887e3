"""Graceful shutdown of a real `recserve serve` process under load: SIGTERM answers every
request it accepted and exits 0; a second signal exits at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from server_fixtures import RawConnection

from recserve.engine.demo import build_demo_repository, demo_request, demo_spec


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    build_demo_repository(root)
    return root


def start(repo, *args):
    """`recserve serve` on a free port; (process, port) once ready; stderr keeps draining."""
    proc = subprocess.Popen([sys.executable, "-m", "recserve.server.cli", "serve", "--port", "0",
                             "--device", "cpu", "--model-repo", str(repo), *args],
                            stderr=subprocess.PIPE, text=True)
    lines, port = [], None
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        port = int(match.group(1)) if match else port
        if port is not None and "ready: every model is loaded" in line:
            break
    else:
        proc.wait()
        pytest.fail("serve exited before it was ready:\n" + "".join(lines))
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    proc.log = lines  # type: ignore[attr-defined]
    proc.reader = reader  # type: ignore[attr-defined]
    return proc, port


def requests(count: int, seed: int, n: int = 300) -> list[dict]:
    spec, rng = demo_spec(), np.random.default_rng(seed)
    return [{"id": i, "op": "infer", "model": "demo", "candidates": n,
             "inputs": demo_request(spec, rng, n)} for i in range(count)]


class Sender(threading.Thread):
    """Keeps ``depth`` requests in flight on one connection until the server closes it."""

    def __init__(self, port: int, seed: int, depth: int = 6) -> None:
        super().__init__(daemon=True)
        self.conn = RawConnection(port, timeout=30)
        self.pool = requests(16, seed)
        self.depth = depth
        self.sent: dict[int, float] = {}  # id -> when it was written
        self.answers: dict[int, str] = {}
        self.closed_at: float | None = None

    def run(self) -> None:
        rid = 0
        try:
            while True:
                while len(self.sent) - len(self.answers) < self.depth:
                    rid += 1
                    message = dict(self.pool[rid % len(self.pool)], id=rid)
                    self.sent[rid] = time.monotonic()
                    self.conn.send(message)
                answer = self.conn.receive()
                self.answers[answer["id"]] = "ok" if answer["ok"] else answer["error"]["code"]
        except OSError:  # ConnectionError included: the server closed the connection
            self.closed_at = time.monotonic()
            self.conn.close()


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(repo):
    proc, port = start(repo, "--drain-seconds", "20")
    senders = [Sender(port, seed=k) for k in range(3)]
    try:
        for s in senders:
            s.start()
        assert _wait(lambda: all(len(s.answers) >= 5 for s in senders))
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for s in senders:
            s.join(30)
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
    proc, port = start(repo, "--drain-seconds", "60", "--max-pending-per-connection", "2048",
                       "--max-queued-rows", "1000000")
    try:
        conn = RawConnection(port, timeout=30)
        pool = requests(16, seed=9, n=700)
        for rid in range(1000):  # 700k rows: seconds of work on 2 cores
            conn.send(dict(pool[rid % 16], id=rid))
        probe = RawConnection(port, timeout=30)
        # signal only once the server holds plenty of accepted work (a drain of seconds)
        assert _wait(lambda: probe.send({"id": 0, "op": "stats"}) or probe.receive()[
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


def _wait(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True
