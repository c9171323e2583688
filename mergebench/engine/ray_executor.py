"""Run a recipe on a Ray cluster: the statistics stage as one task, then one task per output shard.

The driver plans (headers only: it never holds a tensor), creates each output's preallocated shards
in ``OUT.partial/`` exactly as a local run does, and commits at the end. Workers rebuild the same
plan from the recipe, so inputs and outputs must be on storage every node sees at the same paths.
A statistics task runs every statistics and alignment-planning pass and returns their small results,
which Ray hands to every apply task; each apply task computes and writes the keys of one output shard
at their planned offsets, so no two tasks write the same bytes and nothing needs coordinating. The
bytes are those of the local executor: the same code computes each key from the same statistics.

Ray is an optional dependency (``pip install 'mergebench[ray]'``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from mergebench.engine.executor import Statistics, Summary, compute_statistics, execute
from mergebench.engine.graph import Graph
from mergebench.engine.outputs import open_writer
from mergebench.errors import MergebenchError
from mergebench.io.artifacts import ArtifactWriter
from mergebench.io.writer import CheckpointWriter
from mergebench.recipe import Recipe

MISSING_RAY = "--executor ray needs Ray, an optional extra: pip install 'mergebench[ray]'"


def require_ray() -> Any:
    """The ray module, or one clear error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise MergebenchError(MISSING_RAY) from None
    return ray


CONNECT_TIMEOUT_S = 10.0  # ray.init waits minutes on an address that does not answer


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """For ``HOST:PORT``, one TCP connection to the head's port within ``timeout`` seconds, or an error."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MergebenchError(f"--address {address}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise MergebenchError(f"--address {address}: no Ray head answers there within {timeout:g} s "
                              f"({reason})") from None


def connect(address: str | None) -> Any:
    """Join the cluster at ``address`` (``auto``: the one this machine belongs to) or start a local one."""
    ray = require_ray()
    if not ray.is_initialized():
        if address not in (None, "auto") and not address.startswith("ray://"):
            check_reachable(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except ConnectionError as exc:
            raise MergebenchError(f"--address {address}: cannot reach a Ray cluster ({exc})") from None
    return ray


def run_on_ray(recipe: Recipe, graph: Graph, writers: list[CheckpointWriter | ArtifactWriter], device: torch.device,
               address: str | None = None, progress: Callable[[int], None] | None = None,
               allow_non_finite: bool = False, allow_pickle: bool = False) -> Summary:
    """Compute every output of ``graph`` into ``writers`` (created by the caller) with Ray tasks."""
    ray = connect(address)
    gpus = 1 if device.type == "cuda" else 0
    statistics_task = ray.remote(num_gpus=gpus)(_statistics_task)
    apply_task = ray.remote(num_gpus=gpus)(_apply_task)
    options = {"device": str(device), "allow_pickle": allow_pickle, "allow_non_finite": allow_non_finite}
    recipe_ref = ray.put(recipe)
    statistics = ray.get(statistics_task.remote(recipe_ref, options))
    if progress and statistics.bytes_read:
        progress(statistics.bytes_read)
    statistics_ref = ray.put(statistics)
    pending = [apply_task.remote(recipe_ref, statistics_ref, index, keys, options)
               for index, keys in _work_units(graph, writers)]
    tensors, bytes_read, bytes_written, seconds = 0, statistics.bytes_read, 0, 0.0
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            part: Summary = ray.get(finished[0])
            tensors += part.tensors
            bytes_read += part.bytes_read
            bytes_written += part.bytes_written
            seconds = max(seconds, part.seconds)
            if progress:
                progress(part.bytes_read)
    except ray.exceptions.RayTaskError as exc:
        for task in pending:
            ray.cancel(task)
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        if isinstance(cause, MergebenchError):
            raise type(cause)(str(cause)) from None
        raise
    for writer in writers:
        if isinstance(writer, ArtifactWriter):
            writer.finished_elsewhere()
    return Summary(tensors, bytes_read, bytes_written, 1 + statistics.passes, seconds, f"ray ({device})")


def _work_units(graph: Graph, writers: list[CheckpointWriter | ArtifactWriter]) -> list[tuple[int, list[str]]]:
    """(output index, keys) per task: one per output shard still to write; an artifact file is one unit."""
    units = []
    for index, (plan, writer) in enumerate(zip(graph.outputs, writers)):
        if isinstance(writer, ArtifactWriter):
            units.append((index, list(plan.dtypes)))
            continue
        for shard in writer.shards:
            keys = [t.key for t in shard.tensors if t.key not in writer.done]
            if keys:
                units.append((index, keys))
    return units


def _statistics_task(recipe: Recipe, options: dict[str, Any]) -> Statistics:
    graph = Graph(recipe, allow_pickle=options["allow_pickle"])
    return compute_statistics(graph, torch.device(options["device"]))


def _apply_task(recipe: Recipe, statistics: Statistics, index: int, keys: list[str],
                options: dict[str, Any]) -> Summary:
    """Compute ``keys`` of output ``index`` and write them into the shards the driver laid out."""

    graph = Graph(recipe, allow_pickle=options["allow_pickle"])
    writer = open_writer(graph, graph.outputs[index], resume=True)
    mine = set(keys) - writer.done
    done = [set(plan.dtypes) - mine if i == index else set(plan.dtypes) for i, plan in enumerate(graph.outputs)]
    sinks = [writer if i == index else None for i in range(len(graph.outputs))]
    try:
        summary = execute(graph, sinks, torch.device(options["device"]), done=done,
                          allow_non_finite=options["allow_non_finite"], sinks_copy=True,
                          statistics=replace(statistics, bytes_read=0))  # the statistics task counted its reads
        writer.finish_weights() if isinstance(writer, ArtifactWriter) else writer.sync()
    finally:
        if isinstance(writer, CheckpointWriter):
            writer.close()
    return summary
