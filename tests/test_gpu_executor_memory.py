"""The GPU executor's count of a model's device memory (``build_model``'s ``device_bytes``),
on CPU: torch.cuda's allocator calls are replaced by a ledger of live fake blocks."""

from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch

from recserve.engine import gpu_executor
from recserve.engine.settings import EngineSettings

MIB = 2**20


class Block:
    """Stands for device memory held; ``holds`` lets a test tie it into a reference cycle."""

    holds: object = None


class FakeDevice:
    """Reserved memory is the sum of the live blocks (empty_cache frees nothing further)."""

    def __init__(self) -> None:
        self.reserved = 0

    def block(self, nbytes: int) -> object:
        holder = Block()
        self.reserved += nbytes
        weakref.finalize(holder, self._free, nbytes)
        return holder

    def _free(self, nbytes: int) -> None:
        self.reserved -= nbytes


@pytest.fixture
def device(monkeypatch):
    fake = FakeDevice()
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: fake.reserved)
    return fake


def test_a_closed_engines_garbage_freed_during_the_build_does_not_count_against_the_model(
        device):
    # A closed engine's slots, unreachable but in a reference cycle: only a collection frees
    # them, and the build's own allocations may trigger one at any point.
    garbage = device.block(48 * MIB)
    garbage.holds = garbage
    del garbage
    executor = gpu_executor.GpuExecutor(EngineSettings(slots=2))

    def build(spec, weights):
        weights_held = device.block(10 * MIB)
        reserved_with_weights = device.reserved
        slots = [device.block(3 * MIB) for _ in range(2)]
        gc.collect()  # as the interpreter may, mid-build
        model = types.SimpleNamespace(weights=weights_held, slots=slots, device_bytes={})
        return model, reserved_with_weights

    executor._build = build
    gc.disable()  # (so that only the build's collection, or the executor's, can run)
    try:
        model = executor.build_model(types.SimpleNamespace(name="demo"), {})
    finally:
        gc.enable()
    assert model.device_bytes == {"weights": 10 * MIB, "slots": 6 * MIB}
