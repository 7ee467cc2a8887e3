"""Python clients: ``Client`` (blocking socket) and, in aclient.py, ``AsyncClient``.

Both send numpy arrays as typed arrays, return scores as numpy float32 arrays, and
raise ``RecserveError`` subclasses (``BadRequest``, ``NotFound``, ...) for error
responses. Example::

    from recserve.server import Client
    with Client("127.0.0.1", 7700) as client:
        scores = client.infer("demo", inputs, candidates=300)   # float32 [300]
"""

from __future__ import annotations

import socket
from collections import deque

import numpy as np

from .codec import DEFAULT_MAX_FRAME, CodecLimits, FrameDecoder, decode_array, decode_message
from .codec import encode_message as encode_frame
from .errors import RecserveError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7700


def infer_request(model: str, inputs: dict, candidates: int | None = None,
                  version: int | None = None, deadline_ms: float | None = None,
                  priority: str | None = None) -> dict:
    """The fields of an infer request (without ``id``); N is guessed when not given.
    ``priority``: "high", "normal" (the server's default) or "low" (PROTOCOL.md)."""
    if candidates is None:
        candidates = guess_candidates(inputs)
    request = {"op": "infer", "model": model, "candidates": int(candidates), "inputs": inputs}
    if version is not None:
        request["version"] = int(version)
    if deadline_ms is not None:
        request["deadline_ms"] = deadline_ms
    if priority is not None:
        request["priority"] = priority
    return request


def admin_request(op: str, model: str, token: str, version: int | None = None) -> dict:
    """The fields of an admin op (``load``, ``reload``, ``unload``; PROTOCOL.md) for
    ``model``: ``token`` is the server's admin token (its RECSERVE_ADMIN_TOKEN)."""
    if op not in ("load", "reload", "unload"):
        raise ValueError(f"{op!r} is not an admin op (load, reload, unload)")
    if op == "reload" and version is not None:
        raise ValueError("reload always takes the repository's highest version; use load "
                         "to serve a given one")
    request = {"op": op, "model": model, "token": token}
    if version is not None:
        request["version"] = int(version)
    return request


def guess_candidates(inputs: dict) -> int:
    """N from the inputs: a candidate-scope sparse ``lengths`` or a 2-D dense array."""
    for value in inputs.values():
        if isinstance(value, dict) and "lengths" in value:
            return len(value["lengths"])
    for value in inputs.values():
        if isinstance(value, np.ndarray) and value.ndim == 2:
            return int(value.shape[0])
        if isinstance(value, list) and value and isinstance(value[0], list):
            return len(value)
    raise ValueError("cannot tell the number of candidates from these inputs "
                     "(no candidate-scope input); pass candidates=N")


def response_body(response: dict) -> dict:
    """The response itself when ``ok``; otherwise raise its typed error."""
    if response.get("ok") is True:
        return response
    error = response.get("error")
    if not isinstance(error, dict):
        raise RecserveError("internal", f"malformed error response: {response!r}")
    raise RecserveError.from_code(error.get("code"), error.get("message", ""))


def decode_scores(body: dict) -> np.ndarray:
    """The ``scores`` of an infer response as a writable float32 array."""
    return np.array(decode_array(body["scores"], "scores", 1 << 31), dtype=np.float32)


class Client:
    """Blocking client over one TCP connection; one request at a time. Not thread-safe."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 timeout: float | None = 60.0, max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._limits = CodecLimits(max_frame_bytes=max_frame_bytes)
        self._decoder = FrameDecoder(max_frame_bytes)
        self._frames: deque[bytearray] = deque()
        self._next_id = 1

    def call(self, op: str, **fields: object) -> dict:
        """Send one request of ``op`` with ``fields``; its response (raises on ``ok: false``)."""
        rid = self._next_id
        self._next_id += 1
        self._sock.sendall(encode_frame({"id": rid, "op": op, **fields}))
        while True:
            response = self._receive()
            if response.get("id") == rid:
                return response_body(response)
            if response.get("id") is None:
                response_body(response)  # an error the server could not tie to a request

    def ping(self) -> dict:
        """Server and protocol version."""
        return self.call("ping")

    def models(self) -> list[dict]:
        """Every served model with its inputs and outputs (see PROTOCOL.md)."""
        return self.call("models")["models"]

    def infer(self, model: str, inputs: dict, candidates: int | None = None,
              version: int | None = None, deadline_ms: float | None = None,
              priority: str | None = None) -> np.ndarray:
        """Scores for N candidates: float32 [N], or [N, H] for a model with H outputs."""
        request = infer_request(model, inputs, candidates, version, deadline_ms, priority)
        return decode_scores(self.call(**request))

    def load(self, model: str, token: str, version: int | None = None) -> dict:
        """Admin: read ``version`` of ``model`` (default: the highest) from the server's
        repository, warm it up and serve it; work already queued finishes on the previous
        version. ``{model, version}``."""
        return self.call(**admin_request("load", model, token, version))

    def reload(self, model: str, token: str) -> dict:
        """Admin: load a served model's highest version again. ``{model, version, previous}``."""
        return self.call(**admin_request("reload", model, token))

    def unload(self, model: str, token: str, version: int | None = None) -> dict:
        """Admin: stop serving ``version`` of ``model`` (default: every version); running
        work finishes. ``{model, unloaded}``."""
        return self.call(**admin_request("unload", model, token, version))

    def _receive(self) -> dict:
        while not self._frames:
            data = self._sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self._frames.extend(self._decoder.feed(data))
            if not self._frames and self._decoder.error is not None:
                raise self._decoder.error
        return decode_message(self._frames.popleft(), self._limits)

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
