"""The safetensors file layout, read and written by hand.

We parse headers ourselves (rather than through ``safe_open``; ``safetensors_header``, without torch) so
that every claim a file makes is checked before a byte of tensor data is trusted, and so tensors can be
read with ``pread`` into buffers we own: no mmap page faults counted as RSS, no whole-file mapping.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.io.safetensors_header import DTYPE_INFO, StoredTensor

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, torch_name) for name, (torch_name, _) in DTYPE_INFO.items()
                                  if hasattr(torch, torch_name)}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without touching any other tensor."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None  # None for tensors held in memory
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


def tensor_info(stored: StoredTensor) -> TensorInfo:
    """What a header says of a tensor, with its torch dtype."""
    dtype = DTYPES.get(stored.dtype)
    if dtype is None:  # a torch without this dtype
        raise MergebenchError(f"{stored.file}: tensor '{stored.key}' has unsupported dtype '{stored.dtype}'")
    return TensorInfo(stored.key, dtype, stored.shape, stored.file, stored.offset, stored.nbytes)


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out back to back in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the reference writer does, so the
    data section starts aligned.
    """
    doc: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        doc[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
