"""Reference workloads of DESIGN.md: specs, device-side weights and inputs, an eager peer.

- ``dlrmv2``: MLPerf DLRM-v2 shape (26 tables capped at ``max_rows``, dim 128, fixed multi-hot
  sizes, 214 lookups per sample), bottom 13-512-256-128, DCNv2 3 x rank 512 over 3456,
  top 1024-1024-512-256-1, bf16.
- ``dlrm-dot``: same tables, dot interaction (27 vectors, 479 inputs), top
  479-1024-1024-512-256-1.
- ``ranking``: one member and N candidates (100..700) per request; most sparse features
  request scope; ``ranking_requests`` builds validated-shape ``RequestInputs``.
Indices are uniform or Zipf(alpha) with hot rows scattered over the table.
Used by bench/kernels.py and reusable by the engine and server benches.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import torch.nn.functional as F

from recserve.engine.costs import forward_flops, rows_read_bytes
from recserve.engine.demo import ZIPF_ALPHA, random_inputs
from recserve.engine.executor import slice_rows
from recserve.engine.flat import with_flat
from recserve.engine.inputs import RequestInputs, SparseInput
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, SparseFeature, Table

MLPERF_ROWS = (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956,
               405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152,
               12973, 108, 36)
DLRMV2_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)



def dlrmv2_spec(max_rows: int = 4_000_000, table_dtype: str = "bf16",
                interaction: str = "dcnv2") -> ModelSpec:
    """``dlrmv2`` (interaction="dcnv2") or ``dlrm-dot`` (interaction="dot")."""
    tables = tuple(Table(f"t{i}", min(r, max_rows), 128, table_dtype)
                   for i, r in enumerate(MLPERF_ROWS))
    sparse = tuple(SparseFeature(f"s{i}", f"t{i}", max_bag=h) for i, h in enumerate(DLRMV2_HOT))
    if interaction == "dcnv2":
        inter, top, name = Interaction("dcnv2", layers=3, rank=512), (1024, 1024, 512, 256, 1), \
            "dlrmv2"
    else:
        inter, top, name = Interaction("dot"), (1024, 1024, 512, 256, 1), "dlrm-dot"
    return ModelSpec(name, tables, sparse, (DenseFeature("dense", 13),), (512, 256, 128), inter,
                     top, weight_dtype="bf16")


def ranking_spec(max_rows: int = 1_000_000, table_dtype: str = "bf16") -> ModelSpec:
    """``ranking``: 20 request-scope features (member history etc.), 6 candidate-scope."""
    hot = DLRMV2_HOT
    tables = tuple(Table(f"t{i}", min(r, max_rows), 64, table_dtype)
                   for i, r in enumerate(MLPERF_ROWS))
    sparse = tuple(SparseFeature(f"s{i}", f"t{i}", scope="candidate" if i % 5 == 1 else
                                 "request", max_bag=hot[i]) for i in range(len(tables)))
    dense = (DenseFeature("member", 8, scope="request"), DenseFeature("item", 5))
    return ModelSpec("ranking", tables, sparse, dense, (256, 64), Interaction("dot"),
                     (512, 256, 1), weight_dtype="bf16")


def draw_indices(n: int, rows: int, zipf: bool, gen: torch.Generator,
                 device: str | torch.device) -> torch.Tensor:
    """int64 [n] ids in [0, rows): uniform, or Zipf(ZIPF_ALPHA) by rank with the ranks
    scattered over the table (a multiplicative hash), so hot rows are not adjacent."""
    if not zipf or rows == 1:
        return torch.randint(0, rows, (n,), generator=gen, device=device)
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    a = 1.0 - ZIPF_ALPHA  # inverse CDF of a power law truncated to [1, rows + 1)
    top = (rows + 1.0) ** a
    rank = torch.floor((1.0 - u * (1.0 - top)) ** (1.0 / a)).long().clamp(1, rows) - 1
    return (rank * 2654435761) % rows


def fixed_hot_inputs(spec: ModelSpec, batch: int, zipf: bool, device: str | torch.device,
                     seed: int = 0) -> dict:
    """Candidate-scope inputs with every bag at its max_bag (the MLPerf multi-hot shape).

    Returns {"dense": [B, 13] fp32, "values": [int64 per feature], "offsets": [int64
    B + 1 per feature]} on ``device``.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    values, offsets = [], []
    for f in spec.sparse:
        rows = spec.table(f.table).rows
        values.append(draw_indices(batch * f.max_bag, rows, zipf, gen, device))
        offsets.append(torch.arange(batch + 1, device=device, dtype=torch.int64) * f.max_bag)
    dense = torch.randn(batch, spec.dense_in_dim, generator=gen, device=device)
    return {"dense": dense, "values": values, "offsets": offsets}


