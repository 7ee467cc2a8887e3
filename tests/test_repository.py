"""Model repository: layout, versions, and precise errors for broken entries."""

import pytest
import torch
from safetensors.torch import save_file

from recserve.engine.demo import build_demo_repository, demo_spec
from recserve.engine.repository import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelNotFoundError,
    ModelRepository,
    RepositoryError,
    save_model,
)
from recserve.engine.weights import init_weights


def test_save_and_load_versions(tmp_path):
    spec = demo_spec()
    first = save_model(tmp_path, spec, init_weights(spec, seed=1))
    second = save_model(tmp_path, spec, init_weights(spec, seed=2))
    assert (first.name, second.name) == ("1", "2")
    repo = ModelRepository(tmp_path)
    assert repo.models() == [("demo", 2)]
    assert repo.versions("demo") == [1, 2]
    latest = repo.load("demo")
    assert latest.version == 2 and latest.spec == spec
    older = repo.load("demo", 1)
    w1 = init_weights(spec, seed=1)
    assert all(torch.equal(older.weights[k], w1[k]) for k in w1)
    assert not torch.equal(latest.weights["top.0.weight"], older.weights["top.0.weight"])
    with pytest.raises(FileExistsError):
        save_model(tmp_path, spec, w1, version=2)


def test_demo_repository_is_deterministic(tmp_path):
    a = ModelRepository(build_demo_repository(tmp_path / "a").parent.parent).load("demo")
    b = ModelRepository(build_demo_repository(tmp_path / "b").parent.parent).load("demo")
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    # Building again leaves the existing version alone.
    assert build_demo_repository(tmp_path / "a") == tmp_path / "a" / "demo" / "1"


def test_missing_models_and_versions(tmp_path):
    repo = ModelRepository(tmp_path)
    with pytest.raises(ModelNotFoundError, match="model 'nope' not found"):
        repo.load("nope")
    build_demo_repository(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no version 7 \(versions: \[1\]\)"):
        repo.load("demo", 7)
    with pytest.raises(ModelNotFoundError, match="not valid"):
        repo.load("../etc")


def broken_entry(tmp_path, mutate):
    path = build_demo_repository(tmp_path)
    weights = init_weights(demo_spec(), seed=0)
    mutate(weights)
    (path / WEIGHTS_FILE).unlink()
    save_file(weights, str(path / WEIGHTS_FILE))
    return ModelRepository(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda w: w.pop("tables.titles.weight"), r"missing tensor 'tables.titles.weight' "
                                               r"\(want shape \[20000, 16\]"),
    (lambda w: w.update({"top.0.bias": torch.zeros(3)}), r"'top.0.bias' has shape \[3\], want"),
    (lambda w: w.update({"top.0.bias": w["top.0.bias"].half()}), "dtype torch.float16, want"),
    (lambda w: w.update({"extra": torch.zeros(1)}), "unexpected tensor 'extra'"),
    (lambda w: w["top.1.weight"].__setitem__((0, 0), float("nan")), "holds NaN or Inf"),
])
def test_weight_problems_are_reported_precisely(tmp_path, mutate, message):
    with pytest.raises(RepositoryError, match=message):
        broken_entry(tmp_path, mutate).load("demo")


def test_bad_spec_and_missing_weights(tmp_path):
    path = build_demo_repository(tmp_path)
    (path / SPEC_FILE).write_text('{"name": "demo", "tables": "oops"}')
    with pytest.raises(RepositoryError, match="tables must be a list"):
        ModelRepository(tmp_path).load("demo")
    (path / SPEC_FILE).write_text(demo_spec().to_json().replace('"demo"', '"other"'))
    with pytest.raises(RepositoryError, match="names model 'other'"):
        ModelRepository(tmp_path).load("demo")
    (path / SPEC_FILE).write_text(demo_spec().to_json())
    (path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(RepositoryError, match="not a readable safetensors file"):
        ModelRepository(tmp_path).load("demo")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(RepositoryError, match="weights.safetensors is missing"):
        ModelRepository(tmp_path).load("demo")
