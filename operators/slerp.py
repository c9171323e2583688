"""SLERP between two checkpoints (Shoemake 1985, as merging tools use it; semantics §9.6)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, operator, signature


class SlerpParams(Params):
    t: float | list[float] = Field(0.5, description="0 gives a, 1 gives b; a list is a per-block schedule "
                                                    "interpolated over the blocks")
    dot_threshold: float = Field(0.9995, description="above this |cos| the tensors count as colinear: lerp")
    eps: float = Field(1e-8, gt=0, description="a tensor with norm at most eps falls back to lerp")
    t_outside: float = Field(0.5, description="t for keys outside blocks when t is a schedule")

    @field_validator("t")
    @classmethod
    def _schedule_has_two_points(cls, t: float | list[float]) -> float | list[float]:
        if isinstance(t, list) and len(t) < 2:
            raise ValueError("a schedule needs at least 2 values")
        return t


def t_for(p: SlerpParams, ctx: KeyContext) -> float:
    """The schedule read at x = ℓ/(L−1)·(m−1), linearly between its points."""
    if not isinstance(p.t, list):
        return p.t
    if ctx.block is None:
        return p.t_outside
    x = ctx.block / (ctx.num_blocks - 1) * (len(p.t) - 1) if ctx.num_blocks > 1 else 0.0
    low = min(int(math.floor(x)), len(p.t) - 2)
    return p.t[low] + (x - low) * (p.t[low + 1] - p.t[low])


@operator(
    "slerp",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
    signatures=[signature(CHECKPOINT, a=CHECKPOINT, b=CHECKPOINT)], params=SlerpParams)
def slerp(a: torch.Tensor, b: torch.Tensor, p: SlerpParams, ctx: KeyContext) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors; lerp when they are (anti)colinear or tiny."""
    t = t_for(p, ctx)
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a > p.eps and norm_b > p.eps:
        cosine = float(torch.dot(a.reshape(-1), b.reshape(-1))) / (norm_a * norm_b)
        if abs(cosine) <= p.dot_threshold:
            omega = math.acos(cosine)
            return a * (math.sin((1 - t) * omega) / math.sin(omega)) + b * (math.sin(t * omega) / math.sin(omega))
    return a * (1 - t) + b * t
