"""Import of TorchRec DLRM / DLRM_DCN state dicts, checked against modules laid out and
computing as torchrec.models.dlrm's (TorchRec itself is not a dependency: these mirror its
module names, its upper-triangle dot interaction and its LowRankCrossNet)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from recserve.engine.dlrm_import import run_import
from recserve.engine.inputs import RequestInputs, SparseInput, collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.repository import ModelRepository
from recserve.engine.torchrec_import import convert_torchrec, is_torchrec

DIM = 4
TABLES = {"t1": (13, ["f1", "f3"]), "t2": (9, ["f2"])}  # one table serving two features
FEATURES = ["f1", "f3", "f2"]  # the model's order: each config's feature_names in turn


class Perceptron(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self._linear = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.relu(self._linear(x))


class Mlp(nn.Module):
    def __init__(self, n_in: int, sizes: list[int]) -> None:
        super().__init__()
        self._mlp = nn.Sequential(*[Perceptron(([n_in] + sizes)[i], sizes[i])
                                    for i in range(len(sizes))])

    def forward(self, x):
        return self._mlp(x)


class CrossNet(nn.Module):
    def __init__(self, n: int, layers: int, rank: int) -> None:
        super().__init__()
        self.W_kernels = nn.ParameterList(nn.Parameter(torch.randn(n, rank) / 3)
                                          for _ in range(layers))
        self.V_kernels = nn.ParameterList(nn.Parameter(torch.randn(rank, n) / 3)
                                          for _ in range(layers))
        self.bias = nn.ParameterList(nn.Parameter(torch.randn(n, 1) / 10) for _ in range(layers))

    def forward(self, x):
        x0 = x.unsqueeze(2)
        xl = x0
        for w, v, b in zip(self.W_kernels, self.V_kernels, self.bias, strict=True):
            xl = x0 * (torch.matmul(w, torch.matmul(v, xl)) + b) + xl
        return xl.squeeze(2)


class TorchRecShapedDlrm(nn.Module):
    """torchrec.models.dlrm's DLRM (``cross`` None) or DLRM_DCN (``cross`` = (layers, rank))."""

    def __init__(self, dense_in: int, dense_sizes: list[int], over_sizes: list[int],
                 cross: tuple[int, int] | None = None) -> None:
        super().__init__()
        bags = nn.ModuleDict({t: nn.EmbeddingBag(rows, DIM, mode="sum")
                              for t, (rows, _) in TABLES.items()})
        self.sparse_arch = nn.Module()
        self.sparse_arch.embedding_bag_collection = nn.Module()
        self.sparse_arch.embedding_bag_collection.embedding_bags = bags
        self.dense_arch = nn.Module()
        self.dense_arch.model = Mlp(dense_in, dense_sizes)
        vectors = len(FEATURES) + 1
        self.inter_arch = nn.Module()
        if cross is not None:
            self.inter_arch.crossnet = CrossNet(vectors * DIM, *cross)
            over_in = vectors * DIM
        else:
            over_in = DIM + vectors * (vectors - 1) // 2
        self.over_arch = nn.Module()
        self.over_arch.model = nn.Sequential(Mlp(over_in, over_sizes[:-1]),
                                             nn.Linear(over_sizes[-2], over_sizes[-1]))
        self.cross = cross

    def forward(self, dense, bags: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        x = self.dense_arch.model(dense)
        table_of = {f: t for t, (_, names) in TABLES.items() for f in names}
        ebc = self.sparse_arch.embedding_bag_collection.embedding_bags
        sparse = torch.stack([ebc[table_of[f]](*bags[f]) for f in FEATURES], dim=1)
        combined = torch.cat((x.unsqueeze(1), sparse), dim=1)
        if self.cross is not None:
            z = self.inter_arch.crossnet(combined.reshape(x.shape[0], -1))
        else:
            gram = torch.bmm(combined, combined.transpose(1, 2))
            rows, cols = torch.triu_indices(len(FEATURES) + 1, len(FEATURES) + 1, offset=1)
            z = torch.cat((x, gram[:, rows, cols]), dim=1)
        return self.over_arch.model(z)


IMPORT = {"sparse": [{"name": "f1", "table": "t1", "max_bag": 3},
                     {"name": "f3", "table": "t1", "scope": "request", "max_bag": 2},
                     {"name": "f2", "max_bag": 4}],  # no table: t_f2, which is not there
          "dense": [{"name": "counts", "dim": 3}, {"name": "age", "dim": 2}],
          "output": {"name": "click", "activation": "sigmoid"}}


def _import_file(tmp_path) -> dict:
    """``IMPORT`` with f2's table named (t2), written to tmp_path/features.json."""
    config = json.loads(json.dumps(IMPORT))
    config["sparse"][2]["table"] = "t2"
    path = tmp_path / "features.json"
    path.write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("cross, wrapped, suffix", [(None, False, ".pt"), ((2, 3), True, ".pt"),
                                                    ((1, 5), False, ".safetensors")])
def test_imported_models_score_as_the_torchrec_module(tmp_path, cross, wrapped, suffix):
    torch.manual_seed(3)
    net = TorchRecShapedDlrm(5, [6, DIM], [7, 5, 1], cross)
    state = {("model." if wrapped else "") + k: v for k, v in net.state_dict().items()}
    path = tmp_path / f"dlrm{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    _import_file(tmp_path)
    run_import(path, tmp_path / "features.json", tmp_path / "repo", "ctr")
    loaded = ModelRepository(tmp_path / "repo").load("ctr")
    assert loaded.spec.interaction.kind == ("dcnv2" if cross else "dot")
    if cross:
        assert (loaded.spec.interaction.layers, loaded.spec.interaction.rank) == cross

    rng = np.random.default_rng(5)
    n = 6
    counts = rng.standard_normal((n, 3), dtype=np.float32)
    age = rng.standard_normal((n, 2), dtype=np.float32)
    f1_len, f2_len = rng.integers(0, 4, n), rng.integers(1, 5, n)
    f1 = rng.integers(0, 13, int(f1_len.sum()))
    f2 = rng.integers(0, 9, int(f2_len.sum()))
    f3 = rng.integers(0, 13, 2)  # one bag for the whole request
    req = RequestInputs(n, {"f1": SparseInput(f1, f1_len), "f2": SparseInput(f2, f2_len),
                            "f3": SparseInput(f3, np.array([2]))},
                        {"counts": counts, "age": age})
    ours = ReferenceModel(loaded.spec, loaded.weights).forward(collate(loaded.spec, [req]))

    def bags(values, lengths):
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return torch.from_numpy(values), torch.from_numpy(offsets)

    theirs_bags = {"f1": bags(f1, f1_len), "f2": bags(f2, f2_len),
                   "f3": bags(np.tile(f3, n), np.full(n, 2))}  # (the same bag on every row)
    with torch.no_grad():
        dense = torch.from_numpy(np.concatenate([counts, age], axis=1))
        theirs = torch.sigmoid(net(dense, theirs_bags))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_torchrec_import_errors_say_what_to_fix(tmp_path):
    net = TorchRecShapedDlrm(5, [6, DIM], [7, 1], (1, 2))
    state = net.state_dict()
    assert is_torchrec(state) and is_torchrec({"model." + k: v for k, v in state.items()})
    config = _import_file(tmp_path)
    spec, _ = convert_torchrec(state, config, "m")
    assert [t.name for t in spec.tables] == ["t1", "t2"] and spec.sparse[2].table == "t2"
    with pytest.raises(ValueError, match="reads table 't_f2', which the state dict lacks"):
        convert_torchrec(state, IMPORT, "m")  # (f2 without its table: the default name)
    with pytest.raises(ValueError, match=r"tables \['t2'\] that no sparse feature"):
        convert_torchrec(state, {**config, "sparse": config["sparse"][:2]}, "m")
    with pytest.raises(ValueError, match="takes 5 inputs but .* add up to 3"):
        convert_torchrec(state, {**config, "dense": [{"name": "d", "dim": 3}]}, "m")
    with pytest.raises(ValueError, match="says interaction 'dot', but the state dict is a "
                                         "DLRM_DCN"):
        convert_torchrec(state, {**config, "interaction": "dot"}, "m")
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        convert_torchrec(state, {**config, "colour": 1}, "m")
    with pytest.raises(ValueError, match="must name the dense inputs"):
        convert_torchrec(state, {**config, "dense": []}, "m")
    odd = dict(state)
    odd["sparse_arch.embedding_bag_collection.embedding_bags.t2.weight"] = torch.zeros(9, 8)
    with pytest.raises(ValueError, match="one embedding dim for all"):
        convert_torchrec(odd, config, "m")
    del state["over_arch.model.1.bias"]
    with pytest.raises(ValueError, match="lacks 'over_arch.model.1.bias'"):
        convert_torchrec(state, config, "m")


def test_torchrec_import_to_int8_tables_and_bf16_weights(tmp_path):
    net = TorchRecShapedDlrm(5, [6, DIM], [7, 1])
    config = {**_import_file(tmp_path), "table_dtype": "int8", "weight_dtype": "bf16"}
    spec, weights = convert_torchrec(net.state_dict(), config, "q")
    assert weights["tables.t1.weight"].dtype == torch.uint8
    assert weights["top.0.weight"].dtype == torch.bfloat16
    ReferenceModel(spec, weights)  # checks every tensor against the spec


def test_the_cli_imports_a_torchrec_checkpoint(tmp_path, capsys):
    from recserve.server.cli import main

    torch.save(TorchRecShapedDlrm(5, [6, DIM], [7, 1], (2, 2)).state_dict(), tmp_path / "m.pt")
    _import_file(tmp_path)
    code = main(["import-dlrm", str(tmp_path / "m.pt"), "--features",
                 str(tmp_path / "features.json"), "--repo", str(tmp_path / "repo"),
                 "--name", "dcn"])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "repo" / "dcn" / "1")
    spec = ModelRepository(tmp_path / "repo").load("dcn").spec
    assert [f.name for f in spec.sparse] == ["f1", "f3", "f2"]
    assert spec.sparse[1].scope == "request" and spec.interaction.kind == "dcnv2"


