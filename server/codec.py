"""Wire codec: frames, msgpack messages and typed arrays. Pure functions, no I/O.

A frame is a 4-byte big-endian unsigned length followed by that many bytes holding
one msgpack map. ``FrameDecoder`` is fed whatever bytes arrive and returns the
complete frames' payloads; ``decode_message`` unpacks one payload under size limits;
``encode_message`` does the reverse. Typed arrays (``{dtype, shape, data}``,
little-endian, C order) convert to and from numpy here.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from .errors import BadRequest, TooLarge

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 << 20
MAX_FRAME_LIMIT = (1 << 32) - 1
WIRE_DTYPES = {"f4": np.dtype("<f4"), "f8": np.dtype("<f8"), "f2": np.dtype("<f2"),
               "i4": np.dtype("<i4"), "i8": np.dtype("<i8")}
_NUMPY_TO_WIRE = {np.dtype(np.float32): "f4", np.dtype(np.float64): "f8",
                  np.dtype(np.float16): "f2", np.dtype(np.int32): "i4",
                  np.dtype(np.int64): "i8"}
MAX_NDIM = 4
MAX_NESTING = 1023  # msgpack's C unpacker refuses deeper frames (its stack is 1024)


@dataclass(frozen=True, slots=True)
class CodecLimits:
    """Bounds applied while unpacking one frame (each also capped by the frame size)."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME
    """Largest frame payload accepted; a bigger length header is a fatal ``too_large``."""
    max_str_len: int = 1 << 16
    """Longest msgpack str (model names, keys, messages)."""
    max_map_len: int = 4096
    """Most entries in one msgpack map (an ``inputs`` map has one per model input)."""
    max_array_len: int = 1 << 24
    """Most elements in one plain msgpack array."""

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_str_len", "max_map_len", "max_array_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CodecLimits.{name} is {value!r}; expected a positive int")
        if self.max_frame_bytes > MAX_FRAME_LIMIT:
            raise ValueError(f"CodecLimits.max_frame_bytes is {self.max_frame_bytes}; "
                             f"a 4-byte length header allows at most {MAX_FRAME_LIMIT}")


