"""Which block (transformer layer) a tensor belongs to, from its name (OPERATORS.md §0.6)."""

from __future__ import annotations

import re
from collections.abc import Iterable

BLOCK_REGEX = r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\."


def block_index(key: str, block_regex: str = BLOCK_REGEX) -> int | None:
    """The 0-based block of a key, from the first match of the anchored regex; None outside blocks.

    Anchoring on the container name (``layers.10.``) keeps other numbers in a key, such as an MoE
    expert index (``experts.3.``), from being taken for the block.
    """
    match = re.search(block_regex, key)
    return int(match.group(1)) if match else None


def count_blocks(keys: Iterable[str], block_regex: str = BLOCK_REGEX) -> int:
    """L = 1 + the largest block index among the keys (0 when no key is in a block)."""
    indices = [i for i in (block_index(k, block_regex) for k in keys) if i is not None]
    return 1 + max(indices) if indices else 0
