"""Numeric steps shared by several operators, written once (OPERATORS.md §0.3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every stored float type narrower than it; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(tensors: Iterable[torch.Tensor], weights: Iterable[float]) -> torch.Tensor:
    """Σ w_t·x_t accumulated in place into one fresh buffer; never aliases an input.

    Terms with weight exactly 0 are skipped rather than multiplied, so an interpolation at an
    end point returns the other input bit for bit (-0.0 and non-finite values included).
    """
    total: torch.Tensor | None = None
    first: torch.Tensor | None = None
    for tensor, weight in zip(tensors, weights):
        first = tensor if first is None else first
        if weight == 0:
            continue
        total = torch.mul(tensor, weight) if total is None else total.add_(tensor, alpha=weight)
    if total is None:
        if first is None:
            raise ValueError("weighted_sum of nothing")
        return torch.zeros_like(first)
    return total
