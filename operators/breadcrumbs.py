"""Model Breadcrumbs (Davari & Belilovsky, 2024; semantics §9.7): drop the outliers and the small entries."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, DELTA, KeyContext, Params, list_of, operator, signature
from mergebench.operators.task_vectors import check_weights, consensus_sum, finish, normalizer, task_vectors
from mergebench.surgery.numerics import keep_count, masked


class BreadcrumbsParams(Params):
    density: float = Field(0.15, ge=0, le=1, description="fraction kept after the outliers (reference β)")
    gamma: float = Field(0.006, ge=0, le=1, description="fraction of largest-magnitude outliers removed")
    lambda_: float = Field(0.2, alias="lambda", description="scaling λ of the summed masked task vectors")
    weights: list[float] | None = Field(None, description="per-task weights (default all 1)")
    normalize: bool = Field(False, description="divide by Σ w_t (by 1 when |Σ w_t| < 1e-8), as mergekit's normalize")
    granularity: Literal["per_tensor", "row"] = Field(
        "per_tensor", description="mask unit: the whole tensor, or each slice along the last dimension")


SIGNATURES = [signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)),
              signature(DELTA, deltas=list_of(DELTA))]


def _kept(tau: torch.Tensor, p: BreadcrumbsParams) -> torch.Tensor:
    return masked(tau, breadcrumbs_mask(tau, p.density, p.gamma, p.granularity))


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float, granularity: str) -> torch.Tensor:
    """Keep ranks n_top … n_top + n_keep − 1 of |τ| (descending, ties by index) in each unit."""
    if tau.dim() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    units = tau.reshape(1, -1) if granularity == "per_tensor" or tau.dim() == 1 else tau.reshape(-1, tau.shape[-1])
    n = units.shape[-1]
    n_keep, n_top = keep_count(density, n), keep_count(gamma, n)
    n_top = min(n_top, n - n_keep)
    order = torch.argsort(units.abs(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(units, dtype=torch.bool)
    mask.scatter_(-1, order[:, n_top:n_top + n_keep], True)
    return mask.reshape(tau.shape)


@operator(
    "breadcrumbs",
    paper="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795)",
    signatures=SIGNATURES,
    params=BreadcrumbsParams,
    check=check_weights,
)
def breadcrumbs(p: BreadcrumbsParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """Model Breadcrumbs: θ = θ_base + λ·Σ_t w_t·m_t ⊙ τ_t, m_t dropping the top γ and keeping the next ρ."""
    taus = task_vectors(base, models, deltas)
    weights = p.weights or [1.0] * len(taus)
    merged = torch.zeros_like(taus[0])
    for tau, weight in zip(taus, weights):
        merged.add_(_kept(tau, p), alpha=weight)
    return finish(merged.mul_(p.lambda_ / normalizer(weights, p.normalize)), base)


@operator(
    "breadcrumbs_ties",
    paper="Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, with TIES' sign consensus (as mergekit)",
    signatures=SIGNATURES,
    params=BreadcrumbsParams,
    check=check_weights,
)
def breadcrumbs_ties(p: BreadcrumbsParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """Breadcrumbs' masks, then the weighted masked task vectors that agree with the sign of their sum are
    summed (divided by Σ w_t of the agreeing ones with normalize), times λ."""
    taus = task_vectors(base, models, deltas)
    weights = p.weights or [1.0] * len(taus)
    weighted = [_kept(tau, p).mul_(weight) for tau, weight in zip(taus, weights)]
    return finish(consensus_sum(weighted, weights, p.normalize).mul_(p.lambda_), base)