class FrameDecoder:
    """Incremental frame splitter: ``feed(bytes)`` returns every payload completed so far.

    A length header above ``max_frame_bytes`` ends the stream: ``feed`` returns the
    frames completed before it and sets ``error`` to a ``TooLarge``; the stream cannot
    be resynchronised after that, so the caller answers and closes, and later feeds
    return nothing.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.error: TooLarge | None = None
        """Set once an oversize length header was read."""
        self._buffer = bytearray()
        self._need: int | None = None  # payload length of the frame being read

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a partial frame)."""
        return len(self._buffer)

    @property
    def expecting(self) -> int | None:
        """Payload length of the frame being read (its header has arrived), else None."""
        return self._need

    def feed(self, data: bytes) -> list[bytearray]:
        """Append ``data``; return the payloads of all frames now complete, in order."""
        if self.error is not None:
            return []
        self._buffer += data
        frames = []
        pos = 0
        buf = self._buffer
        while True:
            if self._need is None:
                if len(buf) - pos < HEADER.size:
                    break
                (length,) = HEADER.unpack_from(buf, pos)
                if length > self.max_frame_bytes:
                    self.error = TooLarge(message=f"frame of {length} bytes is above the "
                                                  f"limit of {self.max_frame_bytes} bytes")
                    buf.clear()
                    return frames
                pos += HEADER.size
                self._need = length
            if len(buf) - pos < self._need:
                break
            frames.append(buf[pos:pos + self._need])
            pos += self._need
            self._need = None
        if pos:
            del buf[:pos]
        return frames


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_message(payload: bytes | bytearray, limits: CodecLimits) -> dict:
    """Unpack one frame payload to a dict with str keys; ``BadRequest`` if it is not one."""
    if not payload:
        raise BadRequest(message="empty frame: a frame must hold one msgpack map")
    try:
        message = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True, timestamp=0,
            ext_hook=_reject_ext, max_ext_len=0, max_str_len=limits.max_str_len,
            max_bin_len=limits.max_frame_bytes, max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len)
    except msgpack.ExtraData:
        raise BadRequest(message="frame holds bytes after its msgpack map; "
                                 "a frame must hold exactly one map") from None
    except (msgpack.StackError, RecursionError):
        raise BadRequest(message="frame nests maps and arrays too deeply "
                                 f"(at most {MAX_NESTING} levels)") from None
    except (ValueError, msgpack.FormatError, TypeError, UnicodeDecodeError) as exc:
        raise BadRequest(message=f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise BadRequest(message=f"frame holds {type_name(message)}; "
                                 "it must hold a map")
    return message


def encode_message(message: dict) -> bytes:
    """One frame (header + msgpack map); numpy arrays become typed arrays."""
    payload = msgpack.packb(message, default=_default, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def _default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a recserve message")


def encode_array(array: np.ndarray) -> dict:
    """A typed array for ``array`` (int/float dtypes without a wire form are widened)."""
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in _NUMPY_TO_WIRE and native.kind in "iub":
        native = np.dtype(np.int64)
    elif native not in _NUMPY_TO_WIRE and native.kind == "f":
        native = np.dtype(np.float64)
    if native not in _NUMPY_TO_WIRE:
        raise TypeError(f"cannot send an array of dtype {array.dtype} (use ints or floats)")
    data = np.ascontiguousarray(array, dtype=native.newbyteorder("<"))
    return {"dtype": _NUMPY_TO_WIRE[native], "shape": list(data.shape), "data": data.tobytes()}


def is_typed_array(obj: object) -> bool:
    """Whether ``obj`` looks like a typed array (a map with a ``dtype`` key)."""
    return isinstance(obj, dict) and "dtype" in obj


def decode_array(obj: object, name: str, max_elements: int) -> np.ndarray:
    """A numpy array from a typed array or a plain (nested) list of numbers.

    ``name`` labels the value in error messages. Shapes and byte counts are checked
    before any allocation; the result may be a read-only view of the message bytes.
    Plain lists give int64 when every element is an int, float64 otherwise.
    """
    if is_typed_array(obj):
        return _decode_typed(obj, name, max_elements)
    if isinstance(obj, list):
        return _decode_list(obj, name, max_elements)
    raise BadRequest(message=f"{name} is {type_name(obj)}; expected a typed array "
                             "{dtype, shape, data} or a list of numbers")


_TYPED_KEYS = frozenset(("dtype", "shape", "data"))


def _decode_typed(obj: dict, name: str, max_elements: int) -> np.ndarray:
    if not obj.keys() <= _TYPED_KEYS:  # (one set test; the sorted list only for the error)
        extra = sorted(str(k) for k in obj if k not in _TYPED_KEYS)
        raise BadRequest(message=f"{name}: typed array has unknown keys {extra}; "
                                 "expected dtype, shape, data")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise BadRequest(message=f"{name}: typed array dtype is {dtype!r}; expected one of "
                                 f"{', '.join(WIRE_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise BadRequest(message=f"{name}: typed array shape is {shape!r}; expected a list "
                                 f"of at most {MAX_NDIM} non-negative ints")
    if not isinstance(data, bytes):
        raise BadRequest(message=f"{name}: typed array data is {type_name(data)}; "
                                 "expected msgpack bin")
    count = math.prod(shape)
    if count > max_elements:
        raise BadRequest(message=f"{name}: typed array shape {shape} holds {count} elements; "
                                 f"at most {max_elements} are allowed here")
    itemsize = WIRE_DTYPES[dtype].itemsize
    if len(data) != count * itemsize:
        raise BadRequest(message=f"{name}: typed array data has {len(data)} bytes; shape "
                                 f"{shape} of {dtype} needs {count * itemsize}")
    return np.frombuffer(data, dtype=WIRE_DTYPES[dtype]).reshape(shape)


def _decode_list(obj: list, name: str, max_elements: int) -> np.ndarray:
    shape: list[int] = []
    level: object = obj
    while isinstance(level, list):
        shape.append(len(level))
        if len(shape) > MAX_NDIM:
            raise BadRequest(message=f"{name}: list is nested deeper than {MAX_NDIM} levels")
        level = level[0] if level else None
    count = math.prod(shape)
    if count > max_elements:
        raise BadRequest(message=f"{name}: list of shape {shape} holds {count} elements; "
                                 f"at most {max_elements} are allowed here")
    flat: list = []
    _flatten(obj, shape, 0, flat, name)
    if all(type(v) is int for v in flat):
        try:
            return np.array(flat, dtype=np.int64).reshape(shape)
        except OverflowError:
            raise BadRequest(message=f"{name}: an integer does not fit in int64") from None
    return np.array(flat, dtype=np.float64).reshape(shape)


def _flatten(obj: list, shape: list[int], depth: int, out: list, name: str) -> None:
    if len(obj) != shape[depth]:
        raise BadRequest(message=f"{name}: nested lists are ragged (a list of {len(obj)} "
                                 f"where {shape[depth]} was expected at depth {depth})")
    if depth == len(shape) - 1:
        for v in obj:
            if type(v) not in (int, float):
                raise BadRequest(message=f"{name}: element {v!r} is {type_name(v)}; "
                                         "expected a number")
        out.extend(obj)
        return
    for item in obj:
        if not isinstance(item, list):
            raise BadRequest(message=f"{name}: nested lists are ragged (found "
                                     f"{type_name(item)} at depth {depth + 1})")
        _flatten(item, shape, depth + 1, out, name)


def type_name(obj: object) -> str:
    """The msgpack type of a decoded value, with an article: "a map", "an array", "nil"."""
    names = {dict: "a map", list: "an array", str: "a str", bytes: "a bin", int: "an int",
             float: "a float", bool: "a bool", type(None): "nil"}
    return names.get(type(obj), f"a {type(obj).__name__}")
