"""The ``recserve`` command line: serve models, talk to a server, build and import models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .client import DEFAULT_HOST, DEFAULT_PORT, Client
from .codec import DEFAULT_MAX_FRAME
from .config import ServerConfig
from .errors import RecserveError
from .serving import CPU_TORCH_THREADS, DEFAULTS_NOTE, DEVICE_DEFAULTS, DEVICES

DESCRIPTION = """\
recserve serves DLRM-family ranking models over msgpack-on-TCP (the wire contract
is PROTOCOL.md). `recserve serve` runs a server; ping, models and infer talk to one;
demo-model and import-dlrm write model repositories. Run `recserve COMMAND --help`
for a command's options."""

EXAMPLES = """\
examples:
  recserve serve                                   # demo model on 127.0.0.1:7700
  recserve serve --model-repo models --host 0.0.0.0 --port 7700
  recserve ping
  recserve health --ready                          # exit 0 when ready to serve
  recserve models
  recserve infer --demo-candidates 5               # a generated request for "demo"
  recserve infer request.json                      # {"model", "candidates", "inputs"}
  recserve demo-model models
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
    _add_serve(commands)
    for name, help_text in (("ping", "check that a server answers"),
                            ("models", "list a server's models, inputs and outputs")):
        sub = _command(commands, name, help_text)
        _add_connection(sub)
        if name == "models":
            sub.add_argument("--json", action="store_true", help="print the raw response as JSON")
    health = _command(commands, "health", "check a server's health: exit 0 when it is live "
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
    demo = _command(commands, "demo-model", "write the demo model into a repository folder",
                    "example:\n  recserve demo-model models   # writes models/demo/1/")
    demo.add_argument("dir", type=Path, metavar="DIR", help="model repository folder "
                      "(created if missing); the model is written as DIR/demo/1/")
    _add_import(commands)
    return parser


def _command(commands, name: str, help_text: str, epilog: str | None = None):
    return commands.add_parser(name, help=help_text, description=help_text[0].upper() +
                               help_text[1:] + ".", epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_connection(parser: argparse.ArgumentParser, timeout: float = 60.0) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help="server address (default: "
                        "%(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (default: "
                        "%(default)s)")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds to wait for "
                        "the server (default: %(default)s)")


def _add_serve(commands) -> None:
    p = _command(commands, "serve", "run a server until SIGINT or SIGTERM", """\
Without --model-repo the demo model is built (once) into the cache folder
($XDG_CACHE_HOME/recserve/models, else ~/.cache/recserve/models) and served.
With --model-repo DIR the highest version of every model in DIR is served.
Requests are scored by the batching engine (continuous batching across requests and
connections) on the GPU when torch sees one, else on the CPU; --one-at-a-time scores
them one by one with the reference model instead (a baseline for benchmarks).
Admin ops (load, unload, reload) are on when RECSERVE_ADMIN_TOKEN is set in the
environment; their requests must carry that token.

