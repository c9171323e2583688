"""Run a validated recipe to checkpoints on disk: plan, stream, write, commit — or leave nothing behind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mergebench.checkpoint import Checkpoint, Source
from mergebench.errors import MergebenchError
from mergebench.executor import Summary, execute
from mergebench.graph import Graph, OutputPlan
from mergebench.output_files import copy_model_files, model_card
from mergebench.recipe import Recipe
from mergebench.safetensors_format import DTYPE_NAMES
from mergebench.writer import CheckpointWriter

DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                      torch.float64: "float64"}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergebenchError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergebenchError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise MergebenchError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class RunResult:
    summary: Summary
    outputs: list[dict]  # per output: path, tensors, shards, bytes


class _FileSink:
    def __init__(self, writer: CheckpointWriter):
        self.writer = writer

    def write(self, key: str, value: torch.Tensor) -> int:
        return self.writer.write(key, value)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("mergebench")
    except PackageNotFoundError:
        return "0+unknown"


def run_recipe(
    recipe: Recipe,
    device: str = "auto",
    force: bool = False,
    sources: Mapping[str, Source] | None = None,
    progress_factory: Callable[[Graph], Callable[[int], None] | None] | None = None,
) -> RunResult:
    """Write every output of ``recipe``; on any error the partial outputs are removed and no OUT appears."""
    torch_device = resolve_device(device)
    for out in recipe.outputs:
        if out.path.exists() and not force:
            raise MergebenchError(f"{out.path}: already exists (use --force to replace it)")
    graph = Graph(recipe, sources)
    metadata = {"format": "pt", "mergebench_version": version(), "mergebench_recipe_sha256": recipe.sha256}
    writers: list[CheckpointWriter] = []
    try:
        for plan in graph.outputs:
            writers.append(CheckpointWriter(plan.output.path, list(plan.tensors), plan.output.shard_size, metadata))
        progress = progress_factory(graph) if progress_factory else None
        summary = execute(graph, [_FileSink(w) for w in writers], torch_device, progress)
        results = []
        for index, (plan, writer) in enumerate(zip(graph.outputs, writers)):
            writer.finish_weights()
            _write_companions(graph, plan, writer, index)
            results.append({"path": str(plan.output.path), "tensors": len(plan.tensors),
                            "shards": len(writer.shards), "bytes": plan.nbytes})
        for writer in writers:
            writer.commit(force)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return RunResult(summary, results)


def _write_companions(graph: Graph, plan: OutputPlan, writer: CheckpointWriter, index: int) -> None:
    recipe = graph.recipe
    source_name = plan.output.copy_files_from
    source = graph.sources.get(source_name) if source_name else None
    if isinstance(source, Checkpoint) and source.folder is not None:
        copy_model_files(source.folder, writer.partial, _dominant_float_dtype(plan))
    fingerprints = {name: src.fingerprint() for name, src in graph.sources.items()
                    if name in plan.models and isinstance(src, Checkpoint)}
    card = model_card(recipe.resolved, recipe.sha256, index, fingerprints, version())
    (writer.partial / "README.md").write_text(card)


def _dominant_float_dtype(plan: OutputPlan) -> str | None:
    """The dtype config.json should announce: the one most of the output's float bytes are stored in."""
    weights: Counter[torch.dtype] = Counter()
    for t in plan.tensors:
        if t.dtype.is_floating_point:
            weights[t.dtype] += t.nbytes
    if not weights:
        return None
    dtype = weights.most_common(1)[0][0]
    return DTYPE_CONFIG_NAMES.get(dtype, DTYPE_NAMES[dtype].lower())
