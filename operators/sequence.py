"""Folds over the checkpoints of one training run (OPERATORS.md §7, §8): momentum interpolation, EMA, BEMA.

Each key is folded over the sequence one checkpoint at a time, so memory holds a few tensors of one
key whatever the length of the run.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.errors import MergebenchError
from mergebench.operators.base import (
    CHECKPOINT,
    SEQUENCE,
    KeyContext,
    Params,
    TensorSequence,
    operator,
    signature,
)


class MomentumParams(Params):
    tau: float = Field(0.99, ge=0, le=1, description="momentum τ: the slow weights keep τ of themselves per event")
    steps_per_checkpoint: int = Field(1, ge=1, description="interpolation events between consecutive "
                                                            "checkpoints (τ_eff = τ^N)")


@operator("momentum_interp", signatures=[signature(CHECKPOINT, init=CHECKPOINT, sequence=SEQUENCE)],
          params=MomentumParams, execution="sequence")
def momentum_interp(init: torch.Tensor, sequence: TensorSequence, p: MomentumParams, ctx: KeyContext) -> torch.Tensor:
    """Momentum interpolation (Stojanovski et al., 2022): s_k = τ_eff·s_{k−1} + (1 − τ_eff)·θ_k, s_0 = init."""
    tau = p.tau ** p.steps_per_checkpoint
    slow = init.clone()
    for _, theta in sequence:
        slow.lerp_(theta, 1.0 - tau)
    return slow


class ScheduleParams(Params):
    ema_power: float = Field(0.5, ge=0, lt=1, description="κ: the EMA weight of checkpoint k is (ρ + γ·s_k)^−κ")
    lag: float = Field(10.0, ge=0, description="ρ: offset of the schedule in steps")
    multiplier: float = Field(1.0, gt=0, description="γ: steps are multiplied by γ in the schedule")
    update_after: int = Field(0, ge=0, description="τ: burn-in step; the first checkpoint at or after it anchors")
    min_ema_multiplier: float = Field(0.0, ge=0, le=1, description="β_min: lower bound of the EMA weight")


class BemaParams(ScheduleParams):
    bias_power: float = Field(0.2, ge=0, lt=1, description="η: the bias correction weight is (ρ + γ·s_k)^−η")
    bias_correction: bool = Field(True, description="add α_k·(θ_k − θ_anchor); false returns the EMA")
    ema: bool = Field(True, description="average the iterates; false uses the current iterate as EMA_k")


class EmaParams(ScheduleParams):
    decay: float | None = Field(None, ge=0, le=1, description="constant decay per checkpoint "
                                                              "(EMA ← decay·EMA + (1 − decay)·θ_k, as torch's "
                                                              "AveragedModel); unset: BEMA's schedule without "
                                                              "bias correction")


def bema_fold(sequence: TensorSequence, p: ScheduleParams, init: torch.Tensor | None, use_ema: bool,
              bias_correction: bool, bias_power: float) -> torch.Tensor:
    """EMA_k = (1 − β_k)·EMA_{k−1} + β_k·θ_k and BEMA_K = EMA_K + α_K·(θ_K − θ_anchor), s_k = t_k − τ."""
    anchor = init
    ema = init.clone() if init is not None else None
    last, alpha = anchor, 0.0
    for step, theta in sequence:
        if step < p.update_after:
            continue
        if anchor is None:
            anchor, ema, last = theta, theta.clone(), theta
            continue
        base = p.lag + p.multiplier * (step - p.update_after)
        if base <= 0:
            raise MergebenchError(f"lag + multiplier·(step − update_after) must be positive; it is {base} at step "
                                  f"{step}")
        beta = max(base ** -p.ema_power, p.min_ema_multiplier)
        alpha = base ** -bias_power
        ema = ema.lerp_(theta, beta) if use_ema else theta.clone()
        last = theta
    if anchor is None:
        raise MergebenchError(f"no checkpoint at or after update_after = {p.update_after}")
    if not bias_correction or last is anchor:
        return ema
    return ema.add_(last - anchor, alpha=alpha)


SEQUENCE_SIGNATURES = [signature(CHECKPOINT, sequence=SEQUENCE),
                       signature(CHECKPOINT, sequence=SEQUENCE, init=CHECKPOINT)]


@operator("bema", signatures=SEQUENCE_SIGNATURES, params=BemaParams, execution="sequence")
def bema(sequence: TensorSequence, p: BemaParams, ctx: KeyContext, init: torch.Tensor | None = None) -> torch.Tensor:
    """BEMA (Block & Zhang, 2025): an EMA of the iterates plus a bias correction that removes its lag.

    ``init`` is the anchor at step ``update_after`` when the run has no checkpoint there (the base model).
    """
    return bema_fold(sequence, p, init, p.ema, p.bias_correction, p.bias_power)


@operator("ema", signatures=SEQUENCE_SIGNATURES, params=EmaParams, execution="sequence")
def ema(sequence: TensorSequence, p: EmaParams, ctx: KeyContext, init: torch.Tensor | None = None) -> torch.Tensor:
    """Exponential moving average of the checkpoints: constant ``decay``, or BEMA's schedule uncorrected."""
    if p.decay is None:
        return bema_fold(sequence, p, init, use_ema=True, bias_correction=False, bias_power=0.0)
    average = init.clone() if init is not None else None
    for _, theta in sequence:
        average = theta.clone() if average is None else average.lerp_(theta, 1.0 - p.decay)
    return average
