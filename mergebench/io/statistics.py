"""Recording what data-aware merges need, once per model: diagonal Fisher and RegMean's Gram matrices.

``record_statistics`` runs any ``torch.nn.Module`` (a ``transformers`` model included) over the user's
batches and returns

- ``fisher``: per parameter, the mean over examples of the squared gradient of the example's
  log-likelihood — of the label it was given (the empirical Fisher, from ``loss``) or of a label drawn
  from the model's own prediction (the Fisher of Matena & Raffel, from ``logits``; seeded draws);
- ``gram``: per ``nn.Linear``, XᵀX of its inputs over every example (and position): RegMean's inner
  product matrix, ``[in, in]``.

``save_statistics`` writes them as Fisher and Gram artifact files (mergebench.io.artifacts) with their
provenance: the model's fingerprint (sha256 of its parameters), a hash of the data, the example count.
In a recipe they are models of type Fisher and Gram, wired into ``fisher`` and ``regmean``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebench.errors import MergebenchError
from mergebench.io.artifacts import save_artifact
from mergebench.value_types import FISHER, GRAM

STATISTICS = ("fisher", "gram")
Batch = Any  # whatever ``loss`` / ``logits`` / the model take: a tensor, a tuple, a dict of tensors


@dataclass
class Recorded:
    """What ``record_statistics`` found, with what it was found on."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> mean squared gradient
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # linear layer name -> XᵀX
    examples: int = 0
    model_sha256: str = ""
    data_sha256: str = ""


def record_statistics(model: torch.nn.Module, batches: Iterable[Batch], stats: Iterable[str] = STATISTICS, *,
                      loss: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
                      logits: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
                      seed: int = 0, layers: Iterable[str] | None = None) -> Recorded:
    """Diagonal Fisher and/or Gram matrices of ``model`` over ``batches``.

    ``loss(model, batch)`` returns one loss per example (``[B]``: the negative log-likelihood of the
    example's own label, summed over its tokens for a language model): the empirical Fisher.
    ``logits(model, batch)`` returns ``[B, C]`` or ``[B, T, C]`` (with ``-100`` nowhere: every position
    counts) to draw labels from the model (the true Fisher; draws seeded by ``seed``). One of them is
    needed for ``fisher``; ``gram`` only runs the model forward (through whichever is given, else
    ``model(batch)``). Per-example gradients are exact: one backward pass per example.
    ``layers`` limits the Gram matrices to those ``nn.Linear`` names (default: all). Every row a layer
    sees counts, padding positions included: give unpadded batches where that matters.
    """
    stats = tuple(stats)
    unknown = sorted(set(stats) - set(STATISTICS))
    if unknown:
        raise MergebenchError(f"statistics '{unknown[0]}': expected some of {', '.join(STATISTICS)}")
    if "fisher" in stats and (loss is None) == (logits is None):
        raise MergebenchError("the Fisher needs exactly one of loss (the given labels) or logits (sampled labels)")
    recorded = Recorded(model_sha256=_model_sha256(model))
    data = hashlib.sha256()
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and (layers is None or name in set(layers))}
    hooks = [module.register_forward_pre_hook(_gram_hook(recorded.gram, name)) for name, module in linears.items()
             ] if "gram" in stats else []
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    generator = torch.Generator().manual_seed(seed)
    try:
        for batch in batches:
            _hash_batch(data, batch)
            if "fisher" in stats:
                per_example = loss(model, batch) if loss is not None else _sampled_nll(logits(model, batch), generator)
                recorded.examples += per_example.shape[0]
                for i in range(per_example.shape[0]):
                    grads = torch.autograd.grad(per_example[i], list(parameters.values()),
                                                retain_graph=i + 1 < per_example.shape[0], allow_unused=True)
                    for name, grad in zip(parameters, grads):
                        if grad is not None:
                            sums[name].add_(grad.detach().float().square())
            else:
                with torch.no_grad():
                    out = (logits or loss or (lambda m, b: m(b)))(model, batch)
                recorded.examples += out.shape[0] if isinstance(out, torch.Tensor) and out.dim() else 1
    finally:
        for hook in hooks:
            hook.remove()
    if recorded.examples == 0:
        raise MergebenchError("no examples: the batches were empty")
    if "fisher" in stats:
        recorded.fisher = {name: total / recorded.examples for name, total in sums.items()}
    recorded.data_sha256 = data.hexdigest()
    return recorded


def save_statistics(recorded: Recorded, folder: str | os.PathLike[str], model: str = "",
                    force: bool = False) -> dict[str, Path]:
    """``FOLDER/fisher.safetensors`` and/or ``FOLDER/gram.safetensors``, with provenance in their metadata."""
    folder = Path(folder)
    metadata = {"model": model, "model_sha256": recorded.model_sha256, "data_sha256": recorded.data_sha256,
                "examples": str(recorded.examples)}
    written = {}
    for name, values, value_type in (("fisher", recorded.fisher, FISHER), ("gram", recorded.gram, GRAM)):
        if values:
            written[name] = save_artifact(values, folder / f"{name}.safetensors", value_type, metadata, force=force)
    return written


def _gram_hook(grams: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def add(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        gram = rows.T @ rows
        grams[name] = gram if name not in grams else grams[name] + gram

    return add


def _sampled_nll(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per example, −log p(ŷ) summed over its positions, ŷ drawn from the model's own softmax."""
    flat = logits.reshape(logits.shape[0], -1, logits.shape[-1]).float()
    probabilities = flat.detach().softmax(-1).reshape(-1, flat.shape[-1]).cpu()
    drawn = torch.multinomial(probabilities, 1, generator=generator).reshape(flat.shape[:2]).to(flat.device)
    return -flat.log_softmax(-1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1).sum(-1)


def _model_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _hash_batch(digest: Any, batch: Batch) -> None:
    if isinstance(batch, torch.Tensor):
        digest.update(batch.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(batch, Mapping):
        for key in sorted(batch):
            digest.update(str(key).encode())
            _hash_batch(digest, batch[key])
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            _hash_batch(digest, item)
    else:
        digest.update(repr(batch).encode())
