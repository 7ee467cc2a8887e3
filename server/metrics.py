"""Prometheus metrics: the ``stats`` op's numbers under conventional names, on an HTTP endpoint.

``StatsCollector`` reads the very dict the ``stats`` op answers (``Server.current_stats``)
at scrape time and renders it, so ``stats`` and Prometheus can never disagree and
nothing is counted twice. Histograms keep the fixed buckets of ``engine.histogram``
(cumulative ``le`` buckets, the same bounds in every process), so ``sum by (le)`` over
replicas is exact. Times are seconds, sizes bytes, ratios 0..1, clocks hertz.

The endpoint is a small asyncio HTTP server on the server's own event loop: the
collector then reads counters on the thread that writes them (no locks, no torn reads).
``GET /metrics`` answers the text format; anything else is 404.

    exporter = await start_metrics(server, "127.0.0.1", 7701)   # recserve serve does this
    ...
    await exporter.close()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("recserve.server")

DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 7701
MAX_REQUEST_HEAD = 8192  # bytes of request line + headers we read before giving up
READ_TIMEOUT_S = 5.0

StatsFn = Callable[[], dict]

# Engine histograms: stats key -> (metric name, help).
_ENGINE_HISTOGRAMS = {
    "queue_wait_s": ("recserve_queue_wait_seconds",
                     "Time from a request's arrival at the engine to its first rows dispatched"),
    "compute_s": ("recserve_compute_seconds",
                  "Time from a batch's dispatch to the executor until its scores are back"),
    "batch_rows": ("recserve_batch_rows", "Candidate rows per batch"),
    "batch_requests": ("recserve_batch_requests", "Requests (pieces) per batch"),
}
# Engine counters: counter key -> (metric name without _total, help).
_ENGINE_COUNTERS = {
    "batches": ("recserve_batches", "Batches dispatched by the engine"),
    "rows": ("recserve_rows", "Candidate rows dispatched by the engine"),
    "padding_rows": ("recserve_padding_rows", "Rows computed only to pad a batch to its bucket"),
    "expired": ("recserve_expired_requests", "Requests whose deadline passed while queued"),
    "failed": ("recserve_failed_requests", "Requests the executor answered with an error"),
    "cancelled": ("recserve_cancelled_requests", "Requests cancelled by their client"),
    "slow": ("recserve_slow_requests", "Requests the engine answered later than "
             "--slow-request-ms after they reached it (each logged, at a bounded rate)"),
}
# GPU sample field -> (metric name, help, scale to base units).
_GPU_GAUGES = {
    "utilization_pct": ("recserve_gpu_utilization_ratio", "GPU busy fraction (NVML)", 0.01),
    "memory_used_bytes": ("recserve_gpu_memory_used_bytes", "GPU memory in use", 1.0),
    "memory_total_bytes": ("recserve_gpu_memory_total_bytes", "GPU memory in all", 1.0),
    "power_watts": ("recserve_gpu_power_watts", "GPU power draw", 1.0),
    "power_limit_watts": ("recserve_gpu_power_limit_watts", "GPU enforced power limit", 1.0),
    "sm_clock_mhz": ("recserve_gpu_sm_clock_hertz", "GPU SM clock", 1e6),
    "temperature_c": ("recserve_gpu_temperature_celsius", "GPU temperature", 1.0),
    "pcie_tx_bytes_per_s": ("recserve_gpu_pcie_tx_bytes_per_second",
                            "PCIe throughput from the GPU", 1.0),
    "pcie_rx_bytes_per_s": ("recserve_gpu_pcie_rx_bytes_per_second",
                            "PCIe throughput to the GPU", 1.0),
}


def histogram_family(name: str, documentation: str, hists: dict[tuple[str, ...], dict],
                     labels: tuple[str, ...] = ()) -> HistogramMetricFamily:
    """A histogram family from ``{label values: Histogram.to_dict()}`` (cumulative buckets)."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for values, hist in hists.items():
        buckets, running = [], 0
        for bound, count in zip(hist["bounds"], hist["counts"], strict=False):
            running += count
            buckets.append((repr(float(bound)), running))
        buckets.append(("+Inf", running + hist["counts"][-1]))
        family.add_metric(list(values), buckets, sum_value=float(hist["sum"]))
    return family


