"""``stack``: a model built from layer ranges of others (frankenmerges, depth up-scaling; semantics §10).

Output block j is, key for key, block i of the slice's input, renamed; blocks may repeat and be
dropped. Keys outside the blocks come from ``base`` (those after the blocks, such as the final norm
and the head, from ``head`` when it is given). A slice may name any input: a model or a node.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergebench.operators.base import (
    CHECKPOINT,
    LayoutInputs,
    LayoutPlan,
    Params,
    Regex,
    layout_operator,
    list_of,
    signature,
)
from mergebench.surgery.layers import BEFORE_BLOCKS, BLOCK_REGEX, BlockIndex


class LayerSlice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="an input of the node")
    layers: tuple[int, int] = Field(description="[START, END): the input's blocks START..END-1")

    @field_validator("layers")
    @classmethod
    def _a_range(cls, layers: tuple[int, int]) -> tuple[int, int]:
        start, end = layers
        if start < 0 or end <= start:
            raise ValueError(f"layers [{start}, {end}] is not a range [START, END) with 0 <= START < END")
        return layers


class StackParams(Params):
    slices: list[LayerSlice] = Field(min_length=1, description="[{model: INPUT, layers: [START, END]}, ...], "
                                                              "the output's blocks in order (END exclusive)")
    base: str | None = Field(None, description="the input whose keys outside the blocks are kept (default: the "
                                               "first slice's); its config and files make the output's")
    head: str | None = Field(None, description="the input whose keys after the blocks (final norm, head) are kept "
                                               "(default: base)")
    block_regex: Regex = Field(BLOCK_REGEX, description="regex whose first group is the block number")

    @model_validator(mode="after")
    def _one_group(self) -> StackParams:
        if re.compile(self.block_regex).groups < 1:
            raise ValueError("block_regex needs a group capturing the block number")
        return self

    @property
    def base_model(self) -> str:
        return self.base or self.slices[0].model


def _check_inputs(p: StackParams, inputs: dict[str, Any]) -> str | None:
    given = inputs.get("models") or []
    for where, name in [*((f"slice {i}", s.model) for i, s in enumerate(p.slices)), ("base", p.base),
                        ("head", p.head)]:
        if name is not None and name not in given:
            return f"{where} names '{name}', which is not among its models ({', '.join(given)})"
    return None


@layout_operator(
    "stack",
    paper="layer stacking (mergekit's passthrough slices; depth up-scaling: Kim et al., SOLAR 10.7B, "
          "arXiv:2312.15166)",
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT))],
    params=StackParams,
    primary=lambda p: p.base_model,
    check_inputs=_check_inputs,
)
def stack(p: StackParams, inputs: LayoutInputs) -> LayoutPlan:
    """Blocks taken from layer ranges of the inputs, renumbered from 0; outside keys from base (and head)."""
    keys = inputs.keys
    pattern = re.compile(p.block_regex)
    indices = {name: BlockIndex(names, p.block_regex) for name, names in keys.items()}
    stacks = {prefix for index in indices.values() for prefix in index.stacks}
    if len(stacks) > 1:
        raise ValueError(f"the inputs have several stacks of blocks ({', '.join(sorted(stacks))}); stack "
                         f"renumbers one")
    plan: dict[str, tuple[str, str]] = {}
    head = p.head or p.base_model
    for key in keys[p.base_model]:
        if not pattern.search(key) and BEFORE_BLOCKS.search(key):
            plan[key] = (p.base_model, key)
    layers: list[tuple[str, int]] = []
    for piece in p.slices:
        count = max(indices[piece.model].stacks.values(), default=0)
        start, end = piece.layers
        if end > count:
            raise ValueError(f"slice layers [{start}, {end}] of '{piece.model}', which has {count} blocks")
        for block in range(start, end):
            out = len(layers)
            for key in keys[piece.model]:
                match = pattern.search(key)
                if match and int(match.group(1)) == block:
                    plan[key[:match.start(1)] + str(out) + key[match.end(1):]] = (piece.model, key)
            layers.append((piece.model, block))
    for key in keys[head]:
        if not pattern.search(key) and not BEFORE_BLOCKS.search(key):
            plan[key] = (head, key)
    return LayoutPlan(plan, layers)
