"""Shared parameters of the kernel tests: where each one runs."""

import os
from pathlib import Path

import pytest
import torch

# The interpreter (CPU) on hosts without CUDA; the card with `pytest -m gpu`.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="interpreter tests run on hosts without CUDA")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def ptxas_available() -> bool:
    """Whether Triton can compile for a card here without one: its bundled ptxas, or
    ``TRITON_PTXAS_PATH`` (the tests that compile for sm_90 skip without it)."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or bool(os.environ.get("TRITON_PTXAS_PATH"))
