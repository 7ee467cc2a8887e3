"""A request's sparse inputs back to back: the form the GPU engine stages in one copy.

Per feature, a request's ids are a separate array (``SparseInput``). Packing a batch
feature by feature costs a copy per feature per request (26 x 20 for a batch of
ranking-size dlrmv2 requests), and numpy holds the GIL through each small copy, so
packing threads cannot overlap. ``FlatSparse`` keeps all of one request's ids in one array,
bags in a fixed order with their bounds, so staging copies a request's ids at once and
writes its bag bounds with a few array adds; the kernel reads bags by (start, end) and does
not need them feature by feature (``embedding_bag``'s ``ends``).

Bag order: every candidate-scope feature's N bags (spec order), then one bag per
request-scope feature (spec order). With ``--workers``, each worker process builds the form
when it hands a validated request to the engine process (``server/channel.py``), so the
engine process only copies it; pieces of a split request get theirs cut from it
(``slice_flat``). Requests without it (a single-process server, in-process callers) are
staged feature by feature instead (``staging``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .inputs import DeferredInputs, RequestInputs, SparseInput
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
    """[F_c, N]: bag lengths of the candidate-scope features; int64, or int32 when they
    came over the worker channel with int32 bounds."""
    bounds: np.ndarray
    """[F_c * N + F_r + 1]: bag b spans ids[bounds[b]:bounds[b + 1]]; int32 (the dtype the
    engine stages them in: adding a request's base position is then a plain add, no cast)
    unless the request has 2^31 ids or more."""

    def fits(self, f_c: int, f_r: int, n: int) -> bool:
        """Whether this is shaped for ``n`` candidates of a spec with ``f_c`` candidate-scope
        and ``f_r`` request-scope features (``flat_shape``)."""
        return self.lengths.shape == (f_c, n) and self.bounds.shape == (f_c * n + f_r + 1,)

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

    def __contains__(self, name: object) -> bool:  # without making the views
        return any(f.name == name for f in self._spec.sparse)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in self._spec.sparse)

    def __len__(self) -> int:
        return len(self._spec.sparse)


_SHAPES: dict[int, tuple[ModelSpec, tuple[int, int, bool]]] = {}


def flat_shape(spec: ModelSpec) -> tuple[int, int, bool]:
    """(candidate-scope features, request-scope features, any weighted) of ``spec``: what a
    request's flat form must fit. Cached per spec object (asked once per request)."""
    entry = _SHAPES.get(id(spec))
    if entry is None or entry[0] is not spec:
        if len(_SHAPES) > 64:  # specs come and go with model versions: stay small
            _SHAPES.clear()
        f_c = sum(f.scope == "candidate" for f in spec.sparse)
        entry = _SHAPES[id(spec)] = (spec, (f_c, len(spec.sparse) - f_c,
                                            any(f.weighted for f in spec.sparse)))
    return entry[1]


def split_bounds(bounds: np.ndarray, f_c: int, n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Views of flat ``bounds``: candidate-scope starts and ends [F_c, N], request-scope
    starts and ends [F_r]."""
    split = f_c * n
    return (bounds[:split].reshape(f_c, n), bounds[1:split + 1].reshape(f_c, n),
            bounds[split:-1], bounds[split + 1:])


def flatten_sparse(spec: ModelSpec, sparse: Mapping[str, SparseInput], n: int) -> FlatSparse:
    """``sparse`` (one request with ``n`` candidates) in the flat form.

    Ids keep int32 when every feature's are int32; anything else becomes int64 (unsigned
    ids past int64 wrap negative: outside every table, so flagged, never read).
    """
    cand = [sparse[f.name] for f in spec.sparse if f.scope == "candidate"]
    req = [sparse[f.name] for f in spec.sparse if f.scope == "request"]
    parts = cand + req
    dtype = np.int32 if all(p.values.dtype == np.int32 for p in parts) else np.int64
    ids = np.concatenate([p.values for p in parts], dtype=dtype, casting="unsafe") \
        if parts else np.zeros(0, dtype)
    lengths = np.empty((len(cand), n), np.int64)
    if cand:
        np.concatenate([p.lengths for p in cand], out=lengths.reshape(-1), casting="unsafe")
    bounds = np.empty(lengths.size + len(req) + 1,
                      np.int32 if len(ids) <= _INT32_MAX else np.int64)
    bounds[0] = 0
    bounds[1:lengths.size + 1] = lengths.reshape(-1)
    if req:
        bounds[lengths.size + 1:] = np.fromiter((len(p.values) for p in req), bounds.dtype,
                                                len(req))
    np.cumsum(bounds, out=bounds)
    weights = None
    if any(f.weighted for f in spec.sparse):
        weights = np.zeros(len(ids), np.float32)
        if parts:
            np.concatenate([p.weights if p.weights is not None
                            else np.ones(len(p.values), np.float32) for p in parts],
                           out=weights, casting="same_kind")
    return FlatSparse(ids, weights, lengths, bounds)


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
    """``inputs`` carrying its FlatSparse (as a worker process hands it to the engine)."""
    return RequestInputs(inputs.num_candidates, inputs.sparse, inputs.dense,
                         flatten_sparse(spec, inputs.sparse, inputs.num_candidates))


def slice_rows(spec: ModelSpec, inputs: RequestInputs, start: int, count: int) -> RequestInputs:
    """Rows ``start .. start+count`` of a request: candidate-scope inputs sliced, request-scope
    inputs kept whole. ``DeferredInputs`` are decoded here (every executor reads a piece's
    arrays through this), so a malformed one raises here, for its own piece alone."""
    if start < 0 or count < 1 or start + count > inputs.num_candidates:
        raise ValueError(f"rows {start}..{start + count} are outside the request's "
                         f"{inputs.num_candidates} candidates")
    if isinstance(inputs, DeferredInputs):
        inputs = inputs.decoded()
    if start == 0 and count == inputs.num_candidates:
        return inputs
    stop = start + count
    dense = {f.name: inputs.dense[f.name] if f.scope == "request"
             else inputs.dense[f.name][start:stop] for f in spec.dense}
    flat = inputs.flat
    if flat is not None and flat.fits(*flat_shape(spec)[:2], inputs.num_candidates):
        part = slice_flat(flat, start, count)
        return RequestInputs(count, FlatFeatures(part, spec), dense, part)
    sparse = {}
    for feature in spec.sparse:
        part = inputs.sparse[feature.name]
        if feature.scope == "request":
            sparse[feature.name] = part
            continue
        ends = np.cumsum(part.lengths)
        lo = int(ends[start - 1]) if start else 0
        hi = int(ends[stop - 1])
        weights = part.weights[lo:hi] if part.weights is not None else None
        sparse[feature.name] = SparseInput(part.values[lo:hi], part.lengths[start:stop], weights)
    return RequestInputs(count, sparse, dense)
