"""Import a state dict of TorchRec's ``DLRM`` or ``DLRM_DCN`` (``torchrec.models.dlrm``; the
MLPerf DLRM-v2 reference trains ``DLRM_DCN``) into a repository.

The modules name their tensors so (a ``DLRMTrain`` wrapper adds ``model.`` in front, and
``DataParallel`` adds ``module.``; both are dropped):

  sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight   [rows, D]
  dense_arch.model._mlp.<i>._linear.weight / .bias                     ReLU after each
  inter_arch.crossnet.V_kernels.<l> [r, N], .W_kernels.<l> [N, r], .bias.<l> [N(, 1)]
      (DLRM_DCN: x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l over N = (F + 1) D inputs)
  over_arch.model.0._mlp.<i>._linear.weight / .bias                    ReLU after each
  over_arch.model.1.weight / .bias                                     the logits

DLRM's interaction is the dense vector and the dots of each pair of the F + 1 vectors (the
dense one first, then the sparse features in order) in upper-triangle order; recserve lists
the same pairs in lower-triangle order, so the over arch's first layer has its columns
reordered here. The state dict does not say which table each feature reads (a table may
serve several), in what order features enter the interaction, their scopes or how the dense
input splits; an import file does:

    {
      "sparse": [{"name": "cat_0", "table": "t_cat_0", "scope": "candidate", "max_bag": 3},
                 ...],   # in the model's order: each EmbeddingBagConfig's feature_names, in turn
      "dense": [{"name": "int", "dim": 13, "scope": "candidate"}],  # dims sum to the input
      "output": {"name": "click", "activation": "sigmoid"},
      "weight_dtype": "bf16", "table_dtype": "bf16"
    }

``table`` defaults to ``t_<name>`` (TorchRec's examples and the MLPerf reference name tables
so); ``pooling`` (sum, TorchRec's default, or mean), ``max_bag`` and ``scope`` as for
``dlrm_import``. The interaction (dot, or dcnv2 with its layers and rank) is read from the
state dict; ``"interaction"`` may name it, and must then agree. ``output.activation``
sigmoid (the default) turns DLRM's logits into the probability its training loss assumes.
"""

from __future__ import annotations

import re

import torch

from .dlrm_import import tables_and_weights
from .spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from .weights import TORCH_DTYPES

EBC = "sparse_arch.embedding_bag_collection.embedding_bags."
CROSS = "inter_arch.crossnet."
_SPARSE_KEYS = {"name", "table", "scope", "pooling", "max_bag", "weighted"}
_IMPORT_KEYS = {"sparse", "dense", "interaction", "output", "weight_dtype", "table_dtype"}


