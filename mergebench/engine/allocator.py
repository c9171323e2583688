"""Make freed tensor memory go back to the operating system at once.

glibc raises its mmap threshold after large blocks are freed, after which tensors of a few MB come
from the heap and stay resident when freed; a merge that allocates one model's worth of tensors
would then grow RSS with the model. Pinning the thresholds keeps peak memory set by the largest
tensors in flight, as the design promises. Elsewhere than glibc this does nothing.

The heap keeps up to 16 MiB free before giving it back: a slice's float32 temporaries (a few MB,
freed and allocated again for every slice) then stay mapped, where a 1 MiB trim threshold made the
kernel fault in and zero them again slice after slice (ten times the page faults, a fifth of the
wall time of a global TIES merge).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 20
TRIM_BYTES = 16 << 20


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
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
