"""Weight-diff analysis: how and where fine-tunes moved away from their base, block by block.

For each block: the L2 norm of each task delta, its norm relative to the base weights, the fraction of
entries that changed, the cosine similarity between task deltas, their sign agreement (where both
moved, how often in the same direction: TIES's interference measure) and, optionally, the Jaccard
overlap of their top-k masks. One streamed pass; O(blocks) memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Source
from mergebench.surgery.layers import BlockIndex
from mergebench.surgery.numerics import keep_count, threshold_for

OVERALL = "overall"


@dataclass
class _Sums:
    base_sq: float = 0.0
    numel: int = 0
    delta_sq: list[float] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    dots: dict[tuple[int, int], float] = field(default_factory=dict)
    both_moved: dict[tuple[int, int], int] = field(default_factory=dict)
    agree: dict[tuple[int, int], int] = field(default_factory=dict)
    mask_inter: dict[tuple[int, int], int] = field(default_factory=dict)
    mask_union: dict[tuple[int, int], int] = field(default_factory=dict)


def weight_diff(base: Source, others: Sequence[Source], names: Sequence[str],
                mask_density: float | None = None) -> dict[str, dict[str, float]]:
    """Per block (and overall): the statistics above, keyed by readable names; task names from ``names``."""
    if not others:
        raise MergebenchError("diff needs a base and at least one other checkpoint")
    if mask_density is not None and not 0 < mask_density <= 1:
        raise MergebenchError(f"--masks {mask_density}: the density must be in (0, 1], e.g. 0.01")
    for other in others:
        missing = sorted(set(base.keys) - set(other.keys))
        if missing:
            raise MergebenchError(f"{other.label}: lacks tensors of {base.label}: {', '.join(missing[:5])}")
    blocks = BlockIndex(base.keys)
    pairs = [(i, j) for i in range(len(others)) for j in range(i + 1, len(others))]
    sums: dict[str, _Sums] = {}
    for key in base.keys:
        info = base.info(key)
        if not info.is_floating:
            continue
        position = blocks.position(key)
        label = "outside blocks" if position is None else f"block {position[0]:02d}"
        reference = base.read(key).float()
        deltas = []
        for other in others:
            value = other.read(key)
            if tuple(value.shape) != info.shape:
                raise MergebenchError(f"{other.label}: tensor '{key}' is {list(value.shape)}, base {list(info.shape)}")
            deltas.append(value.float() - reference)
        masks = None
        if mask_density is not None:
            masks = [d.abs() >= threshold_for(d.abs(), keep_count(mask_density, d.numel())) for d in deltas]
        for name in (label, OVERALL):
            _accumulate(sums.setdefault(name, _Sums()), reference, deltas, pairs, masks)
    return {name: _report(s, names, pairs) for name, s in sorted(sums.items(), key=lambda item: item[0] == OVERALL)}


def _accumulate(s: _Sums, reference: torch.Tensor, deltas: list[torch.Tensor], pairs: list[tuple[int, int]],
                masks: list[torch.Tensor] | None) -> None:
    if not s.delta_sq:
        s.delta_sq, s.changed = [0.0] * len(deltas), [0] * len(deltas)
    s.base_sq += float(reference.double().square().sum())
    s.numel += reference.numel()
    for t, delta in enumerate(deltas):
        s.delta_sq[t] += float(delta.double().square().sum())
        s.changed[t] += int((delta != 0).sum())
    for i, j in pairs:
        a, b = deltas[i], deltas[j]
        s.dots[i, j] = s.dots.get((i, j), 0.0) + float((a.double() * b.double()).sum())
        moved = (a != 0) & (b != 0)
        s.both_moved[i, j] = s.both_moved.get((i, j), 0) + int(moved.sum())
        s.agree[i, j] = s.agree.get((i, j), 0) + int((moved & (torch.sign(a) == torch.sign(b))).sum())
        if masks is not None:
            s.mask_inter[i, j] = s.mask_inter.get((i, j), 0) + int((masks[i] & masks[j]).sum())
            s.mask_union[i, j] = s.mask_union.get((i, j), 0) + int((masks[i] | masks[j]).sum())


def _report(s: _Sums, names: Sequence[str], pairs: list[tuple[int, int]]) -> dict[str, float]:
    row: dict[str, float] = {"elements": float(s.numel)}
    base_norm = math.sqrt(s.base_sq)
    for t, name in enumerate(names):
        norm = math.sqrt(s.delta_sq[t])
        row[f"norm {name}"] = norm
        row[f"relative norm {name}"] = norm / base_norm if base_norm else math.nan
        row[f"changed {name}"] = s.changed[t] / s.numel if s.numel else 0.0
    for i, j in pairs:
        pair = f"{names[i]}~{names[j]}"
        norms = math.sqrt(s.delta_sq[i]) * math.sqrt(s.delta_sq[j])
        row[f"cosine {pair}"] = s.dots[i, j] / norms if norms else 0.0
        row[f"sign agreement {pair}"] = s.agree[i, j] / s.both_moved[i, j] if s.both_moved[i, j] else math.nan
        if (i, j) in s.mask_union:
            row[f"mask jaccard {pair}"] = s.mask_inter[i, j] / s.mask_union[i, j] if s.mask_union[i, j] else 0.0
    return row


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def check_plot_path(path: Path) -> None:
    """Refuse a plot path up front (before minutes of reading weights): its folder must exist and its
    extension must name an image format."""
    if path.suffix.lstrip(".").lower() not in PLOT_FORMATS:
        raise MergebenchError(f"--plot {path}: the file name must end in one of "
                              f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    if not path.parent.resolve().is_dir():
        raise MergebenchError(f"--plot {path}: the folder {path.parent} does not exist")


def json_ready(report: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """The report with undefined statistics (NaN: e.g. a cosine with a zero delta) as null, since JSON has
    no NaN and strict parsers reject it."""
    return {name: {k: (v if math.isfinite(v) else None) for k, v in row.items()} for name, row in report.items()}


def plot_diff(report: dict[str, dict[str, float]], path: str) -> None:
    """Relative delta norm of each task and cosine similarity of each pair, along the blocks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergebenchError("the plot needs matplotlib: pip install 'mergebench[plot]'") from None
    labels = [name for name in report if name != OVERALL]
    columns = list(next(iter(report.values())))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for column in (c for c in columns if c.startswith("relative norm ")):
        top.plot(labels, [report[label][column] for label in labels], marker="o", label=column[14:])
    top.set_ylabel("‖Δ‖ / ‖θ_base‖")
    top.legend(fontsize=8)
    for column in (c for c in columns if c.startswith("cosine ")):
        bottom.plot(labels, [report[label][column] for label in labels], marker="o", label=column[7:])
    bottom.set_ylabel("cosine between deltas")
    bottom.legend(fontsize=8)
    bottom.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
