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

    @property
    def candidate_starts(self) -> np.ndarray:
        """[F_c, N] start of each candidate-scope bag (a view)."""
        f, n = self.lengths.shape
        return self.bounds[:f * n].reshape(f, n)

    @property
    def candidate_ends(self) -> np.ndarray:
        """[F_c, N] end of each candidate-scope bag (a view)."""
        f, n = self.lengths.shape
        return self.bounds[1:f * n + 1].reshape(f, n)

    @property
    def request_starts(self) -> np.ndarray:
        """[F_r] start of each request-scope bag (a view)."""
        return self.bounds[self.lengths.size:-1]

    @property
    def request_ends(self) -> np.ndarray:
        """[F_r] end of each request-scope bag (a view)."""
        return self.bounds[self.lengths.size + 1:]

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


def flatten_sparse(spec: ModelSpec, sparse: dict[str, SparseInput], n: int) -> FlatSparse:
    """``sparse`` (one request with ``n`` candidates) in the flat form.

    Ids keep int32 when every feature's are int32; anything else becomes int64 (unsigned
    ids past int64 wrap negative: outside every table, so flagged, never read).
    """
    cand = [sparse[f.name] for f in spec.sparse if f.scope == "candidate"]
    req = [sparse[f.name] for f in spec.sparse if f.scope == "request"]
    parts = cand + req
    narrow = all(p.values.dtype == np.int32 for p in parts)
    dtype = np.int32 if narrow else np.int64
    ids = np.concatenate([p.values for p in parts], dtype=dtype, casting="unsafe") \
        if parts else np.zeros(0, dtype)
    lengths = np.empty((len(cand), n), np.int64)
    if cand:
        np.concatenate([p.lengths for p in cand], out=lengths.reshape(-1), casting="unsafe")
    bounds = np.empty(lengths.size + len(req) + 1, np.int32 if len(ids) <= _INT32_MAX
                      else np.int64)
    bounds[0] = 0
    np.cumsum(lengths.ravel(), out=bounds[1:lengths.size + 1], dtype=bounds.dtype)
    if req:
        counts = np.fromiter((len(p.values) for p in req), bounds.dtype, len(req))
        np.cumsum(counts, out=bounds[lengths.size + 1:])
        bounds[lengths.size + 1:] += bounds[lengths.size]
    weights = None
    if any(f.weighted for f in spec.sparse):
        weights = np.concatenate([p.weights if p.weights is not None
                                  else np.ones(len(p.values), np.float32) for p in parts],
                                 dtype=np.float32) if parts else np.zeros(0, np.float32)
    return FlatSparse(ids, weights, lengths, bounds)


def with_flat(spec: ModelSpec, inputs: RequestInputs) -> RequestInputs:
    """``inputs`` carrying its FlatSparse (what validation hands the engine)."""
    return RequestInputs(inputs.num_candidates, inputs.sparse, inputs.dense,
                         flatten_sparse(spec, inputs.sparse, inputs.num_candidates))