def test_the_shipped_mlperf_import_file_gives_the_dlrmv2_shape():
    """docs/mlperf-dlrmv2-features.json names the MLPerf DLRM-v2 reference's features (cat_i
    reading t_cat_i, DESIGN.md's multi-hot sizes, 13 dense ints): a DLRM_DCN state dict of
    that layout (tiny tables and layers here) imports to the dlrmv2 workload's shape."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = json.loads((root / "docs" / "mlperf-dlrmv2-features.json").read_text())
    hot = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
    d, n = 8, 27 * 8
    state = {f"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{i}.weight":
             torch.randn(5 + i, d) for i in range(26)}
    for i, (n_in, n_out) in enumerate([(13, 16), (16, d)]):
        state[f"dense_arch.model._mlp.{i}._linear.weight"] = torch.randn(n_out, n_in)
        state[f"dense_arch.model._mlp.{i}._linear.bias"] = torch.randn(n_out)
    for layer in range(3):
        state[f"inter_arch.crossnet.V_kernels.{layer}"] = torch.randn(4, n)
        state[f"inter_arch.crossnet.W_kernels.{layer}"] = torch.randn(n, 4)
        state[f"inter_arch.crossnet.bias.{layer}"] = torch.randn(n, 1)
    for i, (n_in, n_out) in enumerate([(n, 32), (32, 16)]):
        state[f"over_arch.model.0._mlp.{i}._linear.weight"] = torch.randn(n_out, n_in)
        state[f"over_arch.model.0._mlp.{i}._linear.bias"] = torch.randn(n_out)
    state["over_arch.model.1.weight"], state["over_arch.model.1.bias"] = (torch.randn(1, 16),
                                                                         torch.randn(1))
    spec, weights = convert_torchrec(state, config, "dlrmv2")
    assert [f.max_bag for f in spec.sparse] == hot
    assert [f.table for f in spec.sparse] == [f"t_cat_{i}" for i in range(26)]
    assert spec.dense[0].dim == 13 and spec.interaction.kind == "dcnv2"
    assert (spec.interaction.layers, spec.interaction.rank) == (3, 4)
    assert spec.top_mlp == (32, 16, 1) and spec.weight_dtype == "bf16"
    ReferenceModel(spec, weights)  # every tensor where the spec says
