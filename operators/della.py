"""DELLA (Deep et al., 2024; semantics §9.9): drop each task vector's entries with a probability that falls
with their magnitude rank, rescale the kept ones, then merge with sign consensus (``della``) or linearly
(``della_linear``), as mergekit's generalized task arithmetic does."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, list_of, operator, signature
from mergebench.operators.task_vectors import consensus_sum, normalizer

STREAM = "della"


class DellaParams(Params):
    density: float = Field(1.0, gt=0, le=1, description="mean keep probability of an entry (mergekit's default 1 "
                                                       "keeps everything: give it)")
    epsilon: float = Field(0.15, ge=0, description="keep probabilities run from density − ε (smallest |τ| of a row) "
                                                   "to density + ε (largest)")
    weights: list[float] | None = Field(None, description="per-task weights (default all 1)")
    lambda_: float = Field(1.0, alias="lambda", description="scaling λ of the merged task vector")
    normalize: bool = Field(True, description="divide by Σ w_t (of the agreeing tasks, for della)")
    rescale: bool = Field(True, description="divide each kept entry by its keep probability")

    @model_validator(mode="after")
    def _probabilities(self) -> DellaParams:
        if self.density < 1 and (self.density - self.epsilon <= 0 or self.density + self.epsilon >= 1):
            raise ValueError("density ± epsilon must lie inside (0, 1)")
        return self


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by Σ w_t")


def magprune(tau: torch.Tensor, p: DellaParams, ctx: KeyContext, index: int) -> torch.Tensor:
    """τ with entry j of a row kept with probability (ρ − ε) + 2ε·(rank_j − 1)/(n − 1), ranks by |τ| ascending."""
    if p.density >= 1:
        return tau
    rows = tau.unsqueeze(0) if tau.dim() < 2 else tau
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(rows).scatter_(1, order, torch.arange(n, dtype=tau.dtype, device=tau.device)
                                            .expand_as(rows).contiguous())  # 0 for the smallest
    spread = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    keep_probability = (p.density - p.epsilon) + spread * 2 * p.epsilon
    draws = torch.rand(rows.shape, generator=ctx.generator(STREAM, index)).to(tau.device)
    kept = (draws < keep_probability).to(tau.dtype)
    pruned = rows * kept
    if p.rescale:
        pruned = pruned / keep_probability
    return pruned.reshape(tau.shape)


def _check(p: DellaParams, lengths: dict[str, int]) -> str | None:
    if p.weights is not None and len(p.weights) != lengths["models"]:
        return f"'weights' has {len(p.weights)} values for {lengths['models']} models"
    return None


def _pruned(base: torch.Tensor, models: list[torch.Tensor], p: DellaParams, ctx: KeyContext
            ) -> tuple[list[torch.Tensor], list[float]]:
    weights = p.weights or [1.0] * len(models)
    return [magprune(m - base, p, ctx, i) * w for i, (m, w) in enumerate(zip(models, weights))], weights


@operator(
    "della",
    paper="Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
          "arXiv:2406.11617",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT))], params=DellaParams,
    check=_check)
def della(base: torch.Tensor, models: list[torch.Tensor], p: DellaParams, ctx: KeyContext) -> torch.Tensor:
    """θ_0 + λ·(sign-consensus merge of the weighted, magnitude-sampled task vectors)."""
    weighted, weights = _pruned(base, models, p, ctx)
    return base + consensus_sum(weighted, weights, p.normalize).mul_(p.lambda_)


@operator(
    "della_linear",
    paper="Deep et al., DELLA-Merging, arXiv:2406.11617 (merged linearly, as mergekit's della_linear)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT))], params=DellaLinearParams,
    check=_check)
def della_linear(base: torch.Tensor, models: list[torch.Tensor], p: DellaLinearParams, ctx: KeyContext
                 ) -> torch.Tensor:
    """θ_0 + λ·Σ_t w_t·DELLA(τ_t) (divided by Σ w_t with normalize)."""
    weighted, weights = _pruned(base, models, p, ctx)
    return base + sum(weighted).mul_(p.lambda_ / normalizer(weights, p.normalize))
