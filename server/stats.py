"""Server-side request counters and latency histograms, and the hooks that observe requests.

Every answered request is recorded once, as ``(model, op, code, seconds)``: ``model`` is
the name of a model the server resolved for it ("" when none, so a client sending random
model names cannot grow these tables), ``code`` is ``"ok"`` or the error code. The
``stats`` op reads ``to_dict``; other observers (a metrics exporter) register a callback
in ``on_request_done``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from recserve.engine.histogram import Histogram

log = logging.getLogger("recserve.server")

RequestHook = Callable[[str, str, str, float], None]
"""``hook(model, op, code, seconds)``, called on the event loop when a request is answered."""


class ServerStats:
    """Counts of answered requests by (model, op, code), and latency per model for infer."""

    def __init__(self, hooks: list[RequestHook] | None = None) -> None:
        self.started = time.time()
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        """End-to-end infer latency (frame read to response written) per model."""
        self.invalid_ids: Counter[str] = Counter()
        """Sparse ids outside their table per feature, in requests refused by validation."""
        self.priorities: Counter[tuple[str, str]] = Counter()
        """Answered infer requests by (priority, code), once their priority was read."""
        self.on_request_done: list[RequestHook] = list(hooks or [])
        """Callbacks run for every answered request; one that raises is logged and kept."""

    def record(self, model: str, op: str, code: str, seconds: float,
               priority: str = "") -> None:
        """Count one answered request (by priority too, when it has one) and run the
        hooks."""
        self.requests[(model, op, code)] += 1
        if priority:
            self.priorities[(priority, code)] += 1
        if op == "infer" and model:
            histogram = self.latency.get(model)
            if histogram is None:
                histogram = self.latency[model] = Histogram()
            histogram.observe(seconds)
        for hook in self.on_request_done:
            try:
                hook(model, op, code, seconds)
            except Exception:  # an observer's bug must not fail the request path
                log.exception("on_request_done hook %r failed", hook)

    def to_dict(self) -> dict:
        """``{requests: [{model, op, code, count}], latency_s: {model: histogram},
        invalid_ids: {feature: count}, priorities: [{priority, code, count}]}``."""
        return {"requests": [{"model": m, "op": o, "code": c, "count": n}
                             for (m, o, c), n in sorted(self.requests.items())],
                "latency_s": {m: h.to_dict() for m, h in sorted(self.latency.items())},
                "invalid_ids": dict(sorted(self.invalid_ids.items())),
                "priorities": _priority_rows(self.priorities)}


def merge_server_stats(parts: list[dict]) -> dict:
    """Several processes' ``server`` stats as one: counts and histograms added up."""
    requests: Counter[tuple[str, str, str]] = Counter()
    priorities: Counter[tuple[str, str]] = Counter()
    invalid: Counter[str] = Counter()
    latency: dict[str, dict] = {}
    connections = in_flight = 0
    for part in parts:
        connections += part.get("connections", 0)
        in_flight += part.get("in_flight", 0)
        for row in part.get("requests", []):
            requests[(row["model"], row["op"], row["code"])] += row["count"]
        for row in part.get("priorities", []):
            priorities[(row["priority"], row["code"])] += row["count"]
        invalid.update(part.get("invalid_ids", {}))
        for model, hist in part.get("latency_s", {}).items():
            into = latency.get(model)
            if into is None:
                latency[model] = {**hist, "counts": list(hist["counts"])}
                continue
            into["counts"] = [a + b for a, b in zip(into["counts"], hist["counts"], strict=True)]
            into["sum"] += hist["sum"]
            into["count"] += hist["count"]
    return {"connections": connections, "in_flight": in_flight,
            "requests": [{"model": m, "op": o, "code": c, "count": n}
                         for (m, o, c), n in sorted(requests.items())],
            "latency_s": dict(sorted(latency.items())),
            "invalid_ids": dict(sorted(invalid.items())),
            "priorities": _priority_rows(priorities)}


def _priority_rows(counts: Counter[tuple[str, str]]) -> list[dict]:
    return [{"priority": p, "code": c, "count": n} for (p, c), n in sorted(counts.items())]
