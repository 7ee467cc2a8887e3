"""Messages between front-end worker processes and the engine process (no I/O).

The multi-core front end (``hub``, ``worker``) moves decoding and validation into worker
processes; what crosses to the one process that owns the engine is already validated
numpy data, in a flat binary layout the engine side reads back as zero-copy
``np.frombuffer`` views (no msgpack, no checks). Every message is one frame (the wire's
4-byte length header) whose first byte is its kind:

- ``S`` score request: ``rid u64, deadline f64 (NaN: none), version u32, N u32,
  pinned u8, priority u8, name_len u16, data_at u64, name``, then the headers of the request's
  arrays, then (``data_at`` = INLINE) their data. The arrays: its sparse inputs in the
  flat form (``recserve.engine.flat``: ids, weights, candidate-scope lengths [F_c, N], bag
  bounds), then each dense feature in spec order. Each header is ``code u8, ndim u8,
  shape u32 * ndim`` (code 0: absent; 1 int64, 2 float32, 3 int32: ids stay int32 when
  validation made them so); the data lie back to back, each array on a 64-byte boundary
  counted from where the data start: in the frame after the headers, or at ``data_at`` in
  the worker's shared ring (``shared_ring``), where the worker wrote them. The engine side
  stages the ids in one copy and reads every feature's inputs as views, with a handful of
  array headers to parse instead of three per feature. ``pinned`` 0: the client asked
  for the latest version, which may be newer by now.
- ``R`` score reply: ``rid u64, status u8, released u8, version u32`` then the scores
  array (status 0; ``version`` is the one that scored) or a msgpack ``{code, message}``
  (status 1). ``released`` 1: the engine reads the request's ring region no more, the
  worker may reuse it; 0: an ``F`` follows when it does (a cancelled request, or one
  answered while a batch still packs a piece of it, gets only the ``F``).
- ``F`` region free: ``rid u64``: request ``rid``'s ring region may be reused.
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
from recserve.engine.scheduler import Priority
from recserve.engine.shared_memory import SharedInputs
from recserve.engine.spec import ModelSpec

from .codec import HEADER
from .shared_ring import ALIGN, SharedRing, aligned

_SCORE = struct.Struct("<cQdIIBBHQ")
_REPLY = struct.Struct("<cQBBI")
_FREE = struct.Struct("<cQ")
_I8, _F4, _I4 = np.dtype("<i8"), np.dtype("<f4"), np.dtype("<i4")
_DTYPES = {1: _I8, 2: _F4, 3: _I4}
_CODES = {v: k for k, v in _DTYPES.items()}
_UNSIGNED = {_I4: np.dtype("<u4"), _I8: np.dtype("<u8")}
INLINE = (1 << 64) - 1
"""``data_at`` of a request whose arrays travel in the frame."""

Arrays = list[np.ndarray | None]


_HEADS = {n: struct.Struct(f"<BB{n}I") for n in range(8)}  # code, ndim, shape
_ABSENT = _HEADS[0].pack(0, 0)
_PAD = bytes(ALIGN)


def _layout(arrays: Arrays) -> tuple[bytes, list[int], int]:
    """The arrays' headers, where each one's data start (from the data's start) and the
    data's size: back to back, each on an ``ALIGN`` boundary."""
    headers, offsets, size = [], [], 0
    for array in arrays:
        offsets.append(size)
        if array is None:
            headers.append(_ABSENT)
            continue
        headers.append(_HEADS[array.ndim].pack(_CODES[array.dtype], array.ndim, *array.shape))
        size += aligned(array.nbytes)
    return b"".join(headers), offsets, size


def _write(memory: memoryview, base: int, arrays: Arrays, offsets: list[int]) -> None:
    """Copy each array to ``memory[base + its offset]`` (one copy, no intermediate)."""
    for array, offset in zip(arrays, offsets, strict=True):
        if array is not None and array.size:
            start = base + offset
            memory[start:start + array.nbytes] = memoryview(np.ascontiguousarray(array)).cast("B")


def _read(headers: memoryview, pos: int, count: int, memory: memoryview | None,
          base: int | None) -> tuple[Arrays, int]:
    """``count`` arrays whose headers start at ``headers[pos]``, as views of ``memory``
    from ``base`` (None: the data follow the headers in ``headers`` itself); the
    position after the headers. Raises ValueError when the data lie past the memory."""
    specs = []
    for _ in range(count):
        head = _HEADS[headers[pos + 1]]
        code, _, *shape = head.unpack_from(headers, pos)
        pos += head.size
        specs.append((_DTYPES[code], shape) if code else None)
    if base is None:
        memory, base = headers, pos
    arrays: Arrays = []
    try:
        for spec in specs:
            if spec is None:
                arrays.append(None)
                continue
            dtype, shape = spec
            array = np.ndarray(shape, dtype, memory, base)
            arrays.append(array)
            base += aligned(array.nbytes)
    except TypeError as exc:  # numpy's word for a buffer too small
        raise ValueError(f"array data past the end of its memory: {exc}") from None
    return arrays, pos


def _frame_with(fixed: bytes, arrays: Arrays) -> bytes:
    """A frame: ``fixed``, the arrays' headers, then their data (one join: the cheapest
    way to build a frame of small arrays)."""
    headers, _, size = _layout(arrays)
    parts = [b"", fixed, headers]
    for array in arrays:
        if array is not None and array.size:
            parts.append(np.ascontiguousarray(array).data)
            parts.append(_PAD[:(-array.nbytes) % ALIGN])
    parts[0] = HEADER.pack(len(fixed) + len(headers) + size)
    return b"".join(parts)


def frame(payload: bytes | bytearray) -> bytes:
    """The payload with its length header."""
    return HEADER.pack(len(payload)) + payload


def _score_arrays(inputs: RequestInputs, spec: ModelSpec) -> Arrays:
    """A request's arrays in their wire order and dtypes."""
    flat = inputs.flat
    if flat is None:  # flattened here, in the worker process, not in the engine's
        flat = flatten_sparse(spec, inputs.sparse, inputs.num_candidates)
    # ids cross as validation left them: int32 (what the engine stages) stays int32;
    # int32 bounds mean every length fits int32 too (as int64 they were a sixth of a frame)
    ids = _I4 if flat.ids.dtype == _I4 else _I8
    bounds = _I4 if flat.bounds.dtype == _I4 else _I8
    wire = [(flat.ids, ids), (flat.weights, _F4), (flat.lengths, bounds),
            (flat.bounds, bounds)] + [(inputs.dense[f.name], _F4) for f in spec.dense]
    return [None if a is None else np.asarray(a, dtype=t) for a, t in wire]


def encode_score(rid: int, name: str, version: int, inputs: RequestInputs,
                 deadline: float | None, spec: ModelSpec, pinned: bool = True,
                 ring: SharedRing | None = None,
                 priority: Priority = Priority.NORMAL) -> tuple[bytes, int | None]:
    """(a framed score request, arrays in ``spec``'s order; the start of the ``ring``
    region its data were written to, or None when they are in the frame: no ring, or
    no room left in it)."""
    arrays = _score_arrays(inputs, spec)
    data_at = None
    if ring is not None:
        headers, offsets, size = _layout(arrays)
        data_at = ring.alloc(size)
        if data_at is not None:
            _write(ring.memory, data_at, arrays, offsets)
    raw = name.encode()
    fixed = _SCORE.pack(b"S", rid, math.nan if deadline is None else deadline, version,
                        inputs.num_candidates, pinned, priority, len(raw),
                        INLINE if data_at is None else data_at) + raw
    if data_at is None:
        return _frame_with(fixed, arrays), None
    return frame(fixed + headers), data_at


class ScoreHeader(NamedTuple):
    """The fixed part of a score request; ``offset`` is where its array headers start;
    ``data_at`` where their data start in the worker's ring (None: in the frame)."""

    rid: int
    name: str
    version: int
    candidates: int
    deadline: float | None
    pinned: bool
    offset: int
    data_at: int | None
    priority: Priority


def score_header(payload: memoryview) -> ScoreHeader:
    """The header of a score request."""
    _, rid, deadline, version, n, pinned, priority, name_len, data_at = _SCORE.unpack_from(
        payload, 0)
    start = _SCORE.size
    name = bytes(payload[start:start + name_len]).decode()
    return ScoreHeader(rid, name, version, n, None if math.isnan(deadline) else deadline,
                       bool(pinned), start + name_len, None if data_at == INLINE else data_at,
                       Priority(priority))


def decode_inputs(payload: memoryview, header: ScoreHeader, spec: ModelSpec,
                  ring: memoryview | None = None,
                  shared: SharedInputs | None = None) -> RequestInputs:
    """The request's arrays (views of ``payload``, or of ``ring``, the worker's shared
    memory, when they lie there) as RequestInputs, with its flat form (and ``shared``:
    where another process finds them), their bounds checked (``_check_flat``)."""
    if header.data_at is not None and ring is None:
        raise ValueError("a request in shared memory from a worker that has none")
    arrays, _ = _read(payload, header.offset, 4 + len(spec.dense), ring, header.data_at)
    flat = FlatSparse(*arrays[:4])
    n = header.candidates
    _check_flat(flat, n, spec)
    dense = {f.name: a for f, a in zip(spec.dense, arrays[4:], strict=True)}
    return RequestInputs(n, FlatFeatures(flat, spec), dense, flat, shared)


def decode_shared(payload: bytes, ring: memoryview, spec: ModelSpec) -> RequestInputs:
    """A score request's inputs from its payload and a mapping of its worker's ring: what
    a packing process (``recserve.engine.packer``) decodes (``SharedInputs``). Checked
    (``_check_flat``, about 2 us of its 8): the engine process defers ring requests'
    decoding to the packing processes (``DeferredInputs``), so this may be the first
    check of these bytes."""
    view = memoryview(payload)
    return decode_inputs(view, score_header(view), spec, ring)


def _check_flat(flat: FlatSparse, n: int, spec: ModelSpec) -> None:
    """The flat form's shapes, and every bag bound inside its own ids: the engine stages
    bounds as they come, so a broken worker must not make the gather read past a request's
    ids (the ids themselves are checked by the kernel). One reduction: read as unsigned, a
    negative bound is larger than any length. (Bounds in a worker's ring stay as checked:
    the worker writes a region only before sending it and after it is freed.)"""
    f_c, f_r, weighted = flat_shape(spec)
    bounds, ids = flat.bounds, flat.ids
    if (ids is None or flat.lengths is None or bounds is None or ids.ndim != 1
            or not flat.fits(f_c, f_r, n) or (flat.weights is not None) != weighted
            or (weighted and flat.weights.shape != ids.shape)
            or (bounds.size and int(bounds.view(_UNSIGNED[bounds.dtype]).max()) > len(ids))):
        raise ValueError("malformed sparse inputs from a worker process")


def encode_reply(rid: int, scores: np.ndarray, version: int, released: bool = True) -> bytes:
    """A framed score reply carrying float32 scores from model ``version``; ``released``:
    the request's ring region (if it had one) may be reused now."""
    return _frame_with(_REPLY.pack(b"R", rid, 0, released, version),
                       [np.asarray(scores, dtype=_F4)])


def encode_error(rid: int, code: str, message: str, released: bool = True) -> bytes:
    """A framed score reply carrying an error."""
    return frame(_REPLY.pack(b"R", rid, 1, released, 0)
                 + msgpack.packb({"code": code, "message": message}))


class Reply(NamedTuple):
    """A score reply: ``scores`` and the ``version`` that scored, or ``error``
    ({code, message}); ``released``: see ``encode_reply``."""

    rid: int
    scores: np.ndarray | None
    version: int
    error: dict | None
    released: bool


def decode_reply(payload: memoryview) -> Reply:
    """The reply in an ``R`` payload."""
    _, rid, status, released, version = _REPLY.unpack_from(payload, 0)
    if status == 0:
        (scores,), _ = _read(payload, _REPLY.size, 1, None, None)
        return Reply(rid, scores, version, None, bool(released))
    error = msgpack.unpackb(payload[_REPLY.size:], raw=False)
    return Reply(rid, None, 0, error, bool(released))


def encode_free(rid: int) -> bytes:
    """A framed ``F``: request ``rid``'s ring region may be reused."""
    return frame(_FREE.pack(b"F", rid))


def decode_free(payload: memoryview) -> int:
    """The request id of an ``F`` payload."""
    return _FREE.unpack_from(payload, 0)[1]


def encode_control(message: dict) -> bytes:
    """A framed control message (a msgpack map with ``kind``)."""
    return frame(b"C" + msgpack.packb(message, use_bin_type=True))


def decode_control(payload: memoryview) -> dict:
    """The control message of a ``C`` payload."""
    return msgpack.unpackb(payload[1:], raw=False, strict_map_key=False)
