"""PCB-merging (Du et al., 2024; semantics §9.15): balance each entry's importance within its task and its agreement
across tasks, keep the most important, and average the task vectors by those weights.

The reference computes its quantiles and normalisations over the whole flattened model; here they are
taken over each tensor (``scope: per_tensor``), which needs no statistics pass. The whole-model form needs
exact signed order statistics streamed in passes (the design is in docs/methods.md).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, DELTA, KeyContext, Params, list_of, operator, signature
from mergebench.operators.task_vectors import finish, task_vectors

OUTLIER_RATIO = 0.0001  # the reference clips |τ| to its 0.01 % and 99.99 % quantiles


class PcbParams(Params):
    ratio: float = Field(0.1, gt=0, le=1, description="fraction of each task's entries kept (pcb_ratio)")
    lambda_: float = Field(1.0, alias="lambda", description="scaling λ of the merged task vector")


def _clamp_quantiles(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each row clamped to its sorted values at ⌊d·low⌋ and ⌊d·(1 − high)⌋ − 1 (the reference's ``clamp``)."""
    d = x.shape[1]
    ordered = x.sort(dim=1).values
    return x.clamp(ordered[:, int(d * low)].unsqueeze(1), ordered[:, int(d * (1 - high) - 1)].unsqueeze(1))


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row mapped onto [0, 1]; a constant row (where the reference divides by zero) onto 0."""
    low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    span = high - low
    return (x - low) / torch.where(span == 0, torch.ones_like(span), span)


def pcb_merge(taus: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference's PCB_merge on a [tasks, entries] matrix."""
    count = taus.shape[0]
    magnitudes = _clamp_quantiles(taus.abs(), OUTLIER_RATIO, OUTLIER_RATIO)
    clipped = taus.sign() * magnitudes
    intra = torch.exp(count * _min_max(magnitudes).square())
    inter = torch.tanh(taus * taus.sum(dim=0))
    scale = _min_max(_clamp_quantiles(intra * inter, 1 - ratio, 0))
    return (clipped * scale).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)


@operator(
    "pcb",
    paper="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024 (arXiv:2410.02396)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)),
                signature(DELTA, deltas=list_of(DELTA))],
    params=PcbParams)
def pcb(p: PcbParams, ctx: KeyContext, base=None, models=None, deltas=None) -> torch.Tensor:
    """θ_0 + λ·Σ_t β_t·τ̃_t / Σ_t β_t per tensor: β the min-max-normalised product of intra-balancing
    exp(T·norm(|τ|)²) and inter-balancing tanh(τ_t·Σ_s τ_s), zero below its top ``ratio``; τ̃ the clipped τ."""
    taus = task_vectors(base, models, deltas)
    merged = pcb_merge(torch.stack(taus).reshape(len(taus), -1), p.ratio).reshape(taus[0].shape)
    return finish(merged.mul_(p.lambda_), base)
