"""BitDelta (Liu et al., 2024; semantics §9.5): a fine-tune's delta as one sign bit per weight and one scale."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, operator, signature


class BitDeltaParams(Params):
    targets: Literal["block_linear", "all"] = Field(
        "block_linear", description="compress 2-D .weight matrices inside blocks (the rest keeps the fine-tuned "
                                    "values), or every selected key")


@operator(
    "bitdelta",
    paper="Liu et al., BitDelta: Your Fine-Tune May Only Be Worth One Bit, NeurIPS 2024 (arXiv:2402.10193)",
    signatures=[signature(CHECKPOINT, fine_tuned=CHECKPOINT, base=CHECKPOINT)],
    params=BitDeltaParams)
def bitdelta(fine_tuned: torch.Tensor, base: torch.Tensor, p: BitDeltaParams, ctx: KeyContext) -> torch.Tensor:
    """Ŵ = W_base + α·sign⁺(Δ), α = mean|Δ| (the L2-optimal scale for those signs), sign⁺(0) = +1."""
    is_block_linear = ctx.block is not None and fine_tuned.dim() == 2 and ctx.key.endswith(".weight")
    if p.targets == "block_linear" and not is_block_linear:
        return fine_tuned
    delta = fine_tuned - base
    scale = delta.abs().mean()
    return torch.where(delta >= 0, scale, -scale).add_(base)
