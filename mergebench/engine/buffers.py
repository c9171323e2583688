"""Byte buffers that are handed out and given back, so streaming a model costs no fresh memory per tensor.

A fresh tensor-sized allocation is a new mapping the kernel must fault in and zero page by page:
for a merge that only adds and casts, that costs as much as the arithmetic. The executor computes
outputs into pooled buffers (and reads a GPU's inputs into pinned ones; CPU inputs are mapped from
their files); the pool keeps a bounded number of free buffers (the largest), so its memory stays
set by the tensors in flight, never by the model.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    def __init__(self, capacity: int, pinned: bool = False):
        self.capacity = capacity  # free buffers kept; smaller ones are dropped beyond this
        self.pinned = pinned  # page-locked, for asynchronous copies to and from a GPU
        self._free: list[torch.Tensor] = []
        self._owned: dict[int, torch.Tensor] = {}  # the buffers this pool made, by the address of their memory
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (a view of a pooled buffer: the smallest free one that fits)."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))[:nbytes]
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned)
        with self._lock:
            self._owned[buffer.data_ptr()] = buffer
        return buffer[:nbytes]

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor made from ``take`` (any view of it); other tensors are ignored."""
        with self._lock:
            buffer = self._owned.get(tensor.untyped_storage().data_ptr())
            if buffer is None or any(b is buffer for b in self._free):
                return
            self._free.append(buffer)
            if len(self._free) > self.capacity:
                smallest = self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))
                del self._owned[smallest.data_ptr()]


def typed(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 buffer seen as a tensor of ``dtype`` and ``shape`` (no copy)."""
    return buffer.view(dtype).reshape(shape)
