"""SLERP between two checkpoints (Shoemake 1985, as merging tools use it; semantics §9.6)."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, StatisticsPass, operator, signature
from mergebench.surgery.numerics import ChunkedDot


class SlerpParams(Params):
    t: float = Field(0.5, description="0 gives a, 1 gives b (a gradient [t0, ..., tn] varies it over the blocks)")
    dot_threshold: float = Field(0.9995, description="above this |cos| the tensors count as colinear: lerp")
    eps: float = Field(1e-8, gt=0, description="a tensor with norm at most eps falls back to lerp")


def _accumulate_dots(state: dict[str, ChunkedDot], inputs: dict[str, Any], p: SlerpParams, ctx: KeyContext) -> None:
    a, b = inputs["a"], inputs["b"]
    for name, (x, y) in (("aa", (a, a)), ("bb", (b, b)), ("ab", (a, b))):
        state[name].add(x, y)


def _weights(state: dict[str, ChunkedDot], p: SlerpParams, stats: Any) -> tuple[float, float]:
    """The weights of a and b: sin((1 − t)Ω)/sin Ω and sin(tΩ)/sin Ω, or 1 − t and t (colinear or tiny)."""
    t = p.t
    norm_a, norm_b = math.sqrt(state["aa"].total()), math.sqrt(state["bb"].total())
    if norm_a > p.eps and norm_b > p.eps:
        cosine = state["ab"].total() / (norm_a * norm_b)
        if abs(cosine) <= p.dot_threshold:
            omega = math.acos(cosine)
            return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return 1 - t, t


# the norms and the angle of the whole tensors, gathered a slice at a time: the interpolation is then elementwise
ANGLE = StatisticsPass(init=lambda p, stats: {name: ChunkedDot() for name in ("aa", "bb", "ab")},
                       accumulate=_accumulate_dots, finalize=_weights, sliceable=True)


@operator(
    "slerp",
    paper="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
    signatures=[signature(CHECKPOINT, a=CHECKPOINT, b=CHECKPOINT)], params=SlerpParams,
    key_passes=lambda p, slots: (ANGLE,), elementwise=True)
def slerp(a: torch.Tensor, b: torch.Tensor, p: SlerpParams, ctx: KeyContext) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors; lerp when they are (anti)colinear or tiny."""
    weight_a, weight_b = ctx.stats
    return a * weight_a + b * weight_b
