"""Low-rank updates: the value an adapter holds at one key, and the truncated SVD that makes one.

A LoRA adapter changes a weight ``W`` by ``s·B·A``. mergebench carries that update as
``scale · up @ down`` with both factors in the orientation the weight is stored in (a
``fan_in_fan_out`` or embedding adapter is transposed once, when it is read), so an operator never
meets PEFT's conventions. A module an adapter saves whole (``modules_to_save``) is a ``whole`` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SVD_METHODS = ("auto", "full", "randomized")
# A sketch of 2·rank columns (at least rank + 10; Halko et al., 2011, §4.2) refined by 8 subspace iterations: its
# error is within 0.1 % of the exact truncation's even on a pure-noise delta (no spectral gap, the worst case:
# 0.06 % at rank 32 of 1024 × 2816), and within 0.01 % on fine-tune-like decaying spectra.
RANDOMIZED_MIN_OVERSAMPLE = 10
RANDOMIZED_POWER_STEPS = 8
RANDOMIZED_MAX_SHARE = 0.25  # sketch at most this share of the smaller side; beyond it the full SVD is faster


@dataclass(frozen=True)
class LowRank:
    """An adapter at one key: ``delta = scale · up @ down``, or a ``whole`` tensor that replaces the weight, or nothing.

    ``error`` is the relative Frobenius error ‖Δ − up·down‖/‖Δ‖ of the truncation that made it, when
    one did (the extraction report prints it).
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    whole: torch.Tensor | None = None
    error: float | None = None
    scale: float = 1.0

    @property
    def empty(self) -> bool:
        return self.up is None and self.whole is None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.down, self.up, self.whole) if t is not None)

    def delta(self) -> torch.Tensor:
        product = self.up @ self.down
        return product if self.scale == 1 else product.mul_(self.scale)

    def to(self, device: torch.device | str) -> LowRank:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LowRank(move(self.down), move(self.up), move(self.whole), self.error, self.scale)

    def cpu(self) -> LowRank:
        return self.to("cpu")


def choose_rank(singular_values: torch.Tensor, total_energy: float, rank: int | None, energy: float | None,
                min_rank: int, max_rank: int | None) -> int:
    """The rank kept: ``rank``, or the fewest leading values whose Σσ² reaches ``energy`` of ‖Δ‖², clamped."""
    if energy is not None:
        kept = torch.cumsum(singular_values.double().square(), 0)
        chosen = int(torch.searchsorted(kept, energy * total_energy * (1 - 1e-12)).item()) + 1
    else:
        chosen = rank
    chosen = max(chosen, min_rank)
    if max_rank is not None:
        chosen = min(chosen, max_rank)
    return min(chosen, singular_values.numel())


def truncated_svd(delta: torch.Tensor, rank: int | None = None, energy: float | None = None, min_rank: int = 1,
                  max_rank: int | None = None, method: str = "auto",
                  generator: torch.Generator | None = None) -> LowRank:
    """The best rank-k approximation of a 2-D ``delta`` as factors ``up = U·Σ``, ``down = Vᵀ`` (Eckart–Young).

    ``method``: ``full`` (LAPACK), ``randomized`` (a seeded sketch with power iterations: only for a
    fixed rank), or ``auto``: randomized where the sketch is a small share of the matrix, where it is
    several times faster at an error within 0.1 % of the exact one. The error is measured on the
    residual itself: ‖Δ‖² − Σσ_k² would be exact in exact arithmetic, but in float32 it cancels to
    noise of √ε ≈ 3·10⁻⁴ where the truncation is (nearly) exact.
    """
    delta = delta.float()
    total = float(delta.double().square().sum())
    if total == 0.0:
        return LowRank()
    smaller = min(delta.shape)
    sketch = None if rank is None else min(rank + max(rank, RANDOMIZED_MIN_OVERSAMPLE), smaller)
    randomized = method == "randomized" or (
        method == "auto" and energy is None and sketch is not None and sketch <= RANDOMIZED_MAX_SHARE * smaller)
    if randomized and energy is None and sketch is not None:
        u, s, vh = _randomized_svd(delta, sketch, generator)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = choose_rank(s, total, rank, energy, min_rank, max_rank)
    up, down = (u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous()
    residual = torch.addmm(delta, up, down, alpha=-1)
    error = math.sqrt(float(residual.double().square().sum()) / total)
    return LowRank(down=down, up=up, error=error)


def _randomized_svd(matrix: torch.Tensor, sketch: int,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko–Martinsson–Tropp: an orthonormal basis of the range of ``matrix·Ω`` refined by subspace
    iterations (re-orthonormalised each step), then the exact SVD of the small projected matrix."""
    omega = torch.randn(matrix.shape[1], sketch, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(RANDOMIZED_POWER_STEPS):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh
