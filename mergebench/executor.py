"""Run a Graph: statistics passes if any operator needs them, then the main pass, key by key.

Each pass visits keys in storage order. For a key, every model tensor that any node of any output
needs is read once (a background thread reads the next keys while this one computes), upcast on
the chosen device, and shared through a per-key cache by every node and every output; nothing of
a key outlives it. Results are cast once to the output dtype and handed to the sinks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mergebench.allocator import return_large_blocks_to_the_os
from mergebench.errors import MergebenchError
from mergebench.graph import Graph, OutputPlan
from mergebench.layers import block_index_for
from mergebench.numerics import compute_dtype
from mergebench.operators.base import (
    ARTIFACT_TYPES,
    CHECKPOINT,
    MASK,
    KeyContext,
    StatisticsPass,
    TensorSequence,
    is_list_type,
)
from mergebench.recipe import Node

PREFETCH_KEYS = 1  # keys read ahead of the one being computed: overlap without doubling memory twice

Value = Any  # a tensor, or a list of tensors for list-valued nodes


class Sink(Protocol):
    def write(self, key: str, value: Value) -> int: ...


@dataclass(frozen=True)
class Summary:
    tensors: int
    bytes_read: int
    bytes_written: int
    passes: int
    seconds: float
    device: str


@dataclass(frozen=True)
class Stage:
    """One streamed read of the inputs, during which each (node, pass) listed accumulates."""

    passes: tuple[tuple[str, StatisticsPass], ...]


def statistics_stages(graph: Graph) -> list[Stage]:
    """The statistics passes of every node, scheduled into as few reads as their dependencies allow.

    A node's passes run in sequence after every pass of the nodes upstream of it; passes of
    different nodes at the same step share one read. A pass that visits keys in an order of its
    own (alignment planning) gets a read to itself.
    """
    last: dict[str, int] = {}  # the last stage used by a node or anything upstream of it
    scheduled: dict[tuple[int, str], list[tuple[str, StatisticsPass]]] = {}
    for name, node in graph.nodes.items():  # topological order
        upstream = max((last[r] for r in node.refs() if r in last), default=-1)
        passes = node.op.passes(node.params, frozenset(node.inputs))
        for i, stat_pass in enumerate(passes):
            slot = (upstream + 1 + i, name if stat_pass.order else "")
            scheduled.setdefault(slot, []).append((name, stat_pass))
        last[name] = upstream + len(passes)
    return [Stage(tuple(scheduled[k])) for k in sorted(scheduled)]


def execute(
    graph: Graph,
    sinks: list[Sink],
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    done: list[set[str]] | None = None,
    allow_non_finite: bool = False,
) -> Summary:
    """Compute every output of ``graph`` into the matching sink; ``progress`` gets bytes read per key.

    ``done[i]`` lists keys output i already holds (a resumed run): they are neither read nor written.
    """
    return_large_blocks_to_the_os()
    start = time.perf_counter()
    done = done or [set() for _ in sinks]
    stats: dict[str, Any] = {}
    bytes_read = 0
    stages = statistics_stages(graph)
    for stage in stages:
        bytes_read += _statistics_pass(graph, stage, device, stats, progress)

    def pending(key: str) -> list[tuple[OutputPlan, Sink]]:
        return [(plan, sink) for plan, sink, finished in zip(graph.outputs, sinks, done)
                if key in plan.dtypes and key not in finished]

    def needed(key: str) -> set[str]:
        return set().union(*(graph.needed_for_output(plan, key) for plan, _ in pending(key)))

    bytes_written = 0
    tensors = 0
    for key, raw in _prefetch(graph, [k for k in graph.keys if pending(k)], needed):
        env = _KeyValues(graph, key, raw, device, stats)
        for plan, sink in pending(key):
            bytes_written += sink.write(key, _output_value(graph, plan, env, allow_non_finite))
            tensors += 1
        read_now = sum(t.nbytes for t in raw.values()) + env.lazy_bytes
        del raw, env  # free this key's tensors before the reader allocates the one after next
        bytes_read += read_now
        if progress:
            progress(read_now)
    return Summary(tensors, bytes_read, bytes_written, 1 + len(stages), time.perf_counter() - start, str(device))


def _statistics_pass(graph: Graph, stage: Stage, device: torch.device, stats: dict[str, Any],
                     progress: Callable[[int], None] | None) -> int:
    entries = [(graph.nodes[name], stat_pass) for name, stat_pass in stage.passes]
    states = [stat_pass.init(node.params, stats.get(node.name)) for node, stat_pass in entries]

    def needed(key: str) -> set[str]:
        return set().union(*(graph.needed(r, key) for node, _ in entries if node.selects(key) for r in node.refs()))

    order = entries[0][1].order
    keys = order(list(graph.keys)) if order else graph.keys
    bytes_read = 0
    for key, raw in _prefetch(graph, keys, needed):
        env = _KeyValues(graph, key, raw, device, stats)
        for (node, stat_pass), state in zip(entries, states):
            if node.selects(key) and graph.is_floating(node.name, key):
                stat_pass.accumulate(state, env.inputs(node), node.params_for(key), env.context(node))
        read_now = sum(t.nbytes for t in raw.values()) + env.lazy_bytes
        del raw, env
        bytes_read += read_now
        if progress:
            progress(read_now)
    for (node, stat_pass), state in zip(entries, states):
        stats[node.name] = stat_pass.finalize(state, node.params, stats.get(node.name))
    return bytes_read


def _output_value(graph: Graph, plan: OutputPlan, env: _KeyValues, allow_non_finite: bool = False) -> Value:
    """The finished tensor(s) of one output at one key: cast once, checked finite, on the CPU."""
    key = env.key
    if plan.output.kind in ARTIFACT_TYPES:  # a mask or a sparse delta: no cast, the writer encodes it
        return env.value(plan.output.node).cpu()
    if not graph.is_floating(plan.primary, key):
        return _buffer(plan.primary, plan.models, env)
    dtype = plan.dtypes[key]
    value = env.value(plan.output.node)
    if plan.element is not None:
        value = value[plan.element]
    values = value if isinstance(value, list) else [value]
    cast = []
    for v in values:
        out = v.to(dtype=dtype)
        if not allow_non_finite and not _all_finite(out):
            raise MergebenchError(f"node '{plan.output.node}' produced a non-finite value in tensor '{key}' "
                                  f"(as {dtype}); nothing was written (--allow-non-finite writes it anyway)")
        cast.append(out.cpu())
    return cast if isinstance(value, list) else cast[0]


def _all_finite(tensor: torch.Tensor) -> bool:
    """A sum is finite only if every element is: one reduction, no tensor-sized temporaries.

    A finite tensor whose sum overflows is rare; the exact elementwise check settles that case.
    """
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _buffer(primary: str, models: Iterable[str], env: _KeyValues) -> torch.Tensor:
    """OPERATORS.md §0.2: integer and bool tensors are copied from the primary model, never combined."""
    reference = env.raw[primary]
    for model in models:
        other = env.raw[model]
        if other.dtype != reference.dtype or not torch.equal(other, reference):
            raise MergebenchError(f"buffer '{env.key}' differs between models '{primary}' and '{model}' "
                                  f"(integer and bool tensors are copied, never combined)")
    return reference


class _KeyValues:
    """Per-key values of models and nodes, each computed at most once for this key."""

    def __init__(self, graph: Graph, key: str, raw: dict[str, torch.Tensor], device: torch.device,
                 stats: dict[str, Any]):
        self.graph = graph
        self.key = key
        self.raw = raw
        self.device = device
        self.stats = stats
        self.cache: dict[str, Value] = {}
        if graph.vocab is not None:  # embedding rows rearranged to the output vocabulary before anything sees them
            embeddings = {m: t for m, t in raw.items() if graph.is_embedding(key, m)}
            if embeddings:
                self.raw = {**raw, **graph.vocab.align(key, embeddings)}
        self.lazy_bytes = 0  # bytes read during the computation (sequences), beyond the read-ahead

    def value(self, ref: str) -> Value:
        if ref in self.graph.recipe.sequences:
            return self._sequence(ref)
        if ref not in self.cache:
            self.cache[ref] = self._model(ref) if ref in self.graph.sources else self._node(self.graph.nodes[ref])
        return self.cache[ref]

    def _model(self, name: str) -> torch.Tensor:
        source = self.graph.sources[name]
        if name in self.raw:
            tensor = self.raw[name]
        elif self.key not in source.keys:  # an artifact that leaves the key out: all-False / zero
            dtype = source.info(source.keys[0]).dtype if source.keys else torch.float32
            return torch.zeros(self.graph.shape_of(self.key), dtype=dtype, device=self.device)
        else:  # a sequence's checkpoint, read when its fold reaches it
            tensor = source.read(self.key)
            self.lazy_bytes += tensor.nbytes
        if not tensor.dtype.is_floating_point:
            return tensor.to(device=self.device)  # masks stay boolean
        return tensor.to(device=self.device, dtype=compute_dtype(tensor.dtype))

    def _sequence(self, name: str) -> TensorSequence:
        members = self.graph.recipe.sequences[name]
        return TensorSequence([step for step, _ in members], lambda index: self._model(members[index][1]))

    def _node(self, node: Node) -> Value:
        if not node.selects(self.key):
            return self._unchanged(node)
        return node.op.fn(**self.inputs(node), p=node.params_for(self.key), ctx=self.context(node))

    def inputs(self, node: Node) -> dict[str, Value]:
        return {slot: self.value(ref) if isinstance(ref, str) else [self.value(r) for r in ref]
                for slot, ref in node.inputs.items()}

    def context(self, node: Node) -> KeyContext:
        keys = self.graph.key_lists[node.name]
        blocks = block_index_for(keys)
        position = blocks.position(self.key)
        block, num_blocks = position if position else (None, max(blocks.stacks.values(), default=0))
        return KeyContext(self.key, block, num_blocks, keys, node.seed, self.stats.get(node.name))

    def _unchanged(self, node: Node) -> Value:
        """An unselected key: a Checkpoint keeps its primary input's value, a Delta is zero."""
        if node.result == CHECKPOINT:
            sequence = self.graph.recipe.sequences.get(node.primary)
            return self.value(sequence[-1][1] if sequence else node.primary)
        shape = self.graph.info(node.name, self.key).shape
        zero = torch.zeros(shape, dtype=torch.bool if node.result == MASK else torch.float32, device=self.device)
        if is_list_type(node.result):
            return [zero.clone() for _ in range(node.list_length or 1)]
        return zero


def _prefetch(graph: Graph, keys: list[str], needed: Callable[[str], set[str]]
              ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield each key with its input tensors, read in a background thread a few keys ahead."""

    def read(key: str) -> dict[str, torch.Tensor]:
        sources = graph.sources
        return {model: sources[model].read(key) for model in sorted(needed(key)) if key in sources[model].keys}

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-read") as pool:
        pending: deque = deque()
        upcoming = iter(keys)
        for key in upcoming:
            pending.append((key, pool.submit(read, key)))
            if len(pending) >= PREFETCH_KEYS:
                break
        while pending:
            key, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(read, following)))
            yield key, future.result()
