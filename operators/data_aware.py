"""Merges that weigh models by what they saw (semantics §12): Fisher merging and RegMean, from statistics
recorded once per model (mergebench.io.statistics) and streamed in as Fisher and Gram artifacts."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.errors import MergebenchError
from mergebench.operators.base import CHECKPOINT, FISHER, GRAM, KeyContext, Params, list_of, operator, signature
from mergebench.surgery.numerics import weighted_sum

FISHER_EPSILON = 1e-8  # added to every Fisher value: a parameter no example moved is averaged, not divided by 0


def fisher_weighted(models: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float],
                    epsilon: float = FISHER_EPSILON) -> torch.Tensor:
    """Σ w_t·(F_t + ε)·θ_t / Σ w_t·(F_t + ε) per entry; the plain weighted average where that divisor is 0."""
    scaled = [(fisher + epsilon).mul_(w) for fisher, w in zip(fishers, weights)]
    numerator = torch.zeros_like(models[0])
    for model, scale in zip(models, scaled):
        numerator.addcmul_(model, scale)
    denominator = torch.stack(scaled).sum(0)
    empty = denominator == 0
    if bool(empty.any()):
        average = weighted_sum(models, weights).div_(sum(weights))
        return torch.where(empty, average, numerator / denominator.masked_fill(empty, 1.0))
    return numerator.div_(denominator)


class FisherParams(Params):
    weights: list[float] | None = Field(None, description="one weight per model (default 1 each), as Matena & "
                                                          "Raffel's λ_t")
    epsilon: float = Field(FISHER_EPSILON, ge=0, description="added to every Fisher value (a floor: parameters no "
                                                             "example moved are averaged)")


def _check_fisher(p: FisherParams, lengths: dict[str, int]) -> str | None:
    if lengths["fishers"] != lengths["models"]:
        return f"fishers: one file per model, in the same order ({lengths['fishers']} for {lengths['models']})"
    if p.weights is not None and len(p.weights) != lengths["models"]:
        return f"weights has {len(p.weights)} values for {lengths['models']} models"
    if p.weights is not None and (min(p.weights) < 0 or sum(p.weights) == 0):
        return "weights must be non-negative and not all 0"
    return None


@operator(
    "fisher",
    paper="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv:2111.09832)",
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT), fishers=list_of(FISHER))],
    params=FisherParams, check=_check_fisher, elementwise=True)
def fisher(models: list[torch.Tensor], fishers: list[torch.Tensor], p: FisherParams, ctx: KeyContext) -> torch.Tensor:
    """θ = Σ λ_t·F_t·θ_t / Σ λ_t·F_t per parameter, F_t the diagonal Fisher of model t (+ ε)."""
    return fisher_weighted(models, fishers, p.weights or [1.0] * len(models), p.epsilon)


class RegMeanParams(Params):
    alpha: float = Field(0.9, ge=0, le=1, description="scale of the Gram matrices' off-diagonal entries (Jin et "
                                                       "al.'s α: 1 is the exact least-squares merge, 0 a "
                                                       "per-input-feature weighting)")


def _check_regmean(p: RegMeanParams, lengths: dict[str, int]) -> str | None:
    if lengths["grams"] != lengths["models"]:
        return f"grams: one file per model, in the same order ({lengths['grams']} for {lengths['models']})"
    return None


@operator(
    "regmean",
    paper="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023 "
          "(arXiv:2212.09849)",
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT), grams=list_of(GRAM))],
    params=RegMeanParams, check=_check_regmean)
def regmean(models: list[torch.Tensor], grams: list[torch.Tensor], p: RegMeanParams, ctx: KeyContext
            ) -> torch.Tensor:
    """Per linear weight W_t ([out, in]) with inputs' Gram G_t = X_tᵀX_t: W = (Σ W_t·G̃_t)(Σ G̃_t)⁻¹, the W
    minimising Σ ‖X_t·Wᵀ − X_t·W_tᵀ‖², with G̃ = α·G + (1 − α)·diag(G); solved in float64. Keys without
    Gram matrices (biases, norms, embeddings) are averaged."""
    present = [g.dim() == 2 and g.shape[0] == g.shape[1] == models[0].shape[-1] and bool(g.any()) for g in grams]
    if not any(present):
        return weighted_sum(models, [1.0] * len(models)).div_(len(models))
    if not all(present) or models[0].dim() != 2:
        missing = [i for i, found in enumerate(present) if not found]
        raise MergebenchError(f"regmean: '{ctx.key}' has Gram matrices of its inputs ({models[0].shape[-1]} × "
                              f"{models[0].shape[-1]}) for some models but not for model(s) {missing}: record every "
                              f"model's on the same layers")
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    weighted = torch.zeros_like(models[0], dtype=torch.float64)
    for weight, gram in zip(models, grams):
        gram = gram.double()
        regularised = gram * p.alpha + torch.diag(torch.diagonal(gram)) * (1 - p.alpha)
        total += regularised
        weighted += weight.double() @ regularised
    factor, failed = torch.linalg.cholesky_ex(total)  # Σ G̃ is symmetric positive semi-definite
    if int(failed) == 0:
        solution = torch.cholesky_solve(weighted.T, factor)
    else:  # singular (an input feature no example used): the least-squares solution
        solution = torch.linalg.lstsq(total, weighted.T, driver="gelsd").solution
    return solution.T.to(models[0].dtype)
