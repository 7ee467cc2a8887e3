"""Protocol fuzzing against a real server (hypothesis): valid-looking requests with one
field mutated, ids and ops of every type, random and flipped bytes, truncated and
concatenated frames, huge lengths, deep nesting, bins where arrays belong.

Every example runs on a fresh connection and must get, for each whole frame sent, one
well-formed response (a typed error code from PROTOCOL.md when not ok), or a clean close
after a fatal frame; meanwhile a canary connection must keep being served correctly.
``RECSERVE_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` runs a longer campaign.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from server_fixtures import RawConnection, ServerThread, loaded, reference_scores, small_spec

from recserve.engine.demo import random_inputs, to_wire
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.settings import EngineSettings
from recserve.server.backend import EngineBackend
from recserve.server.codec import CodecLimits, decode_message, encode_array
from recserve.server.errors import ErrorCode, RecserveError

MODEL = loaded(small_spec(), version=1, seed=3)
CODES = {c.value for c in ErrorCode}
EXAMPLES = int(os.environ.get("RECSERVE_FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
MAX_FRAME = 1 << 16
TOKEN = "fuzz-token"
# Control-plane requests to mutate besides infer (admin ops with the right token: with no
# repository configured they fail cleanly; the unload names a model that is not served).
CONTROL = [{"op": "load", "token": TOKEN, "model": "small", "version": 1},
           {"op": "reload", "token": TOKEN, "model": "small"},
           {"op": "unload", "token": TOKEN, "model": "nope"},
           {"op": "health"}, {"op": "stats"}, {"op": "models"}, {"op": "ping"}]


@pytest.fixture(scope="module")
def server():
    engine = Engine(EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=1),
                    lambda s: CpuExecutor(s, torch_threads=1))
    backend = EngineBackend(engine)

    async def setup():
        await engine.start()
        await backend.load(MODEL)

    thread = ServerThread(backend, setup=setup, max_frame_bytes=MAX_FRAME, max_candidates=32,
                          frame_timeout_s=5.0, admin_token=TOKEN)
    thread.canary = RawConnection(thread.port)
    yield thread
    thread.canary.close()
    end = time.monotonic() + 10
    while thread.server.connections > 0 and time.monotonic() < end:
        time.sleep(0.01)
    leftover = (thread.server.connections, thread.server.dispatcher.active,
                engine.pending_requests)
    thread.stop()
    assert leftover == (0, 0, 0)  # nothing leaked across every example


def plain(obj):
    """A wire message as plain msgpack values (numpy arrays as typed-array maps)."""
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj


def valid_request(seed: int, n: int, rid: int = 1) -> dict:
    inputs = random_inputs(MODEL.spec, np.random.default_rng(seed), n)
    return {"id": rid, "op": "infer", "model": "small", "candidates": n,
            "inputs": plain(to_wire(MODEL.spec, inputs))}


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats() | st.text(max_size=12) | st.binary(max_size=24)
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6) | st.integers(-5, 5), inner, max_size=4), max_leaves=12)


@st.composite
def mutated_requests(draw) -> dict:
    """A valid request (mostly infer) with one value somewhere replaced, deleted or added."""
    rid = draw(st.integers(0, 1 << 20))
    which = draw(st.integers(0, 2 * len(CONTROL)))
    if which < len(CONTROL):
        message = {"id": rid, **CONTROL[which]}
    else:
        message = valid_request(draw(st.integers(0, 1 << 16)), draw(st.integers(1, 6)), rid)
    node, path = message, []
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict)
                                   else range(len(node))))
        path.append((node, key))
        node = node[key]
    if not path:
        path.append((message, draw(st.sampled_from(sorted(message)))))
    parent, key = path[-1]
    action = draw(st.sampled_from(["replace", "delete", "add", "bin"]))
    if action == "replace":
        parent[key] = draw(values)
    elif action == "bin":  # bin where an array (or anything) belongs
        parent[key] = draw(st.binary(max_size=64))
    elif action == "delete" and isinstance(parent, dict):
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=6))] = draw(values)
    else:
        parent.append(draw(values))
    return message


def exchange(server, data: bytes, frames: int, fatal_ok: bool = False) -> list[dict]:
    """Send ``data`` on a fresh connection; read one response per whole frame (fewer if the
    server closes after a fatal frame); check each response; close."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(data)
    reader = RawConnection.__new__(RawConnection)
    reader.sock, reader.buffer = sock, b""
    responses = []
    try:
        for _ in range(frames):
            responses.append(reader.receive())
    except ConnectionError:
        assert fatal_ok or any(r["id"] is None for r in responses), responses
    sock.close()
    for response in responses:
        check(response)
    return responses


