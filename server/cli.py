"""The ``recserve`` command line: serve models, talk to a server, build and import models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .admin_cli import register_admin
from .cli_serve import add_serve, run_serve
from .client import DEFAULT_HOST, DEFAULT_PORT, Client
from .errors import RecserveError
from .inspect_cli import register_inspect
from .tools_cli import add_command, register_tools

DESCRIPTION = """\
recserve serves DLRM-family ranking models over msgpack-on-TCP (the wire contract
is PROTOCOL.md). `recserve serve` runs a server; ping, models and infer talk to one;
load, reload and unload change what it serves (with its admin token); demo-model and
import-dlrm write model repositories, inspect checks a model in one. Run `recserve COMMAND
--help` for a command's options."""

EXAMPLES = """\
examples:
  recserve serve                                   # demo model on 127.0.0.1:7700
  recserve serve --model-repo models --host 0.0.0.0 --port 7700
  recserve ping
  recserve health --ready                          # exit 0 when ready to serve
  recserve models
  recserve infer --demo-candidates 5               # a generated request for "demo"
  recserve infer request.json                      # {"model", "candidates", "inputs"}
  recserve load ctr --version 3                    # hot swap ($RECSERVE_ADMIN_TOKEN)
  recserve demo-model models
  recserve inspect models ctr                      # loads, scores, says what it costs
  recserve import-dlrm dlrm.pt --features features.json --repo models --name ctr"""


def default_cache_dir() -> Path:
    """Where ``serve`` builds the demo model: $XDG_CACHE_HOME/recserve or ~/.cache/recserve."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recserve"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command, with help)."""
    parser = argparse.ArgumentParser(
        prog="recserve", description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve(commands, add_command)
    register_tools(commands)
    register_admin(commands, add_command)
    register_inspect(commands, add_command)
    for name, help_text in (("ping", "check that a server answers"),
                            ("models", "list a server's models, inputs and outputs")):
        sub = add_command(commands, name, help_text)
        _add_connection(sub)
        if name == "models":
            sub.add_argument("--json", action="store_true", help="print the raw response as JSON")
    health = add_command(commands, "health", "check a server's health: exit 0 when it is live "
                         "(with --ready: ready to serve), 1 otherwise", """\
For probes (Docker HEALTHCHECK, Kubernetes liveness and readiness): live means the
server answers; ready means every configured model is loaded and warmed up and the
server is not shutting down.

examples:
  recserve health --port 7700            # liveness
  recserve health --port 7700 --ready    # readiness""")
    health.add_argument("--ready", action="store_true", help="exit 0 only when ready")
    _add_connection(health, timeout=3.0)
    _add_infer(commands)
    demo = add_command(commands, "demo-model", "write the demo model into a repository folder",
                       "example:\n  recserve demo-model models   # writes models/demo/1/")
    demo.add_argument("dir", type=Path, metavar="DIR", help="model repository folder "
                      "(created if missing); the model is written as DIR/demo/1/")
    _add_import(commands)
    return parser


def _add_connection(parser: argparse.ArgumentParser, timeout: float = 60.0) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="server address (default: "
                        "%(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (default: "
                        "%(default)s)")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for "
                        "the server (default: %(default)s)")


def _add_infer(commands) -> None:
    p = add_command(commands, "infer", "score one request and print the scores", """\
The request file is JSON: {"model": "demo", "candidates": 3, "inputs": {...}}
with optional "version", "deadline_ms" and "priority"; arrays are plain JSON lists
(the inputs map is described in PROTOCOL.md and listed by `recserve models`).
Use - to read it from stdin. Or pass --demo-candidates N instead of a file to
send random valid inputs for --model, built from the server's `models` answer.

examples:
  recserve infer --demo-candidates 5
  recserve infer --demo-candidates 300 --model ctr --json
  recserve infer request.json""")
    p.add_argument("request", nargs="?", metavar="REQUEST.json",
                   help="JSON request file (- for stdin)")
    p.add_argument("--demo-candidates", type=int, metavar="N",
                   help="send a generated request with N candidates instead of a file")
    p.add_argument("--model", default="demo", help="model for a generated request "
                   "(default: %(default)s)")
    p.add_argument("--version", type=int, help="model version (default: the highest served, "
                   "or the file's)")
    p.add_argument("--priority", choices=("high", "normal", "low"),
                   help="queued high requests are batched before normal ones, normal before "
                   "low (default: normal, or the file's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated request "
                   "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print {model, version, scores} as JSON")
    _add_connection(p)


def _add_import(commands) -> None:
    p = add_command(commands, "import-dlrm", "convert a DLRM_Net or TorchRec DLRM checkpoint "
                    "into a repository entry", """\
STATE_DICT is a state dict, .pt or .safetensors, saved from the open-source DLRM
reference (DLRM_Net: emb_l.<i>.weight, bot_l.<k>, top_l.<k>) or from TorchRec's
DLRM or DLRM_DCN (torchrec.models.dlrm, as the MLPerf DLRM-v2 reference trains it:
sparse_arch.embedding_bag_collection..., dense_arch, inter_arch, over_arch; told
apart by these names). FEATURES.json names what the state dict does not know:
feature names, their tables (TorchRec) and scopes, the dense inputs, the output;
its formats are in engine/dlrm_import.py and engine/torchrec_import.py.

example:
  recserve import-dlrm dlrm.pt --features features.json --repo models --name ctr""")
    p.add_argument("state_dict", type=Path, metavar="STATE_DICT", help="checkpoint file")
    p.add_argument("--features", type=Path, required=True, metavar="FEATURES.json",
                   help="feature description (JSON)")
    p.add_argument("--repo", type=Path, required=True, metavar="DIR",
                   help="model repository to write into")
    p.add_argument("--name", required=True, help="model name in the repository")
    p.add_argument("--version", type=int, help="version to write (default: one above the "
                   "highest present)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recserve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {"serve": run_serve, "health": _health, "ping": _ping, "models": _models,
                "infer": _infer, "demo-model": _demo_model, "import-dlrm": _import_dlrm}
    try:
        return handlers.get(args.command, getattr(args, "run", None))(args)
    except RecserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: nothing listens on {args.host}:{args.port} "
              "(is `recserve serve` running?)", file=sys.stderr)
    except BrokenPipeError:  # the reader went away (`recserve ... | head`): nothing to say
        sys.stdout = open(os.devnull, "w")  # (so the interpreter's last flush stays quiet)
        return 0
    except (OSError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def _health(args: argparse.Namespace) -> int:
    with Client(args.host, args.port, timeout=args.timeout) as client:
        answer = client.call("health")
    ok = answer["ready"] if args.ready else answer["live"]
    state = "ready" if answer["ready"] else f"live, not ready ({answer.get('reason')})"
    models = ", ".join(f"{m['name']} v{m['version']}" for m in answer.get("models", []))
    print(f"{state}; models: {models or 'none'}")
    return 0 if ok else 1


def _ping(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with Client(args.host, args.port, timeout=args.timeout) as client:
        answer = client.ping()
    took = (time.perf_counter() - start) * 1e3
    print(f"{answer.get('server')} at {args.host}:{args.port}, protocol "
          f"{answer.get('protocol')}, {took:.1f} ms")
    return 0


def _models(args: argparse.Namespace) -> int:
    with Client(args.host, args.port, timeout=args.timeout) as client:
        answer = client.call("models")
    if args.json:
        print(json.dumps({"models": answer["models"], "limits": answer["limits"]}, indent=2))
        return 0
    for model in answer["models"]:
        print(f"{model['name']} version {model['version']}")
        for i in model["inputs"]:
            if i["kind"] == "sparse":
                weighted = ", weighted" if i["weighted"] else ""
                what = (f"ids < {i['rows']} ({i['table']}), bags of up to {i['max_bag']}, "
                        f"{i['pooling']}{weighted}")
            else:
                what = f"dim {i['dim']}"
            print(f"  {i['name']:<20} {i['kind']:<6} {i['scope']:<9} {what}")
        outputs = ", ".join(f"{o['name']} ({o['activation']})" for o in model["outputs"])
        print(f"  outputs: {outputs}")
    limits = answer["limits"]
    print(f"limits: {limits['max_candidates']} candidates, {limits['max_frame_bytes']} "
          "bytes per frame")
    return 0


def _infer(args: argparse.Namespace) -> int:
    if (args.request is None) == (args.demo_candidates is None):
        raise ValueError("give a REQUEST.json file or --demo-candidates N (one of them)")
    with Client(args.host, args.port, timeout=args.timeout) as client:
        request = _read_request(args) if args.request else _generated(client, args)
        if args.priority is not None:
            request["priority"] = args.priority
        start = time.perf_counter()
        answer = client.call(**request)
        took = (time.perf_counter() - start) * 1e3
    from .client import decode_scores

    scores = decode_scores(answer)
    if args.json:
        print(json.dumps({"model": answer["model"], "version": answer["version"],
                          "scores": scores.tolist()}))
        return 0
    print(f"{answer['model']} version {answer['version']}: {len(scores)} candidates "
          f"scored in {took:.1f} ms")
    for i, row in enumerate(scores):
        values = row if scores.ndim == 2 else [row]
        print(f"{i:6d}  " + "  ".join(f"{float(v):.6f}" for v in values))
    return 0


def _read_request(args: argparse.Namespace) -> dict:
    text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text()
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.request} is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ValueError(f"{args.request} must hold a JSON object")
    request = {"op": "infer", **request}
    if args.version is not None:
        request["version"] = args.version
    return request


def _generated(client: Client, args: argparse.Namespace) -> dict:
    import numpy as np

    from .synth import synthetic_inputs

    models = [m for m in client.models() if m["name"] == args.model]
    if args.version is not None:
        models = [m for m in models if m["version"] == args.version]
    if not models:
        raise LookupError(f"the server has no model {args.model!r}"
                          + (f" version {args.version}" if args.version is not None else ""))
    model = max(models, key=lambda m: m["version"])
    inputs = synthetic_inputs(model, args.demo_candidates, np.random.default_rng(args.seed))
    return {"op": "infer", "model": model["name"], "version": model["version"],
            "candidates": args.demo_candidates, "inputs": inputs}


def _demo_model(args: argparse.Namespace) -> int:
    from recserve.engine.demo import build_demo_repository

    print(build_demo_repository(args.dir))
    return 0


def _import_dlrm(args: argparse.Namespace) -> int:
    from recserve.engine.dlrm_import import run_import

    print(run_import(args.state_dict, args.features, args.repo, args.name, args.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
