"""Engine stats and the Prometheus endpoint: scraped over HTTP from a real server on 127.0.0.1,
values move with traffic and agree with the ``stats`` op; GPU gauges with and without NVML."""

from __future__ import annotations

import asyncio
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
from server_fixtures import RawConnection, ServerThread, loaded, small_spec
from test_monitor import fake_nvml

from recserve.engine.demo import random_inputs, to_wire
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.monitor import GpuMonitor
from recserve.engine.scheduler import EngineError
from recserve.engine.settings import EngineSettings
from recserve.server.backend import EngineBackend

# A dependency of recserve; absent only on the bare GPU image, which runs the -m gpu tests.
parser = pytest.importorskip("prometheus_client.parser", reason="prometheus-client is missing")

SETTINGS = EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=1)


def make_engine() -> Engine:
    return Engine(SETTINGS, lambda s: CpuExecutor(s, torch_threads=1))


def test_engine_stats_histograms_counters_and_invalid_ids():
    model = loaded(small_spec())

    async def run():
        async with make_engine() as engine:
            await engine.load("small", 1, model.spec, model.weights)
            rng = np.random.default_rng(1)
            await asyncio.gather(*(engine.score("small", random_inputs(model.spec, rng, n))
                                   for n in (5, 20, 70)))
            bad = random_inputs(model.spec, rng, 4)
            bad.sparse["item"].values[:2] = [50, 999]  # table "items" has 50 rows
            with pytest.raises(EngineError) as info:
                await engine.score("small", bad)
            assert info.value.code == "bad_request"
            return engine.stats()

    stats = asyncio.run(run())
    hists = stats["histograms"]
    assert stats["counters"]["requests"] == 4 and stats["max_batch_rows"] == 64
    assert hists["queue_wait_s"]["count"] == 4  # one observation per request
    assert hists["compute_s"]["count"] == stats["counters"]["batches"]
    assert hists["batch_rows"]["count"] == stats["counters"]["batches"]
    # 70 rows do not fit one 64-row batch: rows add up over batches, pieces >= requests
    assert hists["batch_rows"]["sum"] == stats["counters"]["rows"] == 99
    assert hists["batch_requests"]["sum"] >= 4
    assert hists["padding_rows"]["sum"] == stats["counters"]["padding_rows"]
    assert stats["invalid_ids"] == {"item": 2}
    assert stats["executor"] == {}  # the CPU executor has no stats()


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
def served():
    """A real engine server with the ``small`` model and its metrics endpoint on port 0."""
    from recserve.server.metrics import start_metrics

    model = loaded(small_spec())
    backend = EngineBackend(make_engine())

    async def setup():
        await backend.engine.start()
        await backend.load(model)

    thread = ServerThread(backend, setup=setup)
    exporter = thread.run(start_metrics(thread.server, "127.0.0.1", 0))
    host, port = exporter.address
    yield thread, model, f"http://{host}:{port}/metrics"
    thread.run(exporter.close())
    thread.stop()


def infer(conn: RawConnection, rid: int, model, n: int, name: str | None = None) -> dict:
    inputs = to_wire(model.spec, random_inputs(model.spec, np.random.default_rng(rid), n))
    conn.send({"id": rid, "op": "infer", "model": name or model.spec.name, "candidates": n,
               "inputs": inputs})
    return conn.receive()


