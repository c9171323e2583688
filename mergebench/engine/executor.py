"""Run a Graph: statistics passes if any operator needs them, then the main pass, key by key.

Each pass visits keys in storage order. For a key, every model tensor that any node of any output
needs is read once (a background thread reads the next keys while this one computes), upcast on
the chosen device, and shared through a per-key cache by every node and every output; nothing of
a key outlives it. Results are cast once to the output dtype and handed to the sinks.
"""

from __future__ import annotations

import functools
import queue
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any

import torch

from mergebench.engine import pipeline
from mergebench.engine.allocator import return_large_blocks_to_the_os
from mergebench.engine.buffers import BufferPool
from mergebench.engine.graph import Graph, OutputPlan
from mergebench.engine.key_values import (
    KeyValues,
    environments,
    output_value,
    sliced_output_values,
    start_key,
    tensors_of,
)
from mergebench.engine.pipeline import Sink, Value, give_back, prefetch
from mergebench.engine.slicing import sliceable_output
from mergebench.engine.stages import Stage, statistics_stages
from mergebench.engine.staging import finish, uses_pinned_buffers
from mergebench.operators.base import StatisticsPass
from mergebench.recipe import Node

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Summary:
    tensors: int
    bytes_read: int
    bytes_written: int
    passes: int
    seconds: float
    device: str


def execute(
    graph: Graph,
    sinks: list[Sink],
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    done: list[set[str]] | None = None,
    allow_non_finite: bool = False,
    sinks_copy: bool = False,
    statistics: Statistics | None = None,
) -> Summary:
    """Compute every output of ``graph`` into the matching sink; ``progress`` gets bytes read per key.

    ``done[i]`` lists keys output i already holds (a resumed run, or the keys another worker
    writes): they are neither read nor written. ``sinks_copy`` says the sinks keep no tensor they
    are given (files do; a state dict does not): input and output buffers are then reused from key
    to key. ``statistics`` are the results of the statistics passes when they were run elsewhere.
    """
    return_large_blocks_to_the_os()
    start = time.perf_counter()
    done = done or [set() for _ in sinks]
    pool = _pool(graph, len(sinks), device) if sinks_copy else None
    if statistics is None:
        statistics = compute_statistics(graph, device, progress, pool)
    stats = statistics.stats
    bytes_read = statistics.bytes_read

    def pending(key: str) -> list[tuple[OutputPlan, Sink]]:
        return [(plan, sink) for plan, sink, finished in zip(graph.outputs, sinks, done)
                if key in plan.dtypes and key not in finished]

    def needed(key: str) -> set[str]:
        return set().union(*(graph.needed_for_output(plan, key) for plan, _ in pending(key)))

    def compute(key: str, raw: dict[str, torch.Tensor]) -> _KeyResult:
        return _compute_key(graph, key, raw, [plan for plan, _ in pending(key)], device, stats, allow_non_finite,
                            pool)

    tensors = 0
    with pipeline.WriteBehind() as writes:
        keys = [k for k in graph.keys if pending(k)]
        workers = pipeline.compute_threads(device)
        # closed however the loop ends, so that no suspended pipeline is left for the garbage collector
        with closing(pipeline.side_by_side(prefetch(graph, keys, needed, pool), compute, device, workers)) as computed:
            for key, result in computed:
                for (_, sink), value in zip(pending(key), result.values):
                    writes.submit(sink, key, value)
                    tensors += 1
                writes.after_writes(lambda used=result.recycled: give_back(pool, used))
                bytes_read += result.bytes_read
                if progress:
                    progress(result.bytes_read)
    return Summary(tensors, bytes_read, writes.bytes_written, 1 + statistics.passes, time.perf_counter() - start,
                   str(device))


@dataclass(frozen=True)
class _KeyResult:
    values: list[Value]  # one per pending output, in order
    recycled: list[torch.Tensor]  # buffers to give back to the pool once the values are written
    bytes_read: int


def _compute_key(graph: Graph, key: str, raw: dict[str, torch.Tensor], plans: list[OutputPlan],
                 device: torch.device, stats: dict[str, Any], allow_non_finite: bool,
                 pool: BufferPool | None) -> _KeyResult:
    """Every pending output's value at ``key``: its key passes, then the values, in slices when it can."""
    refs = [plan.output.node for plan in plans]
    begun = start_key(graph, key, refs, raw, device, stats, all(sliceable_output(graph, plan, key) for plan in plans))
    read = sum(t.nbytes for t in raw.values())
    if begun.sliced:
        values = sliced_output_values(graph, key, plans, raw, device, begun.stats, allow_non_finite, pool,
                                      begun.memos)
        give_back(pool, raw.values())  # nothing computed in slices refers to the inputs
        return _KeyResult(values, list(values), read)
    env = KeyValues(graph, key, raw, device, begun.stats, memo=begun.memos.setdefault(0, {}))
    values = [output_value(graph, plan, env, allow_non_finite, pool) for plan in plans]
    finish(device)  # the outputs' copies to the host are complete, the inputs' copies to the device too
    # an output may be an input's buffer: the inputs are reused once the outputs are written
    return _KeyResult(values, [*raw.values(), *tensors_of(values)], read + env.lazy_bytes)


@dataclass(frozen=True)
class Statistics:
    """What the statistics passes left for the main pass: small per-node results, and what they cost."""

    stats: dict[str, Any]
    bytes_read: int
    passes: int


