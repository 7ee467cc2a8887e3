"""The admin commands: ``recserve load``, ``reload`` and ``unload`` change what a running
server serves (PROTOCOL.md, admin ops), reading models from the repository it was started
with. They need its admin token: ``RECSERVE_ADMIN_TOKEN`` (the variable the server reads) or
``--token-file``, never a flag's value, which other users of the host see in ``ps``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .client import DEFAULT_HOST, DEFAULT_PORT, Client

TOKEN_ENV = "RECSERVE_ADMIN_TOKEN"
LOAD_TIMEOUT_S = 600.0
"""A load builds and warms the model up (on a GPU: a CUDA graph per slot and bucket, and
autotuning on a cold cache), so the default wait is long."""

EPILOG = """\
The server must have been started with RECSERVE_ADMIN_TOKEN set; give the same token
here, in RECSERVE_ADMIN_TOKEN or a file (--token-file). A new version swaps in while
requests already queued or running finish on the previous one, which is then freed; a
version that fails to load leaves the previous one serving, and says why.

examples:
  export RECSERVE_ADMIN_TOKEN=...    # the server's token
  recserve load ctr                  # the repository's highest version of ctr
  recserve load ctr --version 3      # a given version (rolling back, say)
  recserve reload ctr                # the highest version, read from disk again
  recserve unload ctr --version 2    # stop serving one version (default: every one)"""


def register_admin(commands, add_command) -> None:
    """Add ``load``, ``reload`` and ``unload`` to the ``recserve`` subcommands."""
    helps = {"load": "serve a model version from the server's repository (hot swap)",
             "reload": "load a served model's highest version again, from disk",
             "unload": "stop serving a model version (default: every version)"}
    for op, help_text in helps.items():
        p = add_command(commands, op, help_text, EPILOG)
        p.add_argument("model", metavar="MODEL", help="model name")
        if op != "reload":
            p.add_argument("--version", type=int, help="model version (default: "
                           + ("the repository's highest)" if op == "load" else "every one)"))
        p.add_argument("--token-file", type=Path, metavar="FILE",
                       help=f"read the admin token from FILE (default: ${TOKEN_ENV})")
        p.add_argument("--host", default=DEFAULT_HOST, help="server address (default: "
                       "%(default)s)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help="server port (default: "
                       "%(default)s)")
        p.add_argument("--timeout", type=float, default=LOAD_TIMEOUT_S,
                       help="seconds to wait for the answer (default: %(default)s: a load "
                       "warms the model up)")
        p.set_defaults(run=_run_admin, op=op)


def admin_token(token_file: Path | None, environ: dict | None = None) -> str:
    """The admin token: ``token_file``'s content (stripped) or ``$RECSERVE_ADMIN_TOKEN``;
    ValueError, saying what to set, when there is none."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"{token_file} is empty; it should hold the server's admin token")
        return token
    token = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
    if not token:
        raise ValueError(f"admin ops need the server's admin token: set {TOKEN_ENV} to the "
                         "value the server was started with, or pass --token-file FILE")
    return token


def _run_admin(args: argparse.Namespace) -> int:
    token = admin_token(args.token_file)
    version = getattr(args, "version", None)
    start = time.perf_counter()
    with Client(args.host, args.port, timeout=args.timeout) as client:
        if args.op == "load":
            answer = client.load(args.model, token, version)
        elif args.op == "reload":
            answer = client.reload(args.model, token)
        else:
            answer = client.unload(args.model, token, version)
    took = time.perf_counter() - start
    print(describe(args.op, answer, took))
    return 0


def describe(op: str, answer: dict, took_s: float) -> str:
    """One line saying what an admin op did."""
    model = answer["model"]
    if op == "unload":
        versions = answer["unloaded"]
        if not versions:
            return f"{model}: no version was served, nothing unloaded"
        return (f"{model}: version{'s' if len(versions) > 1 else ''} "
                f"{', '.join(map(str, versions))} unloaded")
    previous = answer.get("previous")
    was = f" (was version {previous})" if previous is not None else ""
    return f"{model} version {answer['version']} is served{was}; {op}ed in {took_s:.1f} s"
