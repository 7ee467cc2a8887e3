"""Packing batches in another process, off the engine process's GIL.

Every numpy copy of a pack gives the GIL up and takes it back; beside a thread that runs
Python (the event loop, the completion thread), taking it back waits until that thread is
forced off, up to the switch interval, every time: a pack that takes 0.3-0.5 ms alone took
24-169 ms so (bench/gil_handoff.py; on the H100 2.5-8x its time alone inside the engine).
Done by another process while the launcher thread waits on a socket, a pack costs one
hand-off whatever its copies (bench/notes-engine.md).

This works where a request's arrays already lie in shared memory (``SharedInputs``: a
front-end worker's ring): a ``PackingProcess`` maps that memory and the slot's host staging
buffers (``SharedMemory``, registered with CUDA as pinned by the executor), rebuilds each
request's views with its ``decode``, slices its planned rows and runs the same
``staging.pack``, into the same bytes the engine then copies to the device. One message
each way per batch, over a Unix ``SOCK_SEQPACKET`` socket pair (message boundaries kept,
descriptors passed with ``SCM_RIGHTS``): the batch plan, with whatever memory and models
the process has not seen yet (their descriptors attached) and the ones gone since (to
unmap); back, the ``PackedSizes`` or the error.

A batch the process cannot take (a piece not in shared memory, a plan too large for one
message) and a process that died or hung: the caller packs in its thread instead
(``PackerUnavailable``); a failed process is killed and another started on the next
batch, until ``MAX_FAILURES`` in a row. The process imports numpy, not torch (31 MB).
"""

from __future__ import annotations

import array
import errno
import logging
import pickle
import socket
import subprocess
import sys
import weakref

from .shared_memory import SharedInputs, SharedMemory
from .staging_layout import PackedSizes, StagingLayout

log = logging.getLogger("recserve.engine")

TIMEOUT_S = 30.0
"""The longest a pack may take before its process is taken for hung (packs take ms)."""
MAX_MESSAGE = 1 << 20
"""The largest batch plan sent (the socket's buffers are asked for this much; a plan the
socket refuses is packed in the thread)."""
MAX_FDS = 64
"""Descriptors one message may carry."""
SWITCH_INTERVAL_S = 0.0005
"""The GIL switch interval while packing processes run (Python's default: 5 ms). On CPU,
packs done by another process cost 1.1 ms beside a busy thread at 0.5 ms, 7-10 ms at 5 ms
(bench/gil_handoff.py): the launcher still takes the GIL back once a pack."""
MAX_FAILURES = 3
"""Processes that fail one after the other, without a pack in between, before this thread
gives up on them and packs every batch itself (something is wrong that a new process will
not mend; an error is logged once)."""


class PackerUnavailable(Exception):
    """This batch cannot be packed by the process: pack it in the thread."""


class PackedModel:
    """What a packing process needs of one model: its staging layout and each slot's host
    staging memory (``key``: unique among this process's models)."""

    def __init__(self, key: int, layout: StagingLayout, slots: list[SharedMemory]) -> None:
        self.key, self.layout, self.slots = key, layout, slots