def to_prepared(model, inputs: dict):
    """A ``PreparedBatch`` for a ``TritonModel`` from ``fixed_hot_inputs`` (on device, one
    request per row, as in MLPerf's offline scenario)."""
    from recserve.kernels.prepare import PreparedBatch

    dev = model.device
    b = inputs["dense"].shape[0]
    by_name = {f.name: k for k, f in enumerate(model.spec.sparse)}
    groups = []
    for _, _, names in model.groups:
        idx, offs, base = [], [], 0
        for n in names:
            v = inputs["values"][by_name[n]]
            idx.append(v)
            offs.append(inputs["offsets"][by_name[n]] + base)
            base += v.shape[0]
        groups.append((torch.cat(idx).to(torch.int32), torch.cat(offs).to(torch.int32), None,
                       None))
    rows = torch.arange(b + 1, device=dev, dtype=torch.int32)
    return PreparedBatch(b, b, rows[:-1], rows, rows[:-1],
                         inputs["dense"].to(model.dtype), tuple(groups))


def ranking_requests(spec: ModelSpec, rng: np.random.Generator, num_requests: int,
                     zipf: bool = False, candidates: tuple[int, int] = (100, 700)
                     ) -> list[RequestInputs]:
    """``num_requests`` ranking requests, N uniform in ``candidates`` (numpy, for the engine
    and server benches): ``engine.demo.random_inputs`` for each."""
    low, high = candidates
    return [random_inputs(spec, rng, int(rng.integers(low, high + 1)), zipf)
            for _ in range(num_requests)]


# (the benchmarks' names for the package's cost model)
model_flops = forward_flops
gather_bytes = rows_read_bytes


class TorchPeer:
    """Plain PyTorch eager forward of a candidate-scope spec in bf16 (the peer to beat):
    one ``embedding_bag`` per table (or one call over a concatenated table), torch.cat,
    F.linear layers. Int8 tables are dequantized to bf16 at load."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.bfloat16, concat: bool = False) -> None:
        if any(f.scope == "request" for f in (*spec.sparse, *spec.dense)):
            raise ValueError("TorchPeer handles candidate-scope specs only")
        self.spec, self.dtype, self.concat = spec, dtype, concat
        self.tables = []
        for t in spec.tables:
            w = weights[f"tables.{t.name}.weight"]
            if t.dtype == "int8":
                w = (w.float() * weights[f"tables.{t.name}.scale"][:, None]
                     + weights[f"tables.{t.name}.offset"][:, None])
            self.tables.append(w.to(dtype))
        self.bases = [0]
        if concat:
            self.big = torch.cat(self.tables)
            for t in self.tables[:-1]:
                self.bases.append(self.bases[-1] + t.shape[0])
        self.p = {k: v.to(dtype) for k, v in weights.items() if not k.startswith("tables.")}

    def pooled(self, values: list[torch.Tensor], offsets: list[torch.Tensor]) -> torch.Tensor:
        """[B, sum dims] pooled embeddings (sum pooling)."""
        if not self.concat:
            return torch.cat([F.embedding_bag(v, t, o[:-1], mode="sum")
                              for v, t, o in zip(values, self.tables, offsets, strict=True)],
                             dim=1)
        b = offsets[0].shape[0] - 1
        idx = torch.cat([v + base for v, base in zip(values, self.bases, strict=True)])
        starts, total = [], 0
        for v, o in zip(values, offsets, strict=True):
            starts.append(o[:-1] + total)
            total += v.shape[0]
        # feature-major bags: one call, then [F, B, d] -> [B, F*d]
        out = F.embedding_bag(idx, self.big, torch.cat(starts), mode="sum")
        return out.view(len(values), b, -1).transpose(0, 1).reshape(b, -1)

    def forward(self, dense: torch.Tensor, values: list[torch.Tensor],
                offsets: list[torch.Tensor]) -> torch.Tensor:
        """Scores [B, H] (sigmoid outputs), like the engine's."""
        spec, p = self.spec, self.p
        x = dense.to(self.dtype)
        for k in range(len(spec.bottom_mlp)):
            x = torch.relu(F.linear(x, p[f"bottom.{k}.weight"], p[f"bottom.{k}.bias"]))
        e = self.pooled(values, offsets)
        if spec.interaction.kind == "dot":
            t = torch.cat([x, e], dim=1).view(x.shape[0], spec.num_vectors, -1)
            gram = torch.bmm(t, t.transpose(1, 2))
            i, j = torch.tril_indices(spec.num_vectors, spec.num_vectors, -1, device=x.device)
            z = torch.cat([x, gram[:, i, j]], dim=1)
        else:
            z = x0 = torch.cat([x, e], dim=1)
            for n in range(spec.interaction.layers):
                low = F.linear(z, p[f"cross.{n}.u"])
                z = x0 * F.linear(low, p[f"cross.{n}.v"], p[f"cross.{n}.bias"]) + z
        for k in range(len(spec.top_mlp)):
            z = F.linear(z, p[f"top.{k}.weight"], p[f"top.{k}.bias"])
            if k < len(spec.top_mlp) - 1:
                z = torch.relu(z)
        return torch.sigmoid(z.float())


