"""bench/gather_diagnosis.py: a failed pooled check names its suspect (the ids, the stored
rows, the reference's own tables, or the output written over after the kernel ran)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from recserve.engine.weights import quantize_rowwise
from recserve.kernels.embedding_bag import embedding_bag
from recserve.kernels.tables import BagFeature, PackedTables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gather_diagnosis as gd  # noqa: E402

B, DIM, HOT = 6, 16, 3


def _setup():
    """Two int8 tables, two features of HOT ids a bag, pooled once; the reference."""
    gen = torch.Generator().manual_seed(0)
    source = [torch.rand(40, DIM, generator=gen) - 0.5 for _ in range(2)]
    quant = [quantize_rowwise(t) for t in source]
    codes = [q[0] for q in quant]
    qparams = [(q[1], q[2]) for q in quant]
    packed = PackedTables(codes, [q[0] for q in qparams], [q[1] for q in qparams])
    feats = [BagFeature(0, 0, max_bag=HOT), BagFeature(1, DIM, max_bag=HOT)]
    values = [torch.randint(0, 40, (B * HOT,), generator=gen) for _ in feats]
    indices = torch.cat(values).to(torch.int32)
    offsets = torch.cat([torch.arange(B + 1) * HOT + k * B * HOT for k in range(2)]
                        ).to(torch.int32)
    e = torch.full((B, 2 * DIM), float("nan"))

    def run():
        return embedding_bag(packed, feats, indices, offsets, e)

    run()
    want = []
    for k, f in enumerate(feats):
        idx = values[k].view(B, HOT)
        scale, shift = qparams[f.table]
        want.append((codes[f.table][idx].float() * scale[idx][..., None]
                     + shift[idx][..., None]).sum(1))
    return dict(e=e, feats=feats, want=want, values=values, indices=indices,
                offsets=offsets, packed=packed, tables=codes, qparams=qparams, relaunch=run,
                b=B, fresh_tables=lambda t: quantize_rowwise(source[t]))


def test_a_right_gather_has_nothing_to_diagnose():
    s = _setup()
    assert gd.wrong_features(s["e"], s["feats"], s["want"]) == []
    assert "no feature is wrong" in gd.diagnose(**s)


def test_an_output_written_over_after_the_launch_is_told_apart():
    s = _setup()
    s["e"][:, DIM:] += 5.0  # (feature 1's slice, after the kernel wrote it)
    said = gd.diagnose(**s)
    assert "features wrong: [1]; after a second launch: [] (the first output was written" in said
    assert "second launch differs" in said
    assert "ids the kernel read = the reference's" in said


def test_a_stored_table_that_differs_from_the_reference_is_named():
    s = _setup()
    t0 = s["packed"].row_stride[0] * s["packed"].rows[0]  # table 1's first byte
    s["packed"].data[t0:] ^= 0x5A  # its codes (and scales) no longer match the reference's
    s["relaunch"]()
    said = gd.diagnose(**s)
    assert "features wrong: [1]; after a second launch: [1] |" in said
    assert "feature 1 (table 1)" in said and "stored rows != the reference's tables" in said
    assert "stored scale/offset != the reference's" in said
    assert "second launch gave the same" in said
    assert "reference tables = built anew" in said


def test_ids_that_differ_from_the_references_are_named():
    s = _setup()
    s["values"][0] = (s["values"][0] + 1) % 40  # the reference pooled other ids
    idx = s["values"][0].view(B, HOT)
    scale, shift = s["qparams"][0]
    s["want"][0] = (s["tables"][0][idx].float() * scale[idx][..., None]
                    + shift[idx][..., None]).sum(1)
    said = gd.diagnose(**s)
    assert "feature 0 (table 0): ids the kernel read != the reference's" in said
    assert "feature 1" not in said
