"""bench/kernels_plot.py: the kernel benchmark's figure, made from its JSON alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernels_plot as kplot  # noqa: E402


def _record(section, workload, variant, b, us, dist="uniform"):
    return {"section": section, "workload": workload, "dist": dist, "variant": variant,
            "B": b, "us": us}


RECORDS = [
    {"section": "env", "gpu": "NVIDIA H200", "commit": "abc1234",
     "date": "2026-11-27T07:35:25Z", "torch": "2.11.0", "triton": "3.6.0"},
    _record("gather", "dlrmv2", "recserve_graph", 8192, 157.2),
    _record("gather", "dlrmv2", "recserve_graph", 512, 12.2),
    _record("gather", "dlrmv2", "torch_per_table_graph", 512, 121.0),
    _record("gather", "dlrmv2", "recserve_graph", 2048, 44.7, dist="zipf"),  # another dist
    _record("gather", "dlrmv2", "recserve_pdl_graph", 512, 11.0),  # not a plotted variant
    _record("forward", "dlrm-dot", "torch_eager", 512, 821.9),
    {"section": "matmul", "n": 8192, "us": 1400.1},
]


def test_series_are_each_variants_points_by_batch_size():
    got = kplot.series(RECORDS, "gather", "dlrmv2")
    assert got == {"recserve_graph": [(512, 12.2), (8192, 157.2)],
                   "torch_per_table_graph": [(512, 121.0)]}
    assert list(got) == [v for v in kplot.VARIANTS if v in got]  # legend order
    assert kplot.series(RECORDS, "gather", "dlrmv2", "zipf") == {
        "recserve_graph": [(2048, 44.7)]}
    assert kplot.series(RECORDS, "forward", "dlrmv2") == {}


def test_title_names_the_card_commit_and_versions():
    assert kplot.title(RECORDS) == ("recserve kernels against PyTorch: NVIDIA H200, commit "
                                    "abc1234, 2026-11-27, torch 2.11.0, triton 3.6.0")


def test_plot_writes_a_png_and_refuses_results_without_timings(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    png = tmp_path / "k.png"
    kplot.plot(RECORDS, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no gather or forward records"):
        kplot.plot(RECORDS[:1], tmp_path / "empty.png")


def test_command_line_says_what_went_wrong(tmp_path, capsys):
    assert kplot.main([str(tmp_path / "missing.json"), str(tmp_path / "k.png")]) == 2
    assert "kernels_plot:" in capsys.readouterr().err
