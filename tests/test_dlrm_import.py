"""Import of DLRM_Net state dicts, checked against a DLRM_Net-shaped torch module."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from recserve.engine.dlrm_import import convert_dlrm, run_import
from recserve.engine.inputs import RequestInputs, SparseInput, collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.repository import ModelRepository


class TinyDlrmNet(nn.Module):
    """The module layout of the open-source DLRM reference: Sequential MLPs, EmbeddingBags."""

    def __init__(self, rows, dim, bottom, top, interaction, self_interaction):
        super().__init__()
        self.emb_l = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum") for n in rows)
        self.bot_l = self._mlp(bottom, sigmoid=False)
        self.top_l = self._mlp(top, sigmoid=True)
        self.interaction, self.self_interaction = interaction, self_interaction

    @staticmethod
    def _mlp(sizes, sigmoid):
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            last = i == len(sizes) - 2
            layers.append(nn.Sigmoid() if sigmoid and last else nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, dense, indices, offsets):
        x = self.bot_l(dense)
        ly = [emb(i, o) for emb, i, o in zip(self.emb_l, indices, offsets, strict=True)]
        if self.interaction == "cat":
            r = torch.cat([x, *ly], dim=1)
        else:
            t = torch.cat([x, *ly], dim=1).view(x.shape[0], -1, x.shape[1])
            z = torch.bmm(t, t.transpose(1, 2))
            extra = 1 if self.self_interaction else 0
            pairs = [(i, j) for i in range(t.shape[1]) for j in range(i + extra)]
            zflat = z[:, [p[0] for p in pairs], [p[1] for p in pairs]]
            r = torch.cat([x, zflat], dim=1)
        return self.top_l(r)


@pytest.mark.parametrize("interaction", ["dot", "dot-self", "cat"])
def test_import_matches_dlrm_forward(tmp_path, interaction):
    torch.manual_seed(0)
    rows, dim, batch = [11, 7, 5], 4, 6
    top_in = {"dot": 4 + 6, "dot-self": 4 + 10, "cat": 4 + 3 * 4}[interaction]
    net = TinyDlrmNet(rows, dim, [3, 8, dim], [top_in, 6, 1],
                      "cat" if interaction == "cat" else "dot", interaction == "dot-self")
    torch.save(net.state_dict(), tmp_path / "dlrm.pt")
    features = {
        "sparse": [{"name": "user", "scope": "candidate"},
                   {"name": "item", "scope": "candidate", "max_bag": 3},
                   {"name": "site", "scope": "candidate"}],
        "dense": [{"name": "dense", "dim": 3}],
        "interaction": interaction,
        "output": {"name": "click", "activation": "sigmoid"},
    }
    (tmp_path / "features.json").write_text(json.dumps(features))
    path = run_import(tmp_path / "dlrm.pt", tmp_path / "features.json", tmp_path / "repo", "ctr")
    assert path == tmp_path / "repo" / "ctr" / "1"
    loaded = ModelRepository(tmp_path / "repo").load("ctr")

    rng = np.random.default_rng(1)
    dense = rng.standard_normal((batch, 3), dtype=np.float32)
    lengths = [np.ones(batch, np.int64), rng.integers(0, 4, batch), np.ones(batch, np.int64)]
    values = [rng.integers(0, n, int(ln.sum())) for n, ln in zip(rows, lengths, strict=True)]
    req = RequestInputs(batch, {name: SparseInput(v, ln) for name, v, ln in
                                zip(("user", "item", "site"), values, lengths, strict=True)},
                        {"dense": dense})
    ours = ReferenceModel(loaded.spec, loaded.weights).forward(collate(loaded.spec, [req]))
    offsets = [torch.from_numpy(np.concatenate([[0], np.cumsum(ln)[:-1]])) for ln in lengths]
    with torch.no_grad():
        theirs = net(torch.from_numpy(dense), [torch.from_numpy(v) for v in values], offsets)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_import_errors_say_what_is_wrong():
    net = TinyDlrmNet([5, 5], 4, [3, 4], [7, 1], "dot", False)
    state = net.state_dict()
    base = {"sparse": [{"name": "a"}, {"name": "b"}], "dense": [{"name": "d", "dim": 3}]}
    with pytest.raises(ValueError, match="2 emb_l tables but the import file names 1"):
        convert_dlrm(state, {**base, "sparse": [{"name": "a"}]}, "m")
    with pytest.raises(ValueError, match="bot_l.0 takes 3 inputs but .* add up to 5"):
        convert_dlrm(state, {**base, "dense": [{"name": "d", "dim": 5}]}, "m")
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        convert_dlrm(state, {**base, "colour": 1}, "m")
    with pytest.raises(ValueError, match="interaction is 'fm'"):
        convert_dlrm(state, {**base, "interaction": "fm"}, "m")
    del state["top_l.0.bias"]
    with pytest.raises(ValueError, match="lacks 'top_l.0.bias'"):
        convert_dlrm(state, base, "m")


def test_import_to_int8_tables():
    net = TinyDlrmNet([50, 40], 4, [3, 4], [7, 1], "dot", False)
    config = {"sparse": [{"name": "a"}, {"name": "b"}], "dense": [{"name": "d", "dim": 3}],
              "table_dtype": "int8", "weight_dtype": "bf16"}
    spec, weights = convert_dlrm(net.state_dict(), config, "q")
    assert weights["tables.emb_0.weight"].dtype == torch.uint8
    assert weights["top.0.weight"].dtype == torch.bfloat16
    ReferenceModel(spec, weights)  # checks every tensor against the spec
