"""Alignment by permutation (Git Re-Basin weight matching, OPERATORS.md §4): reorder one model's hidden
units onto another's so that averaging them averages matching features.

The planning pass visits only the tensors of the permutation spec, keeps them for the search (the
spec's tensors of both models, never the rest), and leaves the permutations; the main pass then
applies them key by key while streaming. ``align`` writes the permuted model, which computes exactly
the same function; any later node can merge it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from mergebench import permutations
from mergebench.errors import MergebenchError
from mergebench.numerics import weighted_sum
from mergebench.operators.base import (
    CHECKPOINT,
    KeyContext,
    Params,
    StatisticsPass,
    list_of,
    operator,
    signature,
)
from mergebench.permutations import build_spec, permute

REBASIN = "Ainsworth et al., Git Re-Basin, ICLR 2023 (arXiv:2209.04836)"


class AlignParams(Params):
    spec: Literal["auto", "mlp", "ffn"] | dict[str, list[tuple[str, int]]] = Field(
        "auto", description="permutation groups: auto-detected (transformer FFN neurons, nn.Sequential chains), "
                            "or group -> [[key, axis], ...]")
    layers: list[str] | None = Field(None, description="an MLP chain: layer prefixes in forward order")
    max_iter: int = Field(100, ge=1, description="coordinate-ascent sweeps over the groups")


class WeightMatchingParams(AlignParams):
    lam: float = Field(0.5, description="weight of the permuted second model: (1 − lam)·A + lam·π(B)")


def _planning(pair: callable) -> tuple[StatisticsPass, ...]:
    """Collect the spec's tensors of both models, then search the permutations."""

    def order(keys: list[str]) -> list[str]:
        return keys  # the spec is known only with the keys: filtered in accumulate

    def accumulate(state: dict[str, Any], inputs: dict[str, Any], p: AlignParams, ctx: KeyContext) -> None:
        if "spec" not in state:
            state["spec"] = build_spec(p.spec, p.layers, list(ctx.keys))
            state["seed"] = ctx.seed
        if ctx.key in state["spec"].keys:
            reference, model = pair(inputs)
            state["a"][ctx.key], state["b"][ctx.key] = reference.float().cpu(), model.float().cpu()

    def finalize(state: dict[str, Any], p: AlignParams, stats: Any) -> dict[str, Any]:
        spec = state.get("spec")
        if spec is None:
            raise MergebenchError("alignment: no tensor was selected")
        perms = permutations.weight_matching(spec, state["a"], state["b"], p.max_iter, state["seed"])
        return {"spec": spec, "perms": perms}

    return (StatisticsPass(lambda p, stats: {"a": {}, "b": {}}, accumulate, finalize, order=order),)


@operator(
    "align",
    paper=REBASIN,
    signatures=[signature(CHECKPOINT, model=CHECKPOINT, reference=CHECKPOINT)],
    params=AlignParams,
    execution="cross-tensor",
    passes=_planning(lambda inputs: (inputs["reference"], inputs["model"])),
)
def align(model: torch.Tensor, reference: torch.Tensor, p: AlignParams, ctx: KeyContext) -> torch.Tensor:
    """The model with its hidden units permuted onto the reference's: the same function, matching features."""
    return permute(model, ctx.key, ctx.stats["spec"], ctx.stats["perms"]).clone()


def _check_pair(p: Params, lengths: dict[str, int]) -> str | None:
    return None if lengths.get("models") == 2 else "weight_matching takes exactly 2 models (reference, permuted)"


@operator(
    "weight_matching",
    paper=REBASIN,
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT))],
    params=WeightMatchingParams,
    execution="cross-tensor",
    passes=_planning(lambda inputs: tuple(inputs["models"])),
    check=_check_pair,
)
def weight_matching(models: list[torch.Tensor], p: WeightMatchingParams, ctx: KeyContext) -> torch.Tensor:
    """Weight matching, then interpolation: θ = (1 − lam)·θ_A + lam·π(θ_B)."""
    reference, other = models
    aligned = permute(other, ctx.key, ctx.stats["spec"], ctx.stats["perms"])
    return weighted_sum([reference, aligned], [1.0 - p.lam, p.lam])
