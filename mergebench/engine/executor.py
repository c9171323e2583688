"""Run a Graph: statistics passes if any operator needs them, then the main pass, key by key.

Each pass visits keys in storage order. For a key, every model tensor that any node of any output
needs is read once (a background thread reads the next keys while this one computes), upcast on
the chosen device, and shared through a per-key cache by every node and every output; nothing of
a key outlives it. Results are cast once to the output dtype and handed to the sinks.
"""

from __future__ import annotations

import functools
import math
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from mergebench.engine.allocator import return_large_blocks_to_the_os
from mergebench.engine.buffers import BufferPool, typed
from mergebench.engine.graph import Graph, OutputPlan
from mergebench.engine.key_state import KeyState
from mergebench.engine.staging import finish, start_compute_thread, to_device, to_host, uses_pinned_buffers
from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Checkpoint
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
from mergebench.surgery.layers import block_index_for
from mergebench.surgery.numerics import compute_dtype

CPU = torch.device("cpu")
PREFETCH_KEYS = 1  # keys read ahead of the one being computed: overlap without doubling memory twice
SLICE_ELEMENTS = 1 << 16  # float32 slices of 256 KiB: in L2 cache, below the mmap threshold (reused); measured best
WRITES_IN_FLIGHT = 2  # finished tensors waiting for the writer thread: with one, handing over a key often waited
COMPUTE_THREADS = 2  # keys computed side by side on the CPU: each holds its inputs and outputs in memory
GPU_COMPUTE_THREADS = 4  # on a GPU: more keys' host work (DARE's draws) overlaps the copies and kernels

Value = Any  # a tensor, or a list of tensors for list-valued nodes
Result = TypeVar("Result")


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
    with _WriteBehind() as writes:
        keys = [k for k in graph.keys if pending(k)]
        computed = _side_by_side(_prefetch(graph, keys, needed, pool), compute, device, _compute_threads(device))
        for key, result in computed:
            for (_, sink), value in zip(pending(key), result.values):
                writes.submit(sink, key, value)
                tensors += 1
            writes.after_writes(lambda used=result.recycled: _give_back(pool, used))
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
    sliced = _in_slices(graph, key, refs, raw, device) and all(_sliceable_output(graph, plan, key) for plan in plans)
    memos: dict[int, dict] = {}  # per slice: what a key's sweeps share (DARE's drop masks)
    key_stats = _key_statistics(graph, key, refs, raw, device, stats, sliced, memos)
    read = sum(t.nbytes for t in raw.values())
    if sliced:
        values = _sliced_output_values(graph, key, plans, raw, device, key_stats, allow_non_finite, pool, memos)
        _give_back(pool, raw.values())  # nothing computed in slices refers to the inputs
        return _KeyResult(values, list(values), read)
    env = _KeyValues(graph, key, raw, device, key_stats, memo=memos.setdefault(0, {}))
    values = [_output_value(graph, plan, env, allow_non_finite, pool) for plan in plans]
    finish(device)  # the outputs' copies to the host are complete, the inputs' copies to the device too
    # an output may be an input's buffer: the inputs are reused once the outputs are written
    return _KeyResult(values, [*raw.values(), *_tensors(values)], read + env.lazy_bytes)


def peak_memory_estimate(graph: Graph) -> int:
    """Bytes held at the worst moment of a CPU run, keys in storage order: ``COMPUTE_THREADS`` keys computed
    side by side (their stored inputs, outputs and, unless computed in slices, a float32 value per model
    and node), ``PREFETCH_KEYS`` read ahead, and the outputs of the ``WRITES_IN_FLIGHT`` before them
    waiting for the writer.

    Pooled buffers keep the size of the largest tensor they held, so a model with outsized tensors
    (embeddings) peaks somewhat higher: medium bench models, 0.58 GB estimated, 0.75–0.77 GB measured."""
    held = [_bytes_at(graph, key) for key in graph.keys]
    worst = 0
    for i in range(len(held)):
        computing = sum(stored + out + floats for stored, out, floats in held[i:i + COMPUTE_THREADS])
        read_ahead = sum(stored for stored, _, _ in held[i + COMPUTE_THREADS:i + COMPUTE_THREADS + PREFETCH_KEYS])
        written = sum(out for _, out, _ in held[max(0, i - WRITES_IN_FLIGHT):i])
        worst = max(worst, computing + read_ahead + written)
    return worst


