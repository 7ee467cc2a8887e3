"""Messages between front-end worker processes and the engine process (no I/O).

The multi-core front end (``hub``, ``worker``) moves decoding and validation into worker
processes; what crosses to the one process that owns the engine is already validated
numpy data, in a flat binary layout the engine side reads back as zero-copy
``np.frombuffer`` views (no msgpack, no checks). Every message is one frame (the wire's
4-byte length header) whose first byte is its kind:

- ``S`` score request: ``rid u64, deadline f64 (NaN: none), version u32, N u32,
  pinned u8, name_len u16, name, then the request's arrays``: its sparse inputs in the
  flat form (``recserve.engine.flat``: ids, weights, candidate-scope lengths [F_c, N], bag
  bounds), then each dense feature in spec order. The engine side stages the ids in one
  copy and reads every feature's inputs as views, with a handful of array headers to
  parse instead of three per feature. An absent array is dtype 0, then codes 1 int64,
  2 float32, 3 int32 (ids stay int32 when validation made them so).
  ``pinned`` 0: the client asked for the latest version, which may be newer by now.
- ``R`` score reply: ``rid u64, status u8, version u32`` then the scores array (status 0;
  ``version`` is the one that scored) or a msgpack ``{code, message}`` (status 1).
- ``C`` control: one msgpack map with a ``kind`` key (models, admin, stats, drain, ...).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import msgpack
import numpy as np

from recserve.engine.flat import FlatFeatures, FlatSparse, flat_shape, flatten_sparse
from recserve.engine.inputs import RequestInputs
from recserve.engine.spec import ModelSpec

from .codec import HEADER

_SCORE = struct.Struct("<cQdIIBH")
_REPLY = struct.Struct("<cQBI")
_ARRAY = struct.Struct("<BB")
_I8, _F4, _I4 = np.dtype("<i8"), np.dtype("<f4"), np.dtype("<i4")
_DTYPES = {1: _I8, 2: _F4, 3: _I4}
_CODES = {v: k for k, v in _DTYPES.items()}


def _put_array(parts: list, array: np.ndarray | None, dtype: np.dtype) -> None:
    if array is None:
        parts.append(_ARRAY.pack(0, 0))
        return
    array = np.asarray(array, dtype=dtype)
    parts.append(_ARRAY.pack(_CODES[dtype], array.ndim))
    parts.append(struct.pack(f"<{array.ndim}I", *array.shape))
    parts.append(np.ascontiguousarray(array).data)


def _get_array(data: memoryview, pos: int) -> tuple[np.ndarray | None, int]:
    code, ndim = _ARRAY.unpack_from(data, pos)
    pos += _ARRAY.size
    if code == 0:
        return None, pos
    shape = struct.unpack_from(f"<{ndim}I", data, pos)
    pos += 4 * ndim
    dtype = _DTYPES[code]
    count = math.prod(shape)
    array = np.frombuffer(data, dtype, count, pos).reshape(shape)
    return array, pos + count * dtype.itemsize


def frame(payload: bytes | bytearray) -> bytes:
    """The payload with its length header."""
    return HEADER.pack(len(payload)) + payload


def encode_score(rid: int, name: str, version: int, inputs: RequestInputs,
                 deadline: float | None, spec: ModelSpec, pinned: bool = True) -> bytes:
    """A framed score request (arrays in ``spec``'s order)."""
    raw = name.encode()
    parts: list = [_SCORE.pack(b"S", rid, math.nan if deadline is None else deadline,
                               version, inputs.num_candidates, pinned, len(raw)), raw]
    flat = inputs.flat
    if flat is None:  # flattened here, in the worker process, not in the engine's
        flat = flatten_sparse(spec, inputs.sparse, inputs.num_candidates)
    # ids cross as validation left them: int32 (what the engine stages) stays int32
    _put_array(parts, flat.ids, _I4 if flat.ids.dtype == _I4 else _I8)
    _put_array(parts, flat.weights, _F4)
    # int32 bounds mean every length fits int32 too (as int64 they were a sixth of a frame)
    _put_array(parts, flat.lengths, _I4 if flat.bounds.dtype == _I4 else _I8)
    _put_array(parts, flat.bounds, _I4 if flat.bounds.dtype == _I4 else _I8)
    for f in spec.dense:
        _put_array(parts, inputs.dense[f.name], _F4)
    return frame(b"".join(parts))


class ScoreHeader(NamedTuple):
    """The fixed part of a score request; ``offset`` is where its arrays start."""

    rid: int
    name: str
    version: int
    candidates: int
    deadline: float | None
    pinned: bool
    offset: int


def score_header(payload: memoryview) -> ScoreHeader:
    """The header of a score request."""
    _, rid, deadline, version, n, pinned, name_len = _SCORE.unpack_from(payload, 0)
    start = _SCORE.size
    name = bytes(payload[start:start + name_len]).decode()
    return ScoreHeader(rid, name, version, n, None if math.isnan(deadline) else deadline,
                       bool(pinned), start + name_len)


def decode_inputs(payload: memoryview, pos: int, n: int, spec: ModelSpec) -> RequestInputs:
    """The request's arrays (views of ``payload``) as RequestInputs, with its flat form."""
    ids, pos = _get_array(payload, pos)
    weights, pos = _get_array(payload, pos)
    lengths, pos = _get_array(payload, pos)
    bounds, pos = _get_array(payload, pos)
    flat = FlatSparse(ids, weights, lengths, bounds)
    _check_flat(flat, n, spec)
    dense = {}
    for f in spec.dense:
        dense[f.name], pos = _get_array(payload, pos)
    return RequestInputs(n, FlatFeatures(flat, spec), dense, flat)


def _check_flat(flat: FlatSparse, n: int, spec: ModelSpec) -> None:
    """The flat form's shapes, and every bag bound inside its own ids: the engine stages
    bounds as they come, so a broken worker must not make the gather read past a request's
    ids (two reductions; the ids themselves are checked by the kernel)."""
    f_c, f_r, weighted = flat_shape(spec)
    bounds, ids = flat.bounds, flat.ids
    if (ids is None or flat.lengths is None or bounds is None or ids.ndim != 1
            or not flat.fits(f_c, f_r, n) or (flat.weights is not None) != weighted
            or (weighted and flat.weights.shape != ids.shape)
            or bounds.min() < 0 or bounds.max() > len(ids)):
        raise ValueError("malformed sparse inputs from a worker process")


def encode_reply(rid: int, scores: np.ndarray, version: int) -> bytes:
    """A framed score reply carrying float32 scores from model ``version``."""
    parts: list = [_REPLY.pack(b"R", rid, 0, version)]
    _put_array(parts, scores, _F4)
    return frame(b"".join(parts))


def encode_error(rid: int, code: str, message: str) -> bytes:
    """A framed score reply carrying an error."""
    return frame(_REPLY.pack(b"R", rid, 1, 0)
                 + msgpack.packb({"code": code, "message": message}))


def decode_reply(payload: memoryview) -> tuple[int, np.ndarray | None, int, dict | None]:
    """(rid, scores, version, None) or (rid, None, 0, {code, message})."""
    _, rid, status, version = _REPLY.unpack_from(payload, 0)
    if status == 0:
        scores, _ = _get_array(payload, _REPLY.size)
        return rid, scores, version, None
    return rid, None, 0, msgpack.unpackb(payload[_REPLY.size:], raw=False)


def encode_control(message: dict) -> bytes:
    """A framed control message (a msgpack map with ``kind``)."""
    return frame(b"C" + msgpack.packb(message, use_bin_type=True))


def decode_control(payload: memoryview) -> dict:
    """The control message of a ``C`` payload."""
    return msgpack.unpackb(payload[1:], raw=False, strict_map_key=False)
