"""PROTOCOL.md agrees with the code: every op and error code, the limits, the examples'
bytes; and the documented infer frame, sent as raw bytes, is scored by a real server."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest
from server_fixtures import RawConnection, ServerThread

from recserve.server.codec import MAX_NESTING, CodecLimits, encode_array, encode_message
from recserve.server.config import ServerConfig
from recserve.server.dispatch import Op
from recserve.server.errors import ErrorCode
from recserve.server.infer import MAX_DEADLINE_MS

DOC = (Path(__file__).resolve().parent.parent / "PROTOCOL.md").read_text()

DOC_REQUEST = {"id": 2, "op": "infer", "model": "demo", "candidates": 2, "inputs": {
    "watch_history": [17, 4021, 388], "country": [42], "device": [3], "hour_of_day": [21],
    "member_dense": [0.5, -1.0, 0.0, 2.0],
    "title_id": {"values": [101, 2048], "lengths": [1, 1]},
    "genres": {"values": [3, 7, 12], "lengths": [2, 1]},
    "title_dense": encode_array(np.array([[0.5, 0.25, 1.0], [0.0, -0.5, 2.0]], np.float32))}}


def hex_of(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def squash(text: str) -> str:
    return " ".join(text.split())


def documented_request_bytes() -> bytes:
    block = DOC.split("<!-- request-hex -->", 1)[1].split("```", 2)[1]
    return bytes.fromhex(block)


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_is_documented(code):
    assert f"| `{code}` |" in DOC


@pytest.mark.parametrize("op", [o.value for o in Op])
def test_every_op_is_documented(op):
    # data-plane ops have a section each; the admin ops share one table
    assert f"### `{op}`" in DOC or f"\n| `{op}` | `token`" in DOC


def test_documented_limits_are_the_defaults():
    config, limits = ServerConfig(), CodecLimits()
    rows = {
        "frame payload": f"{config.max_frame_bytes} bytes",
        "candidates per request": str(config.max_candidates),
        "requests in flight, all connections": str(config.max_in_flight),
        "unanswered requests per connection": str(config.max_pending_per_connection),
        "str length": f"{limits.max_str_len} bytes",
        "map entries": str(limits.max_map_len),
        "array elements": str(limits.max_array_len),
        "nesting depth": str(MAX_NESTING),
        "`deadline_ms`": str(MAX_DEADLINE_MS),
        "open connections": str(config.max_connections),
        "partial frame stall": f"{config.frame_timeout_s:g} s",
        "unread responses stall": f"{config.write_timeout_s:g} s",
        "shutdown drain": f"{config.drain_s:g} s",
    }
    for name, value in rows.items():
        assert f"| {name} | {value} |" in DOC, name
    assert f"127.0.0.1:{config.port}" in DOC


def test_documented_bytes_are_what_the_codec_produces():
    doc = squash(DOC)
    ping_reply = {"id": 1, "ok": True, "protocol": 1, "server": "recserve 0.1.0"}
    assert hex_of(encode_message(ping_reply)) in doc
    vector = msgpack.packb(encode_array(np.array([0.5, 0.25], np.float32)))
    assert hex_of(vector) in doc
    assert documented_request_bytes() == encode_message(DOC_REQUEST)


def test_ping_annotation_matches_its_bytes():
    block = DOC.split("Request `{\"id\": 1, \"op\": \"ping\"}`:", 1)[1].split("```")[1]
    data = []
    for line in block.splitlines():  # leading hex pairs; the annotation follows them
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            data.append(token)
    assert bytes.fromhex("".join(data)) == encode_message({"id": 1, "op": "ping"})


def test_the_documented_infer_frame_is_scored_by_a_real_server(tmp_path):
    from recserve.engine.demo import build_demo_repository
    from recserve.server.backend import ReferenceBackend

    build_demo_repository(tmp_path)
    thread = ServerThread(ReferenceBackend.from_repository(tmp_path), loop="uvloop")
    try:
        conn = RawConnection(thread.port)
        conn.sock.sendall(documented_request_bytes())
        response = conn.receive()
        conn.close()
    finally:
        thread.stop()
    assert response["ok"] is True, response
    assert (response["id"], response["model"], response["version"]) == (2, "demo", 1)
    assert response["scores"]["dtype"] == "f4" and response["scores"]["shape"] == [2]
    scores = np.frombuffer(response["scores"]["data"], "<f4")
    assert np.all((scores > 0) & (scores < 1))
