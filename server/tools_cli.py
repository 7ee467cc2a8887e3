"""The watching tools' commands: ``recserve top`` and ``recserve bench load``.

``register_tools(commands)`` adds them to the ``recserve`` parser; each sets
``args.run`` to its handler. Nothing heavy is imported until a command runs (every
``recserve`` invocation builds the whole parser). ``bench load`` runs ``bench/load.py``
of the source checkout (the bench folder is not part of the installed package).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .client import DEFAULT_HOST, DEFAULT_PORT

MAX_DURATION_S = 3600.0
LOAD_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "load.py"


def add_command(commands, name: str, help_text: str,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A ``recserve`` subcommand parser: ``help_text`` is its one-line help and, capitalised,
    its description; ``epilog`` (examples) keeps its line breaks. Every command uses it."""
    return commands.add_parser(name, help=help_text, description=help_text[0].upper()
                               + help_text[1:] + ".", epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def register_tools(commands) -> None:
    """Add ``top`` and ``bench load`` to the ``recserve`` subcommands."""
    top = add_command(commands, "top", "watch a running server: requests/s, latency, batches, "
                      "queue, errors, GPU", """\
Polls the server's stats op every --interval seconds; rates and percentiles are for
the last interval. Ctrl-C quits.

examples:
  recserve top
  recserve top --port 7700 --interval 2
  recserve top --once            # one frame (two polls --interval apart), then exit
  recserve top --once --json     # the same as one line of JSON (with the raw stats)""")
    top.add_argument("--host", default=DEFAULT_HOST, help="server address (default: "
                     "%(default)s)")
    top.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (default: "
                     "%(default)s)")
    top.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                     help="seconds between polls (default: %(default)s)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true", help="print each interval as one line of "
                     "JSON ({summary, stats}: the rates and percentiles shown, and the "
                     "server's stats answer) instead of the live view")
    top.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the "
                     "server (default: %(default)s)")
    top.set_defaults(run=_run_top)
    bench = commands.add_parser("bench", help="benchmarks against a server",
                                description="Benchmarks against a server.")
    kinds = bench.add_subparsers(dest="bench", metavar="KIND", required=True)
    load = add_command(kinds, "load", "offer ranking traffic to a server and report throughput "
                       "and latency percentiles", LOAD_EXAMPLES)
    add_load_arguments(load)
    load.set_defaults(run=_run_load)


LOAD_EXAMPLES = """\
Closed loop: --concurrency C keeps C requests in flight. Open loop: --rate R sends
Poisson arrivals at R requests/s; latency counts from each request's intended send
time, so a server that falls behind shows its queue (no coordinated omission).
Requests are the DESIGN.md `ranking` workload (N candidates from 100..700) for
--model, built from the server's `models` answer, with Zipf or uniform ids.

examples:
  recserve bench load --concurrency 1,8,32 --duration 5
  recserve bench load --rate 50,100,200 --json out.json --csv out.csv
  recserve bench load --start --baseline --serve-args "--device cpu" \\
      --concurrency 1,4,16,64 --plot p99.png"""


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1]")
    return value


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``recserve bench load`` (and of ``python bench/load.py``)."""
    p.add_argument("--host", default=DEFAULT_HOST, help="server address (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (default: "
                   "%(default)s)")
    p.add_argument("--start", action="store_true", help="start a `recserve serve` on a free "
                   "loopback port for the run (the demo model unless --model-repo)")
    p.add_argument("--baseline", action="store_true", help="also start a --one-at-a-time "
                   "server and run the same loads against it (implies --start)")
    p.add_argument("--serve-args", default="", metavar="ARGS", help="extra `recserve serve` "
                   "flags for started servers, e.g. \"--device cpu --workers 2\"")
    p.add_argument("--model-repo", type=Path, metavar="DIR", help="repository for started "
                   "servers (default: the demo model in a temporary folder)")
    p.add_argument("--model", default="demo", help="model to score (default: %(default)s)")
    p.add_argument("--concurrency", type=_int_list, default=None, metavar="C,C,...",
                   help="closed-loop runs, one per value (default: 1,8,32 unless --rate)")
    p.add_argument("--rate", type=_float_list, default=None, metavar="R,R,...",
                   help="open-loop runs at these requests/s (Poisson arrivals)")
    p.add_argument("--duration", type=_duration, default=5.0, metavar="S",
                   help="seconds of sending per run (default: %(default)s)")
    p.add_argument("--max-requests", type=_positive_int, default=100_000, metavar="N",
                   help="most requests sent per run (default: %(default)s)")
    p.add_argument("--ids", choices=("zipf", "uniform"), default="zipf",
                   help="sparse id distribution (default: %(default)s, alpha 1.15)")
    p.add_argument("--requests", type=_positive_int, default=256, metavar="K",
                   help="distinct requests, encoded once and cycled (default: %(default)s)")
    p.add_argument("--connections", type=_positive_int, default=4, metavar="K",
                   help="client connections per run (default: %(default)s)")
    p.add_argument("--high-share", type=_share, default=0.0, metavar="F",
                   help="send this fraction of requests with priority high and the rest "
                   "with priority low (interactive traffic over background), and report "
                   "latency per priority (default: %(default)s: no priority sent)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every run as JSON")
    p.add_argument("--csv", type=Path, metavar="PATH", help="write one CSV row per run")
    p.add_argument("--plot", type=Path, metavar="PNG", help="plot p99 latency against "
                   "throughput (needs matplotlib: pip install 'recserve[plot]')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def _duration(text: str) -> float:
    value = _positive(text)
    if value > MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_DURATION_S:g} s per run")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [_positive(part) for part in text.split(",")]


def _run_top(args: argparse.Namespace) -> int:
    from .top import run_top

    return run_top(args)


def load_module():
    """``bench/load.py`` of the source checkout, imported by path."""
    if not LOAD_SCRIPT.exists():
        raise ValueError(f"recserve bench load runs {LOAD_SCRIPT}, which this installation "
                         "lacks; run it from a source checkout (pip install -e .)")
    name = "recserve_bench_load"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LOAD_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run_load(args: argparse.Namespace) -> int:
    return load_module().run(args)
