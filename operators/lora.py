"""LoRA adapters as values (semantics §11): extract one from a fine-tune, merge several into one.

An ``Adapter`` at a key is a ``LowRank`` update (``scale · up @ down``, in the weight's orientation)
or a tensor saved whole; mergebench.io.adapters reads PEFT folders into them and
mergebench.io.adapter_writer writes them back.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mergebench.errors import MergebenchError
from mergebench.operators.base import (
    ADAPTER,
    CHECKPOINT,
    KeyContext,
    Params,
    Regex,
    list_of,
    operator,
    signature,
)
from mergebench.operators.dare import drop_and_rescale
from mergebench.surgery.layers import INPUT_EMBEDDINGS
from mergebench.surgery.low_rank import SVD_METHODS, LowRank, truncated_svd
from mergebench.surgery.numerics import keep_count, keep_mask, masked, threshold_for

SVD_STREAM = "lora_svd"


class _RankParams(Params):
    rank: int | None = Field(None, ge=1, description="rank of each factored matrix (lora_extract: this or energy; "
                                                      "lora_merge: default the largest input rank at the key)")
    energy: float | None = Field(None, gt=0, le=1, description="instead of rank: per matrix, the fewest singular "
                                                               "values whose Σσ² reaches this share of ‖Δ‖²")
    min_rank: int = Field(1, ge=1, description="the least rank kept (with energy)")
    max_rank: int | None = Field(None, ge=1, description="the most rank kept (with energy)")
    svd: Literal[SVD_METHODS] = Field("auto", description="full (LAPACK), randomized (seeded sketch with power "
                                                          "iterations; fixed rank only) or auto: randomized where "
                                                          "the sketch is under a quarter of the matrix")

    def factor(self, delta: torch.Tensor, ctx: KeyContext, rank: int | None = None) -> LowRank:
        """The truncated SVD of ``delta`` by these settings (``rank`` when the parameters name none)."""
        return truncated_svd(delta, self.rank or rank, self.energy, self.min_rank, self.max_rank, self.svd,
                             ctx.generator(SVD_STREAM, 0))


class LoraExtractParams(_RankParams):
    target_modules: Regex | None = Field(None, description="regex (re.search) of the weight keys to factor; default "
                                                           "every 2-D weight inside the blocks but embeddings")
    modules_to_save: Regex | None = Field(None, description="regex of other keys whose fine-tuned tensor is saved "
                                                            "whole where it differs from the base (norms, biases, "
                                                            "heads); default none: left out of the adapter")

    @model_validator(mode="after")
    def _one_rank_rule(self) -> LoraExtractParams:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give rank or energy (exactly one)")
        if self.svd == "randomized" and self.energy is not None:
            raise ValueError("svd: randomized needs a fixed rank (energy needs the whole spectrum)")
        return self


@operator(
    "lora_extract",
    paper="LoRA: Hu et al., arXiv:2106.09685; Eckart–Young truncation; randomized SVD: Halko et al., "
          "SIAM Review 53(2), 2011",
    signatures=[signature(ADAPTER, base=CHECKPOINT, fine_tuned=CHECKPOINT)], params=LoraExtractParams)
def lora_extract(base: torch.Tensor, fine_tuned: torch.Tensor, p: LoraExtractParams, ctx: KeyContext) -> LowRank:
    """Δ = θ_ft − θ_0 per targeted matrix, truncated to its best rank-r (or energy-share) approximation
    B·A = U_r·Σ_r·V_rᵀ; other keys saved whole (``modules_to_save``) or left out."""
    delta = fine_tuned - base
    if _targeted(ctx.key, delta, ctx.block, p.target_modules):
        return p.factor(delta, ctx)
    if p.modules_to_save and re.search(p.modules_to_save, ctx.key) and not torch.equal(fine_tuned, base):
        return LowRank(whole=fine_tuned)
    return LowRank()


def _targeted(key: str, delta: torch.Tensor, block: int | None, pattern: str | None) -> bool:
    if delta.dim() != 2:
        return False
    if pattern is not None:
        return re.search(pattern, key) is not None
    return block is not None and not INPUT_EMBEDDINGS.search(key)


COMBINATIONS = ("linear", "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
PRUNED = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


class LoraMergeParams(_RankParams):
    combination: Literal[COMBINATIONS] = Field(
        "svd", description="PEFT's add_weighted_adapter combinations: linear (factors summed: same ranks; "
                           "approximate), cat (factors stacked: exact, rank Σr), svd and the pruned *_svd (the "
                           "weighted sum of the updates, truncated by SVD)")
    weights: list[float] | None = Field(None, description="one weight per adapter (default 1 each); negative "
                                                          "subtracts an adapter")
    density: float | None = Field(None, ge=0, le=1, description="share of each update kept by the pruned "
                                                                "combinations (ties, dare, magnitude_prune)")
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="TIES sign election: sign of the summed weighted updates, or of their signs' count")
    svd_clamp: float | None = Field(None, gt=0, le=1, description="clamp the SVD factors' entries to this "
                                                                  "quantile of their magnitudes (PEFT's svd_clamp)")

    @model_validator(mode="after")
    def _density_where_pruned(self) -> LoraMergeParams:
        if self.combination in PRUNED and self.density is None:
            raise ValueError(f"combination {self.combination} needs a density")
        if self.combination not in PRUNED and self.density is not None:
            raise ValueError(f"density has no effect with combination {self.combination}")
        if self.combination in ("linear", "cat") and (self.rank or self.energy):
            raise ValueError(f"rank and energy apply to the svd combinations, not {self.combination}")
        return self


def _check_merge(p: LoraMergeParams, lengths: dict[str, int]) -> str | None:
    if p.weights is not None and len(p.weights) != lengths["adapters"]:
        return f"weights has {len(p.weights)} values for {lengths['adapters']} adapters"
    return None


@operator(
    "lora_merge",
    paper="PEFT add_weighted_adapter (huggingface/peft, tuners/lora/model.py); TIES: Yadav et al., "
          "arXiv:2306.01708; DARE: Yu et al., arXiv:2311.03099",
    signatures=[signature(ADAPTER, adapters=list_of(ADAPTER))], params=LoraMergeParams, check=_check_merge)
def lora_merge(adapters: list[LowRank], p: LoraMergeParams, ctx: KeyContext) -> LowRank:
    """One adapter from several, per key: ``cat`` stacks w_i·A_i over B_i; ``linear`` sums
    ±√|w_i·s_i|·A_i and √|w_i·s_i|·B_i (PEFT's rule: same ranks, cross terms included); ``svd`` truncates
    Σ w_i·Δ_i, its pruned variants first trim each Δ_i (magnitude top-k, or DARE's seeded drop and
    rescale) and the TIES ones keep the entries that agree with the elected sign of the weighted updates."""
    weights = p.weights or [1.0] * len(adapters)
    wholes = [a.whole for a in adapters if a.whole is not None]
    if len(wholes) > 1:
        raise MergebenchError(f"'{ctx.key}' is saved whole (modules_to_save) by {len(wholes)} of the adapters: "
                              f"whole tensors are not merged (PEFT refuses them too); leave it out of all but one")
    whole = wholes[0] if wholes else None
    present = [(w, a, i) for i, (w, a) in enumerate(zip(weights, adapters)) if a.up is not None]
    if not present:
        return LowRank(whole=whole)
    if p.combination == "cat":
        down = torch.cat([a.down * (w * a.scale) for w, a, _ in present])
        return LowRank(down=down, up=torch.cat([a.up for _, a, _ in present], dim=1), whole=whole)
    if p.combination == "linear":
        return _linear(present, whole, ctx.key)
    deltas = [(a.delta(), w, i) for w, a, i in present]
    merged = _combined(deltas, p, ctx)
    factors = p.factor(merged, ctx, rank=max(a.rank for _, a, _ in present))
    if p.svd_clamp is not None and not factors.empty:
        factors = _clamped(factors, p.svd_clamp)
    return LowRank(factors.down, factors.up, whole, factors.error)


def _linear(present: list[tuple[float, LowRank, int]], whole: torch.Tensor | None, key: str) -> LowRank:
    ranks = {a.rank for _, a, _ in present}
    if len(ranks) > 1:
        raise MergebenchError(f"'{key}': combination linear sums factors and needs one rank, and the adapters have "
                              f"{sorted(ranks)} here (use cat or svd)")
    down = sum(a.down * (abs(w * a.scale) ** 0.5 * (1 if w * a.scale >= 0 else -1)) for w, a, _ in present)
    up = sum(a.up * abs(w * a.scale) ** 0.5 for w, a, _ in present)
    return LowRank(down=down, up=up, whole=whole)


def _combined(deltas: list[tuple[torch.Tensor, float, int]], p: LoraMergeParams, ctx: KeyContext) -> torch.Tensor:
    """Σ w_i·Δ̂_i, Δ̂ trimmed by the combination; TIES keeps per entry the weighted terms whose update has the
    elected sign (a negative weight's update counted with its sign flipped) and averages them."""
    if p.combination in ("magnitude_prune_svd", "ties_svd"):
        trimmed = [_top_magnitudes(d, p.density) for d, _, _ in deltas]
    elif p.combination in ("dare_linear_svd", "dare_ties_svd"):
        trimmed = [drop_and_rescale(d, 1 - p.density, 1 / p.density if p.density else 0.0, ctx, i)
                   for d, _, i in deltas]
    else:
        trimmed = [d for d, _, _ in deltas]
    weighted = [t * w for t, (_, w, _) in zip(trimmed, deltas)]
    if p.combination not in ("ties_svd", "dare_ties_svd"):
        return sum(weighted)
    # PEFT elects on the trimmed updates unweighted; a negative weight must flip its vote, which PEFT's does not
    signed = [t if w >= 0 else -t for t, (_, w, _) in zip(trimmed, deltas)]
    votes = sum(signed) if p.majority_sign_method == "total" else sum(torch.sign(t) for t in signed)
    elected = torch.where(votes >= 0, 1.0, -1.0)
    agreeing = [torch.sign(t) == elected for t in signed]
    total = sum(masked(t, keep) for t, keep in zip(weighted, agreeing))
    return total / sum(keep.float() for keep in agreeing).clamp_(min=1)


def _top_magnitudes(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = keep_count(density, delta.numel())
    if k >= delta.numel():
        return delta
    if k == 0:
        return torch.zeros_like(delta)
    return masked(delta, keep_mask(delta, threshold_for(delta.abs(), k)))


def _clamped(factors: LowRank, quantile: float) -> LowRank:
    """PEFT's svd_clamp: both factors' entries clipped to ± the quantile of their joint distribution."""
    values = torch.cat([factors.up.reshape(-1), factors.down.reshape(-1)]).cpu().numpy()
    high = float(np.quantile(values, quantile))  # torch.quantile's linear rule, without its 2²⁴-entry limit
    return LowRank(factors.down.clamp(-high, high), factors.up.clamp(-high, high), error=factors.error)
