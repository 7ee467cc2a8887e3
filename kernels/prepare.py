"""Host-side packing of a ``Batch`` into the device tensors the fused forward reads.

Per table-dtype group: one index array (int32 unless a table of the group has 2^31+ rows;
ids that do not fit become -1, out of range either way, so none can wrap into range), per
feature bags+1 absolute offsets, and per-value weights when a feature is weighted. Plus the
row -> request map, each request's first row and row range, and the dense inputs
(request-scope ones broadcast on the host unless every dense input is request scope, in
which case the bottom MLP runs once per request).
This is the eager path (``TritonModel.forward``, the engine's per-piece fallback). The
engine's batches go through ``recserve.engine.staging`` instead: fixed bucket shapes packed
straight into pinned buffers, so one CUDA graph per bucket replays them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recserve.engine.inputs import Batch

from .tables import check_csr

if TYPE_CHECKING:
    from .model import TritonModel

_INT32 = (-(1 << 31), (1 << 31) - 1)  # int32 range


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch on the device, in the kernels' layout."""

    num_rows: int
    """B, candidate rows."""
    num_requests: int
    """R, requests."""
    row_request: torch.Tensor
    """int32 [B]: request of each row."""
    request_offsets: torch.Tensor
    """int32 [R + 1]: rows of request r are request_offsets[r] .. request_offsets[r+1]."""
    first_rows: torch.Tensor
    """int32 [R]: one row of each request (clamped into [0, B))."""
    dense: torch.Tensor | None
    """[B or R, dense_in_dim] in the compute dtype or fp32 (R when x is request-only; the
    first bottom layer rounds fp32 inputs to the compute dtype as it loads them)."""
    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                        torch.Tensor | None], ...]
    """Per table-dtype group: (indices, offsets, ends or None, weights or None): CSR
    offsets when ends is None, else bag starts and ends (see ``embedding_bag``)."""
    bad_flags: torch.Tensor | None = None
    """int32 [R], zeros: where the forward's gathers flag each request that sent an id
    outside its table (every gather launch sets flags in it, none clears them). None: the
    forward allocates zeroed flags itself (one fill kernel); the engine's staging brings
    them zeroed with each batch's copy-in, so its graphs have no such kernel."""


def _group_csr(batch: Batch, names: tuple[str, ...], wide: bool, validate: bool
               ) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor | None]:
    parts, offsets, weights, base, counts = [], [], [], 0, []
    any_weighted = any(batch.sparse[n].weights is not None for n in names)
    for n in names:
        sb = batch.sparse[n]
        rel = sb.offsets.to(torch.int64)
        start, end = int(rel[0]), int(rel[-1])
        values = sb.values[start:end]
        parts.append(values)
        offsets.append(rel - start + base)
        counts.append(rel.shape[0] - 1)
        if any_weighted:
            weights.append(sb.weights[start:end] if sb.weights is not None
                           else torch.ones(values.shape[0]))
        base += values.shape[0]
    indices = torch.cat(parts).to(torch.int64)
    offs = torch.cat(offsets)
    if validate:
        check_csr(offs, counts, indices.shape[0])
    if not wide:
        # Every table of the group has < 2^31 rows: an id that does not fit int32 is out of
        # range anyway, so it becomes -1 (still out of range, still flagged).
        indices = torch.where((indices < _INT32[0]) | (indices > _INT32[1]), -1, indices)
    index_dtype = torch.int64 if wide else torch.int32
    w = torch.cat(weights).float() if any_weighted else None
    return indices.to(index_dtype), offs.to(index_dtype), None, w


def prepare_batch(model: TritonModel, batch: Batch, validate: bool = True) -> PreparedBatch:
    """Pack and upload ``batch`` for ``model`` (one host pass, a few H2D copies)."""
    dev = model.device
    b, r = batch.num_rows, batch.num_requests
    row_request = batch.row_request.to(torch.int64)
    counts = torch.bincount(row_request, minlength=r)
    if validate and (row_request.shape[0] != b or counts.shape[0] != r
                     or bool((row_request[1:] < row_request[:-1]).any())):
        raise ValueError(f"row_request (shape {list(row_request.shape)}) must be sorted request "
                         f"ids in [0, {r}) for B={b}")
    request_offsets = torch.zeros(r + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=request_offsets[1:])
    first_rows = request_offsets[:-1].clamp(max=max(b - 1, 0))
    dense = _dense(model, batch, row_request)
    groups = []
    for packed, _, names in model.groups:
        wide = max(packed.rows) > _INT32[1]
        groups.append(tuple(t.to(dev) if t is not None else None
                            for t in _group_csr(batch, names, wide, validate)))
    return PreparedBatch(b, r, row_request.to(dev, torch.int32),
                         request_offsets.to(dev, torch.int32), first_rows.to(dev, torch.int32),
                         dense, tuple(groups))


def _dense(model: TritonModel, batch: Batch, row_request: torch.Tensor) -> torch.Tensor | None:
    spec = model.spec
    if not spec.dense:
        return None
    if model.layout.x_request:
        dense = torch.cat([batch.dense[f.name] for f in spec.dense], dim=1)
    else:
        dense = torch.cat([batch.dense[f.name][row_request] if f.scope == "request"
                           else batch.dense[f.name] for f in spec.dense], dim=1)
    return dense.to(model.device, model.dtype)
