"""Run a validated recipe to checkpoints on disk: lock, check, open writers, compute, write, commit.

The computing is an executor's: the local one (threads over the streamed keys) or Ray's, picked from
``EXECUTORS`` by name; everything else a run does is the same for both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from mergebench.engine.executor import Summary, execute
from mergebench.engine.graph import Graph
from mergebench.engine.outputs import (
    check_free_space,
    finished_by_this_run,
    open_writer,
    output_details,
    write_companions,
    written_bytes,
)
from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import reserve_descriptors
from mergebench.io.output_guard import check_may_replace
from mergebench.io.sources import Source
from mergebench.io.writer import CheckpointWriter, OutputError, OutputLock, Writer
from mergebench.recipe import Recipe
from mergebench.value_types import FILE_ARTIFACTS


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
    outputs: list[dict]  # per output: path, tensors, shards, bytes, files_not_copied


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, as the CLI's flags say it (``mergebench run --help``)."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    force: bool = False  # replace an earlier mergebench output at an output path
    resume: bool = False  # continue an interrupted run from its partial outputs
    allow_non_finite: bool = False  # write NaN/Inf results instead of stopping
    allow_pickle: bool = False  # read pickled weights through torch.load(weights_only=True)
    executor: str = "local"  # a key of EXECUTORS
    address: str | None = None  # the Ray cluster: auto, HOST:PORT, or None for a local one


Progress = Callable[[int], None]
Executor = Callable[[Recipe, Graph, list, torch.device, "Progress | None", RunOptions], Summary]


def _local(recipe: Recipe, graph: Graph, writers: list, device: torch.device, progress: Progress | None,
           options: RunOptions) -> Summary:
    return execute(graph, writers, device, progress, done=[set(w.done) for w in writers],
                   allow_non_finite=options.allow_non_finite, sinks_copy=True)


def _ray(recipe: Recipe, graph: Graph, writers: list, device: torch.device, progress: Progress | None,
         options: RunOptions) -> Summary:
    from mergebench.engine.ray_executor import run_on_ray  # ray is an extra: imported only when asked for

    return run_on_ray(recipe, graph, writers, device, options.address, progress,
                      allow_non_finite=options.allow_non_finite, allow_pickle=options.allow_pickle)


def _ray_ready(sources: Mapping[str, Source] | None) -> None:
    from mergebench.engine.ray_executor import require_ray

    require_ray()
    if sources is not None:
        raise MergebenchError("the Ray executor reads models from their files; in-memory sources run locally")


EXECUTORS: dict[str, tuple[Executor, Callable[[Mapping[str, Source] | None], None]]] = {
    "local": (_local, lambda sources: None),
    "ray": (_ray, _ray_ready),
}


def run_recipe(recipe: Recipe, options: RunOptions = RunOptions(), sources: Mapping[str, Source] | None = None,
               progress_factory: Callable[[Graph], Progress | None] | None = None) -> RunResult:
    """Write every output of ``recipe``.

    A wrong input removes the partial outputs (nothing half-written is left); a write error or an
    interrupt keeps them, and ``options.resume`` then continues where the journal says the run stopped.
    ``options.executor="ray"`` computes on a Ray cluster with the same bytes out.
    """
    if options.executor not in EXECUTORS:
        raise MergebenchError(f"--executor {options.executor}: expected {' or '.join(EXECUTORS)}")
    compute, ready = EXECUTORS[options.executor]
    ready(sources)
    device = resolve_device(options.device)
    force, resume = options.force, options.resume
    with ExitStack() as locks:
        graph = Graph(recipe, sources, allow_pickle=options.allow_pickle)
        reserve_descriptors(sum(len(source.file_states()) for source in graph.sources.values()))
        for plan in sorted(graph.outputs, key=lambda p: str(p.path)):
            locks.enter_context(OutputLock(plan.path))
        replace = [force or (resume and finished_by_this_run(graph, plan)) for plan in graph.outputs]
        for plan, may in zip(graph.outputs, replace):
            check_may_replace(plan.path, may, artifact=plan.output.kind in FILE_ARTIFACTS)
        check_free_space(graph.outputs)
        writers: list[Writer] = []
        try:
            for plan in graph.outputs:
                writers.append(open_writer(graph, plan, resume))
            summary = compute(recipe, graph, writers, device, progress_factory(graph) if progress_factory else None,
                              options)
            results = []
            for plan, writer in zip(graph.outputs, writers):
                writer.finish_weights()
                skipped = write_companions(graph, plan, writer) if isinstance(writer, CheckpointWriter) else []
                results.append({"path": str(plan.path), "tensors": len(plan.tensors),
                                "shards": len(writer.shards), "bytes": written_bytes(plan, writer),
                                "files_not_copied": skipped, **output_details(writer)})
            for writer in writers:
                writer.prepare()
            for writer, may in zip(writers, replace):
                writer.commit(may)
        except MergebenchError as exc:
            for writer in writers:
                writer.close() if isinstance(exc, OutputError) else writer.abort()
            raise
        except BaseException:
            for writer in writers:
                writer.close()
            raise
    return RunResult(summary, results)