class StatsCollector:
    """A prometheus-client collector over a ``stats`` snapshot, taken at each scrape."""

    def __init__(self, stats_fn: StatsFn) -> None:
        self.stats_fn = stats_fn

    def collect(self) -> Iterator[Metric]:
        """Every recserve metric from one fresh snapshot."""
        stats = self.stats_fn()
        yield from server_metrics(stats.get("server", {}))
        yield from engine_metrics(stats.get("engine", {}))
        yield invalid_ids_metric(stats)
        yield from gpu_metrics(stats.get("gpu", {}))
        uptime = GaugeMetricFamily("recserve_uptime_seconds", "Seconds since the server started")
        uptime.add_metric([], float(stats.get("uptime_s", 0.0)))
        info = GaugeMetricFamily("recserve_build_info", "Always 1; the recserve version",
                                 labels=["version"])
        info.add_metric([str(stats.get("version", ""))], 1.0)
        yield from (uptime, info)


def server_metrics(server: dict) -> Iterator[Metric]:
    """Requests by model, op and code; end-to-end latency; connections and in-flight."""
    requests = CounterMetricFamily("recserve_requests", "Answered requests by model, op and "
                                   "outcome (code: ok or the error code)",
                                   labels=["model", "op", "code"])
    for row in server.get("requests", []):
        requests.add_metric([row["model"], row["op"], row["code"]], row["count"])
    yield requests
    yield histogram_family(
        "recserve_request_duration_seconds", "Server-side infer latency, frame read to "
        "response written", {(m,): h for m, h in server.get("latency_s", {}).items()},
        ("model",))
    by_priority = CounterMetricFamily(
        "recserve_requests_by_priority", "Answered infer requests by priority (high, normal, "
        "low) and outcome (code: ok or the error code)", labels=["priority", "code"])
    for row in server.get("priorities", []):
        by_priority.add_metric([row["priority"], row["code"]], row["count"])
    yield by_priority
    for key, name, doc in (("connections", "recserve_connections", "Open client connections"),
                           ("in_flight", "recserve_in_flight_requests",
                            "Admitted infer requests not yet answered")):
        gauge = GaugeMetricFamily(name, doc)
        gauge.add_metric([], float(server.get(key, 0)))
        yield gauge
    workers = server.get("workers")
    if workers is not None:  # the multi-process front end (--workers)
        handed = CounterMetricFamily(
            "recserve_worker_requests", "Score requests handed from worker processes to the "
            "engine process, by path: ring (shared memory) or socket (the ring was full or "
            "off)", labels=["path"])
        for path in ("ring", "socket"):
            handed.add_metric([path], workers.get(f"requests_via_{path}", 0))
        yield handed
        held = GaugeMetricFamily("recserve_worker_ring_regions_held",
                                 "Shared-memory regions of requests the engine still reads")
        held.add_metric([], float(workers.get("ring_regions_held", 0)))
        yield held


def engine_metrics(engine: dict) -> Iterator[Metric]:
    """Batching engine histograms, counters, queue depth, device busy time and bytes (the
    one-at-a-time backend has none of these: they are then absent or zero)."""
    hists = engine.get("histograms", {})
    for key, (name, doc) in _ENGINE_HISTOGRAMS.items():
        yield histogram_family(name, doc, {(): hists[key]} if key in hists else {})
    counters = engine.get("counters", {})
    for key, (name, doc) in _ENGINE_COUNTERS.items():
        yield CounterMetricFamily(name, doc, value=float(counters.get(key, 0)))
    for key, name, doc in (("queued_rows", "recserve_queue_rows",
                            "Candidate rows queued for a batch"),
                           ("pending_requests", "recserve_engine_pending_requests",
                            "Requests queued or running in the engine")):
        yield GaugeMetricFamily(name, doc, value=float(engine.get(key, 0)))
    executor = engine.get("executor", {})
    yield CounterMetricFamily("recserve_bytes_to_device", "Bytes copied host to device",
                              value=float(executor.get("bytes_in", 0)))
    yield CounterMetricFamily("recserve_gpu_busy_seconds", "Device time of batches, from "
                              "CUDA events (works where NVML does not, e.g. under MIG)",
                              value=float(executor.get("gpu_busy_ms", 0.0)) / 1e3)
    yield CounterMetricFamily("recserve_pack_seconds", "Host time spent packing batches for "
                              "the GPU, summed over the packing threads (its rate near "
                              "recserve_pack_threads: the host bounds the engine)",
                              value=float(executor.get("pack_ms", 0.0)) / 1e3)
    yield GaugeMetricFamily("recserve_pack_threads", "Host threads packing batches for the GPU",
                            value=float(executor.get("pack_threads", 0)))
    memory = GaugeMetricFamily("recserve_model_device_bytes", "Device memory a loaded model "
                               "took when it was built: its weights, and its slots (staging, "
                               "activations and a CUDA graph per bucket; --slots)",
                               labels=["model", "version", "part"])
    for key, parts in sorted(engine.get("model_device_bytes", {}).items()):
        name, _, version = key.rpartition("/")
        for part, value in sorted(parts.items()):
            memory.add_metric([name, version, part], float(value))
    yield memory
    if "packed_in_processes" in executor:  # (serve --pack-in process)
        yield CounterMetricFamily("recserve_batches_packed_in_processes", "Batches packed by "
                                  "packing processes (the rest: in the packing threads)",
                                  value=float(executor["packed_in_processes"]))
        yield CounterMetricFamily("recserve_packing_process_restarts", "Packing processes "
                                  "started again after one died or hung (its batch was "
                                  "packed in its thread)",
                                  value=float(executor["packing_process_restarts"]))


