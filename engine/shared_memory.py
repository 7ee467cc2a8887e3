"""Memory that other processes of this host can map: a front-end worker's request ring, a
slot's host staging buffers; and where a request's arrays lie in such memory.

A ``SharedMemory`` is a ``memfd`` (anonymous: not a file under /dev/shm, so a container's
small /dev/shm limit does not apply and nothing is left behind when a process dies)
mapped in this process, its descriptor kept open so that it can be handed to another
process (``packer``) for as long as the memory lives; the descriptor closes with it.
Each has a ``key`` unique in this process, by which a process it was handed to names it.
"""

from __future__ import annotations

import itertools
import mmap
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .inputs import RequestInputs
    from .spec import ModelSpec

_keys = itertools.count(1)


def supported() -> bool:
    """True where anonymous shared memory can be passed to another process (Linux)."""
    return hasattr(os, "memfd_create")


def create_fd(size: int, name: str = "recserve") -> int:
    """A new anonymous shared memory of ``size`` bytes, zeroed; its file descriptor (not
    inherited by children unless passed explicitly, as ``subprocess``'s ``pass_fds`` does)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


def map_fd(fd: int, size: int, *, writable: bool) -> memoryview:
    """Map ``fd``'s ``size`` bytes (read-only unless ``writable``); the fd may be closed
    afterwards. The mapping lives as long as a view of it does."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return memoryview(mmap.mmap(fd, size, mmap.MAP_SHARED, prot))


class SharedMemory:
    """``size`` bytes of new shared memory, zeroed, mapped read-write (``view``) or
    read-only (``writable`` False: this process only reads what another writes)."""

    def __init__(self, size: int, name: str = "recserve", *, writable: bool = True) -> None:
        if size < 1:
            raise ValueError(f"shared memory of {size} bytes")
        self.key = next(_keys)
        self.size = size
        self.fd = create_fd(size, name)
        try:
            self.view = map_fd(self.fd, size, writable=writable)
        except OSError:
            os.close(self.fd)
            raise
        weakref.finalize(self, os.close, self.fd)


@dataclass(frozen=True, slots=True)
class SharedInputs:
    """Where a request's arrays lie in shared memory, for a process that maps ``memory``:
    ``decode(payload, its mapping, spec)`` gives the same RequestInputs again (views of the
    mapping). ``decode`` must be a module-level function (it travels pickled, by name)."""

    memory: SharedMemory
    payload: bytes
    decode: Callable[[bytes, memoryview, ModelSpec], RequestInputs]
