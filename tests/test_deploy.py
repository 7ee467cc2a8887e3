"""Dockerfile.cuda and deploy/recserve.yaml agree with the code: every command and flag they
run is one `recserve` accepts, the ports, user and drain times line up. (No Docker engine or
cluster runs in CI; this is what can be checked without one.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recserve.server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile.cuda").read_text()
MANIFEST = (ROOT / "deploy" / "recserve.yaml").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def only(name: str) -> str:
    found = [args for word, args in instructions(DOCKERFILE) if word == name]
    assert len(found) == 1, (name, found)
    return found[0]


def recserve_args(argv: list[str]):
    """Parse a `recserve ...` command line with the real parser (SystemExit if it refuses)."""
    assert argv[0] == "recserve", argv
    return build_parser().parse_args(argv[1:])


def serve_args_docker():
    return recserve_args(json.loads(only("ENTRYPOINT")) + json.loads(only("CMD")))


def test_docker_entrypoint_and_cmd_are_a_valid_serve_command():
    args = serve_args_docker()
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert str(args.model_repo) == "/models"
    assert args.drain_seconds < 10  # docker stop's default grace before SIGKILL


def test_docker_healthcheck_uses_the_health_op():
    healthcheck = only("HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    args = recserve_args(command)
    assert args.command == "health" and args.ready
    assert args.port == serve_args_docker().port
    assert args.timeout <= float(re.search(r"--timeout=(\d+)s", healthcheck).group(1))


def test_docker_runs_as_non_root_and_exposes_the_served_ports():
    words = [word for word, _ in instructions(DOCKERFILE)]
    user = only("USER")
    assert user not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")
    exposed = {int(p) for p in only("EXPOSE").split()}
    args = serve_args_docker()
    assert exposed == {args.port, args.metrics_port}
    runs = "\n".join(a for w, a in instructions(DOCKERFILE) if w == "RUN")
    assert re.search(rf"useradd .*--uid \d+ .*\b{user}\b", runs)


def test_docker_copies_only_what_exists_and_installs_torch_pinned():
    for word, args in instructions(DOCKERFILE):
        if word == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
    assert '"torch==2.13.0"' in DOCKERFILE


def manifest_lists(key: str) -> list[list[str]]:
    """Every JSON-style flow list after ``key:`` in the manifest (args, probe commands)."""
    return [json.loads(m) for m in re.findall(rf"\b{key}:\s*(\[.*?\])", MANIFEST, re.S)]


def manifest_serve_args():
    (args,) = manifest_lists("args")
    return recserve_args(["recserve", "serve", *args])


def test_k8s_container_args_are_a_valid_serve_command():
    args = manifest_serve_args()
    assert args.host == "0.0.0.0" and args.metrics_host == "0.0.0.0"
    ports = {int(p) for p in re.findall(r"containerPort: (\d+)", MANIFEST)}
    assert ports == {args.port, args.metrics_port}
    assert f'prometheus.io/port: "{args.metrics_port}"' in MANIFEST


def test_k8s_probes_use_the_health_op():
    commands = [c for c in manifest_lists("command") if c[0] == "recserve"]
    parsed = [recserve_args(c) for c in commands]
    assert len(parsed) == 3 and all(p.command == "health" for p in parsed)
    assert sorted(p.ready for p in parsed) == [False, False, True]
    assert {p.port for p in parsed} == {manifest_serve_args().port}
    readiness = MANIFEST.split("readinessProbe:", 1)[1].split("Probe:", 1)[0]
    assert "--ready" in readiness


def test_k8s_grace_period_covers_the_pre_stop_pause_and_the_drain():
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", MANIFEST).group(1))
    pause = [c for c in manifest_lists("command") if c[0] == "sleep"]
    assert len(pause) == 1
    assert grace > int(pause[0][1]) + manifest_serve_args().drain_seconds


def test_k8s_gpu_user_and_service_agree_with_the_image():
    assert re.search(r"nvidia\.com/gpu: 1\b", MANIFEST)
    uid = re.search(r"--uid (\d+)", DOCKERFILE).group(1)
    assert f"runAsUser: {uid}" in MANIFEST and "runAsNonRoot: true" in MANIFEST
    assert MANIFEST.count("kind: Deployment") == 1 and MANIFEST.count("kind: Service") == 1
    assert "targetPort: rpc" in MANIFEST and "{name: rpc, containerPort:" in MANIFEST


def test_k8s_manifest_structure_when_yaml_is_available():
    yaml = pytest.importorskip("yaml")  # not a project dependency; checked where present
    deployment, service = yaml.safe_load_all(MANIFEST)
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert recserve_args(container[probe]["exec"]["command"]).command == "health"


def test_the_several_gpus_recipe_is_a_valid_serve_command_per_gpu():
    """deploy/README's one-server-per-GPU loop: each server's command parses, with ports
    and metrics ports of its own."""
    import shlex

    readme = (ROOT / "deploy" / "README.md").read_text()
    block = readme.split("## Several GPUs on one host", 1)[1].split("```", 2)[1]
    command = re.search(r"(recserve serve .*?)&", block.replace("\\\n", " "), re.S).group(1)
    ports = set()
    for i in range(4):
        line = re.sub(r"\$\(\((\d+)\+i\)\)", lambda m, i=i: str(int(m.group(1)) + i), command)
        args = recserve_args(shlex.split(line))
        assert args.command == "serve" and args.host == "0.0.0.0"
        ports |= {args.port, args.metrics_port}
    assert len(ports) == 8
