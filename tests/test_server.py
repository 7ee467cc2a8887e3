"""A real server on 127.0.0.1 with real clients: scores, every malformed request, limits."""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest
from server_fixtures import (
    LOOPS,
    RawConnection,
    ServerThread,
    loaded,
    multi_spec,
    reference_scores,
    small_spec,
)

from recserve.engine.demo import random_inputs, to_wire
from recserve.server import BadRequest, Client, NotFound, RecserveError
from recserve.server.backend import ReferenceBackend
from recserve.server.codec import encode_array

SMALL_V1 = loaded(small_spec(), version=1, seed=1)
SMALL_V2 = loaded(small_spec(), version=2, seed=2)
MULTI = loaded(multi_spec(), version=3, seed=3)
MAX_CANDIDATES = 64


@pytest.fixture(scope="module", params=LOOPS)
def server(request):
    thread = ServerThread(ReferenceBackend([SMALL_V1, SMALL_V2, MULTI]), loop=request.param,
                          max_candidates=MAX_CANDIDATES, max_frame_bytes=1 << 16)
    yield thread
    thread.stop()


def request(model, n, seed=0):
    """(RequestInputs, wire inputs with numpy arrays) for ``model``."""
    inputs = random_inputs(model.spec, np.random.default_rng(seed), n)
    return inputs, to_wire(model.spec, inputs)