def compute_statistics(graph: Graph, device: torch.device, progress: Callable[[int], None] | None = None,
                       pool: BufferPool | None = None) -> Statistics:
    """Run every statistics (and alignment planning) pass the graph's operators need, in stages."""
    stats: dict[str, Any] = {}
    bytes_read = reads = 0
    for stage in statistics_stages(graph):
        stage = _without_skipped(graph, stage, device, stats)
        if stage.passes:
            bytes_read += _statistics_pass(graph, stage, device, stats, progress, pool or _pool(graph, 0, device))
            reads += 1
    for name, node in graph.layouts.renamed_nodes.items():  # a renamed node merges with its origin's statistics
        if node.origin in stats:
            stats[name] = stats[node.origin]
    return Statistics(stats, bytes_read, reads)


def _without_skipped(graph: Graph, stage: Stage, device: torch.device, stats: dict[str, Any]) -> Stage:
    """``stage`` without the passes that skip (their results set now, from a fresh state): none may be left."""
    kept = []
    for name, stat_pass in stage.passes:
        params = graph.nodes[name].params
        if stat_pass.skipped(params, stats.get(name)):
            _finished(stat_pass, stat_pass.init(params, stats.get(name)), name, graph, device, stats)
        else:
            kept.append((name, stat_pass))
    return replace(stage, passes=tuple(kept))


def _finished(stat_pass: StatisticsPass, state: Any, name: str, graph: Graph, device: torch.device,
              stats: dict[str, Any]) -> None:
    found = stat_pass.finalize(state, graph.nodes[name].params, stats.get(name))
    stats[name] = moved(found, device) if stat_pass.host else found  # once, not per key


def _pass_keys(graph: Graph, nodes: list[Node]) -> list[str]:
    """The keys a statistics pass visits: every key of its nodes, in the output's order, then any others (the
    blocks a stack leaves out still count in a node's statistics)."""
    wanted = dict.fromkeys(key for node in nodes for key in graph.key_lists[node.name])
    output_keys = set(graph.keys)
    return [key for key in graph.keys if key in wanted] + [key for key in wanted if key not in output_keys]


def _pool(graph: Graph, outputs: int, device: torch.device) -> BufferPool:
    return BufferPool(capacity=2 * (len(graph.sources) + outputs) + 2, pinned=uses_pinned_buffers(device))


def _statistics_pass(graph: Graph, stage: Stage, device: torch.device, stats: dict[str, Any],
                     progress: Callable[[int], None] | None, pool: BufferPool | None) -> int:
    entries = [(graph.nodes[name], stat_pass) for name, stat_pass in stage.passes]
    order = entries[0][1].order
    keys = _pass_keys(graph, [node for node, _ in entries])
    keys = order(keys) if order else keys[::-1] if stage.backwards else keys
    # passes whose states combine accumulate keys side by side, each compute thread into states of its own
    workers = pipeline.compute_threads(device) if all(stat_pass.combine for _, stat_pass in entries) else 1
    free: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
    for _ in range(workers):
        free.put([stat_pass.init(node.params, stats.get(node.name)) for node, stat_pass in entries])

    if not all(stat_pass.sliceable for _, stat_pass in entries):
        pool = None  # a pass that is not a plain sum over elements may keep input tensors in its state
    held = {node.name: frozenset(graph.key_lists[node.name]) for node, _ in entries}  # nodes may read other models

    def counts(node: Node, key: str) -> bool:
        return key in held[node.name] and node.selects(key)

    def needed(key: str) -> set[str]:
        return set().union(*(graph.needed(r, key) for node, _ in entries if counts(node, key) for r in node.refs()))

    def accumulate(key: str, raw: dict[str, torch.Tensor]) -> int:
        states = free.get()
        try:
            active = [(node, stat_pass, state) for (node, stat_pass), state in zip(entries, states)
                      if counts(node, key) and graph.is_floating(node.name, key)]
            refs = [r for node, _, _ in active for r in node.refs()]
            begun = start_key(graph, key, refs, raw, device, stats,
                              all(stat_pass.sliceable for _, stat_pass, _ in active))
            lazy_bytes = 0
            for env in environments(graph, key, raw, device, begun.stats, begun.sliced, begun.memos):
                for node, stat_pass, state in active:
                    inputs = env.inputs(node)
                    stat_pass.accumulate(state, moved(inputs, CPU) if stat_pass.host else inputs,
                                         graph.params_for(node, key), env.context(node))
                lazy_bytes += env.lazy_bytes
            finish(device)  # the next key may accumulate into these states on another thread's stream
        finally:
            free.put(states)
        give_back(pool, raw.values())
        return sum(t.nbytes for t in raw.values()) + lazy_bytes

    bytes_read = 0
    with closing(pipeline.side_by_side(prefetch(graph, keys, needed, pool), accumulate, device, workers)) as passed:
        for _, read_now in passed:
            bytes_read += read_now
            if progress:
                progress(read_now)
    per_worker = [free.get() for _ in range(workers)]
    for i, (node, stat_pass) in enumerate(entries):
        state = functools.reduce(stat_pass.combine, [states[i] for states in per_worker])  # one: no combine
        _finished(stat_pass, state, node.name, graph, device, stats)
    return bytes_read


def moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, device) for v in value)
    return value
