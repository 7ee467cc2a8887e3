"""``recserve serve``: its options (server limits, engine settings, front-end workers) and
the command itself. Split from ``cli`` to keep each file small; ``cli.main`` dispatches."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .client import DEFAULT_HOST, DEFAULT_PORT
from .codec import DEFAULT_MAX_FRAME
from .config import ServerConfig
from .serve_options import DEFAULTS_NOTE, DEVICE_DEFAULTS, DEVICES, PACK_IN
from .shared_ring import DEFAULT_RING_BYTES


def add_serve(commands, command) -> None:
    """The ``serve`` subcommand and its options."""
    p = command(commands, "serve", "run a server until SIGINT or SIGTERM", """\
Without --model-repo the demo model is built (once) into the cache folder
($XDG_CACHE_HOME/recserve/models, else ~/.cache/recserve/models) and served.
With --model-repo DIR the highest version of every model in DIR is served.
Requests are scored by the batching engine (continuous batching across requests and
connections) on the GPU when torch sees one, else on the CPU; --one-at-a-time scores
them one by one with the reference model instead (a baseline for benchmarks).
Admin ops (load, unload, reload) are on when RECSERVE_ADMIN_TOKEN is set in the
environment; their requests must carry that token.
GPU kernel switches, also from the environment (off unless set; see bench/RESULTS.md for
what each measured): RECSERVE_FUSED_DOT=1 forms a dot model's interaction inside its
gather launch (slower on an H200: 385 us against 320 at B=8192); RECSERVE_FUSED_BOTTOM=1
runs a model's bottom MLP (2 or 3 layers) in one launch (not yet measured);
RECSERVE_PDL=1 launches each kernel while the one before it finishes (no gain on an H100
or an H200);
RECSERVE_TRIAL_CONFIGS=1 also tunes the trial kernel configs (slower start);
RECSERVE_AUTOTUNE=0 takes each kernel's first config untimed (fast start, slower kernels);
RECSERVE_COMPILE_THREADS=N compiles a kernel's tuning candidates on N threads at once
before timing them (default: half the cores, at most 8; 1 compiles them one by one);
RECSERVE_TUNE_BY=graph times the candidates in a CUDA graph instead of eager launches, and
RECSERVE_TUNE_BY=auto only where a launch is too short to time eagerly (small buckets;
graph tuning ran the dlrmv2 forward up to 5% faster at B=512 on an H200, and up to 4%
slower at 8192; auto is not yet measured); both also try cuBLAS for plain layers of few
rows and a long K (not yet measured).

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
                   help="open connections; one more gets one answer (overloaded, unless it "
                   "is a ping or health probe) and is closed (default: %(default)s)")
    p.add_argument("--max-read-buffer-bytes", type=int, default=256 << 20, metavar="BYTES",
                   help="partly read frames held over all connections; a connection whose "
                   "next frame does not fit waits its turn (default: %(default)s = 256 MiB)")
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
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="front-end processes: with W > 1, W worker processes share the port "
                   "(SO_REUSEPORT), decode and validate requests and hand them to this "
                   "process's one engine; limits on connections and requests in flight are "
                   "split among them; 1: one process does all (the lowest latency at low "
                   "load). On an H100 host 4 workers served 1.6x one process; on 2 cores, "
                   "--workers 2 held 2000 requests/s where one process fell behind "
                   "(bench/RESULTS.md) (default: one per 4 cores this process may use, counting "
                   "its affinity and CPU quota, at most 4; so 1 below 8 cores, and with "
                   "--one-at-a-time)")
    p.add_argument("--worker-ring-mb", type=int, default=DEFAULT_RING_BYTES >> 20,
                   metavar="MB",
                   help="with --workers: shared memory per worker through which requests' "
                   "arrays reach the engine process without crossing a socket (memfd: not "
                   "under /dev/shm, so a container's --shm-size does not limit it); a "
                   "request that finds no room travels through the socket instead, and the "
                   "worker logs it once; 0: always through the socket (default: "
                   "%(default)s)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the Prometheus "
                   "endpoint (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", default=7701,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: "
                   "%(default)s; if the port is taken the server logs a warning and serves "
                   "without metrics)")
    p.add_argument("--no-metrics", dest="metrics_port", action="store_const", const=None,
                   help="no Prometheus endpoint")
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
                   "overloaded (priority low: from half of it; high: up to an eighth past "
                   f"it; default: {DEVICE_DEFAULTS['cpu'].max_queued_rows} on cpu, "
                   f"{DEVICE_DEFAULTS['cuda'].max_queued_rows} on cuda)")
    g.add_argument("--fill-wait-ms", type=float, metavar="MS",
                   help="longest a lone request waits for more rows before a partly full "
                   f"batch is sent anyway (default: {DEVICE_DEFAULTS['cpu'].fill_wait_s * 1e3:g}"
                   f" on cpu, {DEVICE_DEFAULTS['cuda'].fill_wait_s * 1e3:g} on cuda)")
    g.add_argument("--aging-ms", type=float, metavar="MS",
                   help="a queued request rises one priority level (low, normal, high) per MS "
                   "of waiting, so low-priority work is delayed, never starved; 0: strict "
                   f"priority (default: {DEVICE_DEFAULTS['cpu'].aging_s * 1e3:g})")
    g.add_argument("--slow-request-ms", type=float, default=1000.0, metavar="MS",
                   help="log each request the engine answers later than MS after it "
                   "arrived, with its model, size, priority, queued time and batches (at "
                   "most 5 lines, then one every 2 s, each counting the ones left out), and "
                   "count them (recserve_slow_requests_total); 0: off (default: %(default)g)")
    g.add_argument("--pack-threads", type=int, metavar="N",
                   help="host threads packing batches for the GPU (default: one per slot, "
                   "at most 4, leaving two of the cores the process may use to the event "
                   "loop and completions; packing bounds "
                   "the engine on a GPU, bench/RESULTS.md has the sweep)")
    g.add_argument("--pack-in", choices=PACK_IN, default="auto",
                   help="where the GPU executor packs batches of requests that lie in "
                   "--workers' shared rings: in its launcher threads, or in one packing "
                   "process per thread, off this process's GIL (needs a GPU and --workers 2 "
                   "or more; give each process a core and about 40 MiB). auto (default): "
                   "process wherever it can run, else thread. On H100 hosts processes kept "
                   "the card about 1.5x as busy as threads with ranking-sized requests and "
                   "0.96-1.15x as busy with 8192-row ones (bench/RESULTS.md); compare on "
                   "yours with bench/engine_gpu.py --variants default,via=ring,"
                   "pack_in=process")
    g.add_argument("--keep-gil", action=argparse.BooleanOptionalAction, default=None,
                   help="the GPU executor makes a batch's CUDA calls (copies, events, graph "
                   "launches) through the CUDA driver and keeps the GIL, instead of through "
                   "torch, which gives it up at each call and may wait up to the switch "
                   "interval to get it back. On by default with a GPU: on an H200 it issued "
                   "a batch in 0.22-0.26 ms instead of 1.0-1.3 and kept the card busier in "
                   "every paired run (bench/RESULTS.md); --no-keep-gil goes back to torch's "
                   "calls (compare on yours with bench/engine_gpu.py --variants "
                   "default,torch_calls)")
    g.add_argument("--compute-streams", type=int, default=1, metavar="N",
                   help="CUDA streams consecutive GPU batches take in turn, up to --slots "
                   "(default: 1; 2 lets one batch's gather run beside the previous batch's "
                   "matrix products: measure it on your card with bench/engine_gpu.py "
                   "--sweep first)")
    g.add_argument("--tuning-cache", metavar="FILE",
                   help="where kernel autotuning picks are kept for the next start on the same "
                   "kind of card, which then skips tuning (a cold start tunes every kernel for "
                   "every bucket: a minute or two; the saving is not yet timed on a card); an "
                   "empty value keeps none (default: $RECSERVE_TUNING_CACHE, else tuning.json "
                   "in the cache folder, ~/.cache/recserve)")
    g.add_argument("--torch-threads", type=int, metavar="N",
                   help="torch intra-op threads of the CPU executor (default: the cores "
                   "torch would use, within the process's CPU limit, less one for the event "
                   "loop and one per --workers process, at least 1: on 2 cores 1 thread "
                   "served about 17%% more than 2)")