def full_requests(spec, rng, rows: int, count: int) -> list[RequestInputs]:
    """``count`` requests of ``rows`` candidates, every bag at its max_bag (MLPerf shape);
    int32 ids and the flat form, as worker processes hand them to the engine (validation
    narrows ids, the channel flattens them)."""
    out = []
    for _ in range(count):
        sparse = {}
        for f in spec.sparse:
            table_rows = spec.table(f.table).rows
            values = rng.integers(0, table_rows, rows * f.max_bag, dtype=np.int32)
            sparse[f.name] = SparseInput(values, np.full(rows, f.max_bag, dtype=np.int64))
        dense = {f.name: rng.standard_normal((rows, f.dim), dtype=np.float32) for f in spec.dense}
        out.append(with_flat(spec, RequestInputs(rows, sparse, dense)))
    return out


def per_feature(requests: list[RequestInputs]) -> list[RequestInputs]:
    """The same requests without their flat form: one array per feature, as a single-process
    server hands them to the engine."""
    return [RequestInputs(r.num_candidates, dict(r.sparse), r.dense) for r in requests]


def ranking_slices(spec, full: list[RequestInputs], rng, per_request: int
                   ) -> list[RequestInputs]:
    """Ranking-size requests (N uniform in 100..700) cut from ``full`` ones, each with its
    flat form as a worker process would send it."""
    return [with_flat(spec, slice_rows(spec, r, 0, int(n)))
            for r in full for n in rng.integers(100, 701, per_request)]


def one_batch(requests: list[RequestInputs], rows: int) -> list[RequestInputs]:
    """The leading ``requests`` whose candidates fit one batch of ``rows``."""
    batch, used = [], 0
    for r in requests:
        if used + r.num_candidates > rows:
            break
        batch.append(r)
        used += r.num_candidates
    return batch


async def closed_loop(engine, name: str, requests: list[RequestInputs], rows_in_flight: int
                      ) -> None:
    """Score ``requests`` in order keeping about ``rows_in_flight`` candidate rows
    outstanding, as many clients would: a new request is sent when one finishes. (Sending
    them all at once instead measures a burst: the event loop submits thousands of requests
    while the engine's threads wait for the GIL.)"""
    pending = iter(requests)

    async def client() -> None:
        for r in pending:  # shared: each request is sent once, by whichever client is free
            await engine.score(name, r)

    mean = sum(r.num_candidates for r in requests) / max(len(requests), 1)
    clients = max(1, min(len(requests), round(rows_in_flight / max(mean, 1))))
    await asyncio.gather(*(client() for _ in range(clients)))
