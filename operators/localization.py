"""Skill localization: grafting (Panigrahi et al., 2023; semantics §5) and masks as values.

A graft keeps the fine-tuned values on a tiny region γ and the pretrained values elsewhere:
θ = θ_pre + γ ⊙ (θ_ft − θ_pre). Without data, γ is the global top-k of |θ_ft − θ_pre| over the
block parameters (the paper's "base patch"); a saved Mask can be given instead, such as one
optimised against a task loss with ``mergebench.surgery.graft.optimize_mask``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergebench.operators.base import (
    CHECKPOINT,
    MASK,
    KeyContext,
    Params,
    StatisticsPass,
    list_of,
    operator,
    signature,
)
from mergebench.operators.topk import global_threshold, global_threshold_passes
from mergebench.surgery.numerics import keep_count, threshold_for


class GraftParams(Params):
    sparsity: float = Field(1e-4, ge=0, le=1, description="fraction s of the candidate parameters grafted "
                                                          "(k = floor(s·N), ties at the threshold kept)")
    scope: Literal["global", "per_tensor"] = Field("global", description="top-k over all candidates or per tensor")
    candidates: Literal["blocks", "all"] = Field(
        "blocks", description="what may be grafted: parameters inside blocks (embeddings and heads keep the "
                              "pretrained values), or every selected key")


def _is_candidate(p: GraftParams, ctx: KeyContext) -> bool:
    return p.candidates == "all" or ctx.block is not None


def _graft_vectors(inputs: dict[str, Any], p: GraftParams, ctx: KeyContext) -> list[torch.Tensor]:
    if not _is_candidate(p, ctx):
        return []
    return [inputs["fine_tuned"] - inputs["pretrained"]]


GRAFT_THRESHOLD = global_threshold_passes(_graft_vectors, lambda p, n, index: keep_count(p.sparsity, n))


def _graft_passes(p: GraftParams, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
    return GRAFT_THRESHOLD if "mask" not in slots and p.scope == "global" else ()


@operator(
    "graft",
    paper="Panigrahi et al., Task-Specific Skill Localization, ICML 2023 (arXiv:2302.06600)",
    signatures=[signature(CHECKPOINT, pretrained=CHECKPOINT, fine_tuned=CHECKPOINT),
                signature(CHECKPOINT, pretrained=CHECKPOINT, fine_tuned=CHECKPOINT, mask=MASK)],
    params=GraftParams,
    execution="global statistic",
    passes=_graft_passes,
)
def graft(pretrained: torch.Tensor, fine_tuned: torch.Tensor, p: GraftParams, ctx: KeyContext,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grafting: fine-tuned values on the region γ, pretrained values elsewhere."""
    if mask is None:
        if not _is_candidate(p, ctx):
            return pretrained
        delta = (fine_tuned - pretrained).abs()
        threshold = global_threshold(ctx) if p.scope == "global" else threshold_for(
            delta, keep_count(p.sparsity, delta.numel()))
        mask = delta >= threshold
    return torch.where(mask, fine_tuned, pretrained)


class MaskTopkParams(Params):
    proportion: float = Field(0.01, ge=0, le=1, description="fraction of entries kept (when k is not given)")
    k: int | None = Field(None, ge=0, description="number of entries kept, min(k, N)")
    scope: Literal["global", "per_tensor"] = Field("global", description="top-k over all selected keys or per tensor")


def keep_for(p: MaskTopkParams, n: int, index: int = 0) -> int:
    return min(p.k, n) if p.k is not None else keep_count(p.proportion, n)


def _delta_vectors(inputs: dict[str, Any], p: Params, ctx: KeyContext) -> list[torch.Tensor]:
    return [inputs["fine_tuned"] - inputs["base"]]


def topk_mask(delta: torch.Tensor, p: MaskTopkParams, ctx: KeyContext) -> torch.Tensor:
    """|Δ| ≥ the k-th largest |Δ| of the scope (global: found by the statistics passes)."""
    magnitudes = delta.abs()
    threshold = global_threshold(ctx) if p.scope == "global" else threshold_for(
        magnitudes, keep_for(p, magnitudes.numel()))
    return magnitudes >= threshold


DELTA_TOPK = global_threshold_passes(_delta_vectors, keep_for)


def delta_topk_passes(p: MaskTopkParams, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
    return DELTA_TOPK if p.scope == "global" else ()


@operator(
    "mask_topk",
    paper="Panigrahi et al., ICML 2023 (arXiv:2302.06600); Ansell et al., ACL 2022 (2022.acl-long.125)",
    signatures=[signature(MASK, base=CHECKPOINT, fine_tuned=CHECKPOINT)],
    params=MaskTopkParams, execution="global statistic", passes=delta_topk_passes)
def mask_topk(base: torch.Tensor, fine_tuned: torch.Tensor, p: MaskTopkParams, ctx: KeyContext) -> torch.Tensor:
    """The entries that moved most in fine-tuning: top-k of |θ_ft − θ_base| (ties kept)."""
    return topk_mask(fine_tuned - base, p, ctx)


@operator(
    "mask_union",
    paper="Panigrahi et al., ICML 2023 (arXiv:2302.06600)",
    signatures=[signature(MASK, masks=list_of(MASK))])
def mask_union(masks: list[torch.Tensor], p: Params, ctx: KeyContext) -> torch.Tensor:
    """Entries set in any of the masks (graft-compose several tasks' regions)."""
    return torch.stack(masks).any(0)


@operator(
    "mask_intersection",
    paper="Panigrahi et al., ICML 2023 (arXiv:2302.06600)",
    signatures=[signature(MASK, masks=list_of(MASK))])
def mask_intersection(masks: list[torch.Tensor], p: Params, ctx: KeyContext) -> torch.Tensor:
    """Entries set in every mask (the skills two tasks share)."""
    return torch.stack(masks).all(0)
