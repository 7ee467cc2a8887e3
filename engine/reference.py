"""Plain-PyTorch reference model: the correctness oracle and the CPU serving path.

Computes in fp32 whatever the stored dtypes (int8 tables are dequantized once at
load). Request-scope features are pooled and pushed through their share of the
bottom MLP once per request, then broadcast over the request's candidate rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import Batch, SparseBatch
from .spec import ModelSpec
from .weights import check_weights, dequantize_rowwise


class ReferenceModel:
    """fp32 forward of any spec'd model, on whatever device its weights are moved to."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor],
                 device: str | torch.device = "cpu") -> None:
        problems = check_weights(spec, weights)
        if problems:
            raise ValueError("weights do not match the spec:\n  " + "\n  ".join(problems))
        self.spec = spec
        self.device = torch.device(device)
        self.tables = {}
        for t in spec.tables:
            stem = f"tables.{t.name}"
            if t.dtype == "int8":
                table = dequantize_rowwise(weights[f"{stem}.weight"], weights[f"{stem}.scale"],
                                           weights[f"{stem}.offset"])
            else:
                table = weights[f"{stem}.weight"].float()
            self.tables[t.name] = table.to(self.device)
        self.params = {name: w.float().to(self.device) for name, w in weights.items()
                       if not name.startswith("tables.")}

    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Scores [B, H] (after each output's activation) for every candidate row."""
        spec = self.spec
        row_request = batch.row_request.to(self.device)
        vectors = []
        if spec.dense:
            dense = [self._rows(batch.dense[f.name].to(self.device), f.scope, row_request)
                     for f in spec.dense]
            vectors.append(self._mlp("bottom", torch.cat(dense, dim=1), len(spec.bottom_mlp),
                                     last_relu=True))
        for f in spec.sparse:
            pooled = self.pool(f.name, batch.sparse[f.name])
            vectors.append(self._rows(pooled, f.scope, row_request))
        top_in = self._interact(vectors)
        logits = self._mlp("top", top_in, len(spec.top_mlp), last_relu=False)
        return self.activate(logits)

    def pool(self, feature_name: str, bags: SparseBatch) -> torch.Tensor:
        """Pooled vectors [bags, dim] of one sparse feature."""
        feature = next(f for f in self.spec.sparse if f.name == feature_name)
        table = self.tables[feature.table]
        values = bags.values.to(self.device)
        offsets = bags.offsets.to(self.device)
        weights = bags.weights.to(self.device) if bags.weights is not None else None
        pooled = F.embedding_bag(values, table, offsets[:-1], mode="sum",
                                 per_sample_weights=weights, include_last_offset=False)
        if feature.pooling == "mean":
            counts = (offsets[1:] - offsets[:-1]).clamp_min(1).to(pooled.dtype)
            pooled = pooled / counts[:, None]
        return pooled

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply each output's activation to its column."""
        columns = [torch.sigmoid(logits[:, i]) if o.activation == "sigmoid" else logits[:, i]
                   for i, o in enumerate(self.spec.outputs)]
        return torch.stack(columns, dim=1)

    @staticmethod
    def _rows(values: torch.Tensor, scope: str, row_request: torch.Tensor) -> torch.Tensor:
        # Request-scope values are computed once per request and broadcast here
        # (index_select: the same rows as values[row_request], several times faster on CPU).
        return values.index_select(0, row_request) if scope == "request" else values

    def _mlp(self, prefix: str, x: torch.Tensor, layers: int, last_relu: bool) -> torch.Tensor:
        for k in range(layers):
            x = F.linear(x, self.params[f"{prefix}.{k}.weight"], self.params[f"{prefix}.{k}.bias"])
            if k < layers - 1 or last_relu:
                x = torch.relu(x)
        return x

    def _interact(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        kind = spec.interaction.kind
        x0 = torch.cat(vectors, dim=1)
        if kind == "cat":
            return x0
        if kind == "dcnv2":
            x = x0
            for layer in range(spec.interaction.layers):
                u = self.params[f"cross.{layer}.u"]
                v = self.params[f"cross.{layer}.v"]
                b = self.params[f"cross.{layer}.bias"]
                x = x0 * ((x @ u.T) @ v.T + b) + x
            return x
        stacked = torch.stack(vectors, dim=1)  # [B, T, d]
        gram = stacked @ stacked.transpose(1, 2)  # [B, T, T]
        t = stacked.shape[1]
        offset = 0 if spec.interaction.self_interaction else -1
        rows, cols = torch.tril_indices(t, t, offset=offset, device=gram.device)
        dots = gram.flatten(1).index_select(1, rows * t + cols)  # = gram[:, rows, cols]
        parts = [vectors[0], dots] if spec.dense else [dots]
        return torch.cat(parts, dim=1)
