"""The GPU executor's host side (launcher threads, packing, slots, completion, timeline) on
CPU, with the device replaced by a clock (bench/engine_host.py's SimulatedGpuExecutor)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from engine_host import SimulatedGpuExecutor  # noqa: E402

from recserve.engine.demo import demo_spec, random_inputs  # noqa: E402
from recserve.engine.engine import Engine  # noqa: E402
from recserve.engine.settings import EngineSettings  # noqa: E402

SETTINGS = EngineSettings(max_batch_rows=64, buckets=(16, 32, 64), slots=2,
                          max_queued_rows=100_000, aging_s=None)


def test_every_request_is_answered_through_the_real_launch_and_completion_threads():
    spec = demo_spec()
    rng = np.random.default_rng(3)
    sizes = [int(n) for n in rng.integers(1, 150, 40)]  # some above 64 rows: split
    requests = [random_inputs(spec, rng, n) for n in sizes]
    executors: list[SimulatedGpuExecutor] = []

    def factory(settings):
        executors.append(SimulatedGpuExecutor(settings, compute_ms=0.2, pack_threads=2))
        executors[-1].timeline_limit = 100_000
        return executors[-1]

    async def main():
        async with Engine(SETTINGS, factory) as engine:
            await engine.load(spec.name, 1, spec, {})
            return await asyncio.gather(*(engine.score(spec.name, r) for r in requests))

    results = asyncio.run(main())
    executor = executors[0]
    for n, scores in zip(sizes, results, strict=True):
        assert scores.shape[0] == n and not scores.any()  # the simulated device scores 0
    assert executor.free_slots() == SETTINGS.slots  # every slot came back
    stats = executor.stats()
    assert stats["batches"] == executor.batches and stats["pack_threads"] == 2
    assert 0 < stats["pack_ms"] < 60_000
    assert executor.batches >= -(-sum(sizes) // SETTINGS.max_batch_rows)
    stages: dict[int, dict[str, tuple[float, float]]] = {}
    for seq, stage, start, end in executor.timeline:
        stages.setdefault(seq, {})[stage] = (start, end)
    assert len(stages) == executor.batches
    order = ("host_queue", "host_pack", "host_issue", "host_wait", "host_resolve")
    for seq, by_stage in stages.items():
        spans = [by_stage[s] for s in order]
        for (start, end), (next_start, _) in zip(spans[:-1], spans[1:], strict=True):
            assert start <= end <= next_start + 1e-3, (seq, spans)


@pytest.mark.parametrize("graph_outputs, calls", [(False, "torch"), (True, "driver")])
def test_the_simulated_device_runs_the_real_issue_path_and_counts_its_calls(graph_outputs,
                                                                            calls):
    """The real ``issue_streams`` against the simulated device: per batch, the copies in (the
    block, and the weights of a weighted model), h2d_end, the compute stream's wait, its
    start, the replay, then (unless the graphs copy the outputs) compute_end, the copy
    stream's wait and the two copies out; then d2h_end. So 10 calls a batch for dlrmv2 (no
    weights), 6 with graph_outputs: what RESULTS.md's figures assume."""
    spec = demo_spec()
    rng = np.random.default_rng(8)
    requests = [random_inputs(spec, rng, int(n)) for n in rng.integers(1, 150, 20)]
    executors: list[SimulatedGpuExecutor] = []

    def factory(settings):
        executors.append(SimulatedGpuExecutor(settings, 0.2, 2, issue_calls=calls,
                                              graph_outputs=graph_outputs))
        return executors[-1]  # (timeline off: no start events recorded)

    async def main():
        async with Engine(SETTINGS, factory) as engine:
            await engine.load(spec.name, 1, spec, {})
            return await asyncio.gather(*(engine.score(spec.name, r) for r in requests))

    results = asyncio.run(main())
    assert all(r.shape[0] == q.num_candidates for r, q in zip(results, requests, strict=True))
    executor = executors[0]
    copies_in = 1 + any(f.weighted for f in spec.sparse)
    per_batch = copies_in + (5 if graph_outputs else 9)
    assert executor.simulated_calls.calls == per_batch * executor.batches > 0
    assert executor.stats()["issue_calls"] == f"simulated {calls}"
    # each kind of call timed on its way through (the simulated driver's take 3 us or more)
    call_us = executor.stats()["issue_call_us"]
    assert set(call_us) == {"copy", "record", "wait", "replay"}
    assert calls == "torch" or min(call_us.values()) >= 3.0
    assert executor.bytes_in > 0  # the real copy-in sizes, counted


