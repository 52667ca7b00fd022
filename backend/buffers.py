"""Reusable tensor buffers: a pool of tensors given back after use and taken again for the same shape.

Capture allocates the same multi-megabyte buffers for every batch (a layer's tokens over all steps, its float16
samples). On CPU a fresh tensor of that size comes from the kernel, which faults in and zeroes each 4 KB page on
first touch: 25,000 page faults per capture of the benchmark's tiny FLUX, about 4% of its generation time. Reusing
the buffers removes them. On an accelerator torch's caching allocator already reuses memory; the pool does no harm
there.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """Tensors given back (`give`) to be taken again (`take`) for the same shape, dtype and device.

    Thread-safe: capture's writer thread gives back the samples it has written while the main thread takes buffers
    for the next batch. At most `limit` tensors are kept; more are dropped (freed as usual)."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A tensor of that shape, dtype and device, with undefined contents: a given-back one if any, else new."""
        shape, device = tuple(shape), torch.device(device)
        with self._lock:
            for i, t in enumerate(self._free):
                if tuple(t.shape) == shape and t.dtype == dtype and t.device == device:
                    return self._free.pop(i)
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        """Give back a tensor nothing else will read or write any more (a view of another is not kept)."""
        if tensor._base is not None or not tensor.is_contiguous():
            return
        with self._lock:
            if len(self._free) < self.limit:
                self._free.append(tensor)

    def __len__(self) -> int:
        with self._lock:
            return len(self._free)
