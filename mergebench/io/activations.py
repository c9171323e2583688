"""Record what each layer of a chain outputs on shared inputs: the ground cost of activation-based OT.

OTFusion (Singh & Jaggi, 2020) can match neurons by what they compute instead of by their weights:
run every model on the same inputs, record each layer's outputs, and compare neurons by their
activation vectors. The models' weights are streamed from disk as usual; the activations are a
small file per model (an Activations artifact) wired into ``ot_fusion`` or ``align`` (method ot):

    inputs: {models: [a, b], activations: [acts_a, acts_b]}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergebench.io.artifacts import save_artifact
from mergebench.value_types import ACTIVATIONS


@torch.no_grad()
def record_activations(model: torch.nn.Module, inputs: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """``{layer: [samples, neurons]}``: each named submodule's output on ``inputs``.

    A convolution's output ``[N, C, ...]`` counts every position as a sample: ``[N·positions, C]``.
    """
    recorded: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        def keep(module: torch.nn.Module, args: object, output: torch.Tensor, layer: str = layer) -> None:
            recorded[layer] = output.detach().movedim(1, -1).reshape(-1, output.shape[1]).float().cpu()
        hooks.append(model.get_submodule(layer).register_forward_hook(keep))
    try:
        model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return recorded


def save_activations(activations: dict[str, torch.Tensor], path: str | os.PathLike[str], model: str = "",
                     force: bool = False) -> Path:
    """Write ``{layer: [samples, neurons]}`` as an Activations file a recipe can wire into OT alignment."""
    return save_artifact(activations, path, ACTIVATIONS, {"model": model}, force=force)
