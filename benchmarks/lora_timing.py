"""Wall time and error of LoRA extraction.

    python benchmarks/lora_timing.py [--shapes 1024x1024,2048x5504] [--ranks 16,64]
    python benchmarks/lora_timing.py --extract small [--rank 32] [--mergekit /path/to/mergekit-venv]

The first form times the truncated SVD behind ``lora_extract`` and ``lora_merge``, exact (LAPACK) against the
seeded randomized sketch, on deltas with a fine-tune-like decaying spectrum: one row per (shape, rank) with both
times, their ratio, both relative errors and the error ratio. The second extracts model_1 of ``bench.py``'s
models of that size against model_0 with ``mergebench extract-lora`` (and ``mergekit-extract-lora`` when a
mergekit venv is given: the same modules factored, the same ones saved whole), each in a fresh process: wall
time, peak RSS, and the largest and mean relative error ‖Δ − s·B·A‖/‖Δ‖ over the factored matrices.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from mergebench.io.adapters import AdapterSource
from mergebench.io.checkpoint import Checkpoint
from mergebench.surgery.low_rank import truncated_svd

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402 - the benchmark models and the fresh-process timer

SAVED_WHOLE = "embed_tokens|layernorm|norm|lm_head"  # what mergekit-extract-lora saves whole by default


def fine_tune_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A delta whose singular values fall as 1/(1 + i/8): most energy in a few directions, a long tail."""
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, k, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, k, generator=generator)).Q
    spectrum = 1 / (1 + torch.arange(k, dtype=torch.float32) / 8)
    return (left * spectrum) @ right.T


def timed(delta: torch.Tensor, rank: int, method: str) -> tuple[float, float]:
    start = time.perf_counter()
    result = truncated_svd(delta, rank=rank, method=method, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start, result.error


def errors(adapter: Path, base: Path, tuned: Path) -> tuple[float, float]:
    """Largest and mean relative error of an adapter's factored matrices against the true deltas."""
    source, base_ckpt, tuned_ckpt = AdapterSource(adapter), Checkpoint(base), Checkpoint(tuned)
    found = []
    for key in source.keys:
        update = source.read(key)
        if update.up is None:
            continue
        delta = tuned_ckpt.read(key).float() - base_ckpt.read(key).float()
        found.append(float(torch.linalg.matrix_norm(delta - update.delta()) / torch.linalg.matrix_norm(delta)))
    return max(found), sum(found) / len(found)


def extraction(size: str, rank: int, work: Path, mergekit: Path | None) -> None:
    base, tuned, _ = bench.make_models(work, size)
    print("| tool | wall s | peak RSS GB | max error | mean error |\n|---|---|---|---|---|")
    commands = {"mergebench": [str(Path(sys.executable).parent / "mergebench"), "extract-lora", str(base), str(tuned),
                               str(work / "mb-lora"), "--rank", str(rank), "--modules-to-save", SAVED_WHOLE]}
    if mergekit is not None:
        commands["mergekit"] = [str(mergekit / "bin" / "mergekit-extract-lora"), "--model", str(tuned), "--base-model",
                                str(base), "--out-path", str(work / "mk-lora"), "--max-rank", str(rank)]
    for tool, command in commands.items():
        out = work / ("mb-lora" if tool == "mergebench" else "mk-lora")
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak = bench.timed(command)  # absolute paths: mergekit takes a relative a/b for a Hub repo id
        worst, mean = errors(out, base, tuned)
        print(f"| {tool} | {seconds:.1f} | {peak:.2f} | {worst:.4f} | {mean:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x1024,2048x5504")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--extract", choices=sorted(bench.SIZES), help="extract from bench.py's models instead")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergebench-bench"))
    parser.add_argument("--mergekit", type=Path, help="a virtualenv with mergekit installed")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.extract:
        extraction(args.extract, args.rank, args.work, args.mergekit)
        return
    print("| shape | rank | full s | randomized s | speed-up | full error | randomized error | error ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, cols = (int(n) for n in shape.split("x"))
        delta = fine_tune_like(rows, cols, seed=0)
        for rank in (int(r) for r in args.ranks.split(",")):
            full_s, full_err = timed(delta, rank, "full")
            fast_s, fast_err = timed(delta, rank, "randomized")
            print(f"| {shape} | {rank} | {full_s:.2f} | {fast_s:.2f} | {full_s / fast_s:.1f}x | {full_err:.4f} | "
                  f"{fast_err:.4f} | {fast_err / full_err:.4f} |")


if __name__ == "__main__":
    main()
