"""Faults against a real server: clients that vanish mid-request or mid-frame, stall, read
slowly or never, connection churn, a burst above the admission limit, reload under load.
After each, the server must still answer other clients and hold no leftover work."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
from server_fixtures import (
    RawConnection,
    ServerThread,
    loaded,
    reference_scores,
    small_spec,
    wait_for,
)

from recserve.engine.demo import random_inputs, to_wire
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.repository import save_model
from recserve.engine.settings import EngineSettings
from recserve.engine.weights import init_weights
from recserve.server.backend import EngineBackend
from recserve.server.codec import encode_message

MODEL = loaded(small_spec(), version=1, seed=5)


def serve(slow_s: float = 0.0, **config) -> ServerThread:
    """A server over the engine; every batch takes at least ``slow_s`` (keeps work in flight)."""
    settings = EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=1)

    def fault(batch):
        time.sleep(slow_s)

    engine = Engine(settings, lambda s: CpuExecutor(s, torch_threads=1,
                                                     fault=fault if slow_s else None))
    backend = EngineBackend(engine)

    async def setup():
        await engine.start()
        await backend.load(MODEL)

    return ServerThread(backend, setup=setup, **config)


def request(rid: int, n: int = 4, seed: int | None = None, model=MODEL) -> tuple[dict, object]:
    inputs = random_inputs(model.spec, np.random.default_rng(rid if seed is None else seed), n)
    return {"id": rid, "op": "infer", "model": model.spec.name, "candidates": n,
            "inputs": to_wire(model.spec, inputs)}, inputs


def idle(thread: ServerThread) -> bool:
    """No request left anywhere: dispatcher and engine both empty."""
    engine = thread.server.backend.engine
    return thread.server.dispatcher.active == 0 and engine.pending_requests == 0


def still_serves(thread: ServerThread) -> None:
    conn = RawConnection(thread.port)
    message, inputs = request(99, n=5)
    conn.send(message)
    answer = conn.receive()
    conn.close()
    assert answer["ok"] is True, answer
    scores = np.frombuffer(answer["scores"]["data"], "<f4")
    np.testing.assert_allclose(scores, reference_scores(MODEL, inputs), rtol=1e-5, atol=1e-6)


@pytest.fixture
def slow():
    thread = serve(slow_s=0.05)
    yield thread
    thread.stop()


def test_disconnect_mid_request_drops_its_queued_work(slow):
    conn = RawConnection(slow.port)
    for rid in range(20):
        conn.send(request(rid)[0])
    assert wait_for(lambda: slow.server.backend.engine.pending_requests > 0)
    conn.close()
    assert wait_for(lambda: idle(slow) and slow.server.connections == 0)
    assert slow.server.backend.engine.counters["cancelled"] > 0
    still_serves(slow)


def test_disconnect_mid_frame(slow):
    frame = encode_message(request(1)[0])
    for cut in (1, 3, 4, 10, len(frame) - 1):
        conn = RawConnection(slow.port)
        conn.sock.sendall(frame[:cut])
        conn.close()
    assert wait_for(lambda: slow.server.connections == 0 and idle(slow))
    still_serves(slow)


def test_a_client_stalled_mid_frame_is_dropped():
    thread = serve(frame_timeout_s=0.2)
    try:
        stalled = RawConnection(thread.port, timeout=10)
        stalled.sock.sendall(struct.pack(">I", 100) + b"\x81")  # 5 of 104 bytes
        healthy = RawConnection(thread.port)
        assert stalled.is_closed_by_peer()  # before the socket's own 10 s timeout
        healthy.send({"id": 1, "op": "ping"})  # idle but whole-framed: kept
        assert healthy.receive()["ok"] is True
        healthy.close()
        stalled.close()
    finally:
        thread.stop()


def test_a_client_that_never_reads_is_dropped_and_others_are_served():
    thread = serve(write_timeout_s=0.3, max_pending_per_connection=8)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", thread.port))
        sock.settimeout(0.05)
        assert wait_for(lambda: thread.server.connections == 1)
        frames = b"".join(encode_message({"id": i, "op": "models"}) for i in range(100))
        end = time.monotonic() + 20
        while thread.server.connections and time.monotonic() < end:
            try:
                sock.send(frames)  # never a recv: responses pile up at the server
            except TimeoutError:
                continue  # our send buffer is full too: the server stopped reading us
            except OSError:
                break  # reset by the server
        assert wait_for(lambda: thread.server.connections == 0)
        still_serves(thread)
        sock.close()
    finally:
        thread.stop()


def test_a_slow_reader_gets_every_answer_and_bounded_server_work():
    thread = serve(slow_s=0.01, max_pending_per_connection=4)
    try:
        conn = RawConnection(thread.port)
        expected = {}
        for rid in range(40):
            message, inputs = request(rid)
            expected[rid] = reference_scores(MODEL, inputs)
            conn.send(message)
        peak = 0
        for _ in range(40):
            peak = max(peak, thread.server.dispatcher.in_flight)
            time.sleep(0.005)  # the client reads slowly
            answer = conn.receive()
            assert answer["ok"] is True
            scores = np.frombuffer(answer["scores"]["data"], "<f4")
            np.testing.assert_allclose(scores, expected.pop(answer["id"]), rtol=1e-5,
                                       atol=1e-6)
        assert not expected and peak <= 4
        conn.close()
    finally:
        thread.stop()


def test_many_connections_opening_and_closing():
    thread = serve()
    try:
        def churn(k):
            for i in range(25):
                conn = RawConnection(thread.port)
                if i % 2:
                    conn.send({"id": i, "op": "ping"})
                    assert conn.receive()["ok"] is True
                if i % 5 == 0:
                    conn.send(request(i, n=2, seed=k)[0])  # gone before its answer
                conn.close()

        workers = [threading.Thread(target=churn, args=(k,)) for k in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert wait_for(lambda: thread.server.connections == 0 and idle(thread))
        still_serves(thread)
    finally:
        thread.stop()


def test_a_burst_above_admission_is_refused_fast_and_the_rest_answered():
    thread = serve(slow_s=0.02, max_in_flight=6)
    try:
        conns = [RawConnection(thread.port) for _ in range(4)]
        expected, frames = {}, [b""] * 4
        for rid in range(60):
            message, inputs = request(rid)
            expected[rid] = reference_scores(MODEL, inputs)
            frames[rid % 4] += encode_message(message)
        for conn, burst in zip(conns, frames, strict=True):  # all at once: a real burst
            conn.sock.sendall(burst)
        codes: dict[str, int] = {}
        for rid in range(60):
            answer = conns[rid % 4].receive()
            code = "ok" if answer["ok"] else answer["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
            if answer["ok"]:
                scores = np.frombuffer(answer["scores"]["data"], "<f4")
                np.testing.assert_allclose(scores, expected[answer["id"]], rtol=1e-5,
                                           atol=1e-6)
        assert set(codes) == {"ok", "overloaded"} and codes["ok"] >= 6, codes
        for conn in conns:
            conn.close()
        stats = thread.server.stats.requests
        assert stats[("", "infer", "overloaded")] == codes["overloaded"]  # refused unread
        assert wait_for(lambda: idle(thread))
    finally:
        thread.stop()


def test_reload_under_load_fails_no_request(tmp_path):
    spec = small_spec()
    for version in (1, 2):
        save_model(tmp_path, spec, init_weights(spec, seed=version), version=version)
    thread = serve(admin_token="t")
    thread.server.control.repository = tmp_path
    failures, versions, stop = [], set(), threading.Event()

    def client(k):
        conn = RawConnection(thread.port)
        rid = 0
        while not stop.is_set():
            for _ in range(4):  # a few in flight at once, half with a deadline
                rid += 1
                message = request(rid, n=8, seed=k * 1000 + rid)[0]
                if rid % 2:
                    message["deadline_ms"] = 30_000
                conn.send(message)
            for _ in range(4):
                answer = conn.receive()
                if answer["ok"]:
                    versions.add(answer["version"])
                else:
                    failures.append(answer)
        conn.close()

    try:
        workers = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for w in workers:
            w.start()
        admin = RawConnection(thread.port)
        for i, op in enumerate(["load", "reload", "load", "reload", "load"]):
            message = {"id": i, "op": op, "token": "t", "model": "small"}
            if op == "load":
                message["version"] = 1 + i % 2
            admin.send(message)
            assert admin.receive()["ok"] is True
        stop.set()
        for w in workers:
            w.join(60)
        admin.close()
        assert failures == []
        assert versions == {1, 2}
    finally:
        stop.set()
        thread.stop()


def test_frames_in_progress_share_a_bounded_read_buffer():
    thread = serve(max_frame_bytes=1 << 16, max_read_buffer_bytes=1 << 17)
    budget = thread.server.read_budget
    try:
        frames = [encode_message({"id": i, "op": "ping", "pad": "x" * 60_000})
                  for i in range(3)]
        size = len(frames[0]) - 4
        conns = [RawConnection(thread.port) for _ in range(3)]
        for i, (conn, frame) in enumerate(zip(conns, frames, strict=True)):
            conn.sock.sendall(frame[:30_000])  # a large frame, half sent
            if i < 2:
                assert wait_for(lambda i=i: budget.used == (i + 1) * size)
        assert wait_for(lambda: budget.waiting == 1)  # the third does not fit: it waits
        assert budget.used == 2 * size
        gone = RawConnection(thread.port)  # a waiter that leaves: noticed on its turn
        gone.sock.sendall(frames[2][:30_000])
        assert wait_for(lambda: budget.waiting == 2)
        gone.close()
        small = RawConnection(thread.port)  # whole small frames never wait
        small.send({"id": 7, "op": "ping"})
        assert small.receive()["ok"] is True
        conns[0].sock.sendall(frames[0][30_000:])
        assert conns[0].receive()["error"]["code"] == "bad_request"  # "pad" is no ping key
        assert wait_for(lambda: budget.waiting == 1 and budget.used == 2 * size)
        for conn, frame in zip(conns[1:], frames[1:], strict=True):
            conn.sock.sendall(frame[30_000:])
            assert conn.receive()["id"] is not None
        assert wait_for(lambda: budget.used == 0 and budget.waiting == 0)
        assert wait_for(lambda: thread.server.connections == 4)  # the leaver is gone
        for conn in [*conns, small]:
            conn.close()
    finally:
        thread.stop()