def test_engine_gpu_summary_of_a_run():
    from engine_gpu import summarize

    run = {"samples_per_s": 4e6, "bare_samples_per_s": 8e6, "bare_forward_us": 1024.0,
           "bare_two_streams_samples_per_s": 9e6, "gpu_busy_fraction": 0.5,
           "copy_overlap_fraction": 0.25, "batches": 48, "compute_start_gap_ms": 2.0,
           "process_cores": 2.5, "stage_mean_ms": {"host_pack": 3.0, "compute": 1.0}}
    pack_ms = {"full_flat_pinned": 1.5, "ranking_flat_pinned": 2.0,
               "ranking_per_feature_pinned": 0.75}
    for traffic, over in (("full_batches", 2.0), ("ranking_requests", 1.5),
                          ("ranking_per_feature", 4.0)):
        r = dict(run)
        line = summarize("default", traffic, r, pack_ms)
        assert r["ratio_to_bare"] == 0.5 and r["pack_in_engine_over_alone"] == over
        assert f"{over:.1f}x its time alone" in line and "ratio 0.50" in line
        assert "engine process 2.5 cores" in line
    r = dict(run)
    summarize("default", "full_batches", r, {})  # no pinned figure (no GPU): not a crash
    assert r["pack_in_engine_over_alone"] != r["pack_in_engine_over_alone"]  # nan


def test_slot_streams_and_several_compute_streams_exclude_each_other():
    from recserve.engine.gpu_executor import GpuExecutor

    with pytest.raises(ValueError, match="compute_streams .2. does not apply"):
        GpuExecutor(SETTINGS, "cuda", compute_streams=2, slot_streams=True)
    assert GpuExecutor(SETTINGS, "cuda", slot_streams=True).slot_streams
    for without in ({"slot_streams": False}, {"slot_streams": True, "use_graphs": False}):
        with pytest.raises(ValueError, match="needs slot_streams and graphs"):
            GpuExecutor(SETTINGS, "cuda", graph_copies=True, **without)
    assert GpuExecutor(SETTINGS, "cuda", slot_streams=True, graph_copies=True).graph_copies
    for without in ({"use_graphs": False}, {"slot_streams": True, "graph_copies": True}):
        with pytest.raises(ValueError, match="graph_outputs captures the copies out"):
            GpuExecutor(SETTINGS, "cuda", graph_outputs=True, **without)
    assert GpuExecutor(SETTINGS, "cuda", graph_outputs=True).graph_outputs


def test_engine_gpu_variants_compose_from_their_names():
    from engine_gpu import Variant, variant

    base = SETTINGS
    assert variant("default", base) == Variant("default", base)
    v = variant("slots=2+compute_streams=2+switch_ms=0.5+pack_threads=1", base)
    assert (v.settings.slots, v.pack_threads, v.compute_streams, v.switch_s) == (2, 1, 2, 0.0005)
    assert v.settings.max_batch_rows == base.max_batch_rows and not v.via_ring
    assert variant("via=ring", base).via_ring and not variant("via=ring", base).pack_processes
    p = variant("pack_in=process", base)
    assert p.via_ring and p.pack_processes  # (only ring requests go to the processes)
    assert variant("graph_outputs+blocking_wait", base).blocking_wait
    g = variant("pack_in=process+graph_copies+pdl", base)
    assert g.slot_streams and g.graph_copies and g.pdl and g.pack_processes  # (slot streams)
    k = variant("slots=6+pack_threads=4", base)
    assert (k.settings.slots, k.pack_threads, k.keep_gil) == (6, 4, True)  # (the default)
    assert not variant("pack_in=process+torch_calls", base).keep_gil
    with pytest.raises(SystemExit, match="unknown variant change 'warps=4'"):
        variant("slots=2+warps=4", base)
    # every run gpu_check.sh asks for by default is one engine_gpu.py knows
    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    defaults = re.search(r"ENGINE_BENCH_ARGS:---variants ([^}]+)}", script).group(1)
    assert {"default", "slots=4"} <= set(defaults.split(","))  # (the old default against it)
    for name in defaults.split(","):
        variant(name, base)


