"""The control plane: ``health`` and ``stats`` for probes and dashboards, and the admin ops
``load`` / ``unload`` / ``reload`` that change the served models.

Admin ops carry a ``token`` that must equal ``ServerConfig.admin_token`` (compared in
constant time); without a configured token they are off and always ``unauthorized``.
Loads read the model repository the server was started with, build and warm the model
off the event loop, then swap it in (``Engine.load``: batches in flight finish on the old
version). One admin op runs at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path
from typing import Any

from recserve.engine import VERSION

from .dispatch import Dispatcher, Op, Request
from .errors import BadRequest, NotFound, Unauthorized


class Control:
    """Health, stats and admin ops of one server; ``install`` adds them to its dispatcher."""

    def __init__(self, dispatcher: Dispatcher, repository: Path | None = None,
                 monitor: Any = None) -> None:
        self.dispatcher = dispatcher
        self.repository = repository
        """Model repository the admin ops load from (None: they answer bad_request)."""
        self.monitor = monitor
        """A started ``engine.monitor.GpuMonitor`` (or None); read, never sampled, here."""
        self.not_ready: str | None = "models are loading"
        """Why the server is not ready (None once every configured model is loaded)."""
        self.started = time.time()
        self._lock = asyncio.Lock()

    def install(self) -> Control:
        """Register the ops with the dispatcher."""
        d = self.dispatcher
        d.immediate[Op.HEALTH] = self.health
        d.immediate[Op.STATS] = self.stats
        d.tasks.update({Op.LOAD: self.load, Op.UNLOAD: self.unload, Op.RELOAD: self.reload})
        return self

    def health(self, message: dict) -> dict:
        """``{live, ready, reason, models}``: live whenever it answers; ready when every
        configured model is loaded and warmed and the server is not shutting down."""
        served = self.dispatcher.backend.models()
        reason = self.not_ready
        if self.dispatcher.draining:
            reason = "shutting down"
        elif reason is None and not served:
            reason = "no models are served"
        return {"live": True, "ready": reason is None, "reason": reason or "",
                "models": [{"name": h.name, "version": h.version} for h in served]}

    def stats(self, message: dict) -> dict:
        """Body of a ``stats`` response: ``{stats: snapshot()}``."""
        return {"stats": self.snapshot()}

    def snapshot(self, server: dict | None = None) -> dict:
        """Server, engine and GPU counters (PROTOCOL.md, ``stats``); no device call is made.
        ``server`` replaces this process's server part (the multi-process front end)."""
        d = self.dispatcher
        now = time.time()
        backend_stats = getattr(d.backend, "stats", None)
        gpu = self.monitor.snapshot().to_dict() if self.monitor is not None else {
            "available": False, "reason": "no GPU monitor", "time": now, "gpus": []}
        if server is None:
            server = d.server_stats()
        return {"time": now, "uptime_s": now - self.started, "version": VERSION,
                "server": server, "engine": backend_stats() if backend_stats else {},
                "gpu": gpu}

    async def load(self, message: dict, request: Request) -> dict:
        """Load a version (default: the repository's highest) and make it the serving one."""
        self._authorize(message)
        name, version = _name_version(message)
        async with self._lock:
            loaded = await self._load(name, version)
        request.model = name
        return {"model": name, "version": loaded}

    async def reload(self, message: dict, request: Request) -> dict:
        """Load a served model's highest version from the repository again."""
        self._authorize(message)
        name, _ = _name_version(message)
        async with self._lock:
            previous = self.dispatcher.backend.resolve(name, None).version
            loaded = await self._load(name, None)
        request.model = name
        return {"model": name, "version": loaded, "previous": previous}

    async def unload(self, message: dict, request: Request) -> dict:
        """Stop serving one version (or every version) of a model; running work finishes."""
        self._authorize(message)
        name, version = _name_version(message)
        backend = self.dispatcher.backend
        async with self._lock:
            before = {h.version for h in backend.models() if h.name == name}
            _admin(backend, "unload")(name, version)
            after = {h.version for h in backend.models() if h.name == name}
        request.model = name
        return {"model": name, "unloaded": sorted(before - after)}

    def _authorize(self, message: dict) -> None:
        expected = self.dispatcher.config.admin_token
        if expected is None:
            raise Unauthorized(message="admin ops are off: the server was started without "
                                       "RECSERVE_ADMIN_TOKEN")
        token = message.get("token")
        given = token.encode() if isinstance(token, str) else b""
        if not hmac.compare_digest(given, expected.encode()):
            raise Unauthorized(message="token does not match the server's admin token")

    async def _load(self, name: str, version: int | None) -> int:
        from recserve.engine.repository import ModelNotFoundError, ModelRepository

        from .serving import warm_up

        backend = self.dispatcher.backend
        load = _admin(backend, "load")
        if self.repository is None:
            raise BadRequest(message="this server has no model repository to load from")
        try:
            loaded = await asyncio.to_thread(ModelRepository(self.repository).load, name,
                                             version)
        except ModelNotFoundError as exc:
            raise NotFound(message=str(exc)) from None
        except (OSError, ValueError) as exc:
            raise BadRequest(message=f"cannot read {name} from the repository: {exc}") from None
        await load(loaded)
        await warm_up(backend, loaded.name, int(loaded.version))
        return int(loaded.version)


def _admin(backend: Any, method: str) -> Any:
    """The backend's ``load`` / ``unload``; ``BadRequest`` for a backend without them."""
    fn = getattr(backend, method, None)
    if fn is None:
        raise BadRequest(message=f"{method} needs the batching engine; this server scores "
                                 "one request at a time (--one-at-a-time)")
    return fn


def _name_version(message: dict) -> tuple[str, int | None]:
    name, version = message["model"], message.get("version")
    if not isinstance(name, str) or not name:
        raise BadRequest(message=f"model is {name!r}; expected a model name (str)")
    if version is not None and (type(version) is not int or version < 0):
        raise BadRequest(message=f"version is {version!r}; expected a non-negative int")
    return name, version