def _show(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints"
                                         ) from None


def tuning_cache_path(flag: str | None) -> str:
    """The autotuning cache file for ``--tuning-cache`` (None: not given): the flag, else
    $RECSERVE_TUNING_CACHE, else tuning.json in the cache folder; "" for none."""
    from recserve.kernels.tuning_cache import ENV  # (no torch: the module imports it late)

    if flag is not None:
        return flag
    if ENV in os.environ:
        return os.environ[ENV]
    from .cli import default_cache_dir

    return str(default_cache_dir() / "tuning.json")


def run_serve(args: argparse.Namespace) -> int:
    """Run ``recserve serve``; the exit status."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(host=args.host, port=args.port, max_frame_bytes=args.max_frame_bytes,
                          max_candidates=args.max_candidates, max_in_flight=args.max_in_flight,
                          max_pending_per_connection=args.max_pending_per_connection,
                          max_connections=args.max_connections,
                          max_read_buffer_bytes=args.max_read_buffer_bytes,
                          frame_timeout_s=args.frame_timeout, write_timeout_s=args.write_timeout,
                          drain_s=args.drain_seconds,
                          admin_token=os.environ.get("RECSERVE_ADMIN_TOKEN") or None)
    # torch comes in with the backend: imported only by the commands that need it.
    from .cores import default_workers
    from .serve_options import ServeOptions, engine_settings, resolve_device
    from .serving import serve

    repo = args.model_repo
    if repo is None:
        from recserve.engine.demo import build_demo_repository

        from .cli import default_cache_dir

        repo = default_cache_dir() / "models"
        logging.getLogger("recserve").info("demo model: %s", build_demo_repository(repo))
    from recserve.kernels.tuning_cache import ENV

    os.environ[ENV] = tuning_cache_path(args.tuning_cache)
    device = resolve_device(args.device)
    settings = engine_settings(device, args.max_batch_rows, args.buckets, args.slots,
                               args.max_queued_rows, args.fill_wait_ms, args.aging_ms)
    options = ServeOptions(repo, device, settings, args.one_at_a_time, args.torch_threads,
                           args.metrics_host, args.metrics_port,
                           default_workers(args.one_at_a_time) if args.workers is None
                           else args.workers,
                           args.log_level.upper(), args.pack_threads, args.compute_streams,
                           args.worker_ring_mb, args.pack_in, args.keep_gil,
                           args.slow_request_ms)
    import uvloop  # the event loop is chosen here only, never on import

    return uvloop.run(serve(options, config))
