"""Grafting masks optimised against a task loss (semantics §5), for small models in memory.

The weight-only ``graft`` operator takes the top-k of |θ_ft − θ_pre| (the paper's base patch). This
refines it: the binary mask is relaxed to γ(S) = γ_base + (1 − 2γ_base)·σ(S − b) with logits S
initialised in [0, 1) (so γ ≈ γ_base), S follows plain gradient descent on
L(θ_pre + γ(S) ⊙ δ), and the rounded mask with the lowest ``score`` is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mergebench.surgery.layers import block_index
from mergebench.surgery.numerics import draw_seed, keep_count

GRAFT_INIT_STREAM = "graft_init"


@dataclass(frozen=True)
class GraftResult:
    mask: dict[str, torch.Tensor]  # the best rounded mask (bool), candidate keys only
    score: float  # its score (lower is better)
    history: list[float]  # the score of the rounded mask after each step (step 0: the base patch)


def base_patch(pretrained: Mapping[str, torch.Tensor], fine_tuned: Mapping[str, torch.Tensor], sparsity: float,
               candidates: list[str]) -> dict[str, torch.Tensor]:
    """γ_base: the global top-k of |δ| over the candidate keys, k = floor(s·N), ties at the threshold kept."""
    deltas = {k: (fine_tuned[k].float() - pretrained[k].float()).abs() for k in candidates}
    flat = torch.cat([d.reshape(-1) for d in deltas.values()])
    k = keep_count(sparsity, flat.numel())
    threshold = math.inf if k == 0 else float(torch.topk(flat, k).values[-1])
    return {key: d >= threshold for key, d in deltas.items()}


def relax(base: torch.Tensor, logits: torch.Tensor, sigmoid_bias: float) -> torch.Tensor:
    """γ(S) = γ_base + (1 − 2γ_base)·σ(S − b): near γ_base for small S, differentiable in S."""
    return base.float() + (1 - 2 * base.float()) * torch.sigmoid(logits - sigmoid_bias)


def optimize_mask(
    pretrained: Mapping[str, torch.Tensor],
    fine_tuned: Mapping[str, torch.Tensor],
    loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    sparsity: float = 1e-4,
    steps: int = 100,
    lr: float = 1e7,
    sigmoid_bias: float = 10.0,
    l1: float = 0.0,
    score_fn: Callable[[dict[str, torch.Tensor]], float] | None = None,
    candidates: list[str] | None = None,
    seed: int = 0,
) -> GraftResult:
    """Optimise a graft region for ``loss_fn(params) -> scalar`` (differentiable in the params).

    ``score_fn(params)`` ranks rounded masks (default: ``loss_fn``); ``candidates`` defaults to the
    floating keys inside blocks. ``lr`` is large because σ' at the initial logits is about 4.5e-5.
    """
    if candidates is None:
        candidates = [k for k, v in pretrained.items() if v.is_floating_point() and block_index(k) is not None]
    score_fn = score_fn or (lambda params: float(loss_fn(params)))
    base = base_patch(pretrained, fine_tuned, sparsity, candidates)
    deltas = {k: fine_tuned[k].float() - pretrained[k].float() for k in candidates}
    logits = {}
    for key in candidates:
        generator = torch.Generator().manual_seed(draw_seed(seed, GRAFT_INIT_STREAM, 0, key))
        logits[key] = torch.rand(pretrained[key].shape, generator=generator).requires_grad_(True)

    def params_with(mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grafted = dict(pretrained)
        for key in candidates:
            grafted[key] = pretrained[key].float() + mask[key] * deltas[key]
        return grafted

    def relaxed() -> dict[str, torch.Tensor]:
        return {k: relax(base[k], logits[k], sigmoid_bias) for k in candidates}

    best_mask = base
    with torch.no_grad():
        best = score_fn(params_with({k: m.float() for k, m in base.items()}))
    history = [best]
    for _ in range(steps):
        gamma = relaxed()
        loss = loss_fn(params_with(gamma))
        if l1:
            loss = loss + l1 * torch.cat([g.reshape(-1) for g in gamma.values()]).mean()
        grads = torch.autograd.grad(loss, [logits[k] for k in candidates])
        with torch.no_grad():
            for key, grad in zip(candidates, grads):
                logits[key] -= lr * grad
            rounded = {k: g.round().bool() for k, g in relaxed().items()}
            score = score_fn(params_with({k: m.float() for k, m in rounded.items()}))
        history.append(score)
        if score < best:
            best, best_mask = score, rounded
    return GraftResult(best_mask, best, history)
