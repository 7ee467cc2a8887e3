"""The torch side of the staging buffers (``staging_layout``): a device set, and torch views
of a host set for the copies. Packing writes the host set through numpy alone (so packing
processes need no torch); the GPU executor copies from these views of the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .staging_layout import (
    BucketArrays,
    HostBuffers,
    StagingLayout,
    bucket_arrays,
    host_buffers,
    host_bytes,
    host_shapes,
)

_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int32): torch.int32,
                 np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}


@dataclass(frozen=True, slots=True)
class TensorBuffers:
    """A set of staging tensors: on a device, or torch views of a host set."""

    layout: StagingLayout
    block: torch.Tensor
    """uint8: each bucket's ``BucketArrays`` (``bucket``)."""
    weights: torch.Tensor | None
    views: dict[int, BucketArrays] = field(default_factory=dict, compare=False, repr=False)

    def bucket(self, bucket: int) -> BucketArrays:
        """``bucket``'s tensors (made once per bucket: a captured graph reads these very
        addresses)."""
        views = self.views.get(bucket)
        if views is None:
            views = self.views[bucket] = bucket_arrays(self.layout, self.block, bucket,
                                                       _TORCH_DTYPES.__getitem__)
        return views


def allocate(layout: StagingLayout, device: torch.device | str) -> TensorBuffers:
    """A zeroed set of ``layout``'s buffers on ``device`` (the arrays a batch's copy-in fills;
    no scratch)."""
    tensors = {name: None if spec is None else
               torch.zeros(spec[0], dtype=_TORCH_DTYPES[spec[1]], device=device)
               for name, spec in host_shapes(layout).items() if name != "scratch"}
    return TensorBuffers(layout, **tensors)


def as_tensors(host: HostBuffers) -> TensorBuffers:
    """Torch views of a host set (the same memory: what copies to the device read)."""
    def view(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array)

    return TensorBuffers(host.layout, view(host.block), view(host.weights))


def pinned_host(layout: StagingLayout) -> HostBuffers:
    """A host set in one block of pinned memory (its arrays keep the block alive)."""
    block = torch.zeros(host_bytes(layout), dtype=torch.uint8, pin_memory=True)
    return host_buffers(layout, memoryview(block.numpy()))
