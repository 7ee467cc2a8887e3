"""Check an infer request's wire ``inputs`` against a model spec and build RequestInputs.

Every check names the input and the problem. Sizes are bounded from the spec and
``candidates`` before anything is allocated; the codec already bounded the frame.
Wire forms (PROTOCOL.md):

- request-scope sparse: an int array (one bag), or ``{values[, weights]}``;
- candidate-scope sparse: ``{values, lengths[, weights]}``, ``lengths`` has N entries
  summing to ``len(values)``;
- dense: ``[dim]`` (request scope) or ``[N, dim]`` (candidate scope), finite floats.
"""

from __future__ import annotations

import numpy as np

from recserve.engine.inputs import RequestInputs, SparseInput
from recserve.engine.spec import DenseFeature, ModelSpec, SparseFeature

from .codec import decode_array, is_typed_array, type_name
from .errors import BadRequest, TooLarge

_INT32_MAX = (1 << 31) - 1


def validate_inputs(spec: ModelSpec, candidates: object, inputs: object,
                    max_candidates: int) -> RequestInputs:
    """Validated RequestInputs for ``spec``; ``BadRequest`` / ``TooLarge`` otherwise."""
    n = check_candidates(candidates, max_candidates)
    if not isinstance(inputs, dict):
        raise BadRequest(message=f"inputs is {type_name(inputs)}; expected a map "
                                 "from input name to value")
    expected = [f.name for f in spec.sparse] + [f.name for f in spec.dense]
    if len(inputs) != len(expected) or not all(name in inputs for name in expected):
        missing = [name for name in expected if name not in inputs]
        extra = sorted(str(k) for k in inputs if k not in expected)
        parts = []
        if missing:
            parts.append(f"missing inputs {missing}")
        if extra:
            parts.append(f"unknown inputs {extra}")
        raise BadRequest(message=f"model {spec.name!r}: {'; '.join(parts)}; "
                                 f"it takes {expected}")
    sparse = {f.name: _sparse(spec, f, inputs[f.name], n) for f in spec.sparse}
    dense = {f.name: _dense(f, inputs[f.name], n) for f in spec.dense}
    return RequestInputs(num_candidates=n, sparse=sparse, dense=dense)


def check_candidates(candidates: object, max_candidates: int) -> int:
    """N as an int in [1, max_candidates]."""
    if type(candidates) is not int:
        raise BadRequest(message=f"candidates is {candidates!r}; expected a positive int")
    if candidates < 1:
        raise BadRequest(message=f"candidates is {candidates}; a request must score at "
                                 "least 1 candidate")
    if candidates > max_candidates:
        raise TooLarge(message=f"candidates is {candidates}; this server scores at most "
                               f"{max_candidates} per request")
    return candidates


def _sparse(spec: ModelSpec, f: SparseFeature, value: object, n: int) -> SparseInput:
    label = f"input {f.name!r}"
    if f.scope == "request":
        if isinstance(value, list) or is_typed_array(value):
            value = {"values": value}
        allowed = ("values", "weights")
        max_values = f.max_bag  # one bag: the element bound is max_bag itself
    else:
        allowed = ("values", "lengths", "weights")
        max_values = n * f.max_bag
    if not isinstance(value, dict):
        raise BadRequest(message=f"{label} ({f.scope}-scope sparse) is "
                                 f"{type_name(value)}; expected {_sparse_form(f)}")
    required = [k for k in allowed if k != "weights" or f.weighted]
    if len(value) != len(required) or not all(k in value for k in required):
        missing = [k for k in required if k not in value]
        extra = sorted(str(k) for k in value if k not in required)
        raise BadRequest(message=f"{label}: missing keys {missing}, unknown keys {extra}; "
                                 f"expected {_sparse_form(f)}")
    values = _int_vector(value["values"], f"{label} values", max_values, keep_int32=True)
    lengths = None
    if f.scope == "candidate":
        lengths = _lengths(f, value["lengths"], len(values), n)
    values = _checked_ids(spec, f, values)
    weights = None
    if f.weighted:
        weights = _float_array(value["weights"], f"{label} weights", len(values))
        if weights.shape != values.shape:
            raise BadRequest(message=f"{label} weights have shape {list(weights.shape)}; "
                                     f"values have {list(values.shape)}")
        _check_finite(weights, f"{label} weights")
    return SparseInput(values=values, lengths=lengths, weights=weights)


def _sparse_form(f: SparseFeature) -> str:
    weights = ", weights: float array" if f.weighted else ""
    if f.scope == "request":
        if f.weighted:
            return f"{{values: int array{weights}}}"
        return "an int array (one bag) or {values: int array}"
    return f"{{values: int array, lengths: int array of N{weights}}}"


