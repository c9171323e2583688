"""Numeric steps shared by several operators, written once (semantics §0.3)."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable
from decimal import Decimal

import numpy as np
import torch


def draw_seed(seed: int, stream: str, input_index: int, key: str) -> int:
    """semantics §0.5: one seed per (node seed, kind of draw, input position, key)."""
    digest = hashlib.blake2b(f"{seed}|{stream}|{input_index}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every stored float type narrower than it; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(tensors: Iterable[torch.Tensor], weights: Iterable[float]) -> torch.Tensor:
    """Σ w_t·x_t accumulated in place into one fresh buffer; never aliases an input.

    Terms with weight exactly 0 are skipped rather than multiplied, so an interpolation at an
    end point returns the other input bit for bit (-0.0 and non-finite values included). A first
    term of weight 1 is added to the second, not copied first: the same bits, one pass fewer.
    """
    total: torch.Tensor | None = None
    lead: torch.Tensor | None = None  # a first term of weight 1, waiting for the second
    first: torch.Tensor | None = None
    for tensor, weight in zip(tensors, weights):
        first = tensor if first is None else first
        if weight == 0:
            continue
        if lead is not None:
            total, lead = torch.add(lead, tensor, alpha=weight), None
        elif total is not None:
            total.add_(tensor, alpha=weight)
        elif weight == 1:
            lead = tensor
        else:
            total = torch.mul(tensor, weight)
    if lead is not None:  # the only term
        return torch.mul(lead, 1.0)
    if total is None:
        if first is None:
            raise ValueError("weighted_sum of nothing")
        return torch.zeros_like(first)
    return total


def keep_count(density: float, n: int) -> int:
    """k = floor(ρ·n) computed on the decimal string of ρ (0.29·100 is 29, not 28; semantics §0.4)."""
    return math.floor(Decimal(str(density)) * n)


def threshold_for(magnitudes: torch.Tensor, k: int) -> float:
    """The threshold that keeps the k largest magnitudes (ties at the threshold kept).

    The same two histograms as the streamed global threshold, over one tensor: exact, and about ten
    times faster than ``torch.kthvalue`` on large tensors.
    """
    selector = ExactThreshold()
    selector.add_coarse(magnitudes)
    if selector.choose_bin(k):
        selector.add_fine(magnitudes)
    return selector.threshold()


def keep_mask(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 where |value| ≥ threshold, else 0.0.

    A float mask: on the CPU torch compares into float several times faster than into bool, and
    multiplying by it is a plain float multiply.
    """
    return values.abs().ge_(threshold)


HALF_BITS = 16
BINS = 1 << HALF_BITS
FEW = 1024  # below this many elements, counting them one by one beats a histogram over their span
FINE_PIECE = 1 << 20  # a whole tensor's fine pass goes by pieces: its temporaries (8 bytes an entry) stay small


class ExactThreshold:
    """The k-th largest |x| over many tensors, exactly, in two streamed passes and O(65 536) memory.

    For non-negative float32 the IEEE-754 bit pattern read as an integer is monotone in the value.
    Pass 1 histograms the high 16 bits of every magnitude and finds the bin holding the k-th
    largest; pass 2 histograms the low 16 bits of the magnitudes in that bin (semantics §0.4).

    Pass 1 counts, in each bin, the magnitudes whose low 16 bits are not all zero apart from those
    that are: the latter all equal the bin's floor, its smallest value. Task vectors of bf16
    checkpoints are almost all bfloat16 values (the difference of two nearby bf16 numbers is one),
    so the k-th largest is usually among them: the bin's floor is then the threshold, and pass 2 is
    not needed.
    """

    def __init__(self) -> None:
        # bin b's magnitudes whose low bits are all zero at 2b, the others at 2b + 1
        self.coarse = torch.zeros(2 * BINS, dtype=torch.int64)
        self.fine = torch.zeros(BINS, dtype=torch.int64)
        self.count = 0
        self.bin = -1
        self.settled = False  # whether the threshold is the bin's floor (no fine pass)
        self.rank = 0  # the k-th largest is the rank-th largest inside ``bin``
        self.k = 0

    @staticmethod
    def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
        """float32 bit patterns, on the magnitudes' device: a GPU counts them there, only counts come back."""
        return magnitudes.detach().to(torch.float32).contiguous().reshape(-1).view(torch.int32)

    def add_coarse(self, magnitudes: torch.Tensor) -> None:
        bits = self._bits(magnitudes)
        _add_counts(self.coarse, torch.bitwise_and(bits, BINS - 1).clamp_(max=1).add_(bits >> HALF_BITS, alpha=2))
        self.count += bits.numel()

    def fine_pass_copy(self) -> ExactThreshold:
        """This selector with its bin chosen and no fine counts yet, for one state of the fine pass."""
        fresh = copy.copy(self)
        fresh.fine = torch.zeros(BINS, dtype=torch.int64)
        return fresh

    def add_coarse_counts(self, other: ExactThreshold) -> None:
        self.coarse += other.coarse
        self.count += other.count

    def add_fine_counts(self, other: ExactThreshold) -> None:
        self.fine += other.fine

    def choose_bin(self, k: int) -> bool:
        """Fix k; returns whether the fine pass is needed (``needs_fine``)."""
        self.k = k
        if k <= 0 or k >= self.count:
            return False
        per_bin = self.coarse[0::2] + self.coarse[1::2]
        at_or_above = per_bin.flip(0).cumsum(0).flip(0)  # elements in bins >= b
        self.bin = int((at_or_above >= k).nonzero().max())
        above = int(at_or_above[self.bin + 1]) if self.bin + 1 < BINS else 0
        self.rank = k - above
        # the rank-th largest of the bin is its floor when fewer of its entries lie above the floor
        self.settled = self.rank > int(self.coarse[2 * self.bin + 1])
        return self.needs_fine

    @property
    def needs_fine(self) -> bool:
        """Not for k = 0 or k >= n, nor when the k-th largest is the floor of its bin."""
        return self.bin >= 0 and not self.settled

    def add_fine(self, magnitudes: torch.Tensor) -> None:
        bits = self._bits(magnitudes)
        if not bits.is_cpu:
            _add_counts(self.fine, bits[(bits >> HALF_BITS) == self.bin] & (BINS - 1))
            return
        bits = bits.numpy()
        for start in range(0, bits.size, FINE_PIECE):
            piece = bits[start:start + FINE_PIECE]
            # positions, then a gather: boolean indexing (torch's, and numpy's too) mispredicts a branch
            # per element when a bin holds a fifth of them, as bf16 fine-tunes' few distinct deltas do
            low_bits = np.take(piece, np.flatnonzero((piece >> HALF_BITS) == self.bin))
            low_bits &= BINS - 1
            if low_bits.size < FEW:  # no 65 536-bin temporary for a few elements
                np.add.at(self.fine.numpy(), low_bits, 1)
            else:
                _add_counts(self.fine, torch.from_numpy(low_bits))

    def threshold(self) -> float:
        if self.k <= 0:
            return math.inf
        if self.k >= self.count:
            return 0.0
        low = 0
        if not self.settled:
            at_or_above = self.fine.flip(0).cumsum(0).flip(0)
            low = int((at_or_above >= self.rank).nonzero().max())
        bits = torch.tensor([(self.bin << HALF_BITS) | low], dtype=torch.int32)
        return float(bits.view(torch.float32))