def test_scrape_moves_with_traffic_and_agrees_with_stats(served):
    thread, model, url = served
    before = scrape(url)
    assert "recserve_requests_total" not in before  # no request answered yet
    assert before["recserve_gpu_monitor_available"][()] == 0.0
    conn = RawConnection(thread.port)
    try:
        assert all(infer(conn, i, model, n)["ok"] for i, n in enumerate((3, 40, 100), 1))
        assert infer(conn, 9, model, 2, name="nope")["error"]["code"] == "not_found"
        after = scrape(url)
        conn.send({"id": 10, "op": "stats"})
        stats = conn.receive()["stats"]
    finally:
        conn.close()
    requests = after["recserve_requests_total"]
    ok = (("code", "ok"), ("model", "small"), ("op", "infer"))
    assert requests[ok] == 3
    assert requests[(("code", "not_found"), ("model", ""), ("op", "infer"))] == 1
    for row in stats["server"]["requests"]:  # stats agrees with the scrape, row by row
        if row["op"] != "stats":  # the stats call itself came after the scrape
            key = (("code", row["code"]), ("model", row["model"]), ("op", row["op"]))
            assert requests[key] == row["count"]
    latency = stats["server"]["latency_s"]["small"]
    assert after["recserve_request_duration_seconds_count"][(("model", "small"),)] == 3
    assert after["recserve_request_duration_seconds_sum"][(("model", "small"),)] == (
        pytest.approx(latency["sum"]))
    inf = (("le", "+Inf"), ("model", "small"))
    assert after["recserve_request_duration_seconds_bucket"][inf] == latency["count"] == 3
    engine = stats["engine"]
    assert after["recserve_rows_total"][()] == engine["counters"]["rows"] >= 143
    assert after["recserve_batches_total"][()] == engine["counters"]["batches"] > (
        before["recserve_batches_total"][()])
    for name, key in (("recserve_queue_wait_seconds", "queue_wait_s"),
                      ("recserve_compute_seconds", "compute_s"),
                      ("recserve_batch_rows", "batch_rows"),
                      ("recserve_batch_requests", "batch_requests")):
        assert after[f"{name}_count"][()] == engine["histograms"][key]["count"] > 0
        buckets = after[f"{name}_bucket"]
        values = [buckets[k] for k in sorted(buckets, key=lambda k: float(k[0][1]))]
        assert values == sorted(values)  # cumulative: they merge across replicas
    assert after["recserve_padding_rows_total"][()] == engine["counters"]["padding_rows"]
    assert after["recserve_queue_rows"][()] == 0


def test_gpu_gauges_from_the_monitor_and_unavailable_without_nvml(served):
    thread, _, url = served

    def broken_init():
        raise OSError("NVML Shared Library Not Found")

    thread.server.control.monitor = GpuMonitor(
        nvml=types.SimpleNamespace(nvmlInit=broken_init)).start()
    down = scrape(url)
    assert down["recserve_gpu_monitor_available"][()] == 0.0
    assert "recserve_gpu_utilization_ratio" not in down  # no samples, no fake zeros
    monitor = GpuMonitor(nvml=fake_nvml(fail_power=True), interval=60).start()
    thread.server.control.monitor = monitor
    try:
        up = scrape(url)
    finally:
        monitor.stop()
    gpu0, gpu1 = (("gpu", "0"),), (("gpu", "1"),)
    assert up["recserve_gpu_monitor_available"][()] == 1.0
    assert up["recserve_gpu_utilization_ratio"] == {gpu0: 0.87, gpu1: 0.87}
    assert up["recserve_gpu_memory_total_bytes"][gpu0] == 141 << 30
    assert up["recserve_gpu_power_limit_watts"][gpu1] == 700.0
    assert "recserve_gpu_power_watts" not in up  # not supported by this device
    assert up["recserve_gpu_sm_clock_hertz"][gpu0] == 1980e6
    assert up["recserve_gpu_temperature_celsius"][gpu0] == 51
    assert up["recserve_gpu_pcie_rx_bytes_per_second"][gpu0] == 2_000_000


def test_other_paths_and_methods_are_refused(served):
    url = served[2]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=10)
    assert info.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"),
                               timeout=10)
    assert info.value.code == 405


def test_invalid_ids_add_the_engine_and_the_server_validator_counts():
    from recserve.server.metrics import render

    stats = {"server": {"invalid_ids": {"item": 3, "user": 1}},
             "engine": {"invalid_ids": {"item": 2}}, "gpu": {"available": False}}
    text = render(lambda: stats).decode()
    samples = {s.labels["feature"]: s.value
               for family in parser.text_string_to_metric_families(text)
               for s in family.samples if s.name == "recserve_invalid_ids_total"}
    assert samples == {"item": 5.0, "user": 1.0}


