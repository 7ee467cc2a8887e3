"""Codec from bytes: framing, msgpack limits, typed arrays and plain lists."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from recserve.server.codec import (
    CodecLimits,
    FrameDecoder,
    decode_array,
    decode_message,
    encode_array,
    encode_message,
)
from recserve.server.errors import BadRequest, TooLarge

LIMITS = CodecLimits()


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_frames_fed_one_byte_at_a_time():
    messages = [{"id": i, "op": "ping", "pad": "x" * i} for i in range(5)]
    stream = b"".join(encode_message(m) for m in messages)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i:i + 1]))
    assert [decode_message(p, LIMITS) for p in out] == messages
    assert decoder.buffered == 0


def test_several_frames_in_one_chunk_and_a_partial_tail():
    a, b, c = (encode_message({"id": i}) for i in range(3))
    decoder = FrameDecoder()
    first = decoder.feed(a + b + c[:3])
    assert [decode_message(p, LIMITS)["id"] for p in first] == [0, 1]
    assert decoder.buffered == 3
    second = decoder.feed(c[3:])
    assert [decode_message(p, LIMITS)["id"] for p in second] == [2]


def test_frame_header_split_across_chunks():
    data = encode_message({"id": 7})
    decoder = FrameDecoder()
    assert decoder.feed(data[:2]) == []
    assert decoder.feed(data[2:4]) == []
    assert [decode_message(p, LIMITS) for p in decoder.feed(data[4:])] == [{"id": 7}]


def test_oversize_length_header_is_too_large_before_the_payload_arrives():
    decoder = FrameDecoder(max_frame_bytes=100)
    assert len(decoder.feed(frame(b"\x80" * 100))) == 1  # exactly at the limit is fine
    assert decoder.error is None
    # Frames completed before the bad header still come out; nothing after it does.
    out = decoder.feed(frame(b"\x81") + struct.pack(">I", 101) + frame(b"\x82"))
    assert [bytes(p) for p in out] == [b"\x81"]
    assert isinstance(decoder.error, TooLarge)
    assert "101 bytes is above the limit of 100" in decoder.error.message
    assert decoder.feed(frame(b"\x83")) == []


def test_empty_frame_is_a_bad_request():
    (payload,) = FrameDecoder().feed(frame(b""))
    with pytest.raises(BadRequest, match="empty frame"):
        decode_message(payload, LIMITS)


@pytest.mark.parametrize(("payload", "match"), [
    (b"\xc1", "not valid msgpack"),                        # reserved byte
    (b"\x82\xa2id", "not valid msgpack"),                  # truncated map
    (msgpack.packb({"id": 1}) + b"\x01", "bytes after"),
    (msgpack.packb([1, 2]), "holds an array"),
    (msgpack.packb(5), "holds an int"),
    (msgpack.packb({1: 2}), "not valid msgpack"),           # non-str key
    (msgpack.packb({"x": msgpack.ExtType(5, b"ab")}), "not valid msgpack"),
    (msgpack.packb({"t": msgpack.Timestamp(1)}), "not valid msgpack"),
    (msgpack.packb({"s": "é"})[:-1] + b"\xff", "not valid msgpack"),  # bad utf-8
])
def test_bad_payloads_are_bad_requests(payload, match):
    with pytest.raises(BadRequest, match=match):
        decode_message(payload, LIMITS)


def test_nesting_depth_is_bounded():
    nested = lambda depth: b"\x81\xa1x" + b"\x91" * depth + b"\x00"  # noqa: E731
    assert decode_message(nested(1022), LIMITS)["x"] is not None
    with pytest.raises(BadRequest, match="nests maps and arrays too deeply"):
        decode_message(nested(5000), LIMITS)


def test_unpack_limits_apply():
    limits = CodecLimits(max_str_len=10, max_map_len=3, max_array_len=4)
    decode_message(msgpack.packb({"a": "x" * 10, "b": [1, 2, 3, 4]}), limits)
    for message in ({"a": "x" * 11}, {"a": [1] * 5}, {"a": 1, "b": 2, "c": 3, "d": 4}):
        with pytest.raises(BadRequest):
            decode_message(msgpack.packb(message), limits)


@pytest.mark.parametrize("dtype", ["f4", "f8", "f2", "i4", "i8"])
def test_typed_array_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.dtype(dtype))
    wire = msgpack.unpackb(msgpack.packb(encode_array(array)), raw=False)
    assert wire["dtype"] == dtype and wire["shape"] == [2, 3, 4]
    assert wire["data"] == array.astype(array.dtype.newbyteorder("<")).tobytes()
    back = decode_array(wire, "x", 1000)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_encode_array_is_little_endian_c_order_whatever_the_input():
    big = np.array([[1.5, 2.0], [3.0, 4.0]], dtype=">f4").T  # big-endian, Fortran order
    wire = encode_array(big)
    assert wire["shape"] == [2, 2]
    assert np.array_equal(np.frombuffer(wire["data"], "<f4"), [1.5, 3.0, 2.0, 4.0])
    assert encode_array(np.array([1, 2], dtype=np.uint8))["dtype"] == "i8"
    with pytest.raises(TypeError):
        encode_array(np.array(["a"]))


@pytest.mark.parametrize(("wire", "match"), [
    ({"dtype": "u1", "shape": [1], "data": b"\x00"}, "dtype is 'u1'"),
    ({"dtype": "f4", "shape": [2], "data": b"\x00" * 4}, "has 4 bytes; shape \\[2\\]"),
    ({"dtype": "f4", "shape": [-1], "data": b""}, "shape is \\[-1\\]"),
    ({"dtype": "f4", "shape": "2", "data": b""}, "shape is '2'"),
    ({"dtype": "f4", "shape": [1, 1, 1, 1, 1], "data": b"\x00" * 4}, "at most 4"),
    ({"dtype": "f4", "shape": [1], "data": [0, 0, 0, 0]}, "data is an array"),
    ({"dtype": "f4", "shape": [1], "data": b"\x00" * 4, "order": "F"}, "unknown keys"),
    ({"dtype": "f4", "shape": [1 << 40, 1 << 20], "data": b""}, "at most 100 are allowed"),
])
def test_bad_typed_arrays(wire, match):
    with pytest.raises(BadRequest, match=match):
        decode_array(wire, "x", 100)


def test_plain_lists():
    ints = decode_array([[1, 2], [3, 4]], "x", 10)
    assert ints.dtype == np.int64 and ints.shape == (2, 2)
    floats = decode_array([1, 2.5], "x", 10)
    assert floats.dtype == np.float64 and floats.tolist() == [1.0, 2.5]
    assert decode_array([], "x", 10).shape == (0,)


@pytest.mark.parametrize(("value", "match"), [
    ([[1, 2], [3]], "ragged"),
    ([[1, 2], 3], "element \\[1, 2\\]|ragged"),
    ([1, "a"], "element 'a' is a str"),
    ([True, 1], "element True is a bool"),
    ([None], "element None is nil"),
    ([1 << 63], "does not fit in int64"),
    ([[[[[1]]]]], "nested deeper"),
    (list(range(11)), "holds 11 elements; at most 10"),
    ("abc", "is a str; expected a typed array"),
    (b"abc", "is a bin"),
])
def test_bad_plain_lists(value, match):
    with pytest.raises(BadRequest, match=match):
        decode_array(value, "x", 10)


def test_codec_limits_validate():
    with pytest.raises(ValueError, match="max_frame_bytes"):
        CodecLimits(max_frame_bytes=0)
    with pytest.raises(ValueError, match="4-byte length"):
        CodecLimits(max_frame_bytes=1 << 32)


@pytest.mark.parametrize("dtype", [["f4"], {"a": 1}, None, 4, b"f4"])
def test_a_typed_array_dtype_of_any_type_is_a_bad_request(dtype):
    typed = {"dtype": dtype, "shape": [1], "data": b"\x00" * 4}
    with pytest.raises(BadRequest, match="dtype"):
        decode_array(typed, "x", 10)
