"""Starting one front-end worker process for the hub: its share of the limits, its
channel socket and its shared ring, passed at spawn (no names, nothing left behind)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
import subprocess
import sys

from recserve.engine.shared_memory import SharedMemory

from .config import ServerConfig

log = logging.getLogger("recserve.server")


def worker_config(config: ServerConfig, port: int, workers: int) -> ServerConfig:
    """One worker's settings: the hub's, on its reserved port, with the connection,
    in-flight and read-buffer limits split among ``workers`` (admin ops go to the hub)."""
    share = lambda value: max(1, math.ceil(value / workers))  # noqa: E731
    return dataclasses.replace(
        config, port=port, admin_token=None,
        max_connections=share(config.max_connections),
        max_in_flight=share(config.max_in_flight),
        max_read_buffer_bytes=max(config.max_frame_bytes, share(config.max_read_buffer_bytes)))


def new_ring(ring_bytes: int) -> SharedMemory | None:
    """A fresh shared ring for a worker being started (nothing of a dead one's), mapped
    read-only here; None when rings are off or the memory cannot be had (the worker then
    sends requests through its socket)."""
    if not ring_bytes:
        return None
    try:
        return SharedMemory(ring_bytes, "recserve-channel", writable=False)
    except OSError as exc:
        log.warning("no shared ring for a worker (%s): its requests go through its socket",
                    exc)
        return None


def launch(config: ServerConfig, log_level: str, ring_bytes: int
           ) -> tuple[subprocess.Popen, socket.socket, SharedMemory | None]:
    """Start ``python -m recserve.server.worker``: (the process, this side's channel
    socket, its ring or None)."""
    ours, theirs = socket.socketpair()
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    settings = {"channel_fd": theirs.fileno(), "config": fields, "log_level": log_level,
                "ring_fd": None, "ring_bytes": 0}
    ring = new_ring(ring_bytes)
    if ring is not None:
        settings.update(ring_fd=ring.fd, ring_bytes=ring_bytes)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recserve.server.worker", json.dumps(settings)],
            pass_fds=[theirs.fileno()] + ([] if ring is None else [ring.fd]))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours, ring
