"""``recserve top``: the numbers from two stats snapshots, and one frame against a live server."""

from __future__ import annotations

import argparse
import json
import types

import numpy as np
import pytest
from server_fixtures import RawConnection, ServerThread, loaded, small_spec

from recserve.engine.demo import random_inputs, to_wire
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.histogram import Histogram
from recserve.engine.settings import EngineSettings
from recserve.server import top
from recserve.server.backend import EngineBackend
from recserve.server.tools_cli import register_tools

pytest.importorskip("rich", reason="rich (the tools extra) is not installed")


def snapshot(t: float, ok: int, errors: int, rows: int, batches: int, latencies: list[float],
             busy_ms: float) -> dict:
    hist = Histogram()
    for x in latencies:
        hist.observe(x)
    return {"time": t, "uptime_s": t, "version": "0.1.0",
            "server": {"connections": 2, "in_flight": 1,
                       "requests": [{"model": "m", "op": "infer", "code": "ok", "count": ok},
                                    {"model": "", "op": "infer", "code": "not_found",
                                     "count": errors},
                                    {"model": "", "op": "stats", "code": "ok", "count": 50}],
                       "latency_s": {"m": hist.to_dict()}},
            "engine": {"kind": "engine", "counters": {"rows": rows, "batches": batches},
                       "queued_rows": 7, "pending_requests": 3, "max_batch_rows": 1000,
                       "executor": {"gpu_busy_ms": busy_ms, "pack_ms": busy_ms / 2,
                                    "pack_threads": 2}},
            "gpu": {"available": True, "reason": "", "gpus": [
                {"index": 0, "name": "H200", "utilization_pct": 61.0,
                 "memory_used_bytes": 3 << 30, "memory_total_bytes": 141 << 30,
                 "power_watts": 300.0, "power_limit_watts": 700.0, "temperature_c": 40,
                 "sm_clock_mhz": 1980}]}}


def test_summarize_uses_deltas_between_snapshots():
    before = snapshot(100.0, 10, 1, 2_000, 4, [0.5] * 10, 1_000.0)
    # two seconds later: 40 more answers (all fast), 2 more errors, 8000 rows in 10 batches
    now = snapshot(102.0, 50, 3, 10_000, 14, [0.5] * 10 + [0.002] * 40, 2_500.0)
    s = top.summarize(now, before)
    assert s["requests_per_s"] == pytest.approx(21.0)  # (40 ok + 2 errors) / 2 s, not stats
    assert s["rows_per_s"] == pytest.approx(4_000.0)
    assert s["rows_per_batch"] == pytest.approx(800.0) and s["batch_fill"] == pytest.approx(0.8)
    assert 0.0015 <= s["p50_s"] <= 0.002 and s["p99_s"] <= 0.002  # old slow ones left out
    assert s["errors"] == {"not_found": 2} and s["error_totals"] == {"not_found": 3}
    assert s["engine_busy"] == pytest.approx(0.75)
    assert s["pack_busy"] == pytest.approx(0.1875)  # 0.75 s of packing / 2 s / 2 threads
    assert (s["queued_rows"], s["pending"], s["in_flight"]) == (7, 3, 1)
    since_start = top.summarize(now, None)
    assert since_start["requests_per_s"] == pytest.approx(53 / 102.0)
    assert s["workers"] is None  # one process: no front-end line


def test_the_front_end_line_counts_requests_that_missed_the_ring():
    before = snapshot(100.0, 10, 0, 0, 0, [], 0.0)
    now = snapshot(102.0, 50, 0, 0, 0, [], 0.0)
    before["server"]["workers"] = {"processes": 4, "requests_via_ring": 100,
                                   "requests_via_socket": 0}
    now["server"]["workers"] = {"processes": 4, "requests_via_ring": 190,
                                "requests_via_socket": 10}
    s = top.summarize(now, before)
    assert s["workers"] == 4 and s["via_socket"] == pytest.approx(0.1)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(top.render(now, before))
    assert "4 worker processes, 10% of requests through the socket" in console.export_text()
    assert "packing processes" not in console.export_text()  # (threads pack: no line)


