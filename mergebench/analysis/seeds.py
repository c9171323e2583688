"""Claims over seeds: a small experiment's headline as a mean with a margin the per-seed spread justifies.

A result from one training seed on one CPU is a sample, not a claim: other BLAS kernels, thread counts
or data orders land on another curve. The notebooks run each experiment on several seeds, print every
seed's number, and assert on the mean's confidence bound, so that a claim flips only when the method's
effect is smaller than the spread that was measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


def pin_determinism(threads: int = 1) -> None:
    """One seed gives one curve: a fixed number of CPU threads and torch's deterministic algorithms.

    Reductions split over a different number of threads add in another order; pinning the count (and
    the algorithms) removes that source of run-to-run change. Different CPUs may still pick different
    vector kernels, which is what the margins are for.
    """
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@dataclass(frozen=True)
class SeedSummary:
    """Per-seed values of one quantity, with the mean and a two-sided 95 % Student-t interval."""

    name: str
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (n − 1); 0 for a single value."""
        n = len(self.values)
        if n < 2:
            return 0.0
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (n - 1))

    @property
    def margin(self) -> float:
        """Half-width of the 95 % interval of the mean: t(0.975, n − 1) · std / √n (infinite for n = 1)."""
        n = len(self.values)
        if n < 2:
            return math.inf
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1)) * self.std / math.sqrt(n)

    @property
    def lower(self) -> float:
        return self.mean - self.margin

    @property
    def upper(self) -> float:
        return self.mean + self.margin

    def __str__(self) -> str:
        seeds = ", ".join(f"{v:.3f}" for v in self.values)
        return f"{self.name}: mean {self.mean:.3f} ± {self.margin:.3f} (95 % CI; std {self.std:.3f}) over [{seeds}]"


def over_seeds(name: str, values: Iterable[float]) -> SeedSummary:
    """Summarise one quantity measured once per seed; needs at least one value."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name}: no values to summarise")
    return SeedSummary(name, values)