class PackingProcess:
    """One packing process and this side of its socket, for one thread at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._memories: dict[int, weakref.ref] = {}  # what the process has mapped
        self._models: dict[int, weakref.ref] = {}  # and built buffers for
        self.packs = 0
        self.restarts = 0
        self.failures = 0  # in a row
        self.given_up = False

    def start(self) -> None:
        """Start the process (it imports numpy, a tenth of a second; the first pack waits)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "recserve.engine.packer_process", str(theirs.fileno())],
                pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(TIMEOUT_S)
        self._sock = ours
        self._memories.clear()
        self._models.clear()

    def close(self) -> None:
        """Stop the process (it exits when its socket closes)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def pack(self, model: PackedModel, slot: int, bucket: int,
             pieces: list[tuple[SharedInputs, int, int]]) -> PackedSizes:
        """Pack ``pieces`` ((where the request lies, first row, rows) each) into ``model``'s
        slot ``slot`` for ``bucket``, in the process. Raises ``PackerUnavailable`` when it
        cannot (then pack in the thread), and ``PackError`` for what packing itself refused
        (the thread would refuse it too)."""
        if self.given_up:
            raise PackerUnavailable("packing processes failed; packing in this thread")
        if self._sock is None:  # not started, or dropped after a failure
            if self._proc is not None:
                self.close()
                self.restarts += 1
            try:
                self.start()
            except OSError as exc:  # (no process to be had now: try again next batch)
                self._failed()
                raise PackerUnavailable(f"no packing process: {exc}") from exc
        memories, fds = self._new_memories(
            [*model.slots, *(shared.memory for shared, _, _ in pieces)])
        new_model = None
        if model.key not in self._models:
            new_model = (model.key, model.layout, [m.key for m in model.slots])
        gone_memories = [k for k, ref in self._memories.items() if ref() is None]
        gone_models = [k for k, ref in self._models.items() if ref() is None]
        job = (model.key, slot, bucket,
               [(shared.memory.key, shared.payload, shared.decode, start, count)
                for shared, start, count in pieces])
        message = pickle.dumps((gone_memories, gone_models, memories, new_model, job),
                               pickle.HIGHEST_PROTOCOL)
        if len(message) > MAX_MESSAGE or len(fds) > MAX_FDS:
            raise PackerUnavailable(f"a plan of {len(message)} bytes and {len(fds)} memories")
        reply = self._round_trip(message, fds)
        for k in gone_memories:
            del self._memories[k]
        for k in gone_models:
            del self._models[k]
        for shared in [*model.slots, *(s.memory for s, _, _ in pieces)]:
            self._memories.setdefault(shared.key, weakref.ref(shared))
        self._models[model.key] = weakref.ref(model)
        status, value = reply
        if status != "ok":
            raise PackError(value)
        self.packs += 1
        self.failures = 0
        return value

    def _new_memories(self, memories: list[SharedMemory]) -> tuple[list, list[int]]:
        """(key, size, writable) of each memory the process has not mapped, and their
        descriptors (open as long as the memory lives)."""
        described, fds, seen = [], [], set()
        for memory in memories:
            if memory.key in self._memories or memory.key in seen:
                continue
            seen.add(memory.key)
            described.append((memory.key, memory.size, not memory.view.readonly))
            fds.append(memory.fd)
        return described, fds

    def _round_trip(self, message: bytes, fds: list[int]) -> tuple:
        """Send ``message`` (with ``fds``), return the unpickled reply; on a dead, hung or
        refusing process: drop it (the next pack starts another) and PackerUnavailable."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
            if fds else []
        try:
            self._sock.sendmsg([message], ancillary)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # more than the socket carries: nothing sent
                raise PackerUnavailable(f"a plan of {len(message)} bytes") from exc
            self._drop(exc)
        try:
            reply = self._sock.recv(1 << 16)
            if not reply:
                raise ConnectionError("the packing process exited")
            return pickle.loads(reply)
        except OSError as exc:  # (a timeout too)
            self._drop(exc)

    def _drop(self, exc: OSError) -> None:
        log.warning("a packing process failed (%s): packing in the thread; the next batch "
                    "starts another", exc)
        self._sock.close()
        self._sock = None
        self._proc.kill()  # (dead already, or hung: either way, not to be waited for)
        self._failed()
        raise PackerUnavailable(str(exc)) from exc

    def _failed(self) -> None:
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            self.given_up = True
            log.error("%d packing processes failed in a row: this thread packs every batch "
                      "itself from now on (serve --pack-in thread does so from the start)",
                      self.failures)


class PackingProcesses:
    """One ``PackingProcess`` per launcher thread (``processes[i]`` for thread i), started
    and closed together, with the engine process's switch interval short while they run."""

    def __init__(self, count: int) -> None:
        self.processes = [PackingProcess() for _ in range(count)]
        self._switch_interval: float | None = None

    def start(self) -> None:
        for process in self.processes:
            try:
                process.start()
            except OSError as exc:  # (its thread's first batch tries again)
                log.warning("could not start a packing process: %s", exc)
        # this process's threads now hand the GIL over once per pack and per CUDA call: a
        # short switch interval keeps each hand-off short (bench/notes-engine.md)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))

    def close(self) -> None:
        for process in self.processes:
            process.close()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def stats(self) -> dict:
        """Batches packed by the processes, restarts, threads that gave up on them (none
        of it without processes)."""
        if not self.processes:
            return {}
        return {"packed_in_processes": sum(p.packs for p in self.processes),
                "packing_process_restarts": sum(p.restarts for p in self.processes),
                "packing_threads_given_up": sum(p.given_up for p in self.processes)}


class PackError(ValueError):
    """Packing refused the batch (what ``staging.pack`` raised, in the packing process)."""
