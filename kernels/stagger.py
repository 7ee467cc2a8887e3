"""Staggered starts for persistent kernels (``linear``'s STAGGER configs): program p of a
grid's second half waits until program p - programs/2 has set its flag (after its first
tile's K loop), so half the programs run K loops while the other half run epilogues. The
wait is bounded and clears the flag it read, so no launch can hang and a CUDA graph replays
the flags as captured. Timing only: no result depends on them.
"""

from __future__ import annotations

import torch

from . import _common  # noqa: F401  (first: it may switch on the interpreter)

import triton  # isort: skip
import triton.language as tl  # isort: skip

STAGGER_SPINS = tl.constexpr(64)
"""Flag reads a staggered program makes at most before it starts anyway (its partner may
not be resident: then nothing waits long, and no launch can hang on a flag)."""
STAGGER_SLOTS = tl.constexpr(1024)
"""Flags for a grid's first half; the next as many slots hold each waiter's flag reads."""


@triton.jit
def stagger_wait(flag_ptr, spins_ptr):
    """Wait for the flag (bounded), clearing it for the next launch in the same exchange;
    record how many more reads it took (0: the partner was done first)."""
    seen = tl.atomic_xchg(flag_ptr, 0)
    spins = 0
    while (seen == 0) & (spins < STAGGER_SPINS):
        seen = tl.atomic_xchg(flag_ptr, 0)
        spins += 1
    tl.store(spins_ptr, spins)


_STAGGER_FLAGS: dict[torch.device, torch.Tensor] = {}


def stagger_flags(device: torch.device, programs: int) -> torch.Tensor:
    """The device's flags for STAGGER configs: zeros, one per program of a grid's first
    half, cleared again by the programs that read them (so a CUDA graph replays them
    as captured); then, from ``STAGGER_SLOTS``, each waiter's count of extra flag reads
    (``stagger_wait``: how long it waited, for a benchmark to look at). Allocated once,
    at the first staggered launch (the tuner's, eager)."""
    slots = STAGGER_SLOTS.value
    if programs // 2 > slots:
        raise ValueError(f"a staggered grid of {programs} programs needs more than {slots} "
                         "flags; lower PER_SM")
    flags = _STAGGER_FLAGS.get(device)
    if flags is None:
        flags = torch.zeros(2 * slots, dtype=torch.int32, device=device)
        _STAGGER_FLAGS[device] = flags
    return flags


def waits(device: torch.device) -> torch.Tensor | None:
    """Each waiter's extra flag reads at the last staggered launch on ``device`` (0: its
    partner was done first; ``STAGGER_SPINS``: it gave up), or None before any."""
    flags = _STAGGER_FLAGS.get(device)
    return None if flags is None else flags[STAGGER_SLOTS.value:]
