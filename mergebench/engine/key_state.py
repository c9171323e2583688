"""Where the engine keeps what an operator caches for one key (``KeyContext.cached``).

The operator says what to keep; the engine says how: a boolean tensor on the CPU (DARE's drop mask,
a byte per entry per model) is kept as packed bits, an eighth of that, and unpacked when asked for;
anything else, a tensor on a GPU included (no round trip through the host), is kept as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np
import torch


class _Bits:
    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        self.packed = np.packbits(mask.reshape(-1).numpy())

    def unpack(self) -> torch.Tensor:
        bits = np.unpackbits(self.packed, count=math.prod(self.shape)).view(bool)
        return torch.from_numpy(bits).reshape(self.shape)


class KeyState(MutableMapping):
    """A mapping that stores CPU boolean tensors as bits and gives them back as boolean tensors."""

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}

    def __getitem__(self, name: Any) -> Any:
        value = self._values[name]
        return value.unpack() if isinstance(value, _Bits) else value

    def __setitem__(self, name: Any, value: Any) -> None:
        compact = isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.device.type == "cpu"
        self._values[name] = _Bits(value) if compact else value

    def __delitem__(self, name: Any) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