def _bytes_at(graph: Graph, key: str) -> tuple[int, int, int]:
    """(stored inputs, outputs, float32 values) of one key."""
    models = [m for m in graph.sources if key in graph.sources[m].keys]
    stored = sum(graph.sources[m].info(key).nbytes for m in models)
    numel = graph.sources[models[0]].info(key).numel
    plans = [plan for plan in graph.outputs if key in plan.dtypes]
    out = sum(numel * plan.dtypes[key].itemsize for plan in plans)
    sliced = all(graph.is_elementwise(plan.output.node, key) for plan in plans)
    floats = 0 if sliced else (len(models) + len(graph.nodes) + 1) * numel * 4
    return stored, out, floats


def _compute_threads(device: torch.device) -> int:
    """Keys computed at once: one per thread torch may use, at most ``COMPUTE_THREADS`` (``GPU_COMPUTE_THREADS``).

    torch's thread count is the core budget: all cores by default, what ``OMP_NUM_THREADS`` says
    otherwise (Ray sets it to a task's CPUs). On a GPU each thread queues its key on a stream of its
    own, so one key's copies and host work (DARE's draws) overlap the others' kernels.
    """
    most = COMPUTE_THREADS if device.type == "cpu" else GPU_COMPUTE_THREADS
    return max(1, min(most, torch.get_num_threads()))


def _side_by_side(items: Iterable[tuple[str, dict[str, torch.Tensor]]],
                  work: Callable[[str, dict[str, torch.Tensor]], Result], device: torch.device,
                  workers: int) -> Iterator[tuple[str, Result]]:
    """(key, work(key, raw)) for each (key, raw) of ``items``, up to ``workers`` keys at once, as each is done.

    A key done before an older one is handed on at once, and the thread that computed it takes the
    next: an embedding matrix, many times the size of the keys after it, would otherwise leave the
    other threads idle until it is done. Keys are written at their planned offsets, in any order.
    """
    with _ComputePool(workers, device) as computing:
        in_flight: dict[Future[Result], str] = {}
        for key, raw in items:
            in_flight[computing.submit(work, key, raw)] = key
            del raw  # the worker holds it until the key is done
            if len(in_flight) >= workers:
                done = next(as_completed(in_flight))
                yield in_flight.pop(done), done.result()
        for done in as_completed(list(in_flight)):
            yield in_flight.pop(done), done.result()


def _start_compute_thread(workers: int, device: torch.device) -> None:
    if workers > 1:
        torch.set_num_threads(1)
    start_compute_thread(device)


class _ComputePool(ThreadPoolExecutor):
    """Threads that compute whole keys side by side, each with one intra-op torch thread when there are several.

    Slices are too small for torch's thread pool to pay off, and a key's sweeps run in order
    (random draws continue from slice to slice), so cores are used by computing several keys at
    once; torch releases the interpreter lock inside its kernels. A single worker keeps torch's
    threads for what it computes whole. On a GPU each thread has a stream of its own (``staging``).
    """

    def __init__(self, workers: int, device: torch.device):
        self.threads = torch.get_num_threads()
        super().__init__(max_workers=workers, thread_name_prefix="mergebench-compute",
                         initializer=_start_compute_thread, initargs=(workers, device))

    def __exit__(self, *exc_info: object) -> bool | None:
        self.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)  # where torch's thread count is process-wide, not per thread
        return None


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
    bytes_read = 0
    stages = statistics_stages(graph)
    for stage in stages:
        bytes_read += _statistics_pass(graph, stage, device, stats, progress, pool or _pool(graph, 0, device))
    return Statistics(stats, bytes_read, len(stages))


def _pool(graph: Graph, outputs: int, device: torch.device) -> BufferPool:
    return BufferPool(capacity=2 * (len(graph.sources) + outputs) + 2, pinned=uses_pinned_buffers(device))


