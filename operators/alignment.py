"""Alignment by permutation (Git Re-Basin weight matching, semantics §4): reorder one model's hidden
units onto another's so that averaging them averages matching features.

The planning pass visits only the tensors of the permutation spec, keeps them for the search (the
spec's tensors of both models, never the rest), and leaves the permutations; the main pass then
applies them key by key while streaming. ``align`` writes the permuted model, which computes exactly
the same function; any later node can merge it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from mergebench.errors import MergebenchError
from mergebench.operators.base import (
    ACTIVATIONS,
    CHECKPOINT,
    KeyContext,
    Params,
    StatisticsPass,
    list_of,
    operator,
    signature,
)
from mergebench.surgery import permutations, transport
from mergebench.surgery.numerics import weighted_sum
from mergebench.surgery.permutations import PermutationSpec, build_spec, permute

REBASIN = "Ainsworth et al., Git Re-Basin, ICLR 2023 (arXiv:2209.04836)"


class MatchingParams(Params):
    spec: Literal["auto", "mlp", "ffn"] | dict[str, list[tuple[str, int]]] = Field(
        "auto", description="permutation groups: auto-detected (transformer FFN neurons, nn.Sequential chains), "
                            "or group -> [[key, axis], ...]")
    layers: list[str] | None = Field(None, description="an MLP chain: layer prefixes in forward order")
    max_iter: int = Field(100, ge=1, description="coordinate-ascent sweeps over the groups")
    attention_heads: int | None = Field(
        None, ge=1, description="also permute each block's attention heads (Llama, BERT): the number of "
                                "key/value heads; with grouped-query attention a unit carries its query heads")


class TransportParams(Params):
    solver: Literal["emd", "sinkhorn"] = Field("emd", description="exact network simplex, or log-domain Sinkhorn")
    reg: float = Field(0.01, gt=0, description="entropic regularisation (sinkhorn only)")
    squared: bool = Field(False, description="squared Euclidean ground cost")
    bias_in_cost: bool = Field(True, description="append each neuron's bias to its weight row in the cost")
    last_layer: Literal["identity", "ot"] = Field(
        "identity", description="output neurons are labels: align only their inputs (identity), or transport them")


class AlignParams(MatchingParams, TransportParams):
    method: Literal["weight_matching", "ot"] = Field(
        "weight_matching", description="permutations by weight matching, or OT maps (needs layers; exact EMD with "
                                       "equal widths gives a permutation)")


class WeightMatchingParams(MatchingParams):
    lam: float = Field(0.5, description="weight of the permuted second model: (1 − lam)·A + lam·π(B)")


def _planning(pair: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]) -> tuple[StatisticsPass, ...]:
    """Collect the spec's tensors of both models and search the permutations.

    A group that shares no tensor with another (a transformer block's FFN neurons) is solved as soon as
    its tensors have streamed past, and they are dropped: memory holds one block, not the model. Coupled
    groups (an MLP chain) are searched together at the end.
    """

    def accumulate(state: dict[str, Any], inputs: dict[str, Any], p: MatchingParams, ctx: KeyContext) -> None:
        if "spec" not in state:
            state["spec"] = build_spec(p.spec, p.layers, list(ctx.keys), p.attention_heads)
            state["independent"] = permutations.independent_groups(state["spec"])
            state["seed"] = ctx.seed
        spec = state["spec"]
        if ctx.key not in spec.keys:
            return
        reference, model = pair(inputs)
        for group, axis in spec.axes(ctx.key):
            if not -reference.dim() <= axis < reference.dim():
                raise MergebenchError(f"permutation spec group '{group}': axis {axis} of '{ctx.key}', which has "
                                      f"{reference.dim()} axes (shape {list(reference.shape)})")
        state["a"][ctx.key], state["b"][ctx.key] = reference.float(), model.float()
        for group, _ in spec.axes(ctx.key):
            members = [key for key, _ in spec.groups[group]]
            if group in state["independent"] and all(key in state["a"] for key in members):
                state["perms"][group] = permutations.solve_alone(group, spec, state["a"], state["b"])
                for key in members:
                    del state["a"][key], state["b"][key]

    def finalize(state: dict[str, Any], p: MatchingParams, stats: Any) -> dict[str, Any]:
        spec = state.get("spec")
        if spec is None:
            raise MergebenchError("alignment: no tensor was selected")
        coupled = PermutationSpec({g: m for g, m in spec.groups.items() if g not in state["perms"]}, spec.units)
        perms = dict(state["perms"])
        if coupled.groups:
            perms.update(permutations.weight_matching(coupled, state["a"], state["b"], p.max_iter, state["seed"]))
        return {"spec": spec, "perms": perms}

    return (StatisticsPass(lambda p, stats: {"a": {}, "b": {}, "perms": {}}, accumulate, finalize, host=True),)


ALIGN_MATCHING = _planning(lambda inputs: (inputs["reference"], inputs["model"]))


def _align_passes(p: AlignParams, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
    return ALIGN_OT if p.method == "ot" else ALIGN_MATCHING


def _check_align(p: AlignParams, lengths: dict[str, int]) -> str | None:
    if "activations" not in lengths:
        return None
    if p.method != "ot":
        return "activations set the ground cost of method: ot; weight matching compares weights"
    return None if lengths["activations"] == 2 else "activations: one file per model, [model's, reference's]"


@operator(
    "align",
    paper=REBASIN + "; Singh & Jaggi, NeurIPS 2020 (arXiv:1910.05653) with method: ot",
    signatures=[signature(CHECKPOINT, model=CHECKPOINT, reference=CHECKPOINT),
                signature(CHECKPOINT, model=CHECKPOINT, reference=CHECKPOINT, activations=list_of(ACTIVATIONS))],
    params=AlignParams,
    execution="cross-tensor",
    passes=_align_passes,
    check=_check_align,
)
def align(model: torch.Tensor, reference: torch.Tensor, p: AlignParams, ctx: KeyContext,
          activations: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The model with its hidden units permuted onto the reference's: the same function, matching features."""
    if p.method == "ot":
        return transported(model, 0, p.layers or [], ctx)
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


class OTFusionParams(TransportParams):
    layers: list[str] = Field(description="the chain of layer prefixes in forward order (weights [out, in, ...])")
    s: float = Field(0.5, ge=0, le=1, description="fusion weight of the anchor: (1 − s)·aligned + s·anchor")
    anchor: int = Field(-1, description="position of the anchor in models (defines neuron order); default last")


def _chain_key(key: str, layers: list[str]) -> tuple[int, str] | None:
    for index, layer in enumerate(layers):
        if key in (f"{layer}.weight", f"{layer}.bias"):
            return index, key.rsplit(".", 1)[1]
    return None


def _ot_planning(models_of: Callable[[dict[str, Any]], list[torch.Tensor]],
                 anchor_of: Callable[[Params, int], int]) -> tuple[StatisticsPass, ...]:
    """Collect the chain's layers of every model, then compute each non-anchor model's maps onto the anchor."""

    def accumulate(state: dict[str, Any], inputs: dict[str, Any], p: Params, ctx: KeyContext) -> None:
        where = _chain_key(ctx.key, p.layers or [])
        if where is not None:
            state[where] = [t.double() for t in models_of(inputs)]
            if "activations" in inputs and where[1] == "weight":
                state[where[0], "activations"] = [a.double() for a in inputs["activations"]]

    def finalize(state: dict[str, Any], p: Params, stats: Any) -> dict[str, Any]:
        missing = [layer for i, layer in enumerate(p.layers or []) if (i, "weight") not in state]
        if missing or not p.layers:
            raise MergebenchError(f"OT alignment: no weight for layer '{missing[0] if missing else 'layers'}'")
        count = len(state[0, "weight"])
        anchor = anchor_of(p, count)
        maps = {}
        for m in range(count):
            if m == anchor:
                continue
            weights = [state[i, "weight"] for i in range(len(p.layers))]
            biases = [state.get((i, "bias")) for i in range(len(p.layers))]
            activations = _activations(state, p.layers, weights, m, anchor)
            maps[m] = transport.layer_maps(
                [w[m] for w in weights], [w[anchor] for w in weights],
                [b[m] if b and p.bias_in_cost else None for b in biases],
                [b[anchor] if b and p.bias_in_cost else None for b in biases],
                p.solver, p.reg, p.squared, p.last_layer, activations)
        return {"maps": maps, "anchor": anchor}

    return (StatisticsPass(lambda p, stats: {}, accumulate, finalize, host=True),)


def _activations(state: dict[str, Any], layers: list[str], weights: list[list[torch.Tensor]], model: int,
                 anchor: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Each layer's activations of ``model`` and of the anchor, checked against the layer widths; None without."""
    if (0, "activations") not in state:
        return None
    pair: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for index, layer in enumerate(layers):
        recorded = state[index, "activations"]
        for side, m in zip(pair, (model, anchor)):
            width = weights[index][m].shape[0]
            if recorded[m].dim() != 2 or recorded[m].shape[1] != width:
                raise MergebenchError(f"OT alignment: the activations of layer '{layer}' for model {m} have shape "
                                      f"{list(recorded[m].shape)}; the layer has {width} neurons "
                                      f"([samples, {width}] expected)")
            side.append(recorded[m])
        if recorded[model].shape[0] != recorded[anchor].shape[0]:
            raise MergebenchError(f"OT alignment: the activations of layer '{layer}' were recorded on "
                                  f"{recorded[model].shape[0]} and {recorded[anchor].shape[0]} samples; "
                                  f"they must come from the same inputs")
    return pair


def _check_fusion(p: OTFusionParams, lengths: dict[str, int]) -> str | None:
    if lengths.get("models", 0) < 2:
        return "ot_fusion takes at least 2 models"
    if not -lengths["models"] <= p.anchor < lengths["models"]:
        return f"anchor {p.anchor} is not a position in models"
    if "activations" in lengths and lengths["activations"] != lengths["models"]:
        return f"activations: one file per model, in the same order ({lengths['activations']} for {lengths['models']})"
    return None


@operator(
    "ot_fusion",
    paper="Singh & Jaggi, Model Fusion via Optimal Transport, NeurIPS 2020 (arXiv:1910.05653)",
    signatures=[signature(CHECKPOINT, models=list_of(CHECKPOINT)),
                signature(CHECKPOINT, models=list_of(CHECKPOINT), activations=list_of(ACTIVATIONS))],
    params=OTFusionParams,
    execution="cross-tensor",
    passes=_ot_planning(lambda inputs: inputs["models"], lambda p, count: p.anchor % count),
    check=_check_fusion,
    anchor=lambda p, count: p.anchor % count,
)
def ot_fusion(models: list[torch.Tensor], p: OTFusionParams, ctx: KeyContext,
              activations: list[torch.Tensor] | None = None) -> torch.Tensor:
    """OT fusion: each model's neurons transported onto the anchor's, layer by layer, then averaged."""
    anchor = ctx.stats["anchor"]
    aligned = [tensor if m == anchor else transported(tensor, m, p.layers, ctx) for m, tensor in enumerate(models)]
    if len(models) == 2:
        other = 1 - anchor
        return weighted_sum([aligned[other], aligned[anchor]], [1.0 - p.s, p.s])
    return weighted_sum(aligned, [1.0 / len(models)] * len(models))


def transported(tensor: torch.Tensor, model: int, layers: list[str], ctx: KeyContext) -> torch.Tensor:
    """One model's tensor of a chain layer, its inputs and outputs carried onto the anchor's neurons."""
    where = _chain_key(ctx.key, layers)
    if where is None:
        return tensor
    index, kind = where
    maps = ctx.stats["maps"][model]
    value = tensor.double()
    if kind == "weight" and index > 0:
        value = transport.incoming_aligned(value, maps[index - 1])
    outgoing = maps[index] if index < len(maps) else None
    if outgoing is not None:
        value = torch.einsum("o...,oj->j...", value, outgoing)
    return value.to(tensor.dtype)


ALIGN_OT = _ot_planning(lambda inputs: (inputs["model"], inputs["reference"]), lambda p, count: 1)