examples:
  recserve serve
  recserve serve --model-repo models --host 0.0.0.0 --max-candidates 1000
  recserve serve --device cpu --max-batch-rows 2048 --buckets 256,1024,2048""")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: "
                   "%(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default: "
                   "%(default)s; 0 picks a free one)")
    p.add_argument("--model-repo", type=Path, metavar="DIR",
                   help="model repository to serve (default: the demo model in the cache)")
    p.add_argument("--max-candidates", type=int, default=4096, metavar="N",
                   help="most candidates per infer request (default: %(default)s)")
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME, metavar="BYTES",
                   help="largest request frame; a bigger one is answered too_large and the "
                   "connection closed (default: %(default)s = 16 MiB)")
    p.add_argument("--max-in-flight", type=int, default=8192, metavar="N",
                   help="requests in flight over all connections before new ones are "
                   "answered overloaded (default: %(default)s)")
    p.add_argument("--max-pending-per-connection", type=int, default=256, metavar="N",
                   help="requests in flight on one connection before the server stops "
                   "reading from it (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="open connections; one more is answered overloaded and closed "
                   "(default: %(default)s)")
    p.add_argument("--frame-timeout", type=float, default=30.0, metavar="S",
                   help="drop a client that sends part of a frame and stalls this long "
                   "(default: %(default)s)")
    p.add_argument("--write-timeout", type=float, default=30.0, metavar="S",
                   help="drop a client that does not read its responses for this long "
                   "(default: %(default)s)")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, wait this long for accepted requests to be "
                   "answered, then exit 0; a second signal exits at once (default: "
                   "%(default)s)")
    p.add_argument("--workers", type=int, default=1, metavar="W",
                   help="front-end processes: with W > 1, W worker processes share the port "
                   "(SO_REUSEPORT), decode and validate requests and hand them to this "
                   "process's one engine; limits on connections and requests in flight are "
                   "split among them (default: %(default)s: one process does all)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the Prometheus "
                   "endpoint (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus "
                   "metrics on this port (default: off)")
    _add_engine(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity on stderr (default: %(default)s)")


def _add_engine(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "how requests are batched and scored; the defaults "
                             "depend on the device (" + DEFAULTS_NOTE + ")")
    g.add_argument("--device", choices=DEVICES, default="auto", help="where to score: auto "
                   "is cuda when torch sees a GPU, else cpu; null scores nothing (zeros, for "
                   "measuring the front end alone) (default: %(default)s)")
    g.add_argument("--one-at-a-time", action="store_true", help="no batching: score each "
                   "request alone with the reference model (benchmark baseline)")
    g.add_argument("--max-batch-rows", type=int, metavar="ROWS",
                   help="most candidate rows in one batch (default: the last bucket)")
    g.add_argument("--buckets", type=_int_tuple, metavar="A,B,...",
                   help="batch sizes a batch is padded up to, ascending (a GPU graph per "
                   f"bucket; default: {_show(DEVICE_DEFAULTS['cpu'].buckets)} on cpu, "
                   f"{_show(DEVICE_DEFAULTS['cuda'].buckets)} on cuda)")
    g.add_argument("--slots", type=int, metavar="K",
                   help=f"batches in flight in the executor (default: "
                   f"{DEVICE_DEFAULTS['cpu'].slots} on cpu, {DEVICE_DEFAULTS['cuda'].slots} "
                   "on cuda)")
    g.add_argument("--max-queued-rows", type=int, metavar="ROWS",
                   help="queued candidate rows above which new requests are answered "
                   f"overloaded (default: {DEVICE_DEFAULTS['cpu'].max_queued_rows} on cpu, "
                   f"{DEVICE_DEFAULTS['cuda'].max_queued_rows} on cuda)")
    g.add_argument("--fill-wait-ms", type=float, metavar="MS",
                   help="longest a lone request waits for more rows before a partly full "
                   f"batch is sent anyway (default: {DEVICE_DEFAULTS['cpu'].fill_wait_s * 1e3:g}"
                   f" on cpu, {DEVICE_DEFAULTS['cuda'].fill_wait_s * 1e3:g} on cuda)")
    g.add_argument("--torch-threads", type=int, metavar="N",
                   help="torch intra-op threads of the CPU executor (default: "
                   f"{CPU_TORCH_THREADS or 'torch decides'})")


def _show(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints"
                                         ) from None


def _add_infer(commands) -> None:
    p = _command(commands, "infer", "score one request and print the scores", """\
The request file is JSON: {"model": "demo", "candidates": 3, "inputs": {...}}
with optional "version" and "deadline_ms"; arrays are plain JSON lists
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
    p.add_argument("--seed", type=int, default=0, help="seed of the generated request "
                   "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print {model, version, scores} as JSON")
    _add_connection(p)


def _add_import(commands) -> None:
    p = _command(commands, "import-dlrm", "convert a DLRM_Net checkpoint into a repository "
                 "entry", """\
STATE_DICT is a state dict saved from the open-source DLRM reference (DLRM_Net:
emb_l.<i>.weight, bot_l.<k>.weight|bias, top_l.<k>.weight|bias), as .pt or
.safetensors. FEATURES.json names what the state dict does not know: feature
names and scopes, the dense inputs, the interaction, the output; its format is in
engine/dlrm_import.py (and the README).

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
    handlers = {"serve": _serve, "health": _health, "ping": _ping, "models": _models,
                "infer": _infer, "demo-model": _demo_model, "import-dlrm": _import_dlrm}
    try:
        return handlers[args.command](args)
    except RecserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ConnectionRefusedError:
        print(f"error: nothing listens on {args.host}:{args.port} "
              "(is `recserve serve` running?)", file=sys.stderr)
    except (OSError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(host=args.host, port=args.port, max_frame_bytes=args.max_frame_bytes,
                          max_candidates=args.max_candidates, max_in_flight=args.max_in_flight,
                          max_pending_per_connection=args.max_pending_per_connection,
                          max_connections=args.max_connections,
                          frame_timeout_s=args.frame_timeout, write_timeout_s=args.write_timeout,
                          drain_s=args.drain_seconds,
                          admin_token=os.environ.get("RECSERVE_ADMIN_TOKEN") or None)
    # torch comes in with the backend: imported only by the commands that need it.
    from .serving import ServeOptions, engine_settings, resolve_device, serve

    repo = args.model_repo
    if repo is None:
        from recserve.engine.demo import build_demo_repository

        repo = default_cache_dir() / "models"
        logging.getLogger("recserve").info("demo model: %s", build_demo_repository(repo))
    device = resolve_device(args.device)
    settings = engine_settings(device, args.max_batch_rows, args.buckets, args.slots,
                               args.max_queued_rows, args.fill_wait_ms)
    options = ServeOptions(repo, device, settings, args.one_at_a_time, args.torch_threads,
                           args.metrics_host, args.metrics_port, args.workers,
                           args.log_level.upper())
    import uvloop  # the event loop is chosen here only, never on import

    return uvloop.run(serve(options, config))


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