def invalid_ids_metric(stats: dict) -> CounterMetricFamily:
    """Out-of-table ids per feature: those the engine met, plus those the server's validator
    refused (``server.invalid_ids``, when the server counts them) before they reached it."""
    totals: dict[str, float] = {}
    for part in (stats.get("engine", {}), stats.get("server", {})):
        for feature, count in part.get("invalid_ids", {}).items():
            totals[feature] = totals.get(feature, 0.0) + float(count)
    invalid = CounterMetricFamily("recserve_invalid_ids", "Sparse ids outside their table, "
                                  "per feature", labels=["feature"])
    for feature, count in sorted(totals.items()):
        invalid.add_metric([feature], count)
    return invalid


def gpu_metrics(gpu: dict) -> Iterator[Metric]:
    """NVML readings per GPU index; ``recserve_gpu_monitor_available`` says whether there are
    any (fields a device cannot report are left out rather than faked as zero)."""
    available = GaugeMetricFamily("recserve_gpu_monitor_available", "1 when NVML readings are "
                                  "available, 0 otherwise (no NVIDIA GPU, driver or library)")
    available.add_metric([], 1.0 if gpu.get("available") else 0.0)
    yield available
    families = {field: GaugeMetricFamily(name, doc, labels=["gpu"])
                for field, (name, doc, _) in _GPU_GAUGES.items()}
    for sample in gpu.get("gpus", []) if gpu.get("available") else []:
        for field, (_, _, scale) in _GPU_GAUGES.items():
            value = sample.get(field)
            if value is not None:
                families[field].add_metric([str(sample["index"])], float(value) * scale)
    yield from families.values()


def render(stats_fn: StatsFn) -> bytes:
    """The text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats_fn))
    return generate_latest(registry)


class MetricsServer:
    """A running endpoint; ``address`` is (host, port) as bound, ``close`` stops it."""

    def __init__(self, server: asyncio.base_events.Server, stats_fn: StatsFn) -> None:
        self._server = server
        self.stats_fn = stats_fn

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (real even when port 0 was asked for)."""
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        """Stop listening."""
        self._server.close()
        await self._server.wait_closed()


async def start_metrics_server(stats_fn: StatsFn, host: str = DEFAULT_METRICS_HOST,
                               port: int = DEFAULT_METRICS_PORT) -> MetricsServer:
    """Serve ``GET /metrics`` rendered from ``stats_fn()`` on the running loop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, body, kind = _answer(head, stats_fn)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a scraper that went away or sent junk: nothing to answer
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD)
    exporter = MetricsServer(server, stats_fn)
    log.info("Prometheus metrics on http://%s:%d/metrics", *exporter.address)
    return exporter


def _answer(head: bytes, stats_fn: StatsFn) -> tuple[str, bytes, str]:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or parts[0] != b"GET":
        return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
    if parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
        return "404 Not Found", b"metrics are at /metrics\n", "text/plain"
    try:
        return "200 OK", render(stats_fn), CONTENT_TYPE_LATEST
    except Exception:  # a bug in a stats source must not kill the endpoint
        log.exception("rendering metrics failed")
        return "500 Internal Server Error", b"rendering metrics failed\n", "text/plain"


async def start_metrics(server, host: str = DEFAULT_METRICS_HOST,
                        port: int = DEFAULT_METRICS_PORT) -> MetricsServer:
    """The endpoint for a ``Server`` or ``Hub`` (anything with ``current_stats()``)."""
    return await start_metrics_server(server.current_stats, host, port)