def test_engine_gpu_packing_ceiling_counts_every_thread_s_packs(monkeypatch):
    import host_packing
    import workloads as wl

    spec = wl.dlrmv2_spec(1000)
    full = wl.full_requests(spec, np.random.default_rng(0), 16, 2)
    packed = []
    real_pack = host_packing.pack
    monkeypatch.setattr(host_packing, "pack", lambda layout, host, pieces, rows: packed.append(
        (host, pieces[0].num_candidates)) or real_pack(layout, host, pieces, rows))
    got = host_packing.packing_ceiling(spec, full, threads=(1, 3), seconds=0.05)
    assert set(got) == {"1", "3"}
    assert all(r["batches_per_s"] > 0 and r["ms_a_pack"] > 0 for r in got.values())
    # each thread packs into its own buffers (plus one untimed pack each to touch them)
    # (the buffers are kept alive in ``packed``, so their ids stay distinct)
    assert len({id(host) for host, _ in packed}) == 4 and {rows for _, rows in packed} == {16}


@pytest.mark.parametrize("via_hub", ["socket", "ring"])
def test_engine_host_feeds_requests_through_the_hub(via_hub):
    """bench/engine_host.py's ``ranking_via_hub`` traffic: every request enters as a
    worker's channel frame (arrays in it, or in a shared ring) and is answered through
    Hub.score."""
    from engine_host import run

    spec = demo_spec()
    rng = np.random.default_rng(9)
    requests = [random_inputs(spec, rng, int(n)) for n in rng.integers(1, 150, 12)] * 3
    result = asyncio.run(asyncio.wait_for(
        run(SETTINGS, spec, requests, compute_ms=0.05, pack_threads=1, via_hub=via_hub), 60))
    assert result["samples_per_s"] > 0 and result["loop_cpu_us_per_request"] > 0
    assert result["host_stage_mean_ms"]["host_pack"] > 0  # they reached the executor


