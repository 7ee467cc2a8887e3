"""Server settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .codec import DEFAULT_MAX_FRAME, MAX_FRAME_LIMIT, CodecLimits

DEFAULT_PORT = 7700


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the server listens and the limits it enforces."""

    host: str = "127.0.0.1"
    """Address to bind (``0.0.0.0`` for every interface)."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (tests)."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME
    """Largest frame accepted; a bigger one is answered ``too_large`` and the connection closed."""
    max_candidates: int = 4096
    """Most candidates (N) in one infer request; more is answered ``too_large``."""
    max_pending_per_connection: int = 256
    """Requests in flight on one connection before the server stops reading from it."""
    max_in_flight: int = 8192
    """Requests in flight over all connections before new ones are answered ``overloaded``."""
    max_connections: int = 1024
    """Open connections; one more gets one answer (``overloaded`` unless it is a probe)."""
    max_read_buffer_bytes: int = 256 << 20
    """Partly read frames held over all connections; a connection whose next frame does not
    fit waits (stops reading) until earlier frames complete. At least ``max_frame_bytes``."""
    frame_timeout_s: float = 30.0
    """Longest a frame may take to arrive once its first byte has: a client that sends half a
    frame and stalls is dropped."""
    write_timeout_s: float = 30.0
    """Longest the server waits for a client to read its responses once the send buffer to it
    is full: a client that never reads is dropped."""
    drain_s: float = 30.0
    """Graceful shutdown: longest to wait for accepted requests to be answered."""
    admin_token: str | None = field(default=None, repr=False)
    """Token the admin ops (load, unload, reload) must carry; None turns them off."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"ServerConfig.host is {self.host!r}; expected an address")
        _check_int("port", self.port, 0, 65535)
        _check_int("max_frame_bytes", self.max_frame_bytes, 64, MAX_FRAME_LIMIT)
        _check_int("max_candidates", self.max_candidates, 1, 1 << 24)
        _check_int("max_pending_per_connection", self.max_pending_per_connection, 1, 1 << 20)
        _check_int("max_in_flight", self.max_in_flight, 1, 1 << 24)
        _check_int("max_connections", self.max_connections, 1, 1 << 20)
        _check_int("max_read_buffer_bytes", self.max_read_buffer_bytes, self.max_frame_bytes,
                   1 << 40)
        for name in ("frame_timeout_s", "write_timeout_s", "drain_s"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"ServerConfig.{name} is {value!r}; expected seconds > 0")
        if self.admin_token is not None and (not isinstance(self.admin_token, str)
                                             or not self.admin_token):
            raise ValueError("ServerConfig.admin_token must be a non-empty str or None")

    @property
    def codec_limits(self) -> CodecLimits:
        """Unpacking limits derived from these settings."""
        return CodecLimits(max_frame_bytes=self.max_frame_bytes)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"ServerConfig.{name} is {value!r}; expected an int in [{low}, {high}]")
