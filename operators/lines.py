"""LiNeS (Wang et al., 2025; semantics §2): scale a delta by a factor that grows linearly with depth.

Shallow blocks stay near the pretrained weights, deep blocks keep the task update:
λ(ℓ) = α + β·ℓ/(L − 1) for block ℓ of L. Single-task edits default to α = 0.1, β = 1 − α; a
multi-task merge takes α = ‖Σ_t τ_t‖₁ / (T·‖τ_MTL‖₁) from one streamed pass over the deltas.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from mergebench.errors import MergebenchError
from mergebench.operators.base import (
    CHECKPOINT,
    DELTA,
    KeyContext,
    Params,
    Regex,
    StatisticsPass,
    list_of,
    operator,
    signature,
)
from mergebench.surgery.layers import BEFORE_BLOCKS, BLOCK_REGEX, block_index_for

SINGLE_ALPHA = 0.1
MULTI_BETA = 0.5


class LinesParams(Params):
    mode: Literal["single", "multi"] | None = Field(
        None, description="single-task edit or multi-task merge (default: multi when task_deltas are given)")
    alpha: float | None = Field(None, description="scale of the first block (default: 0.1 single; automatic "
                                                  "from L1 norms in multi)")
    beta: float | None = Field(None, description="added scale at the last block (default: 1 − α single; 0.5 multi)")
    outside_blocks: Literal["alpha", "alpha_plus_beta", "split"] = Field(
        "alpha", description="scale of keys outside blocks: α, α + β, or α before the blocks and α + β after")
    num_blocks: int | None = Field(None, ge=1, description="L, when the keys do not show all blocks")
    block_regex: Regex = Field(BLOCK_REGEX, description="regex whose first group is the block number")
    stack_mode: Literal["separate", "concatenate"] = Field(
        "separate", description="encoder/decoder stacks numbered each on its own, or one after the other")

    @field_validator("block_regex")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        if re.compile(pattern).groups < 1:
            raise ValueError("block_regex needs a group capturing the block number")
        return pattern


def _is_multi(p: LinesParams, has_task_deltas: bool) -> bool:
    return p.mode == "multi" or (p.mode is None and has_task_deltas)


def _check(p: LinesParams, lengths: dict[str, int]) -> str | None:
    if p.mode == "multi" and p.alpha is None and "task_deltas" not in lengths:
        return "mode 'multi' needs 'alpha', or 'task_deltas' to compute it from"
    return None


def _accumulate_l1(state: dict[str, Any], inputs: dict[str, Any], p: LinesParams, ctx: KeyContext) -> None:
    task_deltas = inputs["task_deltas"]
    state["tasks"] = len(task_deltas)
    state["summed"] += float(torch.stack(task_deltas).sum(0).abs().sum(dtype=torch.float64))
    state["merged"] += float(inputs["delta"].abs().sum(dtype=torch.float64))


def _auto_alpha(state: dict[str, Any], p: LinesParams, stats: Any) -> dict[str, float]:
    if state["merged"] == 0:
        raise MergebenchError("lines: the merged delta is zero everywhere, so there is nothing to scale")
    return {"alpha": state["summed"] / (state["tasks"] * state["merged"])}


AUTO_ALPHA = StatisticsPass(init=lambda p, stats: {"summed": 0.0, "merged": 0.0, "tasks": 0},
                            accumulate=_accumulate_l1, finalize=_auto_alpha, sliceable=True)


def _passes(p: LinesParams, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
    has_task_deltas = "task_deltas" in slots
    return (AUTO_ALPHA,) if _is_multi(p, has_task_deltas) and p.alpha is None and has_task_deltas else ()


def layer_scale(p: LinesParams, ctx: KeyContext, multi: bool) -> float:
    """λ(ℓ) for the key in ``ctx``."""
    alpha = p.alpha if p.alpha is not None else (ctx.stats["alpha"] if multi else SINGLE_ALPHA)
    beta = p.beta if p.beta is not None else (MULTI_BETA if multi else 1.0 - alpha)
    position = block_index_for(ctx.keys, p.block_regex, p.stack_mode, p.num_blocks).position(ctx.key)
    if position is None:
        after = p.outside_blocks == "alpha_plus_beta" or (p.outside_blocks == "split"
                                                          and not BEFORE_BLOCKS.search(ctx.key))
        return alpha + beta if after else alpha
    block, count = position
    return alpha + beta * (block / (count - 1) if count > 1 else 1.0)


@operator(
    "lines",
    paper="Wang et al., LiNeS: Post-training Layer Scaling, ICLR 2025 (arXiv:2410.17146)",
    signatures=[
        signature(CHECKPOINT, base=CHECKPOINT, fine_tuned=CHECKPOINT),
        signature(DELTA, delta=DELTA),
        signature(DELTA, delta=DELTA, task_deltas=list_of(DELTA)),
    ],
    params=LinesParams,
    execution="per-tensor (global statistic for automatic α)",
    passes=_passes,
    check=_check,
    elementwise=True,
)
def lines(p: LinesParams, ctx: KeyContext, base=None, fine_tuned=None, delta=None, task_deltas=None) -> torch.Tensor:
    """LiNeS: τ scaled by λ(ℓ) = α + β·ℓ/(L − 1); with base + fine_tuned it returns θ_base + λ(ℓ)·τ."""
    multi = _is_multi(p, task_deltas is not None)
    if base is not None:
        return (fine_tuned - base).mul_(layer_scale(p, ctx, multi)).add_(base)
    return delta * layer_scale(p, ctx, multi)