def test_the_packing_processes_line_gives_their_share_of_batches():
    before = snapshot(100.0, 10, 0, 2_000, 4, [], 0.0)
    now = snapshot(102.0, 50, 0, 10_000, 14, [], 0.0)
    before["engine"]["executor"].update(packed_in_processes=4, packing_process_restarts=0)
    now["engine"]["executor"].update(packed_in_processes=12, packing_process_restarts=1)
    s = top.summarize(now, before)
    assert s["in_processes"] == pytest.approx(0.8)  # 8 of the interval's 10 batches
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(top.render(now, before))
    text = console.export_text()
    assert "80% of batches" in text and "restarts since start: 1" in text
    assert "model memory" not in text  # (no GPU model measured: no line)


def test_the_model_memory_line_gives_each_gpu_models_weights_and_slots():
    from rich.console import Console

    now = snapshot(102.0, 50, 0, 10_000, 14, [], 0.0)
    now["engine"]["model_device_bytes"] = {"ctr/2": {"weights": 3 << 30, "slots": 900 << 20},
                                           "demo/1": {"weights": 1 << 20, "slots": 60 << 20}}
    console = Console(width=200, record=True)
    console.print(top.render(now, None))
    assert ("ctr/2: weights 3072 MiB, slots 900 MiB; demo/1: weights 1 MiB, slots 60 MiB"
            in console.export_text())


def _top_once_against_a_live_server(monkeypatch, capsys, *flags: str) -> str:
    """``recserve top --once FLAGS`` against a real server that, between top's two polls,
    answers 3 requests and refuses one (not_found); what top printed."""
    model = loaded(small_spec())
    settings = EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=1)
    backend = EngineBackend(Engine(settings, lambda s: CpuExecutor(s, torch_threads=1)))

    async def setup():
        await backend.engine.start()
        await backend.load(model)

    thread = ServerThread(backend, setup=setup)
    conn = RawConnection(thread.port)

    def traffic(seconds: float) -> None:  # top's wait between its two polls
        rng = np.random.default_rng(0)
        for rid, n in enumerate((10, 30, 50), 1):
            inputs = to_wire(model.spec, random_inputs(model.spec, rng, n))
            conn.send({"id": rid, "op": "infer", "model": "small", "candidates": n,
                       "inputs": inputs})
            assert conn.receive()["ok"]
        conn.send({"id": 9, "op": "infer", "model": "nope", "candidates": 1, "inputs": {}})
        assert conn.receive()["error"]["code"] == "not_found"

    monkeypatch.setattr(top, "time", types.SimpleNamespace(sleep=traffic))
    monkeypatch.setenv("COLUMNS", "200")
    parser = argparse.ArgumentParser()
    register_tools(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["top", "--once", "--port", str(thread.port), *flags])
    try:
        assert args.run(args) == 0
    finally:
        conn.close()
        thread.stop()
    return capsys.readouterr().out


def test_top_once_renders_a_live_server(monkeypatch, capsys):
    out = _top_once_against_a_live_server(monkeypatch, capsys)
    for field in ("requests/s", "rows/s", "latency p50 / p99", "batch fill", "queue",
                  "errors", "engine GPU busy"):
        assert field in out
    assert "not_found 1" in out  # errors by code over the interval
    assert "GPU monitor unavailable: no GPU monitor" in out
    assert " ms / " in out and "rows per batch" in out
    assert "- ms / - ms" not in out  # the interval's requests gave percentiles


def test_top_json_prints_the_interval_and_the_raw_stats_as_one_line(monkeypatch, capsys):
    out = _top_once_against_a_live_server(monkeypatch, capsys, "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 1
    frame = json.loads(lines[0])  # (strict JSON: no NaN)
    summary = frame["summary"]
    assert summary["requests_per_s"] > 0 and summary["errors"] == {"not_found": 1}
    assert summary["rows_per_batch"] >= 10 and 0 < summary["p50_s"] <= summary["p99_s"]
    assert summary["via_socket"] is None  # (NaN: no front-end workers) as null
    assert frame["stats"]["engine"]["counters"]["requests"] == 3
    assert frame["stats"]["gpu"]["available"] is False
