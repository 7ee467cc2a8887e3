"""Shared parameters of the kernel tests: where each one runs."""

import pytest
import torch

# The interpreter (CPU) on hosts without CUDA; the card with `pytest -m gpu`.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="interpreter tests run on hosts without CUDA")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
