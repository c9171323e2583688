"""Moving a key's tensors between the host and an accelerator without stalling the other keys.

On a GPU the inputs are read into page-locked (pinned) host buffers, so their copy to the device is
a DMA transfer queued on the computing thread's own stream: while one compute thread's copies run,
the others' kernels do. A tensor crosses as stored (bf16 is half the bytes of float32) and is upcast
on the device. Each output is cast on the device and copied back once, into a pinned buffer, before
the thread waits for its stream and hands the key to the writer. On the CPU all of this is nothing.
"""

from __future__ import annotations

import torch

from mergebench.engine.buffers import BufferPool, typed


def uses_pinned_buffers(device: torch.device) -> bool:
    """Whether host buffers for ``device`` are page-locked: copies from them run asynchronously."""
    return device.type == "cuda"


def start_compute_thread(device: torch.device) -> None:
    """Give this thread its own stream on ``device``: keys computed side by side then overlap there."""
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device.index)  # a new thread starts on the first GPU
    torch.cuda.set_stream(torch.cuda.Stream(device=device))


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on ``device`` as ``dtype``: copied as stored, then converted there.

    ``Tensor.to(device, dtype)`` from the host converts on the CPU before copying, moving twice the
    bytes of a bf16 tensor and spending a CPU core on it.
    """
    if tensor.device != device:
        tensor = tensor.to(device, non_blocking=True)
    return tensor.to(dtype)


def to_host(tensor: torch.Tensor, pool: BufferPool | None) -> torch.Tensor:
    """``tensor`` on the host: queued into a pooled (pinned) buffer when there is a pool, else copied now.

    A queued copy is complete only after ``finish``.
    """
    if tensor.device.type == "cpu":
        return tensor
    if pool is None:
        return tensor.cpu()
    host = typed(pool.take(tensor.nbytes), tensor.dtype, tuple(tensor.shape))
    return host.copy_(tensor, non_blocking=True)


def finish(device: torch.device) -> None:
    """Wait for this thread's queued kernels and copies: what they wrote on the host is then complete,
    and the pinned buffers they read may be reused."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
