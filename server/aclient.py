"""``AsyncClient``: asyncio client with many requests in flight on one connection.

Requests are written as they are made; a reader task matches responses to them by
id, in whatever order the server answers. Example::

    client = await AsyncClient.connect("127.0.0.1", 7700)
    scores = await asyncio.gather(*(client.infer("demo", r) for r in requests))
    await client.close()
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np

from .client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    admin_request,
    decode_scores,
    infer_request,
    response_body,
)
from .codec import DEFAULT_MAX_FRAME, HEADER, CodecLimits, decode_message, encode_message
from .errors import RecserveError, TooLarge


class AsyncClient:
    """Pipelined asyncio client; create with ``await AsyncClient.connect(...)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self._reader = reader
        self._writer = writer
        self._limits = CodecLimits(max_frame_bytes=max_frame_bytes)
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self._failure: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                      max_frame_bytes: int = DEFAULT_MAX_FRAME) -> AsyncClient:
        """Open a connection."""
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, max_frame_bytes)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    async def call(self, op: str, **fields: object) -> dict:
        """Send one request; await its response (raises on ``ok: false``)."""
        if self._failure is not None:
            raise self._failure
        rid = self._next_id
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self._writer.write(encode_message({"id": rid, "op": op, **fields}))
            await self._writer.drain()
            return response_body(await future)
        finally:
            self._pending.pop(rid, None)

    async def ping(self) -> dict:
        """Server and protocol version."""
        return await self.call("ping")

    async def models(self) -> list[dict]:
        """Every served model with its inputs and outputs (see PROTOCOL.md)."""
        return (await self.call("models"))["models"]

    async def infer(self, model: str, inputs: dict, candidates: int | None = None,
                    version: int | None = None, deadline_ms: float | None = None,
                    priority: str | None = None) -> np.ndarray:
        """Scores for N candidates: float32 [N], or [N, H] for a model with H outputs."""
        request = infer_request(model, inputs, candidates, version, deadline_ms, priority)
        return decode_scores(await self.call(**request))

    async def load(self, model: str, token: str, version: int | None = None) -> dict:
        """Admin: serve ``version`` (default: the highest) of ``model`` (``Client.load``)."""
        return await self.call(**admin_request("load", model, token, version))

    async def reload(self, model: str, token: str) -> dict:
        """Admin: load a served model's highest version again (``Client.reload``)."""
        return await self.call(**admin_request("reload", model, token))

    async def unload(self, model: str, token: str, version: int | None = None) -> dict:
        """Admin: stop serving ``version`` (default: every one) of ``model``."""
        return await self.call(**admin_request("unload", model, token, version))

    async def _read_loop(self) -> None:
        failure: BaseException = ConnectionError("server closed the connection")
        try:
            while True:
                header = await self._reader.readexactly(HEADER.size)
                (length,) = HEADER.unpack(header)
                if length > self._limits.max_frame_bytes:
                    raise TooLarge(message=f"response frame of {length} bytes is above the "
                                           f"client limit of {self._limits.max_frame_bytes}")
                response = decode_message(await self._reader.readexactly(length), self._limits)
                future = self._pending.get(response.get("id"))
                if future is not None and not future.done():
                    future.set_result(response)
                elif response.get("id") is None and response.get("ok") is False:
                    # Not tied to a request (e.g. too_large before a close): the likely
                    # reason the connection ends, so pending requests get it.
                    try:
                        response_body(response)
                    except RecserveError as exc:
                        failure = exc
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except RecserveError as exc:
            failure = exc
        self._fail_all(failure)

    def _fail_all(self, failure: BaseException) -> None:
        if self._failure is None:  # the first reason the connection ended is the real one
            self._failure = failure
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._failure)

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionError."""
        self._fail_all(ConnectionError("client closed"))
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