def is_torchrec(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` is laid out as TorchRec's DLRM (after dropping a ``model.``)."""
    return any(key.startswith((EBC, "model." + EBC)) for key in state)


def convert_torchrec(state: dict[str, torch.Tensor], config: dict,
                     name: str) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Spec and recserve-named weights for a TorchRec DLRM / DLRM_DCN state dict plus the
    import file's facts (module docstring)."""
    if not any(key.startswith(EBC) for key in state):  # (DLRMTrain: the DLRM is .model)
        state = {key.removeprefix("model."): value for key, value in state.items()}
    unknown = sorted(set(config) - _IMPORT_KEYS)
    if unknown:
        raise ValueError(f"import file has unknown keys {unknown}; allowed {sorted(_IMPORT_KEYS)}")
    stored = {key[len(EBC):-len(".weight")]: value for key, value in state.items()
              if key.startswith(EBC) and key.endswith(".weight")}
    sparse = _sparse_features(config.get("sparse", []), stored)
    used = list(dict.fromkeys(f.table for f in sparse))  # first use order
    left_out = sorted(set(stored) - set(used))
    if left_out:
        raise ValueError(f"the state dict has tables {left_out} that no sparse feature of the "
                         "import file reads; name every feature the model was trained with")
    dims = {int(stored[t].shape[1]) for t in used}
    if len(dims) != 1:
        raise ValueError(f"tables have dims {sorted(dims)}; TorchRec's DLRM needs one "
                         "embedding dim for all")
    dim = dims.pop()
    table_dtype = config.get("table_dtype", "fp32")
    weight_dtype = config.get("weight_dtype", "fp32")
    tables = tuple(Table(t, int(stored[t].shape[0]), dim, table_dtype) for t in used)
    dense = tuple(DenseFeature(**facts) for facts in config.get("dense", []))
    bottom = _linears(state, "dense_arch.model._mlp.{}._linear")
    over = _linears(state, "over_arch.model.0._mlp.{}._linear") + ["over_arch.model.1"]
    if not dense or not bottom:
        raise ValueError("TorchRec's DLRM has a dense arch: the import file must name the "
                         "dense inputs (\"dense\": [{\"name\": ..., \"dim\": ...}])")
    fan_in, given = int(_get(state, f"{bottom[0]}.weight").shape[1]), sum(f.dim for f in dense)
    if fan_in != given:
        raise ValueError(f"{bottom[0]} takes {fan_in} inputs but the dense features in the "
                         f"import file add up to {given}")
    interaction = _interaction(state, config.get("interaction"))
    spec = ModelSpec(
        name=name, tables=tables, sparse=sparse, dense=dense,
        bottom_mlp=tuple(int(_get(state, f"{p}.weight").shape[0]) for p in bottom),
        interaction=interaction,
        top_mlp=tuple(int(_get(state, f"{p}.weight").shape[0]) for p in over),
        outputs=(Output(**config.get("output", {"name": "score", "activation": "sigmoid"})),),
        weight_dtype=weight_dtype)
    weights = tables_and_weights(tables, [stored[t.name] for t in tables])
    wdtype = TORCH_DTYPES[weight_dtype]
    for ours, theirs in (("bottom", bottom), ("top", over)):
        for k, prefix in enumerate(theirs):
            for part in ("weight", "bias"):
                weights[f"{ours}.{k}.{part}"] = _get(state, f"{prefix}.{part}").to(wdtype)
    if interaction.kind == "dot":  # their pair order -> ours, in the first top layer's inputs
        first = weights["top.0.weight"]
        weights["top.0.weight"] = first[:, _dot_columns(len(sparse) + 1, dim)].contiguous()
    for layer in range(interaction.layers):
        weights[f"cross.{layer}.u"] = _get(state, f"{CROSS}V_kernels.{layer}").to(wdtype)
        weights[f"cross.{layer}.v"] = _get(state, f"{CROSS}W_kernels.{layer}").to(wdtype)
        weights[f"cross.{layer}.bias"] = _get(state, f"{CROSS}bias.{layer}").reshape(-1).to(
            wdtype)
    return spec, weights


def _sparse_features(entries: list, stored: dict[str, torch.Tensor]) -> tuple:
    if not entries:
        raise ValueError(f"the import file names no sparse features; the state dict has "
                         f"tables {sorted(stored)}")
    features = []
    for i, facts in enumerate(entries):
        if not isinstance(facts, dict) or "name" not in facts:
            raise ValueError(f"import file sparse[{i}] must be an object with a \"name\"")
        bad = sorted(set(facts) - _SPARSE_KEYS)
        if bad:
            raise ValueError(f"import file sparse[{i}] has unknown keys {bad}; "
                             f"allowed {sorted(_SPARSE_KEYS)}")
        facts = {"table": f"t_{facts['name']}", "pooling": "sum", "max_bag": 1, **facts}
        if facts["table"] not in stored:
            raise ValueError(f"sparse feature {facts['name']!r} reads table {facts['table']!r}, "
                             f"which the state dict lacks; it has {sorted(stored)}")
        features.append(SparseFeature(**facts))
    return tuple(features)


def _linears(state: dict[str, torch.Tensor], pattern: str) -> list[str]:
    """Prefixes of the Linear layers ``pattern`` (with {} for the index) names, in order."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + r"\.weight$")
    found = sorted(int(m.group(1)) for key in state if (m := regex.match(key)))
    if found != list(range(len(found))):
        raise ValueError(f"{pattern.format('<i>')} layers are not numbered 0..n-1: {found}")
    return [pattern.format(i) for i in found]


def _interaction(state: dict[str, torch.Tensor], named: str | None) -> Interaction:
    layers = len([k for k in state if k.startswith(f"{CROSS}V_kernels.")])
    found = Interaction("dcnv2", layers=layers,
                        rank=int(_get(state, f"{CROSS}V_kernels.0").shape[0])) \
        if layers else Interaction("dot")
    if named is not None and named != found.kind:
        raise ValueError(f"the import file says interaction {named!r}, but the state dict is "
                         f"a {'DLRM_DCN' if layers else 'DLRM'} ({found.kind})")
    return found


def _dot_columns(vectors: int, dim: int) -> list[int]:
    """For each input column of recserve's dot interaction (the dense vector, then pairs
    i > j row by row), the column of TorchRec's (the dense vector, then pairs i < j)."""
    theirs = {pair: k for k, pair in enumerate((i, j) for i in range(vectors)
                                                for j in range(i + 1, vectors))}
    return list(range(dim)) + [dim + theirs[(j, i)] for i in range(vectors) for j in range(i)]


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"state dict lacks {key!r}")
    return state[key]
