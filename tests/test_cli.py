"""The recserve command line: help, model building commands, and a real `recserve serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from recserve.engine.repository import ModelRepository
from recserve.server.cli import build_parser, main

COMMANDS = ["serve", "health", "ping", "models", "infer", "demo-model", "import-dlrm"]


def test_top_level_help_lists_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert "examples:" in out and "recserve infer --demo-candidates 5" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: recserve {command}")
    if command not in ("ping", "models"):
        assert "example" in out


def test_serve_help_names_only_environment_switches_the_code_reads(capsys):
    """Each RECSERVE_* variable `serve --help` names is read by the package (docs that
    match the code), and the kernel switches are among them."""
    from pathlib import Path

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    named = set(re.findall(r"RECSERVE_[A-Z_]+", capsys.readouterr().out))
    assert {"RECSERVE_FUSED_DOT", "RECSERVE_PDL", "RECSERVE_ADMIN_TOKEN"} <= named
    root = Path(__file__).resolve().parent.parent
    source = "".join(p.read_text() for folder in ("engine", "kernels", "server")
                     for p in (root / folder).glob("*.py") if p.name != "cli_serve.py")
    for name in named:
        assert f'"{name}"' in source, f"{name} is in serve --help but no code reads it"


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model_repo) == ("127.0.0.1", 7700, None)
    assert args.max_frame_bytes == 16 << 20


def test_demo_model_writes_a_loadable_repository(tmp_path, capsys):
    assert main(["demo-model", str(tmp_path / "repo")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "repo" / "demo" / "1")
    loaded = ModelRepository(tmp_path / "repo").load("demo")
    assert loaded.version == 1 and loaded.spec.name == "demo"


def _tiny_dlrm(tmp_path):
    """A DLRM_Net-layout state dict: one table (dim 4), bottom 3->4, dot, top 5->1."""
    torch.manual_seed(0)
    state = {"emb_l.0.weight": torch.randn(6, 4),
             "bot_l.0.weight": torch.randn(4, 3), "bot_l.0.bias": torch.randn(4),
             "top_l.0.weight": torch.randn(1, 5), "top_l.0.bias": torch.randn(1)}
    torch.save(state, tmp_path / "dlrm.pt")
    features = {"sparse": [{"name": "item", "scope": "candidate"}],
                "dense": [{"name": "dense", "dim": 3, "scope": "candidate"}],
                "interaction": "dot", "output": {"name": "click", "activation": "sigmoid"}}
    (tmp_path / "features.json").write_text(json.dumps(features))


def test_import_dlrm(tmp_path, capsys):
    _tiny_dlrm(tmp_path)
    base = ["import-dlrm", str(tmp_path / "dlrm.pt"), "--features",
            str(tmp_path / "features.json"), "--repo", str(tmp_path / "repo"), "--name", "ctr"]
    assert main(base) == 0
    assert main([*base, "--version", "5"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "repo" / "ctr" / "1"), str(tmp_path / "repo" / "ctr" / "5")]
    repo = ModelRepository(tmp_path / "repo")
    assert repo.versions("ctr") == [1, 5]
    assert [f.name for f in repo.load("ctr").spec.sparse] == ["item"]
    (tmp_path / "features.json").write_text("{not json")
    assert main(base) == 1
    assert "error:" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_commands_report_a_missing_server(capsys):
    port = str(_free_port())
    assert main(["ping", "--port", port]) == 1
    assert "nothing listens on 127.0.0.1:" in capsys.readouterr().err
    assert main(["health", "--port", port]) == 1
    assert main(["health", "--port", port, "--ready"]) == 1
    assert main(["infer", "--port", port]) == 1
    assert "REQUEST.json file or --demo-candidates" in capsys.readouterr().err


def _start_serve(args, env=None):
    """Start `recserve serve ARGS --port 0`; (process, port) once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "recserve.server.cli", "serve", "--port",
                             "0", *args], env=env, stderr=subprocess.PIPE, text=True)
    lines, port = [], None
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            port = match.group(1)
        if port is not None and "ready: every model is loaded" in line:
            return proc, port
    proc.wait()
    pytest.fail("serve exited before it was ready:\n" + "".join(lines))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`recserve serve` as a real process, demo model built into an empty cache."""
    cache = tmp_path_factory.mktemp("cache")
    proc, port = _start_serve(["--max-candidates", "50"],
                              env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    try:
        yield proc, port, cache
    finally:
        proc.kill()
        proc.wait()


def test_serve_builds_the_demo_into_the_cache_and_answers(served, capsys):
    proc, port, cache = served
    assert (cache / "recserve" / "models" / "demo" / "1" / "spec.json").is_file()
    assert main(["ping", "--port", port]) == 0
    assert "protocol 1" in capsys.readouterr().out
    assert main(["health", "--port", port]) == 0
    assert main(["health", "--port", port, "--ready"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ready; models: demo v1"] * 2
    assert main(["models", "--port", port]) == 0
    out = capsys.readouterr().out
    assert "demo version 1" in out and "watch_history" in out and "limits: 50 candidates" in out
    assert main(["models", "--port", port, "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert models["models"][0]["name"] == "demo"


def test_infer_generated_and_from_a_file(served, tmp_path, capsys):
    _, port, _ = served
    assert main(["infer", "--demo-candidates", "7", "--port", port, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == "demo" and len(answer["scores"]) == 7
    assert all(0.0 < s < 1.0 for s in answer["scores"])  # sigmoid output
    request = {"model": "demo", "candidates": 2, "inputs": {
        "watch_history": [1, 2, 3], "country": [4], "device": [5], "hour_of_day": [6],
        "member_dense": [0.1, 0.2, 0.3, 0.4],
        "title_id": {"values": [10, 11], "lengths": [1, 1]},
        "genres": {"values": [1, 2, 3], "lengths": [2, 1]},
        "title_dense": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}}
    (tmp_path / "req.json").write_text(json.dumps(request))
    assert main(["infer", str(tmp_path / "req.json"), "--port", port]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("demo version 1: 2 candidates scored")
    assert [line.split()[0] for line in out[1:]] == ["0", "1"]
    assert main(["infer", str(tmp_path / "req.json"), "--port", port, "--priority", "low"]) == 0
    capsys.readouterr()
    (tmp_path / "urgent.json").write_text(json.dumps({**request, "priority": "urgent"}))
    assert main(["infer", str(tmp_path / "urgent.json"), "--port", port]) == 1
    assert "priority is 'urgent'" in capsys.readouterr().err
    request["inputs"]["genres"]["values"][2] = 64
    (tmp_path / "bad.json").write_text(json.dumps(request))
    assert main(["infer", str(tmp_path / "bad.json"), "--port", port]) == 1
    err = capsys.readouterr().err
    assert "bad_request" in err and "input 'genres' values[2] is 64" in err
    assert main(["infer", "--demo-candidates", "51", "--port", port]) == 1
    assert "too_large" in capsys.readouterr().err
    assert main(["infer", "--demo-candidates", "3", "--model", "nope", "--port", port]) == 1
    assert "no model 'nope'" in capsys.readouterr().err


def test_serve_exits_cleanly_on_sigterm(tmp_path, capsys):
    assert main(["demo-model", str(tmp_path)]) == 0
    proc, port = _start_serve(["--model-repo", str(tmp_path)])
    try:
        assert main(["ping", "--port", port]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "recserve stopping" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_an_empty_repository(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recserve.server.cli", "serve", "--port", "0",
                             "--model-repo", str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert f"no models in {tmp_path}" in result.stderr


def test_engine_settings_follow_the_device_defaults_and_overrides():
    from recserve.server.serve_options import DEVICE_DEFAULTS, engine_settings

    assert engine_settings("cpu") == DEVICE_DEFAULTS["cpu"]
    assert engine_settings("cuda") == DEVICE_DEFAULTS["cuda"]
    trimmed = engine_settings("cpu", max_batch_rows=1000)
    assert trimmed.buckets == (256, 512, 1000) and trimmed.max_batch_rows == 1000
    custom = engine_settings("cpu", buckets=(8, 64), slots=3, max_queued_rows=99,
                             fill_wait_ms=2.5)
    assert (custom.max_batch_rows, custom.slots, custom.max_queued_rows) == (64, 3, 99)
    assert custom.fill_wait_s == 0.0025 and custom.aging_s == DEVICE_DEFAULTS["cpu"].aging_s
    assert engine_settings("cuda", aging_ms=250).aging_s == 0.25
    assert engine_settings("cuda", aging_ms=0).aging_s is None  # strict priority
    with pytest.raises(ValueError, match="aging_s"):
        engine_settings("cuda", aging_ms=-1)
    with pytest.raises(ValueError, match="last bucket"):
        engine_settings("cpu", max_batch_rows=100, buckets=(8, 64))


def test_pack_threads_reach_the_gpu_executor(tmp_path, monkeypatch):
    from recserve.engine import cores
    from recserve.engine.settings import EngineSettings
    from recserve.server.serve_options import ServeOptions
    from recserve.server.serving import executor_factory

    args = build_parser().parse_args(["serve", "--pack-threads", "3"])
    assert args.pack_threads == 3
    executor = executor_factory("cuda", None, 3)(EngineSettings(slots=2))  # no CUDA until start
    assert executor.pack_threads == 3
    from recserve.engine.cores import default_pack_threads

    monkeypatch.setattr(cores, "available_cores", lambda root=None: 16)
    assert executor_factory("cuda")(EngineSettings(slots=2)).pack_threads == 2
    monkeypatch.setattr(cores, "available_cores", lambda root=None: 3)  # a 3-CPU limit
    assert executor_factory("cuda")(EngineSettings(slots=4)).pack_threads == 1
    # one per slot where cores allow, a core each left to the event loop and completions
    assert [default_pack_threads(4, c) for c in (1, 2, 4, 5, 16)] == [1, 1, 2, 3, 4]
    # more slots than 4 share 4 threads (8 on an H100 host took turns on the GIL)
    assert [default_pack_threads(s, 16) for s in (6, 8)] == [4, 4]
    with pytest.raises(ValueError, match="pack_threads is 0"):
        ServeOptions(tmp_path, "cpu", pack_threads=0)


def test_compute_streams_reach_the_gpu_executor(tmp_path):
    from recserve.engine.settings import EngineSettings
    from recserve.server.serve_options import ServeOptions
    from recserve.server.serving import executor_factory

    args = build_parser().parse_args(["serve", "--compute-streams", "2"])
    assert args.compute_streams == 2
    assert build_parser().parse_args(["serve"]).compute_streams == 1
    executor = executor_factory("cuda", None, None, 2)(EngineSettings(slots=2))
    assert executor.compute_streams == 2 and executor.stats()["compute_streams"] == 2
    with pytest.raises(ValueError, match="compute_streams is 0"):
        ServeOptions(tmp_path, "cuda", compute_streams=0)
    with pytest.raises(ValueError, match="3 compute streams for 2 slots"):
        ServeOptions(tmp_path, "cuda", EngineSettings(slots=2), compute_streams=3)


def test_pack_in_reaches_the_gpu_executor_and_needs_workers_with_rings(tmp_path):
    from recserve.engine.settings import EngineSettings
    from recserve.server.serve_options import ServeOptions
    from recserve.server.serving import executor_factory

    assert build_parser().parse_args(["serve"]).pack_in == "auto"
    assert build_parser().parse_args(["serve", "--pack-in", "process"]).pack_in == "process"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--pack-in", "gpu"])
    assert executor_factory("cuda", None, None, 1, True)(EngineSettings()).pack_processes
    assert not executor_factory("cuda")(EngineSettings()).pack_processes
    ServeOptions(tmp_path, "cuda", workers=2, pack_in="process")
    for refused in ({"workers": 1}, {"workers": 2, "worker_ring_mb": 0}):
        with pytest.raises(ValueError, match="needs --workers 2 or more"):
            ServeOptions(tmp_path, "cuda", pack_in="process", **refused)
    with pytest.raises(ValueError, match="pack_in is 'gpu'"):
        ServeOptions(tmp_path, "cuda", pack_in="gpu")
    with pytest.raises(ValueError, match="on cpu there is nothing to pack"):
        ServeOptions(tmp_path, "cpu", workers=2, pack_in="process")


def test_keep_gil_is_the_gpu_default_reaches_the_executor_and_is_refused_without_one(
        tmp_path):
    from recserve.engine.settings import EngineSettings
    from recserve.server.serve_options import ServeOptions
    from recserve.server.serving import describe, executor_factory

    assert build_parser().parse_args(["serve", "--keep-gil"]).keep_gil is True
    assert build_parser().parse_args(["serve", "--no-keep-gil"]).keep_gil is False
    assert build_parser().parse_args(["serve"]).keep_gil is None  # (on with a GPU)
    assert executor_factory("cuda")(EngineSettings()).keep_gil
    assert not executor_factory("cuda", keep_gil=False)(EngineSettings()).keep_gil
    ServeOptions(tmp_path, "auto", keep_gil=True)
    ServeOptions(tmp_path, "cpu")  # the default asks nothing of a CPU server
    ServeOptions(tmp_path, "cpu", keep_gil=False)
    with pytest.raises(ValueError, match="on cpu there are none"):
        ServeOptions(tmp_path, "cpu", keep_gil=True)
    options = ServeOptions(tmp_path, "cuda", keep_gil=True)
    said = describe("cuda", EngineSettings(), options, None, {"issue_calls": "driver"})
    assert "CUDA calls keep the GIL" in said
    # (fell back: libcuda did not load, the executor warned, and the log does not claim it)
    assert "keep the GIL" not in describe("cuda", EngineSettings(), options, None,
                                          {"issue_calls": "torch"})


def test_pack_in_auto_uses_processes_only_on_a_gpu_with_workers_and_rings(tmp_path):
    from recserve.server.serve_options import ServeOptions

    auto = ServeOptions(tmp_path, "auto", workers=4)
    assert auto.packs_in_processes("cuda")
    assert not auto.packs_in_processes("cpu") and not auto.packs_in_processes("null")
    assert not ServeOptions(tmp_path, "cuda").packs_in_processes("cuda")  # no workers
    assert not ServeOptions(tmp_path, "cuda", workers=4,
                            worker_ring_mb=0).packs_in_processes("cuda")
    assert not ServeOptions(tmp_path, "cuda", workers=4,
                            pack_in="thread").packs_in_processes("cuda")
    assert ServeOptions(tmp_path, "cuda", workers=2, pack_in="process").packs_in_processes(
        "cuda")
    assert not ServeOptions(tmp_path, "cuda", one_at_a_time=True,
                            workers=4).packs_in_processes("cuda")  # (no engine to pack for)


def test_serve_engine_flags_parse():
    args = build_parser().parse_args(["serve", "--device", "cpu", "--buckets", "16,128",
                                      "--slots", "2", "--fill-wait-ms", "0.5",
                                      "--one-at-a-time"])
    assert (args.device, args.buckets, args.slots, args.fill_wait_ms) == ("cpu", (16, 128), 2,
                                                                          0.5)
    assert args.one_at_a_time
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--buckets", "16,x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])


def test_open_backend_engine_or_one_at_a_time(tmp_path):
    import asyncio

    import numpy as np

    from recserve.engine.demo import build_demo_repository, demo_spec, random_inputs
    from recserve.server.backend import EngineBackend, ReferenceBackend
    from recserve.server.serve_options import ServeOptions, engine_settings
    from recserve.server.serving import open_backend

    build_demo_repository(tmp_path)
    inputs = random_inputs(demo_spec(), np.random.default_rng(1), 9)

    async def scores(one_at_a_time):
        options = ServeOptions(tmp_path, "cpu", engine_settings("cpu", buckets=(16, 64)),
                               one_at_a_time)
        backend = await open_backend(options)
        try:
            kind = type(backend)
            return kind, await backend.score("demo", 1, inputs)
        finally:
            await backend.close()

    kind, batched = asyncio.run(scores(False))
    assert kind is EngineBackend
    kind, alone = asyncio.run(scores(True))
    assert kind is ReferenceBackend
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no models in"):
        asyncio.run(open_backend(ServeOptions(tmp_path / "empty")))


def test_the_null_device_answers_zeros_without_scoring(tmp_path):
    import asyncio

    import numpy as np

    from recserve.engine.demo import build_demo_repository, demo_spec, random_inputs
    from recserve.server.serve_options import ServeOptions
    from recserve.server.serving import open_backend

    build_demo_repository(tmp_path)

    async def go():
        backend = await open_backend(ServeOptions(tmp_path, "null"))
        try:
            inputs = random_inputs(demo_spec(), np.random.default_rng(0), 700)
            return await backend.score("demo", 1, inputs), backend.stats()
        finally:
            await backend.close()

    scores, stats = asyncio.run(go())
    assert scores.shape == (700,) and not scores.any()
    assert stats["counters"]["rows"] >= 700  # batched by the engine like real traffic
    with pytest.raises(ValueError, match="not with --device null"):
        asyncio.run(open_backend(ServeOptions(tmp_path, "null", one_at_a_time=True)))


def test_synthetic_inputs_follow_the_model_description():
    import numpy as np

    from recserve.server.synth import synthetic_inputs

    model = {"inputs": [
        {"name": "a", "kind": "sparse", "scope": "candidate", "dtype": "i4", "rows": 7,
         "max_bag": 3},
        {"name": "b", "kind": "sparse", "scope": "request", "dtype": "i8", "rows": 5,
         "max_bag": 2},
        {"name": "d", "kind": "dense", "scope": "candidate", "dtype": "f4", "dim": 2}]}
    got = synthetic_inputs(model, 4, np.random.default_rng(0))
    assert got["a"]["values"].dtype == np.int32 and got["b"].dtype == np.int64
    assert len(got["a"]["lengths"]) == 4 and got["a"]["lengths"].sum() == len(got["a"]["values"])
    assert 0 <= got["a"]["values"].min() and got["a"]["values"].max() < 7
    assert got["d"].shape == (4, 2) and got["d"].dtype == np.float32


def test_cpu_torch_threads_leave_cores_to_the_event_loop_and_the_workers(monkeypatch):
    import torch

    from recserve.engine import cores
    from recserve.server.serving import cpu_torch_threads

    monkeypatch.setattr(cores, "available_cores", lambda root=None: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert cpu_torch_threads() == 15  # one core for the event loop
    assert cpu_torch_threads(4) == 11  # and one per front-end worker process
    monkeypatch.setattr(cores, "available_cores", lambda root=None: 4)  # a 4-CPU limit
    assert cpu_torch_threads() == 3  # not 15: torch counts the machine's cores
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_torch_threads() == 1 and cpu_torch_threads(8) == 1  # never below one


def test_workers_default_to_one_per_four_cores_up_to_four(monkeypatch, tmp_path):
    from recserve.engine import cores
    from recserve.engine.cores import available_cores, cgroup_cpu_quota
    from recserve.server.cores import default_workers

    assert [default_workers(cores=c) for c in (1, 2, 4, 7, 8, 12, 16, 64)] == \
        [1, 1, 1, 1, 2, 3, 4, 4]
    assert default_workers(one_at_a_time=True, cores=64) == 1  # the baseline: one process
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(16)),
                        raising=False)
    monkeypatch.setattr(cores, "CGROUP_ROOT", tmp_path)  # (the default root)
    assert cgroup_cpu_quota() is None and available_cores() == 16 and default_workers() == 4
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2, no quota
    assert available_cores(tmp_path) == 16
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a 2.5-CPU limit
    assert cgroup_cpu_quota(tmp_path) == 2.5 and available_cores(tmp_path) == 3
    assert default_workers() == 1  # one process: the quota, not the 16 cores, counts
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()  # cgroup v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("800000\n")
    assert available_cores(tmp_path) == 8 and default_workers(cores=8) == 2
    service = tmp_path / "v2" / "system.slice" / "recserve.service"  # a systemd CPUQuota
    service.mkdir(parents=True)
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    (service / "cpu.max").write_text("300000 100000\n")
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/system.slice/recserve.service\n")
    assert cgroup_cpu_quota(tmp_path / "v2", membership) == 3.0
    (service.parent / "cpu.max").write_text("150000 100000\n")  # a tighter slice above
    assert cgroup_cpu_quota(tmp_path / "v2", membership) == 1.5
    assert build_parser().parse_args(["serve"]).workers is None  # resolved at start
    assert build_parser().parse_args(["serve", "--workers", "1"]).workers == 1


def test_the_tuning_cache_defaults_to_the_cache_folder(monkeypatch, tmp_path):
    from recserve.server.cli_serve import tuning_cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("RECSERVE_TUNING_CACHE", raising=False)
    assert tuning_cache_path(None) == str(tmp_path / "recserve" / "tuning.json")
    monkeypatch.setenv("RECSERVE_TUNING_CACHE", "/elsewhere/t.json")
    assert tuning_cache_path(None) == "/elsewhere/t.json"
    assert tuning_cache_path("") == ""  # none
    assert build_parser().parse_args(["serve", "--tuning-cache", "x.json"]).tuning_cache == \
        "x.json"


def test_the_start_up_log_names_the_settings_in_effect(tmp_path, monkeypatch):
    from recserve.server.serve_options import DEVICE_DEFAULTS, ServeOptions
    from recserve.server.serving import describe

    monkeypatch.setenv("RECSERVE_TUNING_CACHE", "")
    cpu = describe("cpu", DEVICE_DEFAULTS["cpu"], ServeOptions(tmp_path, "cpu"), 3, {})
    assert "buckets 256,512,1024,2048" in cpu and "one process" in cpu
    assert "3 torch thread(s)" in cpu and "tuning" not in cpu
    assert "slow requests logged from 1000 ms" in cpu
    assert "no slow-request log" in describe("cpu", DEVICE_DEFAULTS["cpu"], ServeOptions(
        tmp_path, "cpu", slow_request_ms=0), 3, {})
    gpu = describe("cuda", DEVICE_DEFAULTS["cuda"], ServeOptions(tmp_path, "cuda", workers=4),
                   None, {"pack_threads": 4, "compute_streams": 1})
    assert "4 front-end worker(s)" in gpu and "pack threads 4" in gpu
    assert "tuning cache off" in gpu and "torch thread" not in gpu
    assert "packing processes" not in gpu
    assert "packing processes" in describe("cuda", DEVICE_DEFAULTS["cuda"], ServeOptions(
        tmp_path, "cuda", workers=4), None, {"packed_in_processes": 0})


def test_serve_refuses_zero_workers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recserve.server.cli", "serve", "--port", "0",
                             "--device", "cpu", "--workers", "0", "--model-repo", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "workers is 0" in result.stderr


def test_worker_ring_size_is_parsed_and_checked(tmp_path):
    from recserve.server.serve_options import ServeOptions

    assert build_parser().parse_args(["serve"]).worker_ring_mb == 64
    assert build_parser().parse_args(["serve", "--worker-ring-mb", "0"]).worker_ring_mb == 0
    assert ServeOptions(tmp_path, "cpu", worker_ring_mb=0).worker_ring_mb == 0
    for bad in (-1, 1 << 17, 2.5, True):
        with pytest.raises(ValueError, match="worker_ring_mb is"):
            ServeOptions(tmp_path, "cpu", worker_ring_mb=bad)
