"""One request's validated inputs, and the packed batch every backend consumes.

``RequestInputs`` is what the server's validation produces: numpy arrays already
checked against the spec (dtypes, shapes, lengths, index ranges, finite values).
``collate`` packs several requests into one ``Batch`` of torch tensors: candidate
rows of all requests back to back, request-scope features kept once per request
with ``row_request`` saying which request each row belongs to (for the broadcast).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .spec import ModelSpec

if TYPE_CHECKING:  # torch only for collate's Batch: worker processes never import it
    import torch

    from .flat import FlatSparse
    from .shared_memory import SharedInputs


@dataclass(frozen=True, slots=True)
class SparseInput:
    """The ids of one sparse feature for one request."""

    values: np.ndarray
    """int64 or int32 ids, all bags back to back (int32 costs half the bytes all the way to
    the GPU when every table has fewer than 2^31 rows)."""
    lengths: np.ndarray | None = None
    """Bag lengths (int64; int32 from the worker channel), one per candidate (candidate
    scope); None: one bag (request scope)."""
    weights: np.ndarray | None = None
    """float32 per-value weights, same length as ``values`` (weighted features only)."""


@dataclass(frozen=True, slots=True)
class RequestInputs:
    """A validated request: N candidates and every input of the model."""

    num_candidates: int
    """N, the number of candidates to score."""
    sparse: Mapping[str, SparseInput]
    """Sparse inputs by feature name (a dict, or ``flat.FlatFeatures`` over ``flat``)."""
    dense: dict[str, np.ndarray]
    """float32 dense inputs by name: [dim] for request scope, [N, dim] for candidate scope."""
    flat: FlatSparse | None = None
    """The same sparse inputs back to back (``recserve.engine.flat``), when whoever built
    the request made them (the worker channel does): the GPU engine then stages the
    request in one copy. Must hold exactly ``sparse``'s data; never change one alone."""
    shared: SharedInputs | None = None
    """Where these arrays lie in shared memory (a worker's ring), when they do: the GPU
    engine's packing processes then read them there (``packer``)."""


class DeferredInputs:
    """A request's inputs whose arrays are decoded on their first read: ``num_candidates``
    and ``shared`` at once, ``sparse``, ``dense`` and ``flat`` from ``decode()`` (once).

    The engine process of ``serve --workers`` takes ring requests so when packing processes
    pack them (``packer``: they decode and check the bytes themselves), so its event loop,
    which every request passes and whose GIL the launcher threads wait on, skips the
    decode (its CPU a request fell from 38 to 26 us for the demo model, from 31 to 18 for
    dlrmv2's ranking requests: bench/RESULTS.md); the arrays are decoded here only where
    this process reads them (a batch packed in a thread, a bad-id message, a fallback),
    which the engine does only while the request holds its ring region. Two threads may
    decode at once: both get equal inputs, and one is kept.
    """

    __slots__ = ("num_candidates", "shared", "_decode", "_inputs")

    def __init__(self, num_candidates: int, shared: SharedInputs,
                 decode: Callable[[], RequestInputs]) -> None:
        self.num_candidates, self.shared = num_candidates, shared
        self._decode, self._inputs = decode, None

    def decoded(self) -> RequestInputs:
        """The inputs, decoded now if no one has yet (a malformed request raises here)."""
        if self._inputs is None:
            self._inputs = self._decode()
        return self._inputs

    @property
    def sparse(self) -> Mapping[str, SparseInput]:
        return self.decoded().sparse

    @property
    def dense(self) -> dict[str, np.ndarray]:
        return self.decoded().dense

    @property
    def flat(self) -> FlatSparse | None:
        return self.decoded().flat


@dataclass(frozen=True, slots=True)
class SparseBatch:
    """One sparse feature over a batch, in CSR form."""

    values: torch.Tensor
    """int64 [nnz]."""
    offsets: torch.Tensor
    """int64 [bags + 1]; bags = requests (request scope) or rows (candidate scope)."""
    weights: torch.Tensor | None
    """float32 [nnz] or None."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Several requests packed for one forward pass."""

    num_rows: int
    """B, candidate rows in total."""
    num_requests: int
    """R, requests in the batch."""
    row_request: torch.Tensor
    """int64 [B]: the request each row belongs to."""
    sparse: dict[str, SparseBatch]
    """Per sparse feature."""
    dense: dict[str, torch.Tensor]
    """float32 [R, dim] (request scope) or [B, dim] (candidate scope)."""


def collate(spec: ModelSpec, requests: list[RequestInputs]) -> Batch:
    """Pack ``requests`` (already validated against ``spec``) into one Batch."""
    import torch

    if not requests:
        raise ValueError("collate needs at least one request")
    counts = np.array([r.num_candidates for r in requests], dtype=np.int64)
    row_request = np.repeat(np.arange(len(requests), dtype=np.int64), counts)
    sparse = {}
    for feature in spec.sparse:
        parts = [r.sparse[feature.name] for r in requests]
        values = np.concatenate([p.values.astype(np.int64, copy=False) for p in parts])
        if feature.scope == "request":
            lengths = np.array([len(p.values) for p in parts], dtype=np.int64)
        else:
            lengths = np.concatenate([p.lengths for p in parts]).astype(np.int64, copy=False)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        weights = None
        if feature.weighted:
            weights = torch.from_numpy(
                np.concatenate([p.weights for p in parts]).astype(np.float32, copy=False))
        sparse[feature.name] = SparseBatch(torch.from_numpy(values), torch.from_numpy(offsets),
                                           weights)
    dense = {}
    for feature in spec.dense:
        if feature.scope == "request":
            stacked = np.stack([r.dense[feature.name].reshape(feature.dim) for r in requests])
        else:
            stacked = np.concatenate([r.dense[feature.name].reshape(-1, feature.dim)
                                      for r in requests])
        dense[feature.name] = torch.from_numpy(stacked.astype(np.float32, copy=False))
    return Batch(int(counts.sum()), len(requests), torch.from_numpy(row_request), sparse, dense)


def split_scores(scores: np.ndarray, requests: list[RequestInputs]) -> list[np.ndarray]:
    """Cut a batch's [B, H] scores back into one array per request ([N] when H == 1)."""
    out, start = [], 0
    for r in requests:
        part = scores[start:start + r.num_candidates]
        out.append(part[:, 0] if part.shape[1] == 1 else part)
        start += r.num_candidates
    return out
