"""Interpolation on the sphere of several models: NuSLERP, Multi-SLERP and the Karcher mean (semantics §9.10).

As mergekit computes them (its ``nuslerp``, ``multislerp`` and ``karcher`` methods), per tensor, so
that a mergekit config gives the same tensors; with a ``base`` they interpolate the task vectors.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, list_of, operator, signature

WITH_OR_WITHOUT_BASE = [signature(CHECKPOINT, models=list_of(CHECKPOINT)),
                        signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT))]


def _check_weights(p: Params, lengths: dict[str, int], exactly: int | None = None) -> str | None:
    count = lengths["models"]
    if exactly is not None and count != exactly:
        return f"takes exactly {exactly} models, got {count}"
    if p.weights is not None and len(p.weights) != count:
        return f"'weights' has {len(p.weights)} values for {count} models"
    return None


class NuSlerpParams(Params):
    weights: list[float] | None = Field(None, description="relative weights of the two models (t = w₂/(w₁ + w₂); "
                                                          "0.5 when they sum to 0)")
    row_wise: bool = Field(False, description="interpolate each row (the first dimension) on its own sphere")
    flatten: bool = Field(True, description="interpolate the whole flattened tensor (mergekit's nuslerp_flatten)")


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Spherical interpolation along the last axis (every row of it), or of the flattened tensors."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@operator(
    "nuslerp",
    paper="mergekit's NuSLERP (Goddard et al., Arcee's MergeKit, arXiv:2403.13257)",
    signatures=WITH_OR_WITHOUT_BASE, params=NuSlerpParams,
    check=lambda p, lengths: _check_weights(p, lengths, exactly=2))
def nuslerp(models: list[torch.Tensor], p: NuSlerpParams, ctx: KeyContext, base: torch.Tensor | None = None
            ) -> torch.Tensor:
    """SLERP of two models at t = w₂/(w₁ + w₂), or of their task vectors added to the base."""
    weights = p.weights or [1.0, 1.0]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return nuslerp_pair(t, models[0], models[1], p.row_wise, p.flatten)
    return nuslerp_pair(t, models[0] - base, models[1] - base, p.row_wise, p.flatten).add_(base)


class MultiSlerpParams(Params):
    weights: list[float] | None = Field(None, description="one weight per model (default: all 1)")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="added to norms before dividing by them")


@operator(
    "multislerp",
    paper="Goddard, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit",
    signatures=WITH_OR_WITHOUT_BASE, params=MultiSlerpParams, check=_check_weights)
def multislerp(models: list[torch.Tensor], p: MultiSlerpParams, ctx: KeyContext, base: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Barycentre on the sphere: the unit vectors projected on the tangent space at their weighted mean,
    averaged there, mapped back by the exponential map and scaled by the weighted mean norm."""
    if len(models) == 1:
        return models[0].clone()
    vectors = torch.stack([m - base for m in models] if base is not None else models).reshape(len(models), -1)
    weights = torch.tensor(p.weights or [1.0] * len(models), dtype=vectors.dtype, device=vectors.device)
    if p.normalize_weights:
        weights = weights / weights.sum()
    norms = vectors.norm(dim=-1, keepdim=True)
    units = vectors / (norms + p.eps)
    mean = (units * weights[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < p.eps:
        if len(models) != 2:
            raise ValueError(f"multislerp: the weighted mean direction of '{ctx.key}' is zero (antipodal inputs)")
        result = vectors[0] * weights[0] + vectors[1] * weights[1]
    else:
        mean = mean / mean_norm
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights[:, None]).sum(0)
        length = tangent.norm() + p.eps
        result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms[:, 0] * weights).sum()
    result = result.reshape(models[0].shape)
    return result if base is None else result.add_(base)


class KarcherParams(Params):
    max_iter: int = Field(10, ge=1, description="Riemannian gradient steps at most")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is shorter; norms below it are zero")


@operator(
    "karcher",
    paper="Karcher, Riemannian center of mass, 1977 (model merging: mergekit's karcher, arXiv:2603.04972)",
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT))], params=KarcherParams)
def karcher(models: list[torch.Tensor], p: KarcherParams, ctx: KeyContext) -> torch.Tensor:
    """The equally weighted Karcher (Fréchet) mean of the directions on the sphere, times the mean norm."""
    if len(models) == 1:
        return models[0].clone()
    weight = 1.0 / len(models)
    norms = [float(m.norm()) for m in models]
    valid = [(m / n).reshape(-1) for m, n in zip(models, norms) if n > p.tol]
    if not valid:
        return torch.zeros_like(models[0])
    alpha = 1.0 / len(valid)
    mean = torch.zeros_like(valid[0])
    for unit in valid:
        mean.add_(unit, alpha=alpha)
    mean_norm = float(mean.norm())
    mean = valid[0].clone() if mean_norm < p.tol else mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(p.max_iter):  # in place, with Python scalars: a step reads each unit twice and writes nothing else
        tangent.zero_()
        for unit in valid:
            dot = min(1.0, max(-1.0, float(torch.dot(mean, unit))))
            theta = math.acos(dot)
            if theta < p.tol:
                continue
            coefficient = alpha * theta / math.sin(theta)
            tangent.add_(unit, alpha=coefficient).add_(mean, alpha=-coefficient * dot)
        length = float(tangent.norm())
        if length < p.tol:
            break
        mean.mul_(math.cos(length)).add_(tangent, alpha=math.sin(length) / length)
        unit_norm = float(mean.norm())
        if unit_norm > p.tol:
            mean.div_(unit_norm)
    return mean.mul_(sum(weight * n for n in norms)).reshape(models[0].shape)
