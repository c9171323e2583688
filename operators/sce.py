"""SCE (Wan et al., 2024; semantics §9.13): select the entries where the models vary most, weight each task by
its energy, erase the minority signs."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, list_of, operator, signature
from mergebench.surgery.numerics import threshold_for


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of entries kept: those whose variance across "
                                                            "the task vectors is largest")


def variance_mask(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the ⌊fraction·(entries whose variance is not 0)⌋ entries of largest variance across tasks."""
    if fraction >= 1:
        return torch.ones_like(taus[0])
    mean = taus.sum(dim=0).div_(taus.shape[0])
    variance = torch.zeros_like(mean)
    for tau in taus:  # Σ (τ_t − mean)² / T, elementwise: torch's var along the task axis is 100 times slower
        variance.add_((tau - mean).square_())
    variance.div_(taus.shape[0])
    k = int(torch.count_nonzero(variance) * fraction)
    if k == 0:
        return torch.zeros_like(variance)
    # the k largest variances by exact threshold (entries tied at it are kept too, where top-k picks some)
    return (variance >= threshold_for(variance, k)).to(variance.dtype)


@operator(
    "sce",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models (SCE merging), arXiv:2408.07990",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT))], params=SceParams)
def sce(base: torch.Tensor, models: list[torch.Tensor], p: SceParams, ctx: KeyContext) -> torch.Tensor:
    """θ_0 + Σ_t w_t·m_t ⊙ τ̂_t / Σ_t w_t·m_t: τ̂ the selected task vectors, w_t ∝ mean(τ̂_t²) (equal if all are
    zero), m_t their sign agreement with the sign of Σ τ̂ (ties to +)."""
    taus = torch.stack([m - base for m in models])
    taus = taus * variance_mask(taus, p.select_topk)
    energy = taus.square().reshape(len(models), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.ones_like(energy) / len(models) if abs(total) < 1e-6 else energy / total
    majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0)
    agree = (taus.sign() == majority).to(taus.dtype)
    erased = weights.reshape(-1, *[1] * base.dim()) * agree
    return base + (taus * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
