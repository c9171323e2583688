"""DARE (Yu et al., 2024) and DAREx-q (Deng et al., 2025): drop delta entries at random, rescale the rest.

Masks are drawn on the CPU from a generator seeded by (seed, "dare", input position, key), so the
same mask comes out on any device, shard layout or key order, and ``darex_q`` with q = 1 − p is
``dare`` bit for bit (semantics §0.5, §9.3, §9.4).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, model_validator

from mergebench.operators.base import (
    CHECKPOINT,
    DELTA,
    KeyContext,
    Params,
    list_of,
    operator,
    signature,
)
from mergebench.operators.task_vectors import (
    TaskArithmeticParams,
    check_weights,
    finish,
    task_arithmetic,
    task_vectors,
)
from mergebench.surgery.numerics import masked

MASK_STREAM = "dare"
DRAW_PIECE = 1 << 16  # draws per piece: 256 KiB of words, in cache
UNIFORM_STEPS = 1 << 24  # torch.rand's float32 draws are multiples of 2⁻²⁴ in [0, 1)
CPU = torch.device("cpu")


def keep_mask(shape: torch.Size, drop: float, ctx: KeyContext, index: int,
              device: torch.device = CPU) -> torch.Tensor:
    """m ~ Bernoulli(1 − p) per entry, on ``device``: keep iff a float32 uniform draw u ≥ p, drawn on the CPU.

    Drawn once per key: the statistics passes of DARE-TIES and its merge see the mask the first drew.
    """

    def draw() -> torch.Tensor:
        bits = _drawn_mask(math.prod(shape), drop, ctx.words(MASK_STREAM, index))
        return torch.from_numpy(bits).reshape(shape).to(device)

    return ctx.cached((MASK_STREAM, index, drop, tuple(shape)), draw)


def _drawn_mask(numel: int, drop: float, words: np.random.RandomState) -> np.ndarray:
    """torch.rand(numel) ≥ p, computed on the 32-bit words those draws are made of, a cache-sized piece at a time.

    A float32 draw is its word's low 24 bits times 2⁻²⁴, and is compared with p as float32: it is at
    least p exactly when those bits are at least ⌈float32(p)·2²⁴⌉. Pieces keep the words in cache;
    the words continue from piece to piece, so they are those of the whole key.
    """
    least = math.ceil(float(np.float32(drop)) * UNIFORM_STEPS)
    mask = np.empty(numel, dtype=bool)
    for start in range(0, numel, DRAW_PIECE):
        piece = words.randint(0, 2**32, size=min(DRAW_PIECE, numel - start), dtype=np.uint32)
        np.bitwise_and(piece, UNIFORM_STEPS - 1, out=piece)
        np.greater_equal(piece, least, out=mask[start:start + piece.size])
    return mask


def rescale_kept(tau: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    return masked(tau, keep).mul_(scale)


def drop_and_rescale(tau: torch.Tensor, drop: float, scale: float, ctx: KeyContext, index: int) -> torch.Tensor:
    """m ⊙ τ · scale for the mask of this (seed, input position, key)."""
    if drop <= 0:
        return tau * scale
    return rescale_kept(tau, keep_mask(tau.shape, drop, ctx, index, tau.device), scale)


class DareParams(Params):
    p: float = Field(0.9, ge=0, le=1, description="drop rate: the probability that an entry is set to zero")
    rescale: bool = Field(True, description="divide the kept entries by 1 − p (false: DropOnly)")

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p) if self.rescale and self.p < 1 else 1.0


class DarexQParams(Params):
    p: float = Field(0.9, ge=0, le=1, description="drop rate: the probability that an entry is set to zero")
    q: float | None = Field(None, gt=0, le=1, description="rescale kept entries by 1/q (default 1 − p, i.e. DARE); "
                                                          "per key through overrides")

    @model_validator(mode="after")
    def _q_defined(self) -> DarexQParams:
        if self.q is None and self.p >= 1:
            raise ValueError("q must be given when p = 1")
        return self

    @property
    def scale(self) -> float:
        return 1.0 / (self.q if self.q is not None else 1.0 - self.p)


DROP_SIGNATURES = [
    signature(list_of(DELTA), base=CHECKPOINT, models=list_of(CHECKPOINT)),
    signature(list_of(DELTA), deltas=list_of(DELTA)),
]


def _dropped(p: DareParams | DarexQParams, ctx: KeyContext, base, models, deltas) -> list[torch.Tensor]:
    return [drop_and_rescale(tau, p.p, p.scale, ctx, i) for i, tau in enumerate(task_vectors(base, models, deltas))]


@operator(
    "dare",
    paper="Yu et al., Language Models are Super Mario, ICML 2024 (arXiv:2311.03099)",
    signatures=DROP_SIGNATURES, params=DareParams, elementwise=True)
def dare(p: DareParams, ctx: KeyContext, base=None, models=None, deltas=None) -> list[torch.Tensor]:
    """DARE: each task vector keeps an entry with probability 1 − p, kept entries divided by 1 − p."""
    return _dropped(p, ctx, base, models, deltas)


@operator(
    "darex_q",
    paper="Deng et al., DARE the Extreme, ICLR 2025 (arXiv:2410.09344)",
    signatures=DROP_SIGNATURES, params=DarexQParams, elementwise=True)
def darex_q(p: DarexQParams, ctx: KeyContext, base=None, models=None, deltas=None) -> list[torch.Tensor]:
    """DAREx-q: DARE's mask with kept entries divided by q instead of 1 − p (q = 1: DropOnly)."""
    return _dropped(p, ctx, base, models, deltas)


class DareLinearParams(TaskArithmeticParams, DareParams):
    pass


@operator(
    "dare_linear",
    paper="Yu et al., Language Models are Super Mario, ICML 2024 (arXiv:2311.03099)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT))],
    params=DareLinearParams, check=check_weights, elementwise=True)
def dare_linear(base: torch.Tensor, models: list[torch.Tensor], p: DareLinearParams, ctx: KeyContext) -> torch.Tensor:
    """DARE then Task Arithmetic: θ = θ_base + λ·Σ_t w_t·DARE(τ_t)."""
    dropped = _dropped(p, ctx, base, models, None)
    return finish(task_arithmetic.fn(p=p, ctx=ctx, deltas=dropped), base)
