"""Sparse fine-tuning diffs (LT-SFT, Ansell et al., 2022; semantics §6): extract and compose.

A SparseDelta keeps only some entries of θ_ft − θ_0 (the top-K by magnitude, or every entry that
moved more than ``eps``) and is stored as indices and values (mergebench.io.artifacts). Sparse deltas of
different tasks or languages compose by addition: θ = θ_0 + Σ_j φ_j.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import (
    CHECKPOINT,
    SPARSE_DELTA,
    KeyContext,
    Params,
    StatisticsPass,
    list_of,
    operator,
    signature,
)
from mergebench.operators.localization import MaskTopkParams, delta_topk_passes, topk_mask
from mergebench.surgery.numerics import masked, weighted_sum


class ExtractParams(MaskTopkParams):
    proportion: float | None = Field(None, ge=0, le=1, description="fraction of entries kept by |Δ| (top-K); "
                                                                    "with neither this nor k: |Δ| > eps")
    eps: float = Field(1e-7, ge=0, description="without proportion or k, entries with |Δ| ≤ eps are dropped")


def _extract_passes(p: ExtractParams, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
    return delta_topk_passes(p, slots) if p.proportion is not None or p.k is not None else ()


@operator(
    "sft_extract",
    paper="Ansell et al., Composable Sparse Fine-Tuning for Cross-Lingual Transfer, ACL 2022 (2022.acl-long.125)",
    signatures=[signature(SPARSE_DELTA, base=CHECKPOINT, fine_tuned=CHECKPOINT)],
    params=ExtractParams, execution="global statistic", passes=_extract_passes)
def sft_extract(base: torch.Tensor, fine_tuned: torch.Tensor, p: ExtractParams, ctx: KeyContext) -> torch.Tensor:
    """φ = θ_ft − θ_0 on the top-K entries by |Δ| (or where |Δ| > eps); zero, and not stored, elsewhere."""
    delta = fine_tuned - base
    keep = topk_mask(delta, p, ctx) if p.proportion is not None or p.k is not None else delta.abs() > p.eps
    return masked(delta, keep)


@operator(
    "sft_compose",
    paper="Ansell et al., Composable Sparse Fine-Tuning for Cross-Lingual Transfer, ACL 2022 (2022.acl-long.125)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, deltas=list_of(SPARSE_DELTA))])
def sft_compose(base: torch.Tensor, deltas: list[torch.Tensor], p: Params, ctx: KeyContext) -> torch.Tensor:
    """θ = θ_0 + Σ_j φ_j: sparse deltas scattered and added (overlapping entries sum)."""
    return weighted_sum([base, *deltas], [1.0] * (len(deltas) + 1))