def plain(value):
    """The same inputs as plain msgpack lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value


def typed(value):
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    return encode_array(value) if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize("n", [1, 7, MAX_CANDIDATES])
def test_infer_matches_the_reference_model(server, n):
    inputs, wire = request(SMALL_V2, n, seed=n)
    with Client(server.host, server.port) as client:
        scores = client.infer("small", wire, candidates=n)
        as_lists = client.infer("small", plain(wire), candidates=n)
    assert scores.dtype == np.float32 and scores.shape == (n,)
    np.testing.assert_allclose(scores, reference_scores(SMALL_V2, inputs), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(as_lists, scores)


def test_version_defaults_to_the_highest_and_can_be_chosen(server):
    inputs, wire = request(SMALL_V1, 5)
    with Client(server.host, server.port) as client:
        latest = client.infer("small", wire)
        first = client.infer("small", wire, version=1)
        with pytest.raises(NotFound, match="no version 9"):
            client.infer("small", wire, version=9)
        with pytest.raises(NotFound, match="'nope' is not served"):
            client.infer("nope", wire)
    np.testing.assert_allclose(latest, reference_scores(SMALL_V2, inputs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first, reference_scores(SMALL_V1, inputs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(latest, first)


def test_several_outputs_come_back_as_n_by_h(server):
    inputs, wire = request(MULTI, 6)
    with Client(server.host, server.port) as client:
        scores = client.infer("multi", wire)
    assert scores.shape == (6, 2)
    np.testing.assert_allclose(scores, reference_scores(MULTI, inputs), rtol=1e-5, atol=1e-6)


def test_raw_response_shape(server):
    _, wire = request(MULTI, 2)
    conn = RawConnection(server.port)
    conn.send({"id": 41, "op": "infer", "model": "multi", "candidates": 2,
               "inputs": typed(wire)})
    response = conn.receive()
    conn.close()
    assert set(response) == {"id", "ok", "model", "version", "scores"}
    assert (response["id"], response["ok"], response["model"], response["version"]) == (
        41, True, "multi", 3)
    assert response["scores"]["dtype"] == "f4" and response["scores"]["shape"] == [2, 2]
    assert len(response["scores"]["data"]) == 16


def test_ping_and_models(server):
    with Client(server.host, server.port) as client:
        assert client.ping()["protocol"] == 1
        models = client.models()
    assert [(m["name"], m["version"]) for m in models] == [("multi", 3), ("small", 1),
                                                           ("small", 2)]
    small = models[2]
    inputs = {i["name"]: i for i in small["inputs"]}
    assert inputs["history"] == {"name": "history", "kind": "sparse", "scope": "request",
                                 "dtype": "i4", "table": "items", "rows": 50, "max_bag": 6,
                                 "pooling": "mean", "weighted": True}
    assert inputs["feat"] == {"name": "feat", "kind": "dense", "scope": "candidate",
                              "dtype": "f4", "dim": 3}
    assert small["outputs"] == [{"name": "score", "activation": "sigmoid"}]
    assert models[0]["outputs"][1] == {"name": "watch_time", "activation": "logit"}


def _infer(n=3, **changes):
    _, wire = request(SMALL_V2, 3)
    message = {"id": 5, "op": "infer", "model": "small", "candidates": n,
               "inputs": plain(wire)}
    for key, value in changes.items():
        if value is None:
            del message[key]
        else:
            message[key] = value
    return message


def _with_input(name, value):
    message = _infer()
    message["inputs"][name] = value
    return message


def _without_input(name):
    message = _infer()
    del message["inputs"][name]
    return message


MALFORMED = {
    "missing input": (_without_input("ctx"), "bad_request", "missing inputs \\['ctx'\\]"),
    "extra input": (_with_input("colour", [1]), "bad_request", "unknown inputs \\['colour'\\]"),
    "float ids": (_with_input("user", encode_array(np.array([1.0], np.float32))),
                  "bad_request", "input 'user' values has dtype f4"),
    "int dense": (_with_input("ctx", encode_array(np.array([1, 2], np.int64))),
                  "bad_request", "input 'ctx'.*dtype i8; expected floats"),
    "dense shape": (_with_input("feat", [[0.0] * 3] * 2), "bad_request",
                    "input 'feat'.*shape \\[2, 3\\]; expected \\[3, 3\\]"),
    "lengths sum": (_with_input("tags", {"values": [1, 2, 3], "lengths": [1, 1, 2],
                                         "weights": [1.0] * 3}),
                    "bad_request", "input 'tags' lengths sum to 4 but values has 3"),
    "index outside": (_with_input("item", {"values": [1, 77, 3], "lengths": [1, 1, 1]}),
                      "bad_request", "input 'item' values\\[1\\] is 77, outside table 'items'"),
    "nan": (_with_input("ctx", [0.0, float("nan")]), "bad_request", "input 'ctx'.*\\[1\\] is nan"),
    "inf": (_with_input("feat", [[0.0, 0.0, 0.0], [0.0, float("-inf"), 0.0], [0.0] * 3]),
            "bad_request", "input 'feat'.*\\[1, 1\\] is -inf"),
    "unknown model": (_infer(model="nope"), "not_found", "model 'nope' is not served"),
    "unknown version": (_infer(version=7), "not_found", "no version 7"),
    "unknown op": ({"id": 5, "op": "score"}, "bad_request", "unknown op 'score'"),
    "no op": ({"id": 5}, "bad_request", "unknown op None"),
    "zero candidates": (_infer(n=0), "bad_request", "candidates is 0"),
    "too many candidates": (_infer(n=MAX_CANDIDATES + 1), "too_large",
                            f"at most {MAX_CANDIDATES} per request"),
    "missing key": (_infer(inputs=None), "bad_request", "missing keys \\['inputs'\\]"),
    "extra key": (_infer(tenant=1), "bad_request", "unknown keys \\['tenant'\\]"),
    "priority not a str": (_infer(priority=1), "bad_request", "priority is 1; expected one of"),
    "unknown priority": (_infer(priority="urgent"), "bad_request",
                         "priority is 'urgent'; expected one of \\['high', 'normal', 'low'\\]"),
    "extra key on ping": ({"id": 5, "op": "ping", "x": 1}, "bad_request", "unknown keys"),
    "model not a str": (_infer(model=3), "bad_request", "model is 3"),
    "bad version": (_infer(version=-1), "bad_request", "version is -1"),
    "bad deadline": (_infer(deadline_ms=0), "bad_request", "deadline_ms is 0"),
    "inputs not a map": (_infer(inputs=[1]), "bad_request", "inputs is an array"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_a_typed_error_and_the_connection_stays_usable(server, case):
    message, code, match = MALFORMED[case]
    conn = RawConnection(server.port)
    conn.send(message)
    response = conn.receive()
    assert response["id"] == 5 and response["ok"] is False
    assert response["error"]["code"] == code
    assert re.search(match, response["error"]["message"]), response["error"]["message"]
    _assert_usable(conn)


def _assert_usable(conn):
    conn.send({"id": 99, "op": "ping"})
    assert conn.receive()["ok"] is True
    conn.send(_infer() | {"id": 100})
    response = conn.receive()
    assert response["id"] == 100 and response["ok"] is True, response
    conn.close()


@pytest.mark.parametrize(("payload", "match"), [
    (b"\xc1\x00\x01", "not valid msgpack"),
    (msgpack.packb([1, 2, 3]), "holds an array"),
    (msgpack.packb({"id": 1}) + b"\x00", "bytes after its msgpack map"),
    (b"", "empty frame"),
    (msgpack.packb({"op": "ping"}), "request has no id"),
    (msgpack.packb({"id": -1, "op": "ping"}), "request id is -1"),
    (msgpack.packb({"id": "7", "op": "ping"}), "request id is '7'"),
    (msgpack.packb({"id": 1.0, "op": "ping"}), "request id is 1.0"),
    (msgpack.packb({"id": None, "op": "ping"}), "request id is None"),
])
def test_frames_without_a_usable_id_get_an_error_with_id_null(server, payload, match):
    conn = RawConnection(server.port)
    conn.send_payload(payload)
    response = conn.receive()
    assert response["id"] is None and response["ok"] is False
    assert response["error"]["code"] == "bad_request"
    assert match in response["error"]["message"]
    _assert_usable(conn)


def test_frame_above_the_limit_gets_too_large_then_the_connection_closes(server):
    conn = RawConnection(server.port)
    conn.send({"id": 1, "op": "ping"})
    assert conn.receive()["ok"] is True
    # Only the header is sent: the server must not wait for (or buffer) the payload.
    conn.sock.sendall((1 << 16 | 1).to_bytes(4, "big"))
    response = conn.receive()
    assert response["id"] is None and response["error"]["code"] == "too_large"
    assert "65537 bytes is above the limit of 65536" in response["error"]["message"]
    assert conn.is_closed_by_peer()
    conn.close()
    with Client(server.host, server.port) as client:  # the server itself is fine
        assert client.ping()["ok"] is True


def test_too_large_reaches_the_blocking_client_as_a_typed_error(server):
    big = {"user": [1], "pad": "x" * (1 << 16)}
    with Client(server.host, server.port) as client, pytest.raises(RecserveError) as info:
        client.infer("small", big, candidates=1)
    assert info.value.code == "too_large"


def test_bad_request_is_a_subclass_the_client_can_catch(server):
    _, wire = request(SMALL_V2, 3)
    wire["ctx"] = np.array([np.nan, 0.0], dtype=np.float32)
    with Client(server.host, server.port) as client:
        with pytest.raises(BadRequest, match="input 'ctx'") as info:
            client.infer("small", wire)
        assert info.value.code == "bad_request"
        assert client.infer("small", request(SMALL_V2, 3)[1]).shape == (3,)


def test_demo_repository_served_end_to_end(tmp_path):
    from recserve.engine.demo import build_demo_repository, demo_request, demo_spec
    from recserve.engine.repository import ModelRepository

    build_demo_repository(tmp_path)
    demo = ModelRepository(tmp_path).load("demo")
    thread = ServerThread(ReferenceBackend.from_repository(tmp_path))
    try:
        wire = demo_request(demo_spec(), np.random.default_rng(3), 120)
        with Client(thread.host, thread.port) as client:
            scores = client.infer("demo", wire)
            assert [m["name"] for m in client.models()] == ["demo"]
    finally:
        thread.stop()
    assert scores.shape == (120,)
    from recserve.server.validate import validate_inputs
    inputs = validate_inputs(demo.spec, 120, typed(wire), 4096)
    np.testing.assert_allclose(scores, reference_scores(demo, inputs), rtol=1e-5, atol=1e-6)


def test_freeze_heap_hides_what_is_alive_from_full_collections():
    """Objects alive at startup (models, modules) are frozen: a full collection no longer
    walks them (what `serve` and each worker do once ready)."""
    import gc

    from recserve.server.app import freeze_heap

    keep = [[i] for i in range(1000)]  # tracked containers alive "at startup"
    try:
        freeze_heap()
        frozen = gc.get_freeze_count()
        assert frozen >= len(keep)
        assert all(o is not keep[0] for o in gc.get_objects(2))  # not among the walked
    finally:
        gc.unfreeze()
