"""SCE (Wan et al., 2024; semantics §9.13): select the entries where the models vary most, weight each task by
its energy, erase the minority signs."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, list_of, operator, signature


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0, le=1, description="fraction of entries kept: those whose variance across "
                                                            "the task vectors is largest")


def variance_mask(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the ⌊fraction·(entries whose variance is not 0)⌋ entries of largest variance across tasks."""
    if fraction >= 1:
        return torch.ones_like(taus[0])
    variance = taus.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k > 0:
        mask.view(-1)[variance.reshape(-1).topk(k).indices] = 1
    return mask


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
