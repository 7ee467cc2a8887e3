"""``recserve inspect`` (a model checked before serving: loads, scores, what it costs) and
the cost model it and the benchmarks share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from recserve.engine.costs import forward_flops, rows_read_bytes
from recserve.engine.demo import build_demo_repository
from recserve.engine.repository import save_model
from recserve.engine.weights import init_weights
from recserve.server.cli import main
from recserve.server.inspect_cli import inspect_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import workloads as wl  # noqa: E402


def test_the_cost_model_of_dlrmv2():
    """dlrmv2 per candidate: bottom 13-512-256-128, three rank-512 cross layers over 3456
    inputs, top 3456-1024-1024-512-256-1 (DESIGN.md): 16 030 464 multiply-adds; 214 bf16 rows
    of 128 (int8: 128 codes + 8 bytes)."""
    spec = wl.dlrmv2_spec(1000)
    macs = (13 * 512 + 512 * 256 + 256 * 128 + 3 * 2 * 3456 * 512
            + 3456 * 1024 + 1024 * 1024 + 1024 * 512 + 512 * 256 + 256)
    assert macs == 16_030_464 and forward_flops(spec, 1) == 2 * macs
    assert forward_flops(spec, 8192) == 8192 * 2 * macs
    assert rows_read_bytes(spec, 2) == 2 * 214 * 256
    assert rows_read_bytes(wl.dlrmv2_spec(1000, "int8"), 1) == 214 * (128 + 8)
    assert wl.model_flops is forward_flops and wl.gather_bytes is rows_read_bytes


def test_inspect_says_what_a_model_is_and_checks_it_scores(tmp_path, capsys):
    build_demo_repository(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0  # the only model
    out = capsys.readouterr().out
    assert out.startswith(f"demo version 1 ({tmp_path / 'demo' / '1'}): loads and scores")
    for line in ("sparse features  6 (4 per request, 2 per candidate", "tables           5,",
                 "interaction      dot over 7 vectors", "outputs play (sigmoid)",
                 "check            100 generated candidates scored"):
        assert line in out
    assert main(["inspect", str(tmp_path), "demo", "--json", "--candidates", "7"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["check"]["candidates"] == 7 and 0 < facts["check"]["min_score"] < 1
    assert facts["table_bytes"] == sum(t["bytes"] for t in facts["tables"]) > 0
    assert facts["parameters"] > 0 and facts["flops_per_candidate"] > 0


def test_inspect_fails_a_model_that_would_not_serve(tmp_path, capsys):
    build_demo_repository(tmp_path)
    assert main(["inspect", str(tmp_path), "demo", "--version", "2"]) == 1
    assert "has no version 2" in capsys.readouterr().err
    weights_file = tmp_path / "demo" / "1" / "weights.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(str(weights_file))
    spec_text = (tmp_path / "demo" / "1" / "spec.json").read_text()
    broken = dict(weights)  # finite, so they load, but they overflow: inf - inf in layer 2
    broken["top.0.weight"] = torch.full_like(broken["top.0.weight"], 1e38)
    signs = torch.ones_like(broken["top.1.weight"])
    signs[:, ::2] = -1
    broken["top.1.weight"] = signs * 1e38
    save_model(tmp_path, _spec(spec_text), broken, version=2)
    with pytest.raises(ValueError, match="non-finite"):
        inspect_model(tmp_path, "demo", 2, 5)
    del broken["top.0.bias"]
    save_file(broken, str(tmp_path / "demo" / "2" / "weights.safetensors"))
    assert main(["inspect", str(tmp_path), "demo"]) == 1  # (the highest version: 2)
    assert "top.0.bias" in capsys.readouterr().err
    other = _renamed(_spec(spec_text), "other")
    save_model(tmp_path, other, init_weights(other))
    assert main(["inspect", str(tmp_path)]) == 1
    assert "holds 2 models (demo, other); name one" in capsys.readouterr().err


def _spec(text: str):
    from recserve.engine.spec import ModelSpec

    return ModelSpec.from_json(text)


def _renamed(spec, name: str):
    import dataclasses

    return dataclasses.replace(spec, name=name)


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`recserve inspect DIR | head -1`: the pipe closes before the output is written; the
    command exits 0 without a traceback or an error line."""
    import subprocess

    build_demo_repository(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "recserve.server.cli", "inspect",
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes anything
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == b""


def test_against_another_version_says_how_far_scores_and_rankings_moved(tmp_path, capsys):
    build_demo_repository(tmp_path)
    repo = tmp_path
    spec = _spec((repo / "demo" / "1" / "spec.json").read_text())
    from recserve.engine.repository import ModelRepository

    same = ModelRepository(repo).load("demo").weights
    save_model(repo, spec, same, version=2)  # a re-export: the same scores
    save_model(repo, spec, init_weights(spec, seed=99), version=3)  # retrained
    assert main(["inspect", str(repo), "demo", "--version", "2", "--against", "1",
                 "--max-diff", "0"]) == 0
    out = capsys.readouterr().out
    assert "against v1     8 requests of 100 candidates: scores moved by up to 0 " in out
    assert "rank correlation at least 1.0000; at least 10 of the top 10 stayed there" in out
    assert main(["inspect", str(repo), "demo", "--version", "3", "--against", "1",
                 "--max-diff", "1e-3", "--json"]) == 1
    captured = capsys.readouterr()
    moved = json.loads(captured.out)["against"]
    assert moved["max_abs_diff"] > 1e-3 and moved["min_rank_correlation"] < 1
    assert "more than --max-diff 0.001" in captured.err
    assert main(["inspect", str(repo), "demo", "--max-diff", "1"]) == 1
    assert "give --against too" in capsys.readouterr().err


def test_against_a_version_with_other_inputs_is_refused(tmp_path, capsys):
    import dataclasses

    build_demo_repository(tmp_path)
    spec = _spec((tmp_path / "demo" / "1" / "spec.json").read_text())
    fewer = dataclasses.replace(spec, sparse=spec.sparse[:-1])
    save_model(tmp_path, fewer, init_weights(fewer), version=2)
    assert main(["inspect", str(tmp_path), "demo", "--against", "1"]) == 1
    err = capsys.readouterr().err
    assert "versions 2 and 1 take different inputs" in err
    assert spec.sparse[-1].name in err