def test_kernel_variants_refuses_an_unknown_section(tmp_path):
    """bench/kernel_variants.py --sections takes its SECTIONS only, and says so before any
    measurement."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "kernel_variants.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--device", "cpu",
                             "--sections", "forward,gemm"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert ("expected some of gather, int8, forward, row_size, graph_tuned, auto_tuned, configs"
            in result.stderr)
    assert not (tmp_path / "kernel_variants.json").exists()


def test_kernel_variants_summary_names_each_winner_and_the_best_of_another_kind():
    """A card call's summary says per tuned shape which candidate won and how the best one
    of another kind (tiled vs persistent, split-K, the L2 hint) did."""
    import kernel_variants as kv

    tile = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    forward = {"section": "forward", "workload": "dlrmv2", "variant": "default",
               "graph": True, "B": 8192, "us": 700.0, "TFLOPs": 300.0,
               "max_diff_vs_eager": 0.001, "ok": True, "linear_configs": [
                   {"key": "(8192, 3456, 512)", "timings_ms": [
                       [0.09, {**tile, "PER_SM": 2}], [0.095, {**tile, "PER_SM": 1}],
                       [0.1, {**tile, "SPLIT_K": 1}]]},
                   {"key": "(512, 512, 3456)", "timings_ms": [[0.01, tile]]}]}
    bags = {"BAGS": 8, "LANES": 8, "UNROLL": 1, "STAGES": 1, "num_warps": 2}
    gather = {"section": "gather", "tables": "bf16", "variant": "default", "B": 512,
              "us": 40.0, "GBps": 900.0, "ok": True, "graph_us": 12.0, "configs": [
                  {"key": "(bf16)", "timings_ms": [[0.015, {**bags, "L2_KEEP": True}],
                                                   [0.016, bags]]}]}
    text = kv.summary([forward, gather])
    assert ("(8192, 3456, 512): 64x128x64 s4 w4 persistent 2 0.0900 ms; next of another "
            "kind 64x128x64 s4 w4 0.1000 ms") in text
    assert "(512, 512, 3456)" not in text  # one candidate: nothing to compare
    assert "bags 8 lanes 8 unroll 1 w2 L2 keep 0.0150 ms; next of another kind bags 8 " \
           "lanes 8 unroll 1 w2 0.0160 ms" in text


@pytest.mark.parametrize("method", ["graph", "auto"])
def test_kernel_variants_retunes_by_graph_or_auto_then_measures(monkeypatch, method):
    """The graph_tuned and auto_tuned sections (what a card call compares with the
    eager-tuned figures): RECSERVE_TUNE_BY=graph or auto, every tuner's picks forgotten
    first, then both forwards at each size and, with int8, the bf16 and int8 gathers,
    labelled by the method."""
    import kernel_variants as kv

    calls = []
    monkeypatch.setattr(kv, "forget_tuning", lambda: calls.append(("forget",)))
    monkeypatch.setattr(kv, "bench_forward", lambda rec, base, name, *a: calls.append(
        ("forward", name, a[-2], os.environ.get(kv.TUNE_BY_ENV))))
    monkeypatch.setattr(kv, "bench_int8", lambda rec, base, model, spec, sizes, tuned_by:
                        calls.append(("int8", tuple(sizes), tuned_by)))

    class Rec:
        @staticmethod
        def guarded(what, fn, *args):
            return fn(*args)

    monkeypatch.setenv(kv.TUNE_BY_ENV, "eager")  # (restored after: retuned sets it)
    kv.retuned(Rec(), {}, "spec", {}, "model", "dot", {}, "dot_model", [8192, 512], True,
               method)
    assert calls == [("forget",),  # (the smallest batch first)
                     ("forward", f"dlrmv2 {method}-tuned", 512, method),
                     ("forward", f"dlrmv2 {method}-tuned", 8192, method),
                     ("forward", f"dlrm-dot {method}-tuned", 512, method),
                     ("forward", f"dlrm-dot {method}-tuned", 8192, method),
                     ("int8", (512, 8192), method)]


def test_kernel_variants_row_sizes_check_every_dim_and_dtype(tmp_path):
    """The row_size section (a card's question: does a lookup cost per row or per byte?)
    gathers at dims 32-256, bf16 and int8, each checked against the torch reference, and
    records rows a second for each; under the interpreter on tiny tables."""
    import json
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "kernel_variants.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--device", "cpu",
                             "--sizes", "4", "--max-rows", "64", "--row-size-rows", "64",
                             "--sections", "row_size"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = json.loads((tmp_path / "kernel_variants.json").read_text())
    checked = [r for r in records if r["section"] == "gather"]
    assert len(checked) == 8 and all(r["ok"] for r in checked)
    sizes = {(r["dim"], r["dtype"]): r["row_bytes"] for r in records
             if r["section"] == "row_size"}
    assert sizes == {(32, "bf16"): 64, (32, "int8"): 48, (64, "bf16"): 128, (64, "int8"): 80,
                     (128, "bf16"): 256, (128, "int8"): 144, (256, "bf16"): 512,
                     (256, "int8"): 272}
    # beside each, what a lookup touches by each cost model's unit (bench/row_units.py)
    lines = {(r["dim"], r["dtype"]): r["lines"] for r in records if r["section"] == "row_size"}
    assert lines[(128, "bf16")] == lines[(128, "int8")] == 2.0
    assert "M rows/s; a row: 136 B, 5.0 sectors, 3.0 bursts, 2.0 lines" in result.stdout


def test_startup_bench_explains_itself_and_needs_a_gpu(tmp_path):
    """bench/startup.py (model load time: cold, tuning cache, both caches) answers --help
    anywhere and, without a GPU, says it needs one instead of failing in a child."""
    import subprocess

    import torch

    script = Path(__file__).resolve().parents[1] / "bench" / "startup.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "tuning cache" in shown.stdout
    if torch.cuda.is_available():
        return
    refused = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "on a CUDA GPU" in refused.stderr
    assert not (tmp_path / "startup.json").exists()


def test_startup_bench_compiles_one_by_one_only_in_its_cold_1_run(tmp_path, monkeypatch):
    """Each load's child gets its caches, and the compile threads only when asked: the
    cold-1 run's 1, never a value left in the caller's environment."""
    import json
    import subprocess

    import startup

    seen = []

    def run(argv, env, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(argv, 0, json.dumps({"build_s": 1.5}) + "\n", "")

    monkeypatch.setattr(startup.subprocess, "run", run)
    monkeypatch.setenv("RECSERVE_COMPILE_THREADS", "5")
    assert startup.load_once("demo", 10, tmp_path / "t", tmp_path / "p.json", 9)["build_s"] == 1.5
    startup.load_once("demo", 10, tmp_path / "t1", tmp_path / "p1.json", 9, threads="1")
    assert "RECSERVE_COMPILE_THREADS" not in seen[0]
    assert seen[1]["RECSERVE_COMPILE_THREADS"] == "1"
    assert seen[1]["TRITON_CACHE_DIR"] == str(tmp_path / "t1")
    assert seen[1]["RECSERVE_TUNING_CACHE"] == str(tmp_path / "p1.json")


def test_kernel_variants_configs_checks_every_gather_config_and_the_tuners_picks(tmp_path):
    """The configs section (the card's test for the tenth session's wrong int8 gather):
    each candidate config, bf16 and int8, against the reference, then the tuner's pick by
    each method in three rounds; under the interpreter the eager checks alone run (the
    graph ones need a card)."""
    import json
    import os
    import subprocess

    from recserve.kernels.embedding_bag import CONFIGS

    script = Path(__file__).resolve().parents[1] / "bench" / "kernel_variants.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "--device", "cpu",
                             "--sizes", "4", "--max-rows", "64", "--sections", "configs"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [r for r in json.loads((tmp_path / "kernel_variants.json").read_text())
               if r["section"] == "config_check"]
    for label in ("bf16", "int8"):
        each = [r for r in records if r["tables"] == label and "tuned_by" not in r]
        assert [r["config"] for r in each] == [*CONFIGS, "fallback"]
        assert all(r["eager"] for r in each)
        tuned = [(r["tuned_by"], r["round"], r["ok"]) for r in records
                 if r["tables"] == label and "tuned_by" in r]
        assert tuned == [(m, k, True) for m in ("eager", "graph") for k in range(3)]


def test_the_graphs_copy_the_scores_out_by_default_wherever_they_can():
    from recserve.engine.gpu_executor import GpuExecutor

    # (constructing allocates nothing on a device: this runs on CPU)
    assert GpuExecutor(SETTINGS, "cpu").graph_outputs  # 6 CUDA calls a batch, not 10
    assert not GpuExecutor(SETTINGS, "cpu", graph_outputs=False).graph_outputs
    assert not GpuExecutor(SETTINGS, "cpu", use_graphs=False).graph_outputs  # nothing to hold it
    assert not GpuExecutor(SETTINGS, "cpu", slot_streams=True, graph_copies=True).graph_outputs
    with pytest.raises(ValueError, match="it needs graphs"):
        GpuExecutor(SETTINGS, "cpu", use_graphs=False, graph_outputs=True)


def test_engine_host_emulates_a_slower_host_s_packs(monkeypatch):
    """``--pack-ms``: every pack takes at least that long (the rest slept out, the GIL
    released), so the simulated engine shows what a slower host's packing does to it."""
    import engine_host
    from engine_host import run

    monkeypatch.setattr(engine_host, "PACK_MIN_S", 0.004)
    spec = demo_spec()
    rng = np.random.default_rng(3)
    requests = [random_inputs(spec, rng, int(n)) for n in rng.integers(1, 150, 8)]
    result = asyncio.run(asyncio.wait_for(
        run(SETTINGS, spec, requests, compute_ms=0.05, pack_threads=1), 60))
    assert result["host_stage_mean_ms"]["host_pack"] >= 4.0
