"""A request's sparse inputs back to back: the form the GPU engine stages in one copy.

Per feature, a request's ids are a separate array (``SparseInput``). Packing a batch
feature by feature costs a copy per feature per request (26 x 20 for a batch of
ranking-size dlrmv2 requests), and numpy holds the GIL through each small copy, so
packing threads cannot overlap. ``FlatSparse`` keeps all of one request's ids in one array,
bags in a fixed order with their bounds, so staging copies a request's ids at once and
writes its bag bounds with a few array adds; the kernel reads bags by (start, end) and does
not need them feature by feature (``embedding_bag``'s ``ends``).

Bag order: every candidate-scope feature's N bags (spec order), then one bag per
request-scope feature (spec order). Validation builds the form once per request (in a
worker process with ``--workers``), the worker channel carries it, and staging builds it
for requests that arrive without it (in-process callers, pieces of split requests).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .inputs import RequestInputs, SparseInput
from .spec import ModelSpec

_INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True, slots=True)
class FlatSparse:
    """One request's ids, weights and bag bounds (see the module docstring)."""

    ids: np.ndarray
    """[L] int32 when every feature's ids were int32, else int64."""
    weights: np.ndarray | None
    """[L] float32 (1 for unweighted features' ids) when the model has a weighted feature."""
    lengths: np.ndarray
    """int64 [F_c, N]: bag lengths of the candidate-scope features."""
    bounds: np.ndarray
    """[F_c * N + F_r + 1]: bag b spans ids[bounds[b]:bounds[b + 1]]; int32 (the dtype the
    engine stages them in: adding a request's base position is then a plain add, no cast)
    unless the request has 2^31 ids or more."""

    def sparse_inputs(self, spec: ModelSpec) -> dict[str, SparseInput]:
        """Per-feature ``SparseInput`` views of these arrays (no copy), by feature name."""
        f_c, n = self.lengths.shape
        edges = self.bounds[np.append(np.arange(f_c) * n, np.arange(f_c * n, len(self.bounds)))]
        edges = edges.tolist()
        out, c, r = {}, 0, f_c
        for f in spec.sparse:
            k = c if f.scope == "candidate" else r
            lo, hi = edges[k], edges[k + 1]
            weights = self.weights[lo:hi] if f.weighted else None
            if f.scope == "candidate":
                out[f.name] = SparseInput(self.ids[lo:hi], self.lengths[c], weights)
                c += 1
            else:
                out[f.name] = SparseInput(self.ids[lo:hi], None, weights)
                r += 1
        return out


class FlatFeatures(Mapping):
    """A FlatSparse seen as ``RequestInputs.sparse`` (name -> SparseInput): the per-feature
    views are made on first access, so a request whose features are never read one by one
    (the GPU engine stages its flat form) never pays for making 3 views per feature."""

    __slots__ = ("_flat", "_spec", "_made")

    def __init__(self, flat: FlatSparse, spec: ModelSpec) -> None:
        self._flat, self._spec = flat, spec
        self._made: dict[str, SparseInput] | None = None

    def __getitem__(self, name: str) -> SparseInput:
        if self._made is None:
            self._made = self._flat.sparse_inputs(self._spec)
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in self._spec.sparse)

    def __len__(self) -> int:
        return len(self._spec.sparse)