def check(response: dict) -> None:
    assert set(response) >= {"id", "ok"} and isinstance(response["ok"], bool), response
    if not response["ok"]:
        error = response["error"]
        assert error["code"] in CODES and isinstance(error["message"], str), response
        assert error["code"] != "internal", response  # a bad request is never a crash


def canary(server) -> None:
    """The other client is still served, and correctly."""
    conn = server.canary
    inputs = random_inputs(MODEL.spec, np.random.default_rng(7), 3)
    conn.send({"id": 1, "op": "infer", "model": "small", "candidates": 3,
               "inputs": plain(to_wire(MODEL.spec, inputs))})
    answer = conn.receive()
    assert answer["ok"] is True, answer
    np.testing.assert_allclose(np.frombuffer(answer["scores"]["data"], "<f4"),
                               reference_scores(MODEL, inputs), rtol=1e-5, atol=1e-6)


@FUZZ
@given(message=mutated_requests())
def test_mutated_requests(server, message):
    try:
        payload = pack(message)
    except (ValueError, OverflowError, TypeError):
        reject()  # hypothesis built a value msgpack cannot pack: nothing to send
    (response,) = exchange(server, frame(payload), 1)
    if response["ok"] and message.get("op") == "infer":
        assert np.frombuffer(response["scores"]["data"], "<f4").shape[0] == message[
            "candidates"]
    canary(server)


@FUZZ
@given(rid=values, op=values)
def test_ids_and_ops_of_every_type(server, rid, op):
    try:
        payload = pack({"id": rid, "op": op})
    except (ValueError, OverflowError, TypeError):
        reject()
    (response,) = exchange(server, frame(payload), 1)
    try:  # an ext type or a non-str key anywhere makes the whole frame unreadable: id nil
        decode_message(payload, CodecLimits(max_frame_bytes=MAX_FRAME))
        readable = True
    except RecserveError:
        readable = False
    valid_id = readable and type(rid) is int and 0 <= rid < (1 << 64)
    assert response["id"] == (rid if valid_id else None)
    assert response["ok"] is (valid_id and op in ("ping", "models", "health", "stats"))
    canary(server)


@FUZZ
@given(seeds=st.lists(st.integers(0, 1000), min_size=1, max_size=5), cut=st.integers(0, 4096),
       junk=st.lists(st.binary(max_size=40), max_size=3), flip=st.integers(0, 1 << 16))
def test_concatenated_truncated_and_corrupted_frames(server, seeds, cut, junk, flip):
    payloads = [pack(valid_request(s, 1 + s % 5, rid=i)) for i, s in enumerate(seeds)]
    payloads += junk  # random bytes as whole frames: bad_request each
    corrupt = bytearray(payloads[0])
    corrupt[flip % len(corrupt)] ^= 1 << (flip % 8)
    payloads.append(bytes(corrupt))
    stream = b"".join(frame(p) for p in payloads)
    exchange(server, stream, len(payloads))  # concatenated in one write
    truncated = stream[:cut % len(stream)]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(truncated)
    sock.shutdown(socket.SHUT_WR)  # a client gone mid-frame
    received = b""
    while chunk := sock.recv(1 << 16):  # the server closes its side: EOF, no hang
        received += chunk
    sock.close()
    canary(server)


@FUZZ
@given(length=st.integers(MAX_FRAME + 1, (1 << 32) - 1), before=st.integers(0, 2))
def test_huge_length_headers_are_refused_and_closed(server, length, before):
    stream = b"".join(frame(pack({"id": i, "op": "ping"})) for i in range(before))
    responses = exchange(server, stream + struct.pack(">I", length) + b"\x80", before + 2,
                         fatal_ok=True)
    assert [r["ok"] for r in responses] == [True] * before + [False]
    assert responses[-1]["id"] is None and responses[-1]["error"]["code"] == "too_large"
    canary(server)


@FUZZ
@given(depth=st.integers(1, 5000), kind=st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deep_nesting(server, depth, kind):
    nested = kind * depth + b"\xc0"
    payload = b"\x83" + pack("id") + pack(3) + pack("op") + pack("infer") + pack("model") + nested
    (response,) = exchange(server, frame(payload), 1)
    assert response["ok"] is False and response["error"]["code"] == "bad_request"
    canary(server)