def _statistics_pass(graph: Graph, stage: Stage, device: torch.device, stats: dict[str, Any],
                     progress: Callable[[int], None] | None, pool: BufferPool | None) -> int:
    entries = [(graph.nodes[name], stat_pass) for name, stat_pass in stage.passes]
    order = entries[0][1].order
    keys = order(list(graph.keys)) if order else graph.keys
    # passes whose states combine accumulate keys side by side, each compute thread into states of its own
    workers = _compute_threads(device) if all(stat_pass.combine for _, stat_pass in entries) else 1
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
            sliced = (all(stat_pass.sliceable for _, stat_pass, _ in active)
                      and _in_slices(graph, key, refs, raw, device))
            memos: dict[int, dict] = {}
            key_stats = _key_statistics(graph, key, refs, raw, device, stats, sliced, memos)
            lazy_bytes = 0
            for env in _environments(graph, key, raw, device, key_stats, sliced, memos):
                for node, stat_pass, state in active:
                    inputs = env.inputs(node)
                    stat_pass.accumulate(state, moved(inputs, CPU) if stat_pass.host else inputs,
                                         node.params_for(key), env.context(node))
                lazy_bytes += env.lazy_bytes
            finish(device)  # the next key may accumulate into these states on another thread's stream
        finally:
            free.put(states)
        _give_back(pool, raw.values())
        return sum(t.nbytes for t in raw.values()) + lazy_bytes

    bytes_read = 0
    for _, read_now in _side_by_side(_prefetch(graph, keys, needed, pool), accumulate, device, workers):
        bytes_read += read_now
        if progress:
            progress(read_now)
    per_worker = [free.get() for _ in range(workers)]
    for i, (node, stat_pass) in enumerate(entries):
        state = functools.reduce(stat_pass.combine, [states[i] for states in per_worker])  # one: no combine
        found = stat_pass.finalize(state, node.params, stats.get(node.name))
        stats[node.name] = moved(found, device) if stat_pass.host else found  # once, not per key
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


def _output_value(graph: Graph, plan: OutputPlan, env: _KeyValues, allow_non_finite: bool = False,
                  pool: BufferPool | None = None) -> Value:
    """The finished tensor(s) of one output at one key: cast once, checked finite, on the CPU.

    From a GPU each is copied back once, into a ``pool`` buffer when there is one: complete only
    after ``finish``.
    """
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
        cast.append(to_host(out, pool))  # queued before the check, which waits for it
        _check_finite(out, plan, key, allow_non_finite)
    return cast if isinstance(value, list) else cast[0]


def _in_slices(graph: Graph, key: str, refs: list[str], raw: dict[str, torch.Tensor], device: torch.device) -> bool:
    """Whether ``refs`` at ``key`` are elementwise computations on same-shaped inputs all held in ``raw``.

    Then they may be computed ``SLICE_ELEMENTS`` at a time: each slice's float32 values are small
    enough to be reused from the heap and stay in cache, where whole-tensor upcasts would fault in
    fresh memory for every input of every key.
    """
    if device.type != "cpu" or not raw:
        return False
    numel = next(iter(raw.values())).numel()
    if numel <= SLICE_ELEMENTS or any(t.numel() != numel for t in raw.values()):
        return False
    if any(graph.is_embedding(key, model) for model in raw):
        return False
    return all(graph.is_elementwise(ref, key) and graph.needed(ref, key) <= raw.keys() for ref in refs)


def _sliceable_output(graph: Graph, plan: OutputPlan, key: str) -> bool:
    node = graph.nodes.get(plan.output.node)
    return (plan.output.kind not in ARTIFACT_TYPES and graph.is_floating(plan.primary, key)
            and not (node is not None and is_list_type(node.result) and plan.element is None)
            and graph.needed_for_output(plan, key) == graph.needed(plan.output.node, key))