def split_bounds(bounds: np.ndarray, f_c: int, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Views of flat ``bounds``: candidate-scope starts and ends [F_c, N], request-scope
    starts and ends [F_r]."""
    split = f_c * n
    return (bounds[:split].reshape(f_c, n), bounds[1:split + 1].reshape(f_c, n),
            bounds[split:-1], bounds[split + 1:])


def bag_bounds(spec: ModelSpec, sparse: dict[str, SparseInput], n: int,
               out: np.ndarray) -> np.ndarray:
    """The flat bag bounds of ``sparse`` (``FlatSparse.bounds``) written into the start of
    ``out`` (int32 or int64, at least F_c * N + F_r + 1 long; no other array is
    allocated); returns that part of ``out``."""
    cand = [sparse[f.name].lengths for f in spec.sparse if f.scope == "candidate"]
    req = [sparse[f.name].values for f in spec.sparse if f.scope == "request"]
    bounds = out[:len(cand) * n + len(req) + 1]
    bounds[0] = 0
    if cand:
        np.concatenate(cand, out=bounds[1:len(cand) * n + 1], casting="same_kind")
    if req:
        bounds[len(cand) * n + 1:] = np.fromiter(map(len, req), bounds.dtype, len(req))
    np.cumsum(bounds, out=bounds)
    return bounds


def flatten_sparse(spec: ModelSpec, sparse: dict[str, SparseInput], n: int, *,
                   ids_out: np.ndarray | None = None,
                   weights_out: np.ndarray | None = None, lengths: bool = True) -> FlatSparse:
    """``sparse`` (one request with ``n`` candidates) in the flat form.

    Ids keep int32 when every feature's are int32; anything else becomes int64 (unsigned
    ids past int64 wrap negative: outside every table, so flagged, never read). With
    ``ids_out`` (exactly as long as all the ids, of their dtype or int64) and
    ``weights_out``, ids and weights are written there and the form's arrays are those
    (staging builds the form straight into its buffers: no temporary copy). ``lengths``
    False skips the lengths and bounds (staging writes bounds itself): the result's
    ``lengths`` and ``bounds`` are then empty.
    """
    cand = [sparse[f.name] for f in spec.sparse if f.scope == "candidate"]
    req = [sparse[f.name] for f in spec.sparse if f.scope == "request"]
    parts = cand + req
    narrow = all(p.values.dtype == np.int32 for p in parts)
    dtype = np.int32 if narrow else np.int64
    if ids_out is not None:
        if ids_out.dtype != np.int64 and (ids_out.dtype != dtype or dtype != np.int32):
            raise ValueError(f"ids_out is {ids_out.dtype}; these ids need {np.dtype(dtype)}")
        ids = ids_out
        if parts:
            np.concatenate([p.values for p in parts], out=ids, casting="unsafe")
    else:
        ids = np.concatenate([p.values for p in parts], dtype=dtype, casting="unsafe") \
            if parts else np.zeros(0, dtype)
    if lengths:
        lengths_2d = np.empty((len(cand), n), np.int64)
        if cand:
            np.concatenate([p.lengths for p in cand], out=lengths_2d.reshape(-1),
                           casting="unsafe")
        size = lengths_2d.size + len(req) + 1
        bounds = bag_bounds(spec, sparse, n, np.empty(size, np.int32 if len(ids) <= _INT32_MAX
                                                      else np.int64))
    else:
        lengths_2d, bounds = np.zeros((0, 0), np.int64), np.zeros(0, np.int32)
    weights = None
    if any(f.weighted for f in spec.sparse):
        weights = np.zeros(len(ids), np.float32) if weights_out is None else weights_out
        if parts:
            np.concatenate([p.weights if p.weights is not None
                            else np.ones(len(p.values), np.float32) for p in parts],
                           out=weights, casting="same_kind")
    return FlatSparse(ids, weights, lengths_2d, bounds)


def slice_flat(flat: FlatSparse, start: int, count: int) -> FlatSparse:
    """Candidates ``start .. start+count`` of a request's flat form, request-scope bags
    whole: one span per feature copied, bounds from one cumulative sum (the per-feature
    route would take a cumulative sum per feature to find the spans)."""
    f_c, n = flat.lengths.shape
    b, split = flat.bounds, f_c * n
    firsts = np.arange(f_c) * n + start
    lo = np.append(b[firsts], b[split:-1]).tolist()
    hi = np.append(b[firsts + count], b[split + 1:]).tolist()
    ids = np.concatenate([flat.ids[a:z] for a, z in zip(lo, hi, strict=True)])
    weights = None
    if flat.weights is not None:
        weights = np.concatenate([flat.weights[a:z] for a, z in zip(lo, hi, strict=True)])
    lengths = np.ascontiguousarray(flat.lengths[:, start:start + count])
    bounds = np.empty(f_c * count + len(b) - split, b.dtype)
    bounds[0] = 0
    bounds[1:f_c * count + 1] = lengths.reshape(-1)
    bounds[f_c * count + 1:] = np.diff(b[split:])
    np.cumsum(bounds, out=bounds)
    return FlatSparse(ids, weights, lengths, bounds)


def with_flat(spec: ModelSpec, inputs: RequestInputs) -> RequestInputs:
    """``inputs`` carrying its FlatSparse (what validation hands the engine)."""
    return RequestInputs(inputs.num_candidates, inputs.sparse, inputs.dense,
                         flatten_sparse(spec, inputs.sparse, inputs.num_candidates))
