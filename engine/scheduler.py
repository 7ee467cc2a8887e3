"""Continuous-batching policy: requests in, frozen batch plans out.

The scheduler imports no torch, starts no threads and reads no clock: the caller
passes ``now`` (from whatever clock it injects) to every call. Whenever the
executor has a free slot, the engine asks ``next_batch`` and gets a ``BatchPlan``:
up to ``max_batch_rows`` candidate rows of one model, packed from several requests
in priority order, the last one split if it does not fit (its remaining rows stay
at the head of its queue and lead the next batch of that model). Under light load
a batch holds whatever is queued; under heavy load batches fill up on their own.

Order: a lower ``Priority`` value goes first, FIFO within a level. Starvation is
prevented by cheap aging: a request's effective level drops by one per
``aging_s`` seconds queued, and ties go to the older request, so a LOW request
waits at most about ``2 * aging_s`` before it ranks with fresh HIGH work (computed
from the queue heads only: O(levels) per pick, no re-sorting).

Deadlines are absolute times on the caller's clock; a request whose deadline
passes while it still has unsent rows is dropped and reported as expired.
Admission control counts queued (unsent) rows: past ``max_queued_rows``,
``submit`` raises ``EngineError("overloaded")`` at once. The bound depends on the level,
so overload sheds background work first and keeps room for urgent work: LOW requests are
refused from half the bound on, NORMAL ones at the bound, HIGH ones may queue an eighth
past it.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from enum import IntEnum

from .settings import EngineSettings


class EngineError(Exception):
    """A typed failure of one request; ``code`` is a wire error code (``overloaded``,
    ``deadline_exceeded``, ``bad_request``, ``not_found``, ``too_large``, ``internal``)."""

    def __init__(self, code: str, message: str, feature: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.feature = feature
        """The sparse feature at fault (ids outside its table), when one is known."""


class Priority(IntEnum):
    """Request priority; lower values are served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2


