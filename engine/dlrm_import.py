"""Import a state dict of the open-source DLRM reference (``DLRM_Net``) into a repository
(TorchRec's DLRM and DLRM_DCN: ``torchrec_import``; ``run_import`` takes either).

``DLRM_Net`` keeps its layers in ``nn.Sequential`` containers: ``bot_l`` and ``top_l``
alternate Linear and activation modules, so Linear layers sit at even indices
(``bot_l.0``, ``bot_l.2``, ...), and ``emb_l.<i>`` holds one EmbeddingBag (sum) per sparse
feature. The state dict does not say what the features are called, their scopes, how
dense inputs split, or which interaction was used; an import file supplies those:

    {
      "sparse": [{"name": "user_id", "scope": "request"},            # one per emb_l.<i>
                 {"name": "item_id", "scope": "candidate", "max_bag": 1}],
      "dense": [{"name": "dense", "dim": 13, "scope": "candidate"}],  # dims sum to bot_l.0's input
      "interaction": "dot",          # dot | dot-self (arch_interaction_itself) | cat
      "output": {"name": "click", "activation": "sigmoid"},
      "weight_dtype": "fp32", "table_dtype": "fp32"
    }

Sparse entries may also set ``pooling`` (DLRM_Net pools by sum) and ``weighted``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .repository import save_model
from .spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from .weights import TORCH_DTYPES, quantize_rowwise

_INTERACTIONS = {"dot": Interaction("dot"), "dot-self": Interaction("dot", True),
                 "cat": Interaction("cat")}
_SPARSE_KEYS = {"name", "scope", "pooling", "max_bag", "weighted"}
_IMPORT_KEYS = {"sparse", "dense", "interaction", "output", "weight_dtype", "table_dtype"}


def _linear_layers(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.weight$")
    return sorted(int(m.group(1)) for key in state if (m := pattern.match(key)))


def _table_count(state: dict[str, torch.Tensor]) -> int:
    indices = sorted(int(m.group(1)) for key in state
                     if (m := re.match(r"^emb_l\.(\d+)\.weight$", key)))
    if indices != list(range(len(indices))):
        raise ValueError(f"emb_l tables are not numbered 0..n-1: found {indices}")
    return len(indices)


def convert_dlrm(state: dict[str, torch.Tensor], config: dict,
                 name: str) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Spec and recserve-named weights for a DLRM_Net state dict plus the import facts."""
    unknown = sorted(set(config) - _IMPORT_KEYS)
    if unknown:
        raise ValueError(f"import file has unknown keys {unknown}; allowed {sorted(_IMPORT_KEYS)}")
    sparse_facts = config.get("sparse", [])
    count = _table_count(state)
    if len(sparse_facts) != count:
        raise ValueError(f"state dict has {count} emb_l tables but the import file names "
                         f"{len(sparse_facts)} sparse features; give one entry per table, in order")
    table_dtype = config.get("table_dtype", "fp32")
    weight_dtype = config.get("weight_dtype", "fp32")
    tables, sparse = [], []
    for i, facts in enumerate(sparse_facts):
        rows, dim = state[f"emb_l.{i}.weight"].shape
        bad = sorted(set(facts) - _SPARSE_KEYS) if isinstance(facts, dict) else facts
        if bad:
            raise ValueError(f"import file sparse[{i}] has unknown keys {bad}; "
                             f"allowed {sorted(_SPARSE_KEYS)}")
        facts = {"pooling": "sum", "max_bag": 1, **facts}
        table_name = f"emb_{i}"
        tables.append(Table(table_name, int(rows), int(dim), table_dtype))
        sparse.append(SparseFeature(table=table_name, **facts))
    dense = tuple(DenseFeature(**facts) for facts in config.get("dense", []))
    bottom = _linear_layers(state, "bot_l")
    top = _linear_layers(state, "top_l")
    if bottom and dense:
        fan_in = state[f"bot_l.{bottom[0]}.weight"].shape[1]
        given = sum(f.dim for f in dense)
        if fan_in != given:
            raise ValueError(f"bot_l.{bottom[0]} takes {fan_in} inputs but the dense features "
                             f"in the import file add up to {given}")
    interaction = config.get("interaction", "dot")
    if interaction not in _INTERACTIONS:
        raise ValueError(f"interaction is {interaction!r}; expected one of {sorted(_INTERACTIONS)}")
    output = config.get("output", {"name": "score", "activation": "sigmoid"})
    spec = ModelSpec(
        name=name, tables=tuple(tables), sparse=tuple(sparse), dense=dense,
        bottom_mlp=tuple(int(state[f"bot_l.{k}.weight"].shape[0]) for k in bottom),
        interaction=_INTERACTIONS[interaction],
        top_mlp=tuple(int(state[f"top_l.{k}.weight"].shape[0]) for k in top),
        outputs=(Output(**output),), weight_dtype=weight_dtype)
    weights = tables_and_weights(tables, [state[f"emb_l.{i}.weight"]
                                          for i in range(len(tables))])
    wdtype = TORCH_DTYPES[weight_dtype]
    for ours, theirs, layers in (("bottom", "bot_l", bottom), ("top", "top_l", top)):
        for k, index in enumerate(layers):
            for part in ("weight", "bias"):
                key = f"{theirs}.{index}.{part}"
                if key not in state:
                    raise ValueError(f"state dict lacks {key!r}")
                weights[f"{ours}.{k}.{part}"] = state[key].to(wdtype)
    return spec, weights


def tables_and_weights(tables, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each table's stored tensors (``tables.<name>.weight``, and int8's scale and offset)
    from its fp32-convertible ``values``, in the table's dtype."""
    weights: dict[str, torch.Tensor] = {}
    for table, value in zip(tables, values, strict=True):
        stem, value = f"tables.{table.name}", value.float()
        if table.dtype == "int8":
            codes, scale, offset = quantize_rowwise(value)
            weights.update({f"{stem}.weight": codes, f"{stem}.scale": scale,
                            f"{stem}.offset": offset})
        else:
            weights[f"{stem}.weight"] = value.to(TORCH_DTYPES[table.dtype])
    return weights


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``'d state dict (no code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # weights_only refuses pickled code: only tensors and plain containers load.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    # Checkpoints saved from DataParallel prefix every key with "module.".
    return {key.removeprefix("module."): value for key, value in state.items()
            if isinstance(value, torch.Tensor)}


def run_import(state_dict: str | os.PathLike, features: str | os.PathLike,
               repo: str | os.PathLike, name: str, version: int | None = None) -> Path:
    """Convert a DLRM_Net checkpoint, or a TorchRec DLRM / DLRM_DCN one (``torchrec_import``:
    told apart by their tensor names), and write it to ``repo`` as model ``name``."""
    from .torchrec_import import convert_torchrec, is_torchrec

    try:
        config = json.loads(Path(features).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{features} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{features} must hold a JSON object")
    state = read_state_dict(state_dict)
    convert = convert_torchrec if is_torchrec(state) else convert_dlrm
    spec, weights = convert(state, config, name)
    return save_model(repo, spec, weights, version)
