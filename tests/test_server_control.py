"""The control plane over a real server: health and readiness, stats and the request hook,
admin ops behind the token (load, unload, reload with hot swap), the connection limit."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_fixtures import RawConnection, ServerThread, loaded, small_spec, two_version_repo

from recserve.engine.demo import random_inputs, to_wire
from recserve.engine.engine import Engine
from recserve.engine.executor import CpuExecutor
from recserve.engine.settings import EngineSettings
from recserve.server.backend import EngineBackend, ReferenceBackend

TOKEN = "s3cret-token"


def engine_backend() -> EngineBackend:
    settings = EngineSettings(max_batch_rows=64, buckets=(16, 64), slots=1)
    return EngineBackend(Engine(settings, lambda s: CpuExecutor(s, torch_threads=1)))


@pytest.fixture
def repo(tmp_path):
    return two_version_repo(tmp_path)


def start(backend, repo=None, models=(), **config):
    async def setup():
        await backend.engine.start()
        for model in models:
            await backend.load(model)

    hooks = config.pop("hooks", ())
    thread = ServerThread(backend, setup=setup if hasattr(backend, "engine") else None,
                          **config)
    thread.server.control.repository = repo
    thread.server.stats.on_request_done.extend(hooks)
    return thread


def infer_message(rid, model, n=3, seed=0, version=None):
    inputs = to_wire(model.spec, random_inputs(model.spec, np.random.default_rng(seed), n))
    message = {"id": rid, "op": "infer", "model": model.spec.name, "candidates": n,
               "inputs": inputs}
    if version is not None:
        message["version"] = version
    return message


def call(conn, message):
    conn.send(message)
    return conn.receive()


def test_health_reports_loading_ready_and_draining():
    thread = start(engine_backend(), models=[loaded(small_spec(), version=1)])
    try:
        conn = RawConnection(thread.port)
        answer = call(conn, {"id": 1, "op": "health"})
        assert answer["live"] is True and answer["ready"] is False
        assert answer["reason"] == "models are loading"
        thread.server.mark_ready()
        answer = call(conn, {"id": 2, "op": "health"})
        assert answer["ready"] is True and answer["reason"] == ""
        assert answer["models"] == [{"name": "small", "version": 1}]
        assert thread.run(thread.server.drain(1.0)) is True
        answer = call(conn, {"id": 3, "op": "health"})
        assert answer["ready"] is False and answer["reason"] == "shutting down"
        refused = call(conn, infer_message(4, loaded(small_spec())))
        assert refused["error"]["code"] == "overloaded"
        assert "shutting down" in refused["error"]["message"]
        conn.close()
    finally:
        thread.stop()


def test_stats_count_requests_by_model_op_and_code_and_run_the_hooks():
    seen = []
    model = loaded(small_spec(), version=3)
    thread = start(engine_backend(), models=[model],
                   hooks=[lambda *args: seen.append(args)])
    try:
        conn = RawConnection(thread.port)
        for rid in range(3):
            assert call(conn, infer_message(rid, model, seed=rid))["ok"] is True
        assert call(conn, {"id": 9, "op": "infer", "model": "nope", "candidates": 1,
                           "inputs": {}})["error"]["code"] == "not_found"
        bad = infer_message(11, model, n=3)
        bad["inputs"]["item"]["values"][:2] = [50, -1]  # table "items" has 50 rows
        assert call(conn, bad)["error"]["code"] == "bad_request"
        conn.send_payload(b"\xc1")  # not msgpack
        assert conn.receive()["error"]["code"] == "bad_request"
        stats = call(conn, {"id": 10, "op": "stats"})["stats"]
        conn.close()
    finally:
        thread.stop()
    counts = {(r["model"], r["op"], r["code"]): r["count"] for r in stats["server"]["requests"]}
    assert counts[("small", "infer", "ok")] == 3
    assert counts[("", "infer", "not_found")] == 1  # an unknown name is not a label
    assert counts[("", "", "bad_request")] == 1
    assert counts[("small", "infer", "bad_request")] == 1
    assert stats["server"]["invalid_ids"] == {"item": 2}
    latency = stats["server"]["latency_s"]
    assert list(latency) == ["small"] and latency["small"]["count"] == 4  # answered, any code
    assert len(latency["small"]["counts"]) == len(latency["small"]["bounds"]) + 1
    assert stats["server"]["connections"] == 1 and stats["server"]["in_flight"] == 0
    assert stats["engine"]["kind"] == "engine"
    assert stats["engine"]["counters"]["requests"] >= 3
    assert stats["engine"]["models"] == [{"name": "small", "version": 3}]
    assert stats["gpu"]["available"] is False and stats["uptime_s"] >= 0
    assert [s[:3] for s in seen] == [("small", "infer", "ok")] * 3 + [
        ("", "infer", "not_found"), ("small", "infer", "bad_request"), ("", "", "bad_request"),
        ("", "stats", "ok")]
    assert all(s[3] >= 0 for s in seen)


def test_admin_ops_are_off_without_a_token(repo):
    thread = start(engine_backend(), repo)
    try:
        conn = RawConnection(thread.port)
        answer = call(conn, {"id": 1, "op": "load", "token": TOKEN, "model": "small"})
        assert answer["error"]["code"] == "unauthorized"
        assert "RECSERVE_ADMIN_TOKEN" in answer["error"]["message"]
        conn.close()
    finally:
        thread.stop()


@pytest.mark.parametrize("token", ["wrong", "", 7, None, b"s3cret-token"])
def test_admin_ops_refuse_a_wrong_token(repo, token):
    thread = start(engine_backend(), repo, admin_token=TOKEN)
    try:
        conn = RawConnection(thread.port)
        for op in ("load", "unload", "reload"):
            answer = call(conn, {"id": 1, "op": op, "token": token, "model": "small"})
            assert answer["error"]["code"] == "unauthorized", answer
            answer = call(conn, {"id": 1, "op": op, "model": "small"})  # no token at all
            assert answer["error"]["code"] == "unauthorized", answer
        assert call(conn, {"id": 2, "op": "health"})["models"] == []
        conn.close()
    finally:
        thread.stop()


def test_load_reload_unload_with_the_token(repo):
    thread = start(engine_backend(), repo, admin_token=TOKEN)
    admin = {"op": "load", "token": TOKEN, "model": "small"}
    try:
        conn = RawConnection(thread.port)
        assert call(conn, {"id": 1, **admin, "version": 1}) == {
            "id": 1, "ok": True, "model": "small", "version": 1}
        v1 = loaded(small_spec(), version=1, seed=1)
        first = call(conn, infer_message(2, v1))
        assert first["version"] == 1
        answer = call(conn, {"id": 3, **admin, "op": "reload"})
        assert (answer["version"], answer["previous"]) == (2, 1)
        second = call(conn, infer_message(4, v1))
        assert second["version"] == 2 and second["scores"] != first["scores"]
        assert call(conn, {"id": 5, **admin, "version": 7})["error"]["code"] == "not_found"
        assert call(conn, {"id": 6, **admin, "model": "../etc"})["error"]["code"] == "not_found"
        assert call(conn, {"id": 7, **admin, "model": 5})["error"]["code"] == "bad_request"
        answer = call(conn, {"id": 8, **admin, "op": "unload"})
        assert answer == {"id": 8, "ok": True, "model": "small", "unloaded": [2]}
        assert call(conn, infer_message(9, v1))["error"]["code"] == "not_found"
        answer = call(conn, {"id": 10, **admin, "op": "unload"})
        assert answer["error"]["code"] == "not_found"
        assert call(conn, {"id": 11, **admin, "op": "reload"})["error"]["code"] == "not_found"
        conn.close()
    finally:
        thread.stop()


def test_a_failed_load_keeps_the_old_version_serving(repo):
    (repo / "small" / "2" / "weights.safetensors").write_bytes(b"not safetensors")
    thread = start(engine_backend(), repo, admin_token=TOKEN)
    try:
        conn = RawConnection(thread.port)
        load = {"op": "load", "token": TOKEN, "model": "small"}
        assert call(conn, {"id": 1, **load, "version": 1})["ok"] is True
        answer = call(conn, {"id": 2, **load})
        assert answer["error"]["code"] == "bad_request", answer
        assert call(conn, infer_message(3, loaded(small_spec())))["version"] == 1
        conn.close()
    finally:
        thread.stop()


def test_admin_ops_on_the_one_at_a_time_backend_are_bad_requests(repo):
    thread = start(ReferenceBackend([loaded(small_spec())]), repo, admin_token=TOKEN)
    try:
        conn = RawConnection(thread.port)
        answer = call(conn, {"id": 1, "op": "load", "token": TOKEN, "model": "small"})
        assert answer["error"]["code"] == "bad_request"
        assert "--one-at-a-time" in answer["error"]["message"]
        assert call(conn, {"id": 2, "op": "stats"})["stats"]["engine"]["kind"] == (
            "one_at_a_time")
        conn.close()
    finally:
        thread.stop()


def test_connections_above_the_limit_are_refused_and_closed():
    thread = start(ReferenceBackend([loaded(small_spec())]), max_connections=2)
    try:
        kept = [RawConnection(thread.port) for _ in range(2)]
        for i, conn in enumerate(kept):  # both accepted and served
            assert call(conn, {"id": i, "op": "ping"})["ok"] is True
        extra = RawConnection(thread.port)
        answer = call(extra, {"id": 3, "op": "models"})
        assert answer["id"] is None and answer["error"]["code"] == "overloaded"
        assert extra.is_closed_by_peer()
        extra.close()
        probe = RawConnection(thread.port)  # a full server is still alive for its probes
        answer = call(probe, {"id": 4, "op": "health"})
        assert answer["ok"] is True and answer["live"] is True
        assert probe.is_closed_by_peer()
        probe.close()
        assert thread.server.connections == 2
        kept.pop().close()
        deadline = asyncio.run(_wait_until(lambda: thread.server.connections == 1))
        assert deadline
        again = RawConnection(thread.port)
        assert call(again, {"id": 5, "op": "ping"})["ok"] is True
        again.close()
        kept[0].close()
    finally:
        thread.stop()


async def _wait_until(predicate, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True
