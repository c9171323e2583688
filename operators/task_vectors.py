"""Task vectors: deltas from a base, applying them, and Task Arithmetic (semantics §0.9, §9.1)."""

from __future__ import annotations

from itertools import chain

import torch
from pydantic import Field

from mergebench.operators.base import ADAPTER, CHECKPOINT, DELTA, SPARSE_DELTA, Params, list_of, operator, signature
from mergebench.surgery.low_rank import LowRank
from mergebench.surgery.numerics import weighted_sum


@operator(
    "delta",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    signatures=[signature(list_of(DELTA), base=CHECKPOINT, models=list_of(CHECKPOINT))],
    elementwise=True)
def delta(base: torch.Tensor, models: list[torch.Tensor], p, ctx) -> list[torch.Tensor]:
    """Task vectors τ_t = θ_t − θ_base, one Delta per model, in the order given."""
    return [model - base for model in models]


class ApplyParams(Params):
    scale: float = Field(1.0, description="multiplier on the delta (on each delta of a list, which is summed)")


@operator(
    "apply",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT,
    delta=(DELTA, list_of(DELTA), SPARSE_DELTA, list_of(SPARSE_DELTA), ADAPTER, list_of(ADAPTER)))],
    params=ApplyParams,
    elementwise=True,  # an adapter's factors are never sliced: the engine slices only plain tensors
)
def apply(base: torch.Tensor, delta: torch.Tensor | LowRank | list, p: ApplyParams, ctx) -> torch.Tensor:
    """θ = θ_base + scale·Σ τ: turns a Delta, SparseDelta or Adapter (or a list of them) back into a Checkpoint.

    An adapter's τ is its low-rank update (a tensor it saves whole counts as whole − θ_base); a key it
    leaves alone is θ_base bit for bit."""
    deltas = [_dense(base, d) for d in (delta if isinstance(delta, list) else [delta])]
    deltas = [d for d in deltas if d is not None]
    return weighted_sum([base, *deltas], [1.0] + [p.scale] * len(deltas))


def _dense(base: torch.Tensor, delta: torch.Tensor | LowRank) -> torch.Tensor | None:
    if not isinstance(delta, LowRank):
        return delta
    if delta.empty:
        return None
    dense = torch.zeros_like(base) if delta.whole is None else delta.whole.to(base.dtype) - base
    return dense if delta.up is None else dense.addmm_(delta.up, delta.down, alpha=delta.scale)


NORMALIZE_EPS = 1e-8  # mergekit's: a weight sum closer to 0 than this divides by 1


def normalizer(weights: list[float], normalize: bool) -> float:
    """What mergekit's ``normalize`` divides a weighted sum by: Σ w_t, or 1 when it is off or |Σ w_t| < 1e-8."""
    total = sum(weights)
    return total if normalize and abs(total) >= NORMALIZE_EPS else 1.0


class TaskArithmeticParams(Params):
    lambda_: float = Field(0.3, alias="lambda", description="scaling λ of the summed task vectors")
    weights: list[float] | None = Field(None, description="per-task weights w_t (default all 1; -1 negates a task)")
    normalize: bool = Field(False, description="divide by Σ w_t (by 1 when |Σ w_t| < 1e-8), as mergekit's normalize")

    def scaled_weights(self, count: int) -> list[float]:
        """λ·w_t, divided by Σ w_t when normalizing."""
        weights = self.weights or [1.0] * count
        return [self.lambda_ * w / normalizer(weights, self.normalize) for w in weights]


def check_weights(p: TaskArithmeticParams, lengths: dict[str, int]) -> str | None:
    count = lengths.get("models", lengths.get("deltas"))
    if p.weights is not None and len(p.weights) != count:
        return f"'weights' has {len(p.weights)} values for {count} task vectors"
    return None


@operator(
    "task_arithmetic",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    signatures=[
        signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)),
        signature(DELTA, deltas=list_of(DELTA)),
    ],
    params=TaskArithmeticParams,
    check=check_weights,
    elementwise=True,
)
def task_arithmetic(
    p: TaskArithmeticParams,
    ctx,
    base: torch.Tensor | None = None,
    models: list[torch.Tensor] | None = None,
    deltas: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Task Arithmetic (Ilharco et al., 2023): θ = θ_base + λ·Σ_t w_t·τ_t; with ``deltas`` it returns λ·Σ w_t·τ_t."""
    task_vectors = deltas if deltas is not None else (model - base for model in models)
    weights = p.scaled_weights(len(deltas if deltas is not None else models))
    if base is None:
        return weighted_sum(task_vectors, weights)
    return weighted_sum(chain([base], task_vectors), [1.0, *weights])


def task_vectors(base: torch.Tensor | None, models: list[torch.Tensor] | None,
                 deltas: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The task vectors of one key, whichever way a node was wired (``base`` + ``models`` or ``deltas``)."""
    return list(deltas) if deltas is not None else [model - base for model in models]


def finish(merged_delta: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """A merged delta as the node's result: the delta itself, or the base plus it (``base`` + ``models``)."""
    return merged_delta if base is None else merged_delta.add_(base)


def consensus_sum(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """mergekit's sign consensus over one tensor: the weighted task vectors that agree with the sign of their sum
    (a zero sum counts as +), summed; divided by Σ w_t over the agreeing ones (1 where none) when normalizing."""
    total = weighted[0].clone()
    for w in weighted[1:]:
        total.add_(w)
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w, weight in zip(weighted, weights):
        agrees = (w.sign() == majority).to(total.dtype)
        merged.addcmul_(w, agrees)
        divisor.add_(agrees, alpha=weight)
    return merged.div_(divisor.masked_fill_(divisor == 0, 1.0)) if normalize else merged
