"""The global top-k threshold as two statistics passes, shared by TIES, grafting, masks and sparse deltas.

Each selected key contributes the magnitudes of one or more vectors (TIES: one per task); the passes
leave ``{"thresholds": [t_1, ...]}`` with t_i the exact k_i-th largest magnitude of vector i over the
whole model (semantics §0.4), computed with 65 536-bin histograms, never concatenating the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mergebench.operators.base import KeyContext, Params, StatisticsPass
from mergebench.surgery.numerics import ExactThreshold

VectorsFn = Callable[[dict[str, Any], Params, KeyContext], list[torch.Tensor]]
KeepFn = Callable[[Params, int, int], int]  # (params, n, vector index) -> k


def global_threshold_passes(vectors: VectorsFn, keep: KeepFn) -> tuple[StatisticsPass, StatisticsPass]:
    """Coarse then fine histogram of |v| per vector; ``vectors`` may return [] for a key that does not count.

    ``vectors`` must be elementwise (each element from the same element of the inputs, DARE's draws
    included): the histograms are then sums over slices, and the passes are sliceable."""

    def coarse(state: dict[str, Any], inputs: dict[str, Any], p: Params, ctx: KeyContext) -> None:
        values = vectors(inputs, p, ctx)
        if values and state["thresholds"] is None:
            state["thresholds"] = [ExactThreshold() for _ in values]
        for selector, value in zip(state["thresholds"] or [], values):
            selector.add_coarse(value.abs())

    def choose_bins(state: dict[str, Any], p: Params, stats: Any) -> dict[str, Any]:
        for index, selector in enumerate(state["thresholds"] or []):
            selector.choose_bin(keep(p, selector.count, index))
        return state

    def fine(state: dict[str, Any], inputs: dict[str, Any], p: Params, ctx: KeyContext) -> None:
        for selector, value in zip(state["thresholds"] or [], vectors(inputs, p, ctx)):
            if selector.needs_fine:
                selector.add_fine(value.abs())

    def fine_not_needed(p: Params, stats: Any) -> bool:
        return not any(selector.needs_fine for selector in stats["thresholds"] or [])

    def thresholds(state: dict[str, Any], p: Params, stats: Any) -> dict[str, Any]:
        return {"thresholds": [selector.threshold() for selector in state["thresholds"] or []]}

    def fine_init(p: Params, stats: Any) -> dict[str, Any]:
        selectors = stats["thresholds"]
        return {"thresholds": None if selectors is None else [s.fine_pass_copy() for s in selectors]}

    def combine_coarse(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if a["thresholds"] is None:
            return b
        for mine, theirs in zip(a["thresholds"], b["thresholds"] or []):
            mine.add_coarse_counts(theirs)
        return a

    def combine_fine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        for mine, theirs in zip(a["thresholds"] or [], b["thresholds"] or []):
            mine.add_fine_counts(theirs)
        return a

    return (StatisticsPass(lambda p, stats: {"thresholds": None}, coarse, choose_bins, sliceable=True,
                           combine=combine_coarse),
            StatisticsPass(fine_init, fine, thresholds, sliceable=True, combine=combine_fine, skip=fine_not_needed))


def global_threshold(ctx: KeyContext, index: int = 0) -> float:
    """The threshold the passes found for vector ``index`` (+inf when nothing was selected)."""
    found = (ctx.stats or {}).get("thresholds") or []
    return found[index] if index < len(found) else math.inf