def _slices(raw: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """{model: its flat elements [start, start + SLICE_ELEMENTS)} for each start over the key's elements."""
    flat = {model: tensor.reshape(-1) for model, tensor in raw.items()}
    numel = next(iter(flat.values())).numel()
    for start in range(0, numel, SLICE_ELEMENTS):
        yield {model: tensor[start:start + SLICE_ELEMENTS] for model, tensor in flat.items()}


def _sliced_output_values(graph: Graph, key: str, plans: list[OutputPlan], raw: dict[str, torch.Tensor],
                          device: torch.device, stats: dict[str, Any], allow_non_finite: bool,
                          pool: BufferPool | None, memos: dict[int, dict]) -> list[torch.Tensor]:
    """The outputs at ``key`` computed slice by slice into tensors of the output dtype."""
    outs = []
    for plan in plans:
        shape, dtype = graph.info(plan.primary, key).shape, plan.dtypes[key]
        nbytes = math.prod(shape) * dtype.itemsize
        outs.append(typed(pool.take(nbytes), dtype, shape) if pool else torch.empty(shape, dtype=dtype))
    flat_outs = [out.reshape(-1) for out in outs]
    for index, env in enumerate(_environments(graph, key, raw, device, stats, True, memos)):
        start = index * SLICE_ELEMENTS
        for plan, out in zip(plans, flat_outs):
            value = env.value(plan.output.node)
            written = out[start:start + SLICE_ELEMENTS]
            written.copy_(value if plan.element is None else value[plan.element])
            _check_finite(written, plan, key, allow_non_finite)
    return outs


@contextmanager
def _one_thread() -> Iterator[None]:
    """Slices are too small for torch's thread pool to pay off; the other cores read and write meanwhile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _environments(graph: Graph, key: str, raw: dict[str, torch.Tensor], device: torch.device,
                  stats: dict[str, Any], sliced: bool, memos: dict[int, dict]) -> Iterator[_KeyValues]:
    """The key's values once, or once per slice of its elements (one intra-op thread meanwhile).

    ``memos[i]`` is what operators keep for slice i across the sweeps of one key (``KeyContext.memo``).
    """
    if not sliced:
        yield _KeyValues(graph, key, raw, device, stats, memo=memos.setdefault(0, {}))
        return
    generators: dict[str, dict] = {}  # per node: random draws continue from slice to slice
    with _one_thread():
        for index, part in enumerate(_slices(raw)):
            yield _KeyValues(graph, key, part, device, stats, shape=next(iter(part.values())).shape,
                             generators=generators, memo=memos.setdefault(index, {}))


def _key_statistics(graph: Graph, key: str, refs: list[str], raw: dict[str, torch.Tensor], device: torch.device,
                    stats: dict[str, Any], sliced: bool, memos: dict[int, dict]) -> dict[str, Any]:
    """``stats`` with, for each node behind ``refs`` that has key passes, what they found at this key.

    The passes of a node run one after another over the key (whole, or slice by slice), after those
    of the nodes it reads, whose values they may need.
    """
    key_stats = stats
    for name in graph.nodes_behind(refs):
        node = graph.nodes[name]
        if not node.selects(key) or not graph.is_floating(name, key):
            continue
        params = node.params_for(key)
        found = stats.get(name)
        for key_pass in node.op.key_passes(params, frozenset(node.inputs)):
            state = key_pass.init(params, found)
            for env in _environments(graph, key, raw, device, key_stats, sliced, memos):
                key_pass.accumulate(state, env.inputs(node), params, env.context(node))
            found = key_pass.finalize(state, params, found)
            key_stats = {**key_stats, name: found}
    return key_stats


def _tensors(values: list[Value]) -> list[torch.Tensor]:
    return [t for v in values for t in (v if isinstance(v, list) else [v])]


def _give_back(pool: BufferPool | None, tensors: Iterable[torch.Tensor]) -> None:
    if pool is not None:
        for tensor in tensors:
            pool.give(tensor)


def _check_finite(value: torch.Tensor, plan: OutputPlan, key: str, allow_non_finite: bool) -> None:
    if not allow_non_finite and not _all_finite(value):
        raise MergebenchError(f"node '{plan.output.node}' produced a non-finite value in tensor '{key}' "
                              f"(as {value.dtype}); nothing was written (--allow-non-finite writes it anyway)")


def _all_finite(tensor: torch.Tensor) -> bool:
    """A sum is finite only if every element is: one reduction, no tensor-sized temporaries.

    A finite tensor whose sum overflows is rare; the exact elementwise check settles that case. The
    sum is checked as a Python float: torch.isfinite on a one-element tensor costs as much as
    summing 64 Ki of them (8 µs), and every slice of every key is checked.
    """
    if tensor.numel() == 0 or math.isfinite(tensor.sum().item()):
        return True
    return bool(torch.isfinite(tensor).all())


def _buffer(primary: str, models: Iterable[str], env: _KeyValues) -> torch.Tensor:
    """semantics §0.2: integer and bool tensors are copied from the primary model, never combined."""
    reference = env.raw[primary]
    for model in models:
        if model not in env.raw:  # an artifact (mask, activations) holds no buffers
            continue
        other = env.raw[model]
        if other.dtype != reference.dtype or not torch.equal(other, reference):
            raise MergebenchError(f"buffer '{env.key}' differs between models '{primary}' and '{model}' "
                                  f"(integer and bool tensors are copied, never combined)")
    return reference


class _KeyValues:
    """Per-key values of models and nodes, each computed at most once for this key."""

    def __init__(self, graph: Graph, key: str, raw: dict[str, torch.Tensor], device: torch.device,
                 stats: dict[str, Any], shape: tuple[int, ...] | None = None,
                 generators: dict[str, dict] | None = None, memo: dict[str, dict] | None = None):
        self.graph = graph
        self.key = key
        self.shape = shape  # a slice of the key's elements (see _sliced_output_values), else None
        self.generators = generators
        self.memo = memo
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
        return to_device(tensor, self.device, compute_dtype(tensor.dtype))

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
        shared = None if self.generators is None else self.generators.setdefault(node.name, {})
        kept = None if self.memo is None else self.memo.setdefault(node.name, KeyState())
        return KeyContext(self.key, block, num_blocks, keys, node.seed, self.stats.get(node.name), shared, kept)

    def _unchanged(self, node: Node) -> Value:
        """An unselected key: a Checkpoint keeps its primary input's value, a Delta is zero."""
        if node.result == CHECKPOINT:
            sequence = self.graph.recipe.sequences.get(node.primary)
            return self.value(sequence[-1][1] if sequence else node.primary)
        shape = self.shape or self.graph.info(node.name, self.key).shape
        zero = torch.zeros(shape, dtype=torch.bool if node.result == MASK else torch.float32, device=self.device)
        if is_list_type(node.result):
            return [zero.clone() for _ in range(node.list_length or 1)]
        return zero


class _WriteBehind:
    """Sink writes in one background thread, so writing a key overlaps computing the next.

    At most ``WRITES_IN_FLIGHT`` tensors wait (their memory is the price of the overlap); a write
    error surfaces at the next submission or when the block ends. One thread keeps each sink's
    writes in submission order, which the journal of a resumable run relies on.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-write")
        self.in_flight: deque[Future[int]] = deque()
        self.bytes_written = 0

    def __enter__(self) -> _WriteBehind:
        return self

    def submit(self, sink: Sink, key: str, value: Value) -> None:
        while len(self.in_flight) >= WRITES_IN_FLIGHT:
            self.bytes_written += self.in_flight.popleft().result()
        self.in_flight.append(self.pool.submit(sink.write, key, value))

    def after_writes(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the writer thread once every write submitted so far is done."""
        self.pool.submit(action)

    def __exit__(self, *exc_info: object) -> None:
        try:
            while self.in_flight:
                future = self.in_flight.popleft()
                if exc_info[0] is None:
                    self.bytes_written += future.result()
                else:
                    future.cancel()
        finally:
            self.pool.shutdown(wait=True)


def _prefetch(graph: Graph, keys: list[str], needed: Callable[[str], set[str]], pool: BufferPool | None = None
              ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield each key with its input tensors, read in a background thread a few keys ahead.

    A ``pool`` says the caller keeps no input past its key: files are then seen in place (mapped)
    for the CPU, or read into the pool's pinned buffers for a GPU, which the caller gives back.
    """

    def read_one(source: Any, key: str) -> torch.Tensor:
        if pool is None or not isinstance(source, Checkpoint):
            return source.read(key)
        if pool.pinned:  # a GPU copies from page-locked memory asynchronously
            return source.read(key, pool.take(source.info(key).nbytes))
        return source.map(key)

    def read(key: str) -> dict[str, torch.Tensor]:
        sources = graph.sources
        return {model: read_one(sources[model], key) for model in sorted(needed(key)) if key in sources[model].keys}

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-read") as reader:
        pending: deque = deque()
        upcoming = iter(keys)
        for key in upcoming:
            pending.append((key, reader.submit(read, key)))
            if len(pending) >= PREFETCH_KEYS:
                break
        while pending:
            key, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, reader.submit(read, following)))
            yield key, future.result()