def _int_vector(obj: object, label: str, max_len: int, keep_int32: bool = False) -> np.ndarray:
    """A 1-D int64 array, or int32 as sent when ``keep_int32`` (ids: see ``_sparse``)."""
    array = decode_array(obj, label, max_len)
    if array.ndim != 1:
        raise BadRequest(message=f"{label} has shape {list(array.shape)}; expected a 1-D array")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind != "i":
        raise BadRequest(message=f"{label} has dtype {_wire_name(array)}; ids must be ints "
                                 "(i4 or i8)")
    if keep_int32 and array.dtype == np.int32:
        return array
    return array.astype(np.int64, copy=False)


def _lengths(f: SparseFeature, obj: object, num_values: int, n: int) -> np.ndarray:
    label = f"input {f.name!r} lengths"
    lengths = _int_vector(obj, label, n)
    if len(lengths) != n:
        raise BadRequest(message=f"{label} has {len(lengths)} entries; expected one per "
                                 f"candidate ({n})")
    lo, hi = _extremes(lengths)
    if lo < 0 or hi > f.max_bag:  # (an empty array gives 0, 0)
        i = int(np.argmax((lengths < 0) | (lengths > f.max_bag)))
        raise BadRequest(message=f"{label}[{i}] is {int(lengths[i])}; bag lengths must be "
                                 f"in [0, {f.max_bag}] (max_bag)")
    total = int(lengths.sum())
    if total != num_values:
        raise BadRequest(message=f"{label} sum to {total} but values has {num_values} "
                                 "entries; they must be equal")
    return lengths


def _extremes(array: np.ndarray) -> tuple[int, int]:
    """(min, max) of a 1-D int array, (0, 0) when empty. A few elements (request-scope
    bags are often one id) go through a list: two numpy reductions cost more there."""
    if len(array) <= 32:
        listed = array.tolist()
        return (min(listed), max(listed)) if listed else (0, 0)
    return int(array.min()), int(array.max())


def _checked_ids(spec: ModelSpec, f: SparseFeature, values: np.ndarray) -> np.ndarray:
    """``values`` once every id is inside its table, as int32 where the table allows."""
    rows = spec.table(f.table).rows
    # Two reductions and no temporaries on the common path; find the culprit only on failure.
    lo, hi = _extremes(values)
    if lo < 0 or hi >= rows:  # (an empty array gives 0, 0; tables have rows)
        bad = (values < 0) | (values >= rows)
        i = int(np.argmax(bad))
        error = BadRequest(message=f"input {f.name!r} values[{i}] is {int(values[i])}, "
                                   f"outside table {f.table!r} (valid ids are 0 to {rows - 1})")
        error.invalid_ids = (f.name, int(np.count_nonzero(bad)))  # for the server's stats
        raise error
    if values.dtype != np.int32 and rows <= _INT32_MAX:
        # Narrowed here, per request (in a worker process with --workers), so the engine's
        # packing, its bottleneck on the GPU, copies half the bytes and checks nothing.
        values = values.astype(np.int32)
    return values


def _float_array(obj: object, label: str, max_elements: int) -> np.ndarray:
    array = decode_array(obj, label, max_elements)
    if array.size and array.dtype.kind != "f" and is_typed_array(obj):
        raise BadRequest(message=f"{label} has dtype {_wire_name(array)}; expected floats "
                                 "(f2, f4 or f8)")
    # Plain lists of ints are exact numbers, so they are accepted as floats. An f8 too
    # large for f4 becomes Inf here and is reported by _check_finite.
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(np.float32, copy=False)


def _dense(f: DenseFeature, obj: object, n: int) -> np.ndarray:
    label = f"input {f.name!r}"
    want = [f.dim] if f.scope == "request" else [n, f.dim]
    array = _float_array(obj, f"{label} ({f.scope}-scope dense, expected shape {want})",
                         int(np.prod(want)))
    if list(array.shape) != want:
        form = "[dim]" if f.scope == "request" else "[N, dim]"
        raise BadRequest(message=f"{label} ({f.scope}-scope dense) has shape "
                                 f"{list(array.shape)}; expected {want} ({form})")
    _check_finite(array, label)
    return array


def _check_finite(array: np.ndarray, label: str) -> None:
    # A float64 sum of float32 values cannot overflow, and any NaN or Inf makes it
    # non-finite: one reduction decides the common case.
    if np.isfinite(array.sum(dtype=np.float64)):
        return
    finite = np.isfinite(array)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        index = ", ".join(str(i) for i in where)
        raise BadRequest(message=f"{label}[{index}] is {array[where]} (after conversion to "
                                 "float32); values must be finite")


def _wire_name(array: np.ndarray) -> str:
    return f"{array.dtype.kind}{array.dtype.itemsize}"
