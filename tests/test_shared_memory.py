"""Shared memory handed to other processes (``recserve.engine.shared_memory``)."""

import gc
import os
import subprocess
import sys

import pytest

from recserve.engine.shared_memory import SharedMemory, supported

pytestmark = pytest.mark.skipif(not supported(), reason="needs memfd_create (Linux)")


def test_another_process_maps_the_same_bytes_through_the_descriptor():
    memory = SharedMemory(1 << 12)
    memory.view[:5] = b"hello"
    code = ("import sys; from recserve.engine.shared_memory import map_fd; "
            "v = map_fd(int(sys.argv[1]), 4096, writable=True); "
            "assert bytes(v[:5]) == b'hello'; v[5:10] = b'world'")
    subprocess.run([sys.executable, "-c", code, str(memory.fd)], pass_fds=[memory.fd],
                   check=True, timeout=60)
    assert bytes(memory.view[:10]) == b"helloworld"


def test_a_read_only_mapping_refuses_writes_and_the_descriptor_closes_with_the_memory():
    memory = SharedMemory(1 << 12, "recserve-test-close", writable=False)
    assert memory.view.readonly and bytes(memory.view[:4]) == bytes(4)  # zeroed
    fd, key = memory.fd, memory.key
    assert SharedMemory(64).key != key  # keys are unique in the process

    def names_our_memory() -> bool:  # (the number may be reused once closed)
        try:
            return "recserve-test-close" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False

    assert names_our_memory()  # open while the memory lives
    del memory
    gc.collect()
    assert not names_our_memory()
    with pytest.raises(ValueError, match="0 bytes"):
        SharedMemory(0)