ADMIT_SHARE = {Priority.HIGH: 1.125, Priority.NORMAL: 1.0, Priority.LOW: 0.5}
"""Queued rows a request of each level may find and still be admitted, as a share of
``max_queued_rows`` (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``start .. start+count`` of one request, in one batch."""

    request_id: int
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """One batch for the executor: pieces of requests of one model, in row order."""

    seq: int
    """Batch number, increasing."""
    model: Hashable
    """The model key the requests were submitted with."""
    pieces: tuple[Piece, ...]
    """Row ranges, packed back to back in this order."""
    rows: int
    """Real rows: the sum of the pieces' counts."""
    bucket: int
    """The batch size it runs at (rows rounded up to a bucket)."""

    @property
    def padding(self) -> int:
        """Rows computed for nothing."""
        return self.bucket - self.rows


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``next_batch`` decided."""

    plan: BatchPlan | None
    """The batch to run, or None when nothing is ready."""
    expired: tuple[int, ...]
    """Requests dropped because their deadline passed (answer ``deadline_exceeded``)."""
    wake_at: float | None
    """With no plan: when a batch waiting for fill becomes ready (None: nothing waits)."""


class _Entry:
    """A queued request (mutable; lives in exactly one level deque while it has unsent rows)."""

    __slots__ = ("id", "model", "rows", "priority", "deadline", "submitted", "seq", "next_row",
                 "live")

    def __init__(self, request_id: int, model: Hashable, rows: int, priority: Priority,
                 deadline: float | None, submitted: float, seq: int) -> None:
        self.id, self.model, self.rows = request_id, model, rows
        self.priority, self.deadline, self.submitted, self.seq = priority, deadline, submitted, seq
        self.next_row = 0
        self.live = True  # False once fully dispatched, cancelled or expired (lazy removal)


class _ModelQueue:
    __slots__ = ("levels", "rows")

    def __init__(self) -> None:
        self.levels: list[deque[_Entry]] = [deque() for _ in Priority]
        self.rows = 0


class Scheduler:
    """Queues of requests per model and priority, and the batching policy over them."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._queues: dict[Hashable, _ModelQueue] = {}
        self._entries: dict[int, _Entry] = {}
        self._deadlines: list[tuple[float, int, _Entry]] = []
        self._queued_rows = 0
        self._seq = 0
        self._batches = 0

    @property
    def queued_rows(self) -> int:
        """Rows submitted and not yet dispatched, over all models."""
        return self._queued_rows

    @property
    def queued_requests(self) -> int:
        """Requests with rows not yet dispatched."""
        return len(self._entries)

    def room(self, priority: Priority = Priority.NORMAL) -> int:
        """Rows a request of ``priority`` may bring now and still be admitted."""
        return min(self.settings.max_queued_rows,
                   self._bound(Priority(priority)) - self._queued_rows)

    def _bound(self, level: Priority) -> int:
        """Queued rows past which a request of ``level`` is refused (``ADMIT_SHARE``)."""
        return int(self.settings.max_queued_rows * ADMIT_SHARE[level])

    def queued_rows_for(self, model: Hashable) -> int:
        """Rows of ``model`` not yet dispatched."""
        queue = self._queues.get(model)
        return queue.rows if queue else 0

    def submit(self, request_id: int, model: Hashable, rows: int, now: float,
               priority: Priority = Priority.NORMAL, deadline: float | None = None) -> None:
        """Queue a request of ``rows`` candidate rows, or raise ``EngineError`` at once."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows is {rows!r}; expected a positive integer")
        if request_id in self._entries:
            raise ValueError(f"request id {request_id} is already queued")
        limit = self.settings.max_queued_rows
        if rows > limit:
            raise EngineError("too_large", f"{rows} candidates is above the engine's queue "
                                           f"bound of {limit} rows")
        level = priority if type(priority) is Priority else Priority(priority)
        bound = self._bound(level)
        if self._queued_rows + rows > bound:
            raise EngineError("overloaded", f"{self._queued_rows} rows queued; {rows} more "
                                            f"would pass the bound of {bound} for "
                                            f"{level.name.lower()} priority")
        if deadline is not None and deadline <= now:
            raise EngineError("deadline_exceeded", "the deadline passed before queueing")
        self._seq += 1
        entry = _Entry(request_id, model, rows, level, deadline, now, self._seq)
        queue = self._queues.get(model)
        if queue is None:  # (not setdefault: that would build a queue per request)
            queue = self._queues[model] = _ModelQueue()
        queue.levels[entry.priority].append(entry)
        queue.rows += rows
        self._queued_rows += rows
        self._entries[request_id] = entry
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, entry.seq, entry))

    def cancel(self, request_id: int) -> bool:
        """Drop a request's unsent rows; False when none were left (unknown or all sent)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def expire(self, now: float) -> tuple[int, ...]:
        """Drop every queued request whose deadline is at or before ``now``; their ids."""
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)[2]
            if entry.live:
                self._drop(entry)
                expired.append(entry.id)
        return tuple(expired)

    def next_deadline(self) -> float | None:
        """The earliest deadline among queued requests (for the caller's expiry timer)."""
        while self._deadlines and not self._deadlines[0][2].live:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def next_batch(self, now: float, model: Hashable | None = None) -> Decision:
        """Expire overdue requests, then plan the next batch (of ``model``, or of the model
        whose best queued request ranks first)."""
        expired = self.expire(now)
        candidates = [model] if model is not None else list(self._queues)
        best_key, best_model, wake_at = None, None, None
        for key in candidates:
            queue = self._queues.get(key)
            head = self._best_head(queue, now) if queue else None
            if head is None:
                continue
            ready_at = self._ready_at(queue, now)
            if ready_at > now:
                wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                continue
            rank = self._rank(head, now)
            if best_key is None or rank < best_key:
                best_key, best_model = rank, key
        if best_key is None:
            return Decision(None, expired, wake_at)
        return Decision(self._plan(best_model, now), expired, None)

    def _plan(self, model: Hashable, now: float) -> BatchPlan:
        queue = self._queues[model]
        room = self.settings.max_batch_rows
        pieces = []
        while room > 0:
            entry = self._best_head(queue, now)
            if entry is None:
                break
            take = min(room, entry.rows - entry.next_row)
            pieces.append(Piece(entry.id, entry.next_row, take))
            entry.next_row += take
            room -= take
            queue.rows -= take
            self._queued_rows -= take
            if entry.next_row == entry.rows:
                queue.levels[entry.priority].popleft()
                entry.live = False
                del self._entries[entry.id]
        if not queue.rows:
            del self._queues[model]
        rows = self.settings.max_batch_rows - room
        self._batches += 1
        return BatchPlan(self._batches, model, tuple(pieces), rows, self.settings.bucket_for(rows))

    def _drop(self, entry: _Entry) -> None:
        unsent = entry.rows - entry.next_row
        queue = self._queues[entry.model]
        queue.rows -= unsent
        self._queued_rows -= unsent
        entry.live = False
        del self._entries[entry.id]
        if not queue.rows:
            del self._queues[entry.model]

    def _best_head(self, queue: _ModelQueue, now: float) -> _Entry | None:
        best = None
        for level in queue.levels:
            while level and not level[0].live:
                level.popleft()
            if level and (best is None or self._rank(level[0], now) < self._rank(best, now)):
                best = level[0]
        return best

    def _rank(self, entry: _Entry, now: float) -> tuple[int, int]:
        aging = self.settings.aging_s
        level = int(entry.priority)
        if aging is not None:
            level = max(0, level - int((now - entry.submitted) // aging))
        return level, entry.seq

    def _ready_at(self, queue: _ModelQueue, now: float) -> float:
        wait = self.settings.fill_wait_s
        if wait <= 0 or queue.rows >= self.settings.max_batch_rows:
            return now
        # Heads are the oldest of their level (FIFO); _best_head has just dropped dead ones.
        oldest = min(level[0].submitted for level in queue.levels if level)
        return max(now, oldest + wait)
