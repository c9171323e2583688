"""Model Stock (Jang et al., 2024; semantics §9.11): interpolate the fine-tunes' average toward the base by the
angle between their task vectors."""

from __future__ import annotations

import torch
from pydantic import Field

from mergebench.operators.base import CHECKPOINT, KeyContext, Params, list_of, operator, signature


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one ratio per row (filter) instead of one per tensor")


def _at_least_two(p: ModelStockParams, lengths: dict[str, int]) -> str | None:
    return None if lengths["models"] >= 2 else f"needs at least 2 fine-tuned models, got {lengths['models']}"


@operator(
    "model_stock",
    paper="Jang et al., Model Stock: All we need is just a few fine-tuned models, ECCV 2024 (arXiv:2403.19522)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT))],
    params=ModelStockParams, check=_at_least_two)
def model_stock(base: torch.Tensor, models: list[torch.Tensor], p: ModelStockParams, ctx: KeyContext) -> torch.Tensor:
    """θ = t·mean(θ_i) + (1 − t)·θ_0 with t = N·cos θ / (1 + (N − 1)·cos θ), cos θ the mean pairwise cosine of
    the task vectors (the base is kept where 1 + (N − 1)·cos θ vanishes)."""
    shape = base.shape
    if p.filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cosine),
                        count * cosine / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / count
    return (ratio * average + (1 - ratio) * w0).reshape(shape)
