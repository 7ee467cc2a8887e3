"""asyncio adapter: bytes in, frames to the session, responses out, with backpressure.

No business logic: frames are cut and unpacked by the codec, requests handled by a
``dispatch.Session``. Backpressure: a connection with ``max_pending_per_connection``
requests unanswered, or whose transport is above its write high-water mark
(``pause_writing``), stops handing frames to the session and stops reading, so a
client that floods requests or never reads its responses cannot make the server
buffer without bound. ``timed_out`` (polled by the server) tells a connection that has
sat on half a frame, or on a full send buffer, for too long.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

from .codec import CodecLimits, FrameDecoder, decode_message, encode_message
from .dispatch import Dispatcher, Session, error_response
from .errors import InternalError, RecserveError
from .writes import TurnWriter

log = logging.getLogger("recserve.server")

PROBES = ("ping", "health")  # ops answered even over the connection limit
QUIET_S = 0.5  # on shutdown, a connection silent this long is closed at once


class ReadBudget:
    """Bytes of partly read frames over all connections, bounded.

    A connection reserves a frame's whole length as soon as its header arrives and gives it
    back when the frame is complete; one that cannot reserve stops reading (holding no
    more than what already arrived) until earlier frames finish and it is woken in turn.
    Holders always have their whole frame reserved, so they complete: no deadlock. (A
    waiting connection is not reading, so a client that leaves while waiting is noticed,
    and its place released, when its turn comes.)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[ServerProtocol] = deque()

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes if they fit (and nobody is queued before)."""
        if self.used + size > self.limit or self._waiting:
            return False
        self.used += size
        return True

    def wait(self, protocol: ServerProtocol) -> None:
        """Queue a connection that could not reserve its frame."""
        self._waiting.append(protocol)

    def give(self, size: int) -> None:
        """Return a reservation and wake waiting connections that now fit, in order."""
        self.used -= size
        while self._waiting:
            head = self._waiting[0]
            need = head.waiting_for or 0
            if self.used + need > self.limit:
                break
            self._waiting.popleft()
            self.used += need
            head.reserved(need)

    @property
    def waiting(self) -> int:
        """Connections waiting for budget."""
        return len(self._waiting)

    def forget(self, protocol: ServerProtocol) -> None:
        """A waiting connection went away."""
        if protocol in self._waiting:
            self._waiting.remove(protocol)
            self.give(0)


class ServerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, dispatcher: Dispatcher, limits: CodecLimits, max_pending: int,
                 on_lost: Callable[[ServerProtocol], None] | None = None,
                 refuse: RecserveError | None = None,
                 budget: ReadBudget | None = None) -> None:
        self._dispatcher = dispatcher
        self._budget = budget
        self._reservation = 0  # bytes of the budget held for the frame being read
        self.waiting_for: int | None = None
        """Length of the frame this connection waits to reserve budget for."""
        # The server is full: answer one probe (ping, health) or else this error, then close.
        self._refuse = refuse
        self._limits = limits
        self._max_pending = max_pending
        self._on_lost = on_lost
        self._decoder = FrameDecoder(limits.max_frame_bytes)
        self._session: Session | None = None
        self._transport: asyncio.Transport | None = None
        self._write_paused = False
        self._read_paused = False
        self._closing = False
        self._processing = False
        # Frames cut from received bytes but not yet handled: at most what arrived
        # before reading paused, since reading pauses while this is not empty.
        self._backlog: deque[bytearray] = deque()
        self._partial_since: float | None = None  # monotonic time a partial frame began
        self._blocked_since: float | None = None  # monotonic time writing was paused
        self._last_data = time.monotonic()  # when bytes last arrived
        self._writes = TurnWriter()  # responses that finish together leave in one syscall

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check.
        self._transport = transport  # type: ignore[assignment]
        self._writes.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Responses are single small writes; Nagle would hold them back ~40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._session = Session(self._dispatcher, self._send)
        if self._refuse is not None:
            self._partial_since = time.monotonic()  # the frame timeout drops a silent one

    def data_received(self, data: bytes) -> None:
        self._last_data = time.monotonic()
        if self._closing or self._session is None:
            return
        frames = self._decoder.feed(data)
        self._backlog.extend(frames)
        if self._budget is not None:
            self._account(bool(frames))
        if self._refuse is not None:
            self._probe_only()
            return
        if not self._decoder.buffered:
            self._partial_since = None
        elif self._partial_since is None:
            self._partial_since = time.monotonic()
        self._process()
        if self._decoder.error is not None:
            # The rest of the stream cannot be framed any more: answer, then close.
            self._session.reject(self._decoder.error)
            self.close()

    def _account(self, completed: bool) -> None:
        """Hold budget for the frame now being read (its header has arrived)."""
        budget = self._budget
        if completed and self._reservation:  # frames finish in order: ours was among them
            budget.give(self._reservation)
            self._reservation = 0
        need = self._decoder.expecting
        if need is None or self._reservation or self.waiting_for is not None:
            return
        if budget.take(need):
            self._reservation = need
        else:
            self.waiting_for = need
            budget.wait(self)
            self._update_reading()

    def reserved(self, size: int) -> None:
        """The budget woke this connection with ``size`` bytes reserved: read on."""
        self.waiting_for = None
        self._reservation = size
        self._update_reading()

    def _probe_only(self) -> None:
        """Over the connection limit: health probes still get through (a full server is
        alive, and must not be restarted for it); anything else is refused."""
        if not self._backlog and self._decoder.error is None:
            return
        message = None
        if self._backlog:
            try:
                message = decode_message(self._backlog.popleft(), self._limits)
            except RecserveError:
                pass
        if message is not None and message.get("op") in PROBES:
            self._session.submit(message)
        else:
            self._session.reject(self._refuse)
        self.close()

    def timed_out(self, now: float, frame_timeout: float, write_timeout: float) -> str | None:
        """Why this connection should be dropped at ``now`` (monotonic), or None."""
        if self._blocked_since is not None and now - self._blocked_since > write_timeout:
            return f"it has not read its responses for {write_timeout:g} s"
        if (self._partial_since is not None and not self._read_paused
                and now - self._partial_since > frame_timeout):
            return f"it sent part of a frame and nothing more for {frame_timeout:g} s"
        return None

    def abort(self) -> None:
        """Drop the connection now, discarding unsent responses."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _process(self) -> None:
        """Hand queued frames to the session while it is under its pending limit."""
        if self._processing or self._session is None:
            return
        self._processing = True  # responses sent from submit() must not re-enter
        try:
            while (self._backlog and not self._closing and not self._write_paused
                   and self._session.pending < self._max_pending):
                payload = self._backlog.popleft()
                try:
                    message = decode_message(payload, self._limits)
                except RecserveError as exc:
                    self._session.reject(exc)
                    continue
                self._session.submit(message)
        finally:
            self._processing = False
        self._update_reading()

    def eof_received(self) -> bool | None:
        # EOF means the client is gone (a half-close cannot be told apart from a close):
        # returning False closes the transport, and connection_lost cancels its requests
        # so departed clients do not keep holding admission slots or compute.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._budget is not None:
            self._budget.forget(self)
            self.waiting_for = None
            if self._reservation:
                self._budget.give(self._reservation)
                self._reservation = 0
        if self._session is not None:
            self._session.close()
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._blocked_since = time.monotonic()
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._blocked_since = None
        self._process()

    def finish(self) -> None:
        """Shutdown: end our side after the responses already written are flushed, keep
        reading (and dropping) what the client still sends so that closing does not reset
        the connection under its unread responses; the transport closes when the client
        closes (the server aborts it after a while otherwise)."""
        self._closing = True
        self._writes.flush()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        quiet = time.monotonic() - self._last_data > QUIET_S
        if quiet or not transport.can_write_eof():
            transport.close()  # nothing arriving: a plain close cannot reset anything
            return
        if self._read_paused:
            transport.resume_reading()
            self._read_paused = False
        transport.write_eof()

    def close(self) -> None:
        """Close after the responses already written are flushed."""
        self._closing = True
        self._writes.flush()
        if self._transport is not None:
            self._transport.close()

    def _send(self, response: dict) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            frame = encode_message(response)
        except (TypeError, ValueError, OverflowError) as exc:
            log.exception("cannot encode the response to request %r", response.get("id"))
            frame = encode_message(error_response(response.get("id"), InternalError(
                message=f"response could not be encoded: {exc}")))
        self._writes.write(frame)
        self._process()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing or transport.is_closing():
            return
        pending = self._session.pending if self._session is not None else 0
        should_pause = (self._write_paused or bool(self._backlog)
                        or pending >= self._max_pending or self.waiting_for is not None)
        if should_pause and not self._read_paused:
            transport.pause_reading()
            self._read_paused = True
        elif not should_pause and self._read_paused:
            transport.resume_reading()
            self._read_paused = False
            if self._partial_since is not None:  # the wait was ours, not the client's
                self._partial_since = time.monotonic()
