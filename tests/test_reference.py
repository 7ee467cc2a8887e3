"""Reference model against an independent per-candidate numpy computation."""

import dataclasses

import numpy as np
import pytest
import torch

from recserve.engine.demo import demo_spec, random_inputs
from recserve.engine.inputs import RequestInputs, SparseInput, collate, split_scores
from recserve.engine.reference import ReferenceModel
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from recserve.engine.weights import dequantize_rowwise, init_weights


def spec_with(interaction: Interaction, table_dtype: str = "fp32") -> ModelSpec:
    return ModelSpec(
        name="m",
        tables=(Table("a", 13, 4, table_dtype), Table("b", 9, 4)),
        sparse=(SparseFeature("hist", "a", "mean", "request", 6),
                SparseFeature("item", "a", "sum", "candidate", 1),
                SparseFeature("tags", "b", "sum", "candidate", 3, weighted=True)),
        dense=(DenseFeature("u", 2, "request"), DenseFeature("c", 3)),
        bottom_mlp=(5, 4), interaction=interaction, top_mlp=(7, 2),
        outputs=(Output("p"), Output("q", "logit")))


INTERACTIONS = [Interaction("dot"), Interaction("dot", True), Interaction("cat"),
                Interaction("dcnv2", layers=2, rank=3)]


def numpy_scores(spec: ModelSpec, w: dict, req: RequestInputs) -> np.ndarray:
    """Candidate by candidate, straight from the spec's stated semantics."""
    p = {k: v.double().numpy() for k, v in w.items() if not k.startswith("tables.")}
    tables = {}
    for t in spec.tables:
        s = f"tables.{t.name}"
        raw = (dequantize_rowwise(w[f"{s}.weight"], w[f"{s}.scale"], w[f"{s}.offset"])
               if t.dtype == "int8" else w[f"{s}.weight"])
        tables[t.name] = raw.double().numpy()
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    out = []
    for n in range(req.num_candidates):
        x = np.concatenate([req.dense[f.name] if f.scope == "request" else req.dense[f.name][n]
                            for f in spec.dense]).astype(np.float64)
        for k in range(len(spec.bottom_mlp)):
            x = relu(p[f"bottom.{k}.weight"] @ x + p[f"bottom.{k}.bias"])
        vecs = [x]
        for f in spec.sparse:
            s = req.sparse[f.name]
            if f.scope == "request":
                ids, wts = s.values, s.weights
            else:
                start = int(s.lengths[:n].sum())
                ids = s.values[start:start + s.lengths[n]]
                wts = None if s.weights is None else s.weights[start:start + s.lengths[n]]
            wts = np.ones(len(ids)) if wts is None else wts.astype(np.float64)
            v = sum((wt * tables[f.table][i] for i, wt in zip(ids, wts, strict=True)),
                    np.zeros(4))
            vecs.append(v / max(len(ids), 1) if f.pooling == "mean" else v)
        kind = spec.interaction.kind
        if kind == "dot":
            extra = 1 if spec.interaction.self_interaction else 0
            dots = [vecs[i] @ vecs[j] for i in range(len(vecs)) for j in range(i + extra)]
            z = np.concatenate([x, dots])
        else:
            z = x0 = np.concatenate(vecs)
            for layer in range(spec.interaction.layers if kind == "dcnv2" else 0):
                u, v, b = (p[f"cross.{layer}.{k}"] for k in ("u", "v", "bias"))
                z = x0 * (v @ (u @ z) + b) + z
        for k in range(len(spec.top_mlp)):
            z = p[f"top.{k}.weight"] @ z + p[f"top.{k}.bias"]
            z = relu(z) if k < len(spec.top_mlp) - 1 else z
        acts = [1 / (1 + np.exp(-z[i])) if o.activation == "sigmoid" else z[i]
                for i, o in enumerate(spec.outputs)]
        out.append(acts)
    return np.array(out)


@pytest.mark.parametrize("interaction", INTERACTIONS, ids=lambda i: f"{i.kind}{i.self_interaction}")
@pytest.mark.parametrize("table_dtype", ["fp32", "bf16", "int8"])
def test_reference_matches_independent_computation(interaction, table_dtype):
    spec = spec_with(interaction, table_dtype)
    weights = init_weights(spec, seed=3)
    rng = np.random.default_rng(7)
    requests = [random_inputs(spec, rng, n) for n in (3, 1, 5)]
    # An empty bag must pool to zeros, for sum and for mean.
    tags = requests[2].sparse["tags"]
    lengths = tags.lengths.copy()
    lengths[0] = 0
    keep = int(tags.lengths[0])
    requests[2].sparse["tags"] = SparseInput(tags.values[keep:], lengths, tags.weights[keep:])
    requests[1].sparse["hist"] = SparseInput(np.zeros(0, np.int64))
    model = ReferenceModel(spec, weights)
    scores = split_scores(model.forward(collate(spec, requests)).numpy(), requests)
    for req, got in zip(requests, scores, strict=True):
        want = numpy_scores(spec, weights, req)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_request_scope_equals_values_repeated_per_candidate():
    spec = demo_spec()
    weights = init_weights(spec, seed=1)
    rng = np.random.default_rng(0)
    req = random_inputs(spec, rng, 6)
    # The same model with every request-scope input turned candidate-scope.
    flat = dataclasses.replace(
        spec,
        sparse=tuple(dataclasses.replace(f, scope="candidate") for f in spec.sparse),
        dense=tuple(dataclasses.replace(f, scope="candidate") for f in spec.dense))
    n = req.num_candidates
    sparse = {}
    for f in spec.sparse:
        s = req.sparse[f.name]
        if f.scope == "request":
            s = SparseInput(np.tile(s.values, n), np.full(n, len(s.values), np.int64))
        sparse[f.name] = s
    dense = {f.name: np.tile(req.dense[f.name], (n, 1)) if f.scope == "request"
             else req.dense[f.name] for f in spec.dense}
    shared = ReferenceModel(spec, weights).forward(collate(spec, [req]))
    repeated = ReferenceModel(flat, weights).forward(
        collate(flat, [RequestInputs(n, sparse, dense)]))
    torch.testing.assert_close(shared, repeated, rtol=1e-6, atol=1e-6)
    assert shared.std() > 1e-4, "scores should differ across candidates"


def test_reference_refuses_mismatched_weights():
    spec = spec_with(Interaction("dot"))
    weights = init_weights(spec)
    weights["top.0.weight"] = weights["top.0.weight"][:, :-1]
    del weights["bottom.1.bias"]
    expected = r"(?s)missing tensor 'bottom.1.bias'.*'top.0.weight' has shape \[7, 9\]"
    with pytest.raises(ValueError, match=expected):
        ReferenceModel(spec, weights)
