"""Interpolation between whole checkpoints: WiSE-FT (semantics §1) and the weighted average (§9.0)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, FISHER, Params, list_of, operator, signature
from mergebench.operators.data_aware import fisher_weighted
from mergebench.surgery.numerics import weighted_sum


class WiseFTParams(Params):
    alpha: float = Field(0.5, description="mixing coefficient: 0 gives the zero-shot model, 1 the fine-tuned one")


def _check_wise_ft(p: WiseFTParams, lengths: dict[str, int]) -> str | None:
    if "fishers" in lengths and lengths["fishers"] != 2:
        return f"fishers: the zero-shot model's and the fine-tuned one's, in that order ({lengths['fishers']} given)"
    return None


@operator(
    "wise_ft",
    paper="Wortsman et al., Robust fine-tuning of zero-shot models, CVPR 2022 (arXiv:2109.01903); with Fisher "
          "weights: Matena & Raffel, NeurIPS 2022 (arXiv:2111.09832)",
    signatures=[signature(CHECKPOINT, zero_shot=CHECKPOINT, fine_tuned=CHECKPOINT),
                signature(CHECKPOINT, zero_shot=CHECKPOINT, fine_tuned=CHECKPOINT, fishers=list_of(FISHER))],
    params=WiseFTParams,
    check=_check_wise_ft,
    elementwise=True,
)
def wise_ft(zero_shot: torch.Tensor, fine_tuned: torch.Tensor, p: WiseFTParams, ctx,
            fishers: list[torch.Tensor] | None = None) -> torch.Tensor:
    """WiSE-FT: θ = (1 − α)·θ_0 + α·θ_1 (Wortsman et al., 2022). α = 0 and α = 1 return an input exactly.

    With ``fishers`` (each model's diagonal Fisher F_0, F_1), the Fisher-weighted interpolation
    θ = ((1 − α)·F_0·θ_0 + α·F_1·θ_1) / ((1 − α)·F_0 + α·F_1): each parameter leans toward the model whose
    data it mattered to."""
    if fishers is None or p.alpha in (0, 1):
        return weighted_sum([zero_shot, fine_tuned], [1.0 - p.alpha, p.alpha])
    return fisher_weighted([zero_shot, fine_tuned], fishers, [1.0 - p.alpha, p.alpha])


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
