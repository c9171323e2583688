"""SLERP between two checkpoints (Shoemake 1985, as merging tools use it; semantics §9.6)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, operator, signature


class SlerpParams(Params):
    t: float = Field(0.5, description="0 gives a, 1 gives b (a gradient [t0, ..., tn] varies it over the blocks)")
    dot_threshold: float = Field(0.9995, description="above this |cos| the tensors count as colinear: lerp")
    eps: float = Field(1e-8, gt=0, description="a tensor with norm at most eps falls back to lerp")


@operator(
    "slerp",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
    signatures=[signature(CHECKPOINT, a=CHECKPOINT, b=CHECKPOINT)], params=SlerpParams)
def slerp(a: torch.Tensor, b: torch.Tensor, p: SlerpParams, ctx: KeyContext) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors; lerp when they are (anti)colinear or tiny."""
    t = p.t
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a > p.eps and norm_b > p.eps:
        cosine = float(torch.dot(a.reshape(-1), b.reshape(-1))) / (norm_a * norm_b)
        if abs(cosine) <= p.dot_threshold:
            omega = math.acos(cosine)
            return a * (math.sin((1 - t) * omega) / math.sin(omega)) + b * (math.sin(t * omega) / math.sin(omega))
    return a * (1 - t) + b * t
