"""TIES-merging (Yadav et al., 2023; semantics §9.2): trim, elect sign, disjoint merge.

With ``scope: global`` (the default, as the reference) each task's threshold is the k-th largest
|τ| over every selected key of the model, and the sign that breaks ties is the majority over the
whole model: exact, streamed, never concatenating the model (mergebench.surgery.numerics.ExactThreshold).
``dare_ties`` is the same merge on DARE-dropped task vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from mergebench.operators.base import (
    CHECKPOINT,
    DELTA,
    KeyContext,
    Params,
    StatisticsPass,
    list_of,
    operator,
    signature,
)
from mergebench.operators.dare import DareParams, drop_and_rescale
from mergebench.operators.task_vectors import finish, task_vectors
from mergebench.operators.topk import VectorsFn, global_threshold_passes
from mergebench.surgery.numerics import elect_sign, keep_count, keep_mask, masked, sum_of_signs, weighted_sum


class TiesParams(Params):
    density: float = Field(0.2, ge=0, le=1, description="fraction of each task vector kept by magnitude (trim)")
    lambda_: float = Field(1.0, alias="lambda", description="scaling λ of the merged task vector")
    elect: Literal["mass"] = Field("mass", description="sign election: the sign of the summed trimmed values")
    agg: Literal["mean", "sum", "max"] = Field("mean", description="disjoint merge of the agreeing values")
    scope: Literal["global", "per_tensor"] = Field(
        "global", description="where thresholds and the majority sign are computed: whole model or each tensor")
    weights: list[float] | None = Field(None, description="per-task weights w_t on the trimmed task vectors, before "
                                                          "the sign election; 'mean' divides by Σ w_t of the agreeing "
                                                          "ones (mergekit's normalize)")
    densities: list[float] | None = Field(None, description="per-task densities, in place of 'density'")

    def density_of(self, task: int) -> float:
        return self.densities[task] if self.densities is not None else self.density


def check_ties(p: TiesParams, lengths: dict[str, int]) -> str | None:
    tasks = lengths.get("models", lengths.get("deltas"))
    for name in ("weights", "densities"):
        values = getattr(p, name)
        if values is not None and tasks is not None and len(values) != tasks:
            return f"'{name}' has {len(values)} values for {tasks} task vectors"
    if p.densities is not None and not all(0 <= d <= 1 for d in p.densities):
        return "every one of 'densities' must lie in [0, 1]"
    return None


SIGNATURES = [
    signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)),
    signature(DELTA, deltas=list_of(DELTA)),
]


def ties_merge(taus: list[torch.Tensor], p: TiesParams, ctx: KeyContext) -> torch.Tensor:
    """λ·τ_m for one key: trimmed, sign-elected, disjointly merged task vectors.

    Accumulates in place, task by task, so a key costs about two tensors per task, not a stack of them.
    """
    # found by the passes: over the model (global scope) or over this key (per tensor, as key passes)
    thresholds, majority = ctx.stats["thresholds"], ctx.stats["majority"]
    trimmed = _weighted(_trimmed(taus, thresholds), p.weights)
    gamma = elect_sign(_summed(trimmed), majority)
    merged = torch.zeros_like(gamma)
    counts = torch.zeros_like(gamma)
    for task, t in enumerate(trimmed):
        agrees = torch.mul(t, gamma).gt_(0)  # 1.0 where t is non-zero with the elected sign
        if p.agg == "max":
            torch.maximum(merged, masked(t.abs(), agrees), out=merged)
        else:
            merged.addcmul_(t, agrees)
            counts.add_(agrees, alpha=1.0 if p.weights is None else p.weights[task])
    if p.agg == "max":
        merged.mul_(gamma)
    elif p.agg == "mean" and p.weights is None:
        merged.div_(counts.clamp_(min=1))
    elif p.agg == "mean":  # mergekit's divisor: Σ w_t over the agreeing tasks, 1 where it is 0
        merged.div_(counts.masked_fill_(counts == 0, 1.0))
    return merged if p.lambda_ == 1 else merged.mul_(p.lambda_)


def _trimmed(taus: list[torch.Tensor], thresholds: list[float]) -> list[torch.Tensor]:
    """τ̂_t: each task vector without its entries below its threshold (a zero threshold keeps them all)."""
    return [tau if thr <= 0 else masked(tau, keep_mask(tau, thr)) for tau, thr in zip(taus, thresholds)]


def _weighted(trimmed: list[torch.Tensor], weights: list[float] | None) -> list[torch.Tensor]:
    return trimmed if weights is None else [t * w for t, w in zip(trimmed, weights)]


def _summed(tensors: list[torch.Tensor]) -> torch.Tensor:
    return weighted_sum(tensors, [1.0] * len(tensors))


def ties_passes(vectors: VectorsFn, scope: str) -> Callable[[Params, frozenset[str]], tuple[StatisticsPass, ...]]:
    """The exact per-task thresholds (two histogram passes), then the majority sign, for params of ``scope``.

    As key passes (``scope="per_tensor"``) they find the per-tensor thresholds the same way, so a large
    tensor is merged slice by slice instead of through tensor-sized temporaries.
    """

    def majority_init(p: TiesParams, stats: Any) -> dict[str, Any]:
        return {"thresholds": stats["thresholds"] if stats else None, "elected": 0}

    def count_signs(state: dict[str, Any], inputs: dict[str, Any], p: TiesParams, ctx: KeyContext) -> None:
        taus = vectors(inputs, p, ctx)
        if state["thresholds"] is None:  # density 0 or 1: no threshold pass was needed
            state["thresholds"] = [0.0 if p.density_of(i) >= 1 else float("inf") for i in range(len(taus))]
        state["elected"] += sum_of_signs(_summed(_weighted(_trimmed(taus, state["thresholds"]), p.weights)))

    def majority_done(state: dict[str, Any], p: TiesParams, stats: Any) -> dict[str, Any]:
        majority = (state["elected"] > 0) - (state["elected"] < 0)
        return {"thresholds": state["thresholds"], "majority": float(majority)}

    def combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {"thresholds": a["thresholds"] or b["thresholds"], "elected": a["elected"] + b["elected"]}

    threshold_passes = global_threshold_passes(vectors, lambda p, n, task: keep_count(p.density_of(task), n))
    majority_pass = StatisticsPass(majority_init, count_signs, majority_done, sliceable=True, combine=combine)

    def passes(p: Params, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
        if p.scope != scope:
            return ()
        densities = p.densities if p.densities is not None else [p.density]
        needs_threshold = any(0 < d < 1 for d in densities)
        return (*threshold_passes, majority_pass) if needs_threshold else (majority_pass,)

    return passes


def _ties_vectors(inputs: dict[str, Any], p: Params, ctx: KeyContext) -> list[torch.Tensor]:
    return task_vectors(inputs.get("base"), inputs.get("models"), inputs.get("deltas"))


@operator(
    "ties",
    paper="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
    signatures=SIGNATURES, params=TiesParams, execution="global statistic",
    passes=ties_passes(_ties_vectors, scope="global"), check=check_ties,
    key_passes=ties_passes(_ties_vectors, scope="per_tensor"), elementwise=True)
def ties(p: TiesParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """TIES-merging: θ = θ_base + λ·τ_m, τ_m the disjoint merge of trimmed, sign-agreeing task vectors."""
    return finish(ties_merge(task_vectors(base, models, deltas), p, ctx), base)


class DareTiesParams(TiesParams, DareParams):
    density: float = Field(1.0, ge=0, le=1, description="fraction of each dropped task vector kept by magnitude")


def _dare_vectors(inputs: dict[str, Any], p: DareTiesParams, ctx: KeyContext) -> list[torch.Tensor]:
    taus = task_vectors(inputs["base"], inputs["models"], None)
    return [drop_and_rescale(tau, p.p, p.scale, ctx, i) for i, tau in enumerate(taus)]


@operator(
    "dare_ties",
    paper="Yu et al., ICML 2024 (arXiv:2311.03099), then Yadav et al., NeurIPS 2023 (arXiv:2306.01708)",
    signatures=[SIGNATURES[0]], params=DareTiesParams, execution="global statistic",
    passes=ties_passes(_dare_vectors, scope="global"), check=check_ties,
    key_passes=ties_passes(_dare_vectors, scope="per_tensor"), elementwise=True)
def dare_ties(base: torch.Tensor, models: list[torch.Tensor], p: DareTiesParams, ctx: KeyContext) -> torch.Tensor:
    """DARE then TIES: each task vector randomly dropped and rescaled, then sign-elected and merged."""
    return finish(ties_merge(_dare_vectors({"base": base, "models": models}, p, ctx), p, ctx), base)
