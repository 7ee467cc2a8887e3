"""Autotuning picks kept across processes (kernels/tuning_cache.py), with the tuner's GPU
path driven on CPU by a fake clock, as in the tuner's own tests."""

from __future__ import annotations

import json

import pytest

from recserve.kernels import _common, tuning_cache
from recserve.kernels.tuning_cache import TuningCache

PRINT = {"device": "card", "triton": "3.6.0", "torch": "2.11", "kernels": "abc"}
COST = {0: 3.0, 1: 1.0, 2: 2.0}


@pytest.fixture
def gpu_path(monkeypatch, tmp_path):
    """The tuner as on a card, its cache in tmp_path; yields (path, timed: configs timed)."""
    path = tmp_path / "tuning.json"
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.delenv("RECSERVE_AUTOTUNE", raising=False)
    monkeypatch.setenv(tuning_cache.ENV, str(path))
    monkeypatch.setattr(tuning_cache, "fingerprint", lambda: dict(PRINT))
    monkeypatch.setattr(tuning_cache, "_opened", {})
    timed = []

    def fake_bench(fn, **_):
        fn()
        timed.append(fake_bench.config)
        return COST[fake_bench.config]

    monkeypatch.setattr(_common.triton.testing, "do_bench", fake_bench)
    fake_bench.config = None

    def launch(cfg):
        fake_bench.config = cfg["v"]
        launch.calls.append(cfg["v"])

    launch.calls = []
    return path, timed, launch


def fresh_process(monkeypatch):
    """What a new process sees: no tuner state, the cache file reread."""
    monkeypatch.setattr(tuning_cache, "_opened", {})
    return _common.SafeTuner("t", [{"v": v} for v in COST])


def test_a_pick_is_saved_and_a_new_process_starts_from_it(gpu_path, monkeypatch):
    path, timed, launch = gpu_path
    key = ("k", 8192, "torch.bfloat16")
    assert fresh_process(monkeypatch).run(key, launch) == {"v": 1}
    assert sorted(timed) == [0, 1, 2]  # tuned: every config timed
    saved = json.loads(path.read_text())
    assert saved["fingerprint"] == PRINT and list(saved["entries"].values()) == [{"v": 1}]
    timed.clear()
    launch.calls.clear()
    tuner = fresh_process(monkeypatch)
    assert tuner.run(key, launch) == {"v": 1} and timed == [] and launch.calls == [1]
    assert tuner.run(("other",), launch) == {"v": 1} and sorted(timed) == [0, 1, 2]


def test_a_cache_from_another_card_or_kernel_source_is_ignored(gpu_path, monkeypatch):
    path, timed, launch = gpu_path
    stale = {"fingerprint": {**PRINT, "kernels": "edited"},
             "entries": {TuningCache.entry("t", ("k",)): {"v": 0}}}
    path.write_text(json.dumps(stale))
    assert fresh_process(monkeypatch).run(("k",), launch) == {"v": 1}
    assert sorted(timed) == [0, 1, 2]
    assert json.loads(path.read_text())["fingerprint"] == PRINT  # replaced


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps(
    {"fingerprint": PRINT, "entries": {TuningCache.entry("t", ("k",)): {"v": 9}}})])
def test_an_unreadable_file_or_an_unknown_config_costs_a_tuning_only(gpu_path, monkeypatch,
                                                                    content):
    path, timed, launch = gpu_path
    path.write_text(content)
    assert fresh_process(monkeypatch).run(("k",), launch) == {"v": 1}
    assert sorted(timed) == [0, 1, 2]


def test_a_cached_config_that_fails_is_tuned_again(gpu_path, monkeypatch):
    path, timed, launch = gpu_path
    path.write_text(json.dumps(
        {"fingerprint": PRINT, "entries": {TuningCache.entry("t", ("k",)): {"v": 2}}}))

    def flaky(cfg):
        if cfg["v"] == 2 and not timed:
            raise RuntimeError("ptxas error")
        launch(cfg)

    with pytest.warns(UserWarning, match="cached config"):
        assert fresh_process(monkeypatch).run(("k",), flaky) == {"v": 1}
    assert sorted(timed) == [0, 1, 2]


def test_no_cache_without_the_variable_and_none_when_tuning_is_off(gpu_path, monkeypatch):
    path, timed, launch = gpu_path
    monkeypatch.setenv("RECSERVE_AUTOTUNE", "0")
    assert fresh_process(monkeypatch).run(("k",), launch) == {"v": 0}  # first config
    assert not path.exists()
    monkeypatch.delenv("RECSERVE_AUTOTUNE")
    monkeypatch.delenv(tuning_cache.ENV)
    assert fresh_process(monkeypatch).run(("k",), launch) == {"v": 1}
    assert not path.exists()


def test_an_unwritable_place_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # the cache's folder would have to be this file
    cache = TuningCache(blocker / "tuning.json", PRINT)
    cache.put("t", ("k",), {"v": 1})  # no exception: the next start tunes again
    assert cache.get("t", ("k",)) == {"v": 1}  # still used by this process
    assert "could not write the tuning cache" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no temporary left
