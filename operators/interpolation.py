"""Interpolation between whole checkpoints: WiSE-FT (semantics §1) and the weighted average (§9.0)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, Params, list_of, operator, signature
from mergebench.surgery.numerics import weighted_sum


class WiseFTParams(Params):
    alpha: float = Field(0.5, description="mixing coefficient: 0 gives the zero-shot model, 1 the fine-tuned one")


@operator(
    "wise_ft",
    paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022 (arXiv:2109.01903)",
    signatures=[signature(CHECKPOINT, zero_shot=CHECKPOINT, fine_tuned=CHECKPOINT)],
    params=WiseFTParams,
    elementwise=True,
)
def wise_ft(zero_shot: torch.Tensor, fine_tuned: torch.Tensor, p: WiseFTParams, ctx) -> torch.Tensor:
    """WiSE-FT: θ = (1 − α)·θ_0 + α·θ_1 (Wortsman et al., 2022). α = 0 and α = 1 return an input exactly."""
    return weighted_sum([zero_shot, fine_tuned], [1.0 - p.alpha, p.alpha])


class LinearParams(Params):
    weights: list[float] | None = Field(None, description="one weight per model (default: all 1)")
    normalize: bool = Field(True, description="divide by the sum of the weights")


def _check_linear(p: LinearParams, lengths: dict[str, int]) -> str | None:
    weights = p.weights or [1.0] * lengths["models"]
    if len(weights) != lengths["models"]:
        return f"'weights' has {len(weights)} values for {lengths['models']} models"
    if p.normalize and sum(weights) == 0:
        return "'weights' sum to 0, which 'normalize: true' cannot divide by"
    return None


@operator(
    "linear",
    paper="weighted averaging (model soups: Wortsman et al., ICML 2022, arXiv:2203.05482)",
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT))],
    params=LinearParams,
    check=_check_linear,
    elementwise=True,
)
def linear(models: list[torch.Tensor], p: LinearParams, ctx) -> torch.Tensor:
    """Weighted average θ = Σ w_t·θ_t / Σ w_t (or the plain weighted sum without normalize), as mergekit's linear."""
    weights = p.weights or [1.0] * len(models)
    merged = weighted_sum(models, weights)
    return merged.div_(sum(weights)) if p.normalize else merged