def _add_counts(histogram: torch.Tensor, bins: torch.Tensor) -> None:
    """histogram[b] += how often b occurs in ``bins`` (a temporary: shifted in place), over their span only.

    Magnitudes of one tensor share a few exponents: counting over their span and adding that,
    rather than over all 65 536 bins, halves the cost of a histogram pass.
    """
    if bins.numel() == 0:
        return
    low = int(bins.min())
    counts = torch.bincount(bins.sub_(low))
    histogram[low:low + counts.numel()] += counts.to(histogram.device)


def masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` where ``keep`` (a bool or 0/1 float mask), zero elsewhere.

    A multiply by the mask: several times faster than ``torch.where`` on the CPU, and a bool mask
    is read as bytes, which torch multiplies far faster than bools. Dropped entries may come out
    as -0.0, which compares, adds and sparsifies as zero.
    """
    return values * (keep.view(torch.uint8) if keep.dtype == torch.bool else keep)


DOT_CHUNK = 1 << 12
DOT_PIECE = 1 << 20  # entries multiplied at a time: a whole embedding's products are not held at once


class ChunkedDot:
    """Σ x·y of two flattened tensors, given whole or in consecutive slices, with the same bits either way.

    The products are summed ``DOT_CHUNK`` at a time in the tensors' dtype (float32: each chunk summed
    by torch's vectorised, cascaded reduction), the chunks counted from the tensors' first entry (a
    slice's unfinished chunk waits for the next slice), and ``math.fsum`` adds the chunk sums exactly:
    the total does not depend on where slices begin, and errs like one chunk's sum, not like a sum
    over the whole tensor. (float64 products would be exact, but cost SLERP ten times as much.)
    """

    def __init__(self) -> None:
        self.sums: list[float] = []
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().reshape(-1), y.detach().reshape(-1)
        if self.carry is not None:
            x, y = torch.cat([self.carry[0], x]), torch.cat([self.carry[1], y])
        whole = x.numel() - x.numel() % DOT_CHUNK
        for start in range(0, whole, DOT_PIECE):
            end = min(start + DOT_PIECE, whole)
            self.sums.extend(torch.mul(x[start:end], y[start:end]).view(-1, DOT_CHUNK).sum(dim=1).tolist())
        self.carry = (x[whole:].clone(), y[whole:].clone()) if whole < x.numel() else None

    def total(self) -> float:
        tail = [] if self.carry is None else [float(torch.mul(*self.carry).sum())]
        return math.fsum([*self.sums, *tail])


EXACT_FLOAT32_COUNT = 1 << 24  # every integer up to this is a float32


def sum_of_signs(values: torch.Tensor) -> int:
    """Σ sign(v), exactly: summed in float32 a 2²⁴-element chunk at a time, where every partial sum is an integer.

    A float64 sum would first convert every sign to float64, one more pass over the values.
    """
    signs = torch.sign(values).reshape(-1)
    # chunks by indexing: torch's split goes through a Python wrapper (10 µs), and every slice is checked
    return sum(int(signs[start:start + EXACT_FLOAT32_COUNT].sum())
               for start in range(0, signs.numel(), EXACT_FLOAT32_COUNT))


def elect_sign(trimmed_sum: torch.Tensor, majority: float) -> torch.Tensor:
    """TIES sign election: the sign of the summed trimmed deltas, zeros resolved to the majority sign.

    ``trimmed_sum`` is overwritten (with 1.0 where it is zero, see ``keep_mask``): float
    arithmetic only, no bool temporaries.
    """
    signs = torch.sign(trimmed_sum)
    return signs.add_(trimmed_sum.eq_(0), alpha=majority)
