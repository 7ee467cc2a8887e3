"""Clients: typed exceptions, request building, connection failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_fixtures import ServerThread, loaded, small_spec

from recserve.engine.demo import random_inputs, to_wire
from recserve.server import (
    AsyncClient,
    BadRequest,
    Client,
    DeadlineExceeded,
    ErrorCode,
    InternalError,
    NotFound,
    Overloaded,
    RecserveError,
    TooLarge,
    Unauthorized,
)
from recserve.server.backend import ReferenceBackend
from recserve.server.client import guess_candidates, infer_request

MODEL = loaded(small_spec(), seed=9)


@pytest.fixture()
def server():
    thread = ServerThread(ReferenceBackend([MODEL]), max_frame_bytes=4096)
    yield thread
    thread.stop()


def wire(n):
    return to_wire(MODEL.spec, random_inputs(MODEL.spec, np.random.default_rng(n), n))


@pytest.mark.parametrize(("code", "kind"), [
    ("bad_request", BadRequest), ("not_found", NotFound), ("too_large", TooLarge),
    ("overloaded", Overloaded), ("deadline_exceeded", DeadlineExceeded),
    ("unauthorized", Unauthorized), ("internal", InternalError),
])
def test_every_code_maps_to_its_subclass(code, kind):
    error = RecserveError.from_code(code, "why")
    assert type(error) is kind and error.code == code and error.message == "why"
    assert str(error) == f"{code}: why"


def test_error_codes_are_exactly_the_documented_set():
    assert {c.value for c in ErrorCode} == {
        "bad_request", "not_found", "too_large", "overloaded", "deadline_exceeded",
        "unauthorized", "internal"}


def test_an_unknown_code_still_raises_a_recserve_error():
    error = RecserveError.from_code("rate_limited", "slow down")
    assert type(error) is RecserveError and error.code == "rate_limited"


def test_infer_requests_carry_priority_only_when_given():
    assert "priority" not in infer_request("m", {"x": [1]}, candidates=1)
    assert infer_request("m", {"x": [1]}, candidates=1, priority="high")["priority"] == "high"


def test_candidates_are_guessed_from_candidate_scope_inputs():
    assert guess_candidates({"a": [1], "b": {"values": [1, 2], "lengths": [1, 0, 1]}}) == 3
    assert guess_candidates({"d": np.zeros((5, 2)), "r": np.zeros(2)}) == 5
    assert guess_candidates({"d": [[0.0], [1.0]]}) == 2
    with pytest.raises(ValueError, match="pass candidates=N"):
        guess_candidates({"a": [1, 2]})
    request = infer_request("m", {"a": [1]}, candidates=4, version=2, deadline_ms=5)
    assert request == {"op": "infer", "model": "m", "candidates": 4, "inputs": {"a": [1]},
                       "version": 2, "deadline_ms": 5}


def test_blocking_client_sees_a_closed_server_as_connection_error(server):
    client = Client(server.host, server.port)
    assert client.infer("small", wire(2)).shape == (2,)
    server.stop()
    with pytest.raises(OSError):  # ConnectionError, or a reset on the send
        client.ping()
    client.close()


def test_blocking_client_refuses_a_response_above_its_own_frame_limit(server):
    with Client(server.host, server.port, max_frame_bytes=64) as client:
        with pytest.raises(TooLarge, match="above the limit of 64"):
            client.models()


def test_async_client_fails_pending_requests_with_the_servers_too_large(server):
    async def go():
        client = await AsyncClient.connect(server.host, server.port)
        assert (await client.ping())["ok"] is True
        big = client.call("ping", pad="x" * 8192)
        with pytest.raises(TooLarge, match="above the limit of 4096"):
            await big
        with pytest.raises(TooLarge):  # the connection is gone; the reason stays
            await client.ping()
        await client.close()

    asyncio.run(go())


def test_async_client_close_fails_what_is_in_flight():
    async def go():
        # A peer that accepts and never answers: the request stays in flight.
        peers = []
        silent = await asyncio.start_server(lambda r, w: peers.append(w), "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        client = await AsyncClient.connect("127.0.0.1", port)
        pending = asyncio.ensure_future(client.infer("small", wire(3)))
        while client.in_flight == 0:
            await asyncio.sleep(0)
        await client.close()
        with pytest.raises(ConnectionError, match="client closed"):
            await pending
        with pytest.raises(ConnectionError):
            await client.ping()
        silent.close()

    asyncio.run(go())
