"""A packing process (``python -m recserve.engine.packer_process FD``): see ``packer``.

It serves one socket: each message maps the memories it brings (descriptors attached),
unmaps the ones gone, builds the staging buffers of models it has not seen, then packs one
batch and answers ``("ok", PackedSizes)`` or ``("error", why)``. It exits when the
socket closes (the engine process is done with it, or gone); it ignores SIGINT and SIGTERM,
which the engine process handles for the group. Anything wrong outside the
pack itself (a memory that cannot be mapped, a message it cannot read) also ends it: the
engine side then packs in its thread and starts another, from a clean state.
"""

from __future__ import annotations

import array
import os
import pickle
import signal
import socket
import sys

from .flat import slice_rows
from .packer import MAX_FDS, MAX_MESSAGE
from .shared_memory import map_fd
from .staging import pack
from .staging_layout import host_buffers


class _State:
    """What the process holds: mappings by memory key, models' slot buffers by model key."""

    def __init__(self) -> None:
        self.memories: dict[int, memoryview] = {}
        self.models: dict[int, tuple] = {}  # key -> (layout, [HostBuffers per slot])

    def apply(self, gone_memories, gone_models, memories, new_model, fds: list[int]) -> None:
        for key in gone_models:
            self.models.pop(key, None)
        for key in gone_memories:
            self.memories.pop(key, None)  # (unmapped once no buffer views it)
        if len(fds) != len(memories):
            raise ValueError(f"{len(memories)} memories came with {len(fds)} descriptors")
        for (key, size, writable), fd in zip(memories, fds, strict=True):
            try:
                self.memories[key] = map_fd(fd, size, writable=writable)
            finally:
                os.close(fd)  # (the mapping holds the memory: forgetting it frees it)
        if new_model is not None:
            key, layout, slot_keys = new_model
            self.models[key] = (layout, [host_buffers(layout, self.memories[k])
                                         for k in slot_keys])

    def pack(self, model_key: int, slot: int, bucket: int, pieces: list):
        layout, slots = self.models[model_key]
        spec = layout.spec
        rows = [slice_rows(spec, decode(payload, self.memories[memory], spec), start, count)
                for memory, payload, decode, start, count in pieces]
        return pack(layout, slots[slot], rows, bucket)


def _receive(sock: socket.socket, buffer: bytearray) -> tuple[memoryview, list[int]] | None:
    """One message and the descriptors that came with it; None once the socket closed."""
    size, ancillary, flags, _ = sock.recvmsg_into([buffer], socket.CMSG_SPACE(MAX_FDS * 4))
    if not size:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ValueError("a message larger than the packing process reads")
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return memoryview(buffer)[:size], list(fds)


def serve(sock: socket.socket) -> None:
    """Answer messages on ``sock`` until it closes."""
    state, buffer = _State(), bytearray(MAX_MESSAGE)
    while (received := _receive(sock, buffer)) is not None:
        message, fds = received
        *changes, job = pickle.loads(message)
        state.apply(*changes, fds)
        try:
            reply = ("ok", state.pack(*job))
        except Exception as exc:  # what the thread would raise too: the engine decides
            reply = ("error", f"{type(exc).__name__}: {exc}"[:2000])  # (one short message)
        sock.send(pickle.dumps(reply, pickle.HIGHEST_PROTOCOL))


def main(argv: list[str]) -> None:
    # Ctrl-C or a SIGTERM to the process group is the engine process's to handle (a server
    # drains, and keeps packing meanwhile); this process ends when its socket closes.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    try:
        serve(sock)
    except ConnectionError:
        pass
    finally:
        sock.close()


if __name__ == "__main__":
    main(sys.argv)