def test_the_workers_hand_over_counts_become_metrics():
    """With ``--workers`` the stats' ``server.workers`` become a counter by path and a
    gauge of ring regions held; without it neither is rendered."""
    from recserve.server.metrics import render

    stats = {"server": {"workers": {"processes": 2, "ring_bytes": 1 << 26,
                                    "requests_via_ring": 40, "requests_via_socket": 3,
                                    "ring_regions_held": 5}},
             "engine": {}, "gpu": {"available": False, "gpus": []}}
    families = {f.name: f for f in parser.text_string_to_metric_families(
        render(lambda: stats).decode())}
    handed = {s.labels["path"]: s.value for s in families["recserve_worker_requests"].samples
              if s.name.endswith("_total")}
    assert handed == {"ring": 40, "socket": 3}
    assert families["recserve_worker_ring_regions_held"].samples[0].value == 5
    del stats["server"]["workers"]
    text = render(lambda: stats).decode()
    assert "recserve_worker" not in text


def test_requests_by_priority_are_counted_merged_and_exported():
    from recserve.server.metrics import render
    from recserve.server.stats import ServerStats, merge_server_stats

    one, two = ServerStats(), ServerStats()
    one.record("m", "infer", "ok", 0.01, "high")
    one.record("m", "infer", "overloaded", 0.001, "low")
    two.record("m", "infer", "ok", 0.02, "high")
    two.record("", "infer", "bad_request", 0.001)  # refused before its priority was read
    merged = merge_server_stats([one.to_dict(), two.to_dict()])
    assert merged["priorities"] == [{"priority": "high", "code": "ok", "count": 2},
                                    {"priority": "low", "code": "overloaded", "count": 1}]
    stats = {"server": merged, "engine": {}, "gpu": {"available": False, "gpus": []}}
    families = {f.name: f for f in parser.text_string_to_metric_families(
        render(lambda: stats).decode())}
    samples = {(s.labels["priority"], s.labels["code"]): s.value
               for s in families["recserve_requests_by_priority"].samples
               if s.name.endswith("_total")}
    assert samples == {("high", "ok"): 2, ("low", "overloaded"): 1}


def test_batches_packed_in_processes_are_counted_only_with_packing_processes():
    from recserve.server.metrics import render

    executor = {"pack_threads": 2, "packed_in_processes": 31, "packing_process_restarts": 1}
    stats = {"server": {}, "engine": {"executor": executor},
             "gpu": {"available": False, "gpus": []}}
    families = {f.name: f for f in parser.text_string_to_metric_families(
        render(lambda: stats).decode())}
    assert families["recserve_batches_packed_in_processes"].samples[0].value == 31
    assert families["recserve_packing_process_restarts"].samples[0].value == 1
    del executor["packed_in_processes"], executor["packing_process_restarts"]
    assert "packing_process" not in render(lambda: stats).decode()


def test_a_models_device_memory_goes_from_the_engine_stats_to_a_gauge():
    from recserve.server.metrics import render

    model = loaded(small_spec())

    class MeasuringExecutor(CpuExecutor):  # as the GPU executor measures what a build took
        def build_model(self, spec, weights):
            return types.SimpleNamespace(built=super().build_model(spec, weights), spec=spec,
                                         device_bytes={"weights": 3 << 20, "slots": 40 << 20})

    async def run():
        async with Engine(SETTINGS, lambda s: MeasuringExecutor(s, torch_threads=1)) as engine:
            await engine.load("small", 2, model.spec, model.weights)
            return engine.stats()

    engine_stats = asyncio.run(run())
    assert engine_stats["model_device_bytes"] == {"small/2": {"weights": 3 << 20,
                                                               "slots": 40 << 20}}
    stats = {"server": {}, "engine": engine_stats, "gpu": {"available": False, "gpus": []}}
    families = {f.name: f for f in parser.text_string_to_metric_families(
        render(lambda: stats).decode())}
    samples = {(s.labels["model"], s.labels["version"], s.labels["part"]): s.value
               for s in families["recserve_model_device_bytes"].samples}
    assert samples == {("small", "2", "weights"): 3 << 20, ("small", "2", "slots"): 40 << 20}
    # a CPU model measures nothing: no samples
    assert asyncio.run(_cpu_engine_stats(model))["model_device_bytes"] == {}


async def _cpu_engine_stats(model) -> dict:
    async with make_engine() as engine:
        await engine.load("small", 1, model.spec, model.weights)
        return engine.stats()
