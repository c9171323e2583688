"""Make freed tensor memory go back to the operating system at once.

glibc raises its mmap threshold after large blocks are freed, after which tensors of a few MB come
from the heap and stay resident when freed; a merge that allocates one model's worth of tensors
would then grow RSS with the model. Pinning the thresholds keeps peak memory set by the largest
tensors in flight, as the design promises. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20


@cache
def return_large_blocks_to_the_os() -> bool:
    """Blocks of 1 MiB and more are mmapped and unmapped on free; returns whether it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES))
