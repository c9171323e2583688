"""Operators that pick, entry by entry, between the inputs: NearSwap, MagMax and Arcee Fusion (semantics §9.12)."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, DELTA, KeyContext, Params, list_of, operator, signature
from mergebench.operators.task_vectors import finish, task_vectors


class NearSwapParams(Params):
    t: float = Field(description="distance below which an entry takes the other model's value (w = t/|a − b|, "
                                 "clamped to [0, 1])")


@operator(
    "nearswap",
    paper="mergekit's NearSwap (alchemonaut, QuartetAnemoi-70B-t0.0001)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, model=CHECKPOINT)], params=NearSwapParams,
    elementwise=True)
def nearswap(base: torch.Tensor, model: torch.Tensor, p: NearSwapParams, ctx: KeyContext) -> torch.Tensor:
    """θ = w·θ_model + (1 − w)·θ_base with w = clamp(t / max(|θ_base − θ_model|, 1e-6), 0, 1): entries that
    barely differ take the model's value, entries far apart keep the base's."""
    weight = (p.t / (base - model).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return weight * model + (1 - weight) * base


class MagMaxParams(Params):
    lambda_: float = Field(1.0, alias="lambda", description="scaling λ of the merged task vector")


@operator(
    "magmax",
    paper="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024 "
          "(arXiv:2407.06322)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)),
                signature(DELTA, deltas=list_of(DELTA))],
    params=MagMaxParams, elementwise=True)
def magmax(p: MagMaxParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """Each entry of the merged task vector is the task vectors' entry of largest magnitude (the first on a
    tie), times λ."""
    taus = task_vectors(base, models, deltas)
    merged = taus[0].clone()
    for tau in taus[1:]:
        larger = tau.abs() > merged.abs()
        merged = torch.where(larger, tau, merged)
    return finish(merged.mul_(p.lambda_), base)


def arcee_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_0| times the KL divergence of softmax(θ) from softmax(θ_0) along the last axis."""
    eps = 1e-8
    p = torch.softmax(model, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    return (model - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def quartiles_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(Q3 − Q1) of the scores, each quartile the sorted value at ⌊q·(n − 1)⌋ (mergekit's rule;
    exact where mergekit samples a million entries of larger tensors)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    q1, median, q3 = (flat.kthvalue(int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@operator(
    "arcee_fusion",
    paper="Arcee Fusion (Arcee AI, as mergekit's arcee_fusion)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, fine_tuned=CHECKPOINT)])
def arcee_fusion(base: torch.Tensor, fine_tuned: torch.Tensor, p, ctx: KeyContext) -> torch.Tensor:
    """The fine-tuned value where its importance (change × KL of the softmaxed rows) reaches the dynamic
    threshold median + 1.5·IQR of the tensor's importances, the base value elsewhere."""
    importance = arcee_importance(fine_tuned, base)
    keep = (importance >= quartiles_threshold(importance)).to(base.dtype)
    return base + (fine_tuned - base) * keep
