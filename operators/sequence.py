"""Folds over the checkpoints of one training run (semantics §7, §8): momentum interpolation, EMA, BEMA.

Each key is folded over the sequence one checkpoint at a time, so memory holds a few tensors of one
key whatever the length of the run. With ``every: k`` a fold also emits its running value at every
k-th checkpoint (and the last): one pass over the run writes the whole series.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

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


class SeriesParams(Params):
    every: int | None = Field(None, ge=1, description="also emit the running value at every k-th checkpoint "
                                                       "and the last (a series, written to PATH/step-N)")


def emitted_steps(p: SeriesParams, steps: list[int], first_step: int = 0) -> list[int] | None:
    """The steps a series emits: every k-th checkpoint at or after ``first_step``, and the last."""
    if p.every is None:
        return None
    used = [s for s in steps if s >= first_step]
    return sorted(set(used[p.every - 1::p.every]) | set(used[-1:]))


def collect(states: Iterator[tuple[int, torch.Tensor]], p: SeriesParams, steps: list[int],
            first_step: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """The last running value, or (with ``every``) a copy of it at each emitted step."""
    wanted = emitted_steps(p, steps, first_step)
    if wanted is None:
        return deque(states, maxlen=1)[0][1]
    return [value.clone() for step, value in states if step in wanted]


class MomentumParams(SeriesParams):
    tau: float = Field(0.99, ge=0, le=1, description="momentum τ: the slow weights keep τ of themselves per event")
    steps_per_checkpoint: int = Field(1, ge=1, description="interpolation events between consecutive "
                                                            "checkpoints (τ_eff = τ^N)")


def momentum_states(init: torch.Tensor, sequence: TensorSequence, p: MomentumParams
                    ) -> Iterator[tuple[int, torch.Tensor]]:
    tau = p.tau ** p.steps_per_checkpoint
    slow = init.clone()
    for step, theta in sequence:
        yield step, slow.lerp_(theta, 1.0 - tau)


@operator(
    "momentum_interp",
    paper="Stojanovski et al., Momentum-based Weight Interpolation, NeurIPS 2022 workshop (arXiv:2211.03186)",
    signatures=[signature(CHECKPOINT, init=CHECKPOINT, sequence=SEQUENCE)],
    params=MomentumParams, execution="sequence", series=lambda p, steps: emitted_steps(p, steps))
def momentum_interp(init: torch.Tensor, sequence: TensorSequence, p: MomentumParams, ctx: KeyContext):
    """Momentum interpolation (Stojanovski et al., 2022): s_k = τ_eff·s_{k−1} + (1 − τ_eff)·θ_k, s_0 = init."""
    return collect(momentum_states(init, sequence, p), p, sequence.steps)


class ScheduleParams(SeriesParams):
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


def bema_states(sequence: TensorSequence, p: ScheduleParams, init: torch.Tensor | None, use_ema: bool,
                bias_correction: bool, bias_power: float) -> Iterator[tuple[int, torch.Tensor]]:
    """EMA_k = (1 − β_k)·EMA_{k−1} + β_k·θ_k and BEMA_k = EMA_k + α_k·(θ_k − θ_anchor), s_k = t_k − τ.

    Yields the EMA itself, or a fresh BEMA_k, after each checkpoint from the anchor on.
    """
    anchor = init
    ema = init.clone() if init is not None else None
    for step, theta in sequence:
        if step < p.update_after:
            continue
        if anchor is None:
            anchor, ema = theta, theta.clone()
            yield step, ema
            continue
        base = p.lag + p.multiplier * (step - p.update_after)
        if base <= 0:
            raise MergebenchError(f"lag + multiplier·(step − update_after) must be positive; it is {base} at step "
                                  f"{step}")
        ema = ema.lerp_(theta, max(base ** -p.ema_power, p.min_ema_multiplier)) if use_ema else theta.clone()
        yield step, ema.add(theta - anchor, alpha=base ** -bias_power) if bias_correction else ema
    if anchor is None:
        raise MergebenchError(f"no checkpoint at or after update_after = {p.update_after}")


SEQUENCE_SIGNATURES = [signature(CHECKPOINT, sequence=SEQUENCE),
                       signature(CHECKPOINT, sequence=SEQUENCE, init=CHECKPOINT)]


def _schedule_series(p: ScheduleParams, steps: list[int]) -> list[int] | None:
    uses_schedule = getattr(p, "decay", None) is None  # a constant-decay EMA has no burn-in
    return emitted_steps(p, steps, p.update_after if uses_schedule else 0)


@operator(
    "bema",
    paper="Block & Zhang, EMA Without the Lag, 2025 (arXiv:2508.00180)",
    signatures=SEQUENCE_SIGNATURES, params=BemaParams, execution="sequence", series=_schedule_series)
def bema(sequence: TensorSequence, p: BemaParams, ctx: KeyContext, init: torch.Tensor | None = None):
    """BEMA (Block & Zhang, 2025): an EMA of the iterates plus a bias correction that removes its lag.

    ``init`` is the anchor at step ``update_after`` when the run has no checkpoint there (the base model).
    """
    states = bema_states(sequence, p, init, p.ema, p.bias_correction, p.bias_power)
    return collect(states, p, sequence.steps, p.update_after)


def _ema_states(sequence: TensorSequence, p: EmaParams, init: torch.Tensor | None
                ) -> Iterator[tuple[int, torch.Tensor]]:
    average = init.clone() if init is not None else None
    for step, theta in sequence:
        average = theta.clone() if average is None else average.lerp_(theta, 1.0 - p.decay)
        yield step, average


@operator(
    "ema",
    paper="Block & Zhang, EMA Without the Lag, 2025 (arXiv:2508.00180)",
    signatures=SEQUENCE_SIGNATURES, params=EmaParams, execution="sequence", series=_schedule_series)
def ema(sequence: TensorSequence, p: EmaParams, ctx: KeyContext, init: torch.Tensor | None = None):
    """Exponential moving average of the checkpoints: constant ``decay``, or BEMA's schedule uncorrected."""
    if p.decay is None:
        states = bema_states(sequence, p, init, use_ema=True, bias_correction=False, bias_power=0.0)
    else:
        states = _ema_states(sequence, p, init)
    return collect(states, p, sequence.steps, p.update_after if p.decay is None else 0)
