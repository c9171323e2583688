"""Which block (transformer layer) a tensor belongs to, from its name (semantics §0.6)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

BLOCK_REGEX = r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\."
STACK_MODES = ("separate", "concatenate")
# Keys outside the blocks that come before them (embeddings); every other outside key (final norms,
# heads, projections) comes after them. LiNeS's ``outside_blocks: split`` and schedules read this.
BEFORE_BLOCKS = re.compile(r"embed|wte|wpe|position|token_type|patch|cls_token|class_embedding|conv1|ln_pre")
# The weights of nn.Embedding modules in the usual architectures (a LoRA on one is stored transposed).
INPUT_EMBEDDINGS = re.compile(r"(?:^|\.)(?:embed_tokens|word_embeddings|wte|wpe|shared|position_embeddings|"
                              r"token_type_embeddings|embed_positions|embed_in)\.weight$")


def block_index(key: str, block_regex: str = BLOCK_REGEX) -> int | None:
    """The 0-based block of a key, from the first match of the anchored regex; None outside blocks.

    Anchoring on the container name (``layers.10.``) keeps other numbers in a key, such as an MoE
    expert index (``experts.3.``), from being taken for the block.
    """
    match = re.search(block_regex, key)
    return int(match.group(1)) if match else None


class BlockIndex:
    """Block positions of a model's keys, stack by stack.

    A *stack* is the key prefix before the matched block number (``encoder`` and ``decoder`` in T5,
    ``visual.transformer`` and ``transformer`` in open_clip). ``separate`` numbers each stack
    0..L_s−1 with its own L_s; ``concatenate`` puts the stacks one after another (encoders first,
    then the order of first appearance) and gives every block the total L.
    """

    def __init__(self, keys: Iterable[str], block_regex: str = BLOCK_REGEX, stack_mode: str = "separate",
                 num_blocks: int | None = None):
        if stack_mode not in STACK_MODES:
            raise ValueError(f"stack_mode must be one of {STACK_MODES}")
        pattern = re.compile(block_regex)
        self._where: dict[str, tuple[str, int]] = {}
        sizes: dict[str, int] = {}
        for key in keys:
            match = pattern.search(key)
            if match:
                stack, index = key[: match.start()], int(match.group(1))
                self._where[key] = (stack, index)
                sizes[stack] = max(sizes.get(stack, 0), index + 1)
        ordered = sorted(sizes, key=lambda s: (0 if "encoder" in s else 1 if "decoder" in s else 0,
                                               list(sizes).index(s)))
        if stack_mode == "concatenate":
            offsets, total = {}, 0
            for stack in ordered:
                offsets[stack], total = total, total + sizes[stack]
            self._offset = offsets
            self._size = dict.fromkeys(sizes, num_blocks or total)
        else:
            self._offset = dict.fromkeys(sizes, 0)
            self._size = {s: num_blocks or n for s, n in sizes.items()}
        self.stacks = {s: sizes[s] for s in ordered}

    def position(self, key: str) -> tuple[int, int] | None:
        """(block ℓ, block count L) of a key, or None when it lies outside every block."""
        where = self._where.get(key)
        if where is None:
            return None
        stack, index = where
        return self._offset[stack] + index, self._size[stack]


@lru_cache(maxsize=32)
def block_index_for(keys: tuple[str, ...], block_regex: str = BLOCK_REGEX, stack_mode: str = "separate",
                    num_blocks: int | None = None) -> BlockIndex:
    """A cached BlockIndex, for operators with their own block settings (the keys tuple is shared)."""
    return BlockIndex(keys, block_regex, stack_mode, num_blocks)
