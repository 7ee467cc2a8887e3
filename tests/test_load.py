"""The load generator against a real server whose backend takes a known 20 ms per request, one
request at a time: closed-loop percentiles sit at the delay, open-loop latency above capacity
includes the queue (counted from the intended send times), JSON and CSV agree."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys

import numpy as np
import pytest
from server_fixtures import ServerThread

from recserve.engine.demo import demo_spec
from recserve.server.backend import ModelHandle
from recserve.server.client import Client
from recserve.server.errors import NotFound
from recserve.server.tools_cli import add_load_arguments, load_module, register_tools

DELAY_S = 0.020


class SlowBackend:
    """Serves the demo model's schema; every score takes DELAY_S, one at a time (capacity
    1 / DELAY_S = 50 requests/s)."""

    def __init__(self) -> None:
        self.handle = ModelHandle("demo", 1, demo_spec())
        self.lock: asyncio.Lock | None = None
        self.priorities: list = []

    def models(self) -> list[ModelHandle]:
        return [self.handle]

    def resolve(self, name: str, version: int | None) -> ModelHandle:
        if name != "demo" or version not in (None, 1):
            raise NotFound(message=f"no {name} {version}")
        return self.handle

    async def score(self, model, version, inputs, deadline=None, priority=None) -> np.ndarray:
        self.priorities.append(priority)
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            await asyncio.sleep(DELAY_S)
        return np.zeros(inputs.num_candidates, dtype=np.float32)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def slow_server():
    thread = ServerThread(SlowBackend())
    yield thread
    thread.stop()


def load_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    return parser.parse_args(["--quiet", *argv])


def test_requests_are_ranking_shaped_with_zipf_or_uniform_ids(slow_server):
    load = load_module()
    with Client(slow_server.host, slow_server.port) as client:
        answer = client.call("models")
    _, sizes, _ = load.encode_requests(answer, "demo", 300, seed=1, zipf=False)
    assert 100 <= min(sizes) and max(sizes) <= 700 and 200 < np.mean(sizes) < 350
    desc = answer["models"][0]
    rng = np.random.default_rng(2)
    zipf = load.ranking_inputs(desc, rng, 500, zipf=True)["title_id"]["values"]
    uniform = load.ranking_inputs(desc, rng, 500, zipf=False)["title_id"]["values"]
    assert zipf.max() < 20_000 and uniform.max() < 20_000
    assert np.median(zipf) < 200 < np.median(uniform)  # Zipf: the hot ids dominate
    with pytest.raises(LookupError, match="no model 'nope'"):
        load.encode_requests(answer, "nope", 1, seed=0, zipf=True)


def test_percentiles_against_a_known_delay_closed_and_open_loop(slow_server, tmp_path):
    load = load_module()
    args = load_args("--port", str(slow_server.port), "--concurrency", "1", "--rate", "100",
                     "--duration", "1", "--max-requests", "100", "--requests", "16",
                     "--connections", "2", "--json", str(tmp_path / "r.json"),
                     "--csv", str(tmp_path / "r.csv"))
    assert load.run(args) == 0
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    closed, opened = runs
    assert closed["mode"] == "closed" and closed["errors"] == {} and closed["unanswered"] == 0
    assert closed["completed"] >= 20
    # one request in flight: every latency is the delay plus a little loopback overhead
    assert DELAY_S * 1e3 - 0.5 <= closed["p50_ms"] <= DELAY_S * 1e3 + 15
    assert closed["p50_ms"] <= closed["p90_ms"] <= closed["p99_ms"] <= closed["p99.9_ms"]
    assert closed["requests_per_s"] <= 1 / DELAY_S + 1  # the backend's capacity bounds it
    # open loop at twice capacity: the queue grows for the whole second, and latency counted
    # from each intended send time shows it (a send-time clock would see about 20-40 ms)
    assert opened["mode"] == "open" and opened["errors"] == {}
    assert opened["completed"] == opened["sent"] >= 50
    assert opened["p50_ms"] > 100 and opened["p99_ms"] > 300
    assert opened["requests_per_s"] <= 1 / DELAY_S + 1
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["closed", "open"]
    assert float(rows[1]["p99_ms"]) == pytest.approx(opened["p99_ms"])
    assert rows[0]["mean_batch_rows"] == ""  # no batching engine behind this server


def test_plot_needs_matplotlib_and_says_how_to_install_it(slow_server, tmp_path,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    args = load_args("--port", str(slow_server.port), "--plot", str(tmp_path / "p.png"))
    with pytest.raises(ValueError, match=r"pip install 'recserve\[plot\]'"):
        load_module().run(args)
    assert not (tmp_path / "p.png").exists()  # refused before any traffic


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    report = load_module().report
    runs = [{"server": s, "mode": m, "concurrency": c, "rate_per_s": r, "completed": 10,
             "requests_per_s": x, "p99_ms": y}
            for s, m, c, r, x, y in (("engine", "closed", 1, None, 100.0, 2.0),
                                     ("engine", "closed", 8, None, 400.0, 5.0),
                                     ("engine", "open", None, 300.0, 300.0, 4.0),
                                     ("one-at-a-time", "closed", 1, None, 90.0, 2.5))]
    report.plot(runs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_registration_parses_both_commands():
    parser = argparse.ArgumentParser()
    register_tools(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "load", "--rate", "5,10", "--duration", "2"])
    assert (args.command, args.bench, args.rate, args.duration) == ("bench", "load",
                                                                    [5.0, 10.0], 2.0)
    assert args.concurrency is None and args.ids == "zipf" and callable(args.run)
    for bad in (["bench", "load", "--duration", "0"], ["bench", "load", "--rate", "-1"],
                ["bench", "load", "--duration", "99999"], ["top", "--interval", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_priority_mix_is_sent_and_reported_per_priority(slow_server, tmp_path):
    load = load_module()
    backend = slow_server.server.dispatcher.backend
    backend.priorities.clear()
    args = load_args("--port", str(slow_server.port), "--concurrency", "4", "--duration", "1",
                     "--max-requests", "40", "--requests", "20", "--high-share", "0.3",
                     "--json", str(tmp_path / "r.json"))
    assert load.run(args) == 0
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    parts = run["by_priority"]
    assert set(parts) == {"high", "low"}
    assert parts["high"]["completed"] + parts["low"]["completed"] == run["completed"]
    assert parts["high"]["p50_ms"] <= parts["high"]["p99_ms"]
    seen = {str(p.name).lower() for p in backend.priorities}
    assert seen == {"high", "low"}  # the server got them, as the engine's levels
    with pytest.raises(SystemExit):
        load_args("--high-share", "1.5")
