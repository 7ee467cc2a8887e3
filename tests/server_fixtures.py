"""Helpers for the server tests: small models, a server on its own thread, a raw socket,
`recserve serve` as a real process and a client keeping it busy."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest

from recserve.engine.demo import demo_request, demo_spec
from recserve.engine.inputs import RequestInputs, collate
from recserve.engine.reference import ReferenceModel
from recserve.engine.spec import DenseFeature, Interaction, ModelSpec, Output, SparseFeature, Table
from recserve.engine.weights import init_weights
from recserve.server.app import Server
from recserve.server.codec import encode_message
from recserve.server.config import ServerConfig


def small_spec() -> ModelSpec:
    """Every input form: weighted and plain sparse of both scopes, dense of both scopes."""
    return ModelSpec(
        name="small",
        tables=(Table("items", 50, 8), Table("users", 30, 8), Table("tags", 10, 8)),
        sparse=(SparseFeature("user", "users", "sum", "request"),
                SparseFeature("history", "items", "mean", "request", max_bag=6, weighted=True),
                SparseFeature("item", "items", "sum", "candidate"),
                SparseFeature("tags", "tags", "mean", "candidate", max_bag=3, weighted=True)),
        dense=(DenseFeature("ctx", 2, "request"), DenseFeature("feat", 3, "candidate")),
        bottom_mlp=(8,), interaction=Interaction("dot"), top_mlp=(6, 1))


def multi_spec() -> ModelSpec:
    """Two outputs (scores come back [N, 2]), cat interaction, no dense inputs."""
    return ModelSpec(
        name="multi", tables=(Table("items", 40, 4),),
        sparse=(SparseFeature("seen", "items", "sum", "request", max_bag=4),
                SparseFeature("item", "items", "sum", "candidate")),
        interaction=Interaction("cat"), top_mlp=(5, 2),
        outputs=(Output("click"), Output("watch_time", "logit")))


def two_version_repo(root):
    """A model repository at ``root`` holding ``small_spec`` versions 1 and 2 (weights
    seeded by version, so their scores differ); ``root``."""
    from recserve.engine.repository import save_model

    spec = small_spec()
    for version in (1, 2):
        save_model(root, spec, init_weights(spec, seed=version), version=version)
    return root


def loaded(spec: ModelSpec, version: int = 1, seed: int = 0) -> SimpleNamespace:
    """What the backend takes: name, version, spec, weights."""
    return SimpleNamespace(name=spec.name, version=version, spec=spec,
                           weights=init_weights(spec, seed=seed))


def reference_scores(model: SimpleNamespace, inputs: RequestInputs) -> np.ndarray:
    """Scores straight from the reference model ([N] for one output)."""
    scores = ReferenceModel(model.spec, model.weights).forward(collate(model.spec, [inputs]))
    scores = scores.numpy()
    return scores[:, 0] if scores.shape[1] == 1 else scores


LOOPS = ["asyncio", "uvloop"]


class ServerThread:
    """A real server on 127.0.0.1 (ephemeral port) with its event loop on a thread.

    ``loop``: "asyncio" (the standard loop) or "uvloop" (the one the CLI installs).
    """

    def __init__(self, backend: object, loop: str = "asyncio", setup: object = None,
                 **config: object) -> None:
        if loop == "uvloop":  # what ``recserve serve`` runs on
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.server = Server(backend, ServerConfig(port=0, **config))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        if setup is not None:  # a coroutine function to run on the loop first
            self.run(setup())
        self.run(self.server.start())
        self.host, self.port = self.server.address

    def run(self, coro: object, timeout: float = 30.0) -> object:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Close the server and its loop (again: nothing)."""
        if self.loop.is_closed():
            return
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RawConnection:
    """A bare socket speaking frames, for requests no well-behaved client would send."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send_payload(self, payload: bytes) -> None:
        """One frame around ``payload`` (any bytes)."""
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def send(self, message: object) -> None:
        """One frame holding ``message`` packed as msgpack (numpy arrays as typed arrays)."""
        self.send_payload(encode_message(message)[4:])

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def receive(self) -> dict:
        """The next response."""
        (length,) = struct.unpack(">I", self._read(4))
        return msgpack.unpackb(self._read(length), raw=False)

    def is_closed_by_peer(self) -> bool:
        """True once the server has closed its end (reads hit EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def start_serve(repo, *args: str, env: dict | None = None):
    """`recserve serve` on a free port; (process, port) once ready; stderr keeps draining
    into ``process.log`` (``process.reader`` is the thread doing it). One process unless
    ``args`` say ``--workers`` (the default depends on the machine's cores)."""
    proc = subprocess.Popen([sys.executable, "-m", "recserve.server.cli", "serve", "--port", "0",
                             "--device", "cpu", "--model-repo", str(repo), "--workers", "1",
                             *args],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines, port = [], None
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        port = int(match.group(1)) if match else port
        if port is not None and "ready: every model is loaded" in line:
            break
    else:
        proc.wait()
        pytest.fail("serve exited before it was ready:\n" + "".join(lines))
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    proc.log = lines  # type: ignore[attr-defined]
    proc.reader = reader  # type: ignore[attr-defined]
    return proc, port


def demo_requests(count: int, seed: int, n: int = 300) -> list[dict]:
    """``count`` infer requests for the demo model, ``n`` candidates each."""
    spec, rng = demo_spec(), np.random.default_rng(seed)
    return [{"id": i, "op": "infer", "model": "demo", "candidates": n,
             "inputs": demo_request(spec, rng, n)} for i in range(count)]


class Sender(threading.Thread):
    """Keeps ``depth`` requests in flight on one connection until the server closes it."""

    def __init__(self, port: int, seed: int, depth: int = 6) -> None:
        super().__init__(daemon=True)
        self.conn = RawConnection(port, timeout=30)
        self.pool = demo_requests(16, seed)
        self.depth = depth
        self.sent: dict[int, float] = {}  # id -> when it was written
        self.answers: dict[int, str] = {}
        self.closed_at: float | None = None

    def run(self) -> None:
        rid = 0
        try:
            while True:
                while len(self.sent) - len(self.answers) < self.depth:
                    rid += 1
                    message = dict(self.pool[rid % len(self.pool)], id=rid)
                    self.sent[rid] = time.monotonic()
                    self.conn.send(message)
                answer = self.conn.receive()
                self.answers[answer["id"]] = "ok" if answer["ok"] else answer["error"]["code"]
        except OSError:  # ConnectionError included: the server closed the connection
            self.closed_at = time.monotonic()
            self.conn.close()


def sigterm_under_load(proc, senders: list[Sender]) -> float:
    """Start ``senders``, SIGTERM ``proc`` once each has 5 answers, and check it exits 0
    with the senders done; when the signal was sent (``time.monotonic``)."""
    for s in senders:
        s.start()
    assert wait_for(lambda: all(len(s.answers) >= 5 for s in senders))
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    for s in senders:
        s.join(30)
    return signalled
