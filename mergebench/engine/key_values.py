"""The values of one key: every model's tensor and every node's result at that key, each computed at most
once, whole or slice by slice, with the key's own statistics (key passes) first."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mergebench.engine import slicing
from mergebench.engine.buffers import BufferPool, typed
from mergebench.engine.graph import Graph, OutputPlan
from mergebench.engine.key_state import KeyState
from mergebench.engine.pipeline import Value
from mergebench.engine.staging import to_device, to_host
from mergebench.errors import MergebenchError
from mergebench.operators.base import (
    ADAPTER,
    ARTIFACT_TYPES,
    CHECKPOINT,
    MASK,
    KeyContext,
    TensorSequence,
    is_list_type,
)
from mergebench.recipe import Node
from mergebench.surgery.layers import block_index_for
from mergebench.surgery.low_rank import LowRank
from mergebench.surgery.numerics import compute_dtype


@dataclass(frozen=True)
class KeyStart:
    """What every pass does first at a key: decide whether it goes in slices, and run its key passes."""

    sliced: bool
    stats: dict[str, Any]  # the run's statistics with this key's own (key passes) added
    memos: dict[int, dict]  # per slice: what the key's sweeps keep (``KeyContext.cached``)


def start_key(graph: Graph, key: str, refs: list[str], raw: dict[str, torch.Tensor], device: torch.device,
              stats: dict[str, Any], may_slice: bool) -> KeyStart:
    """Slices when the nodes ``refs`` reach allow them (``may_slice``) and the key is large; then the key passes."""
    sliced = may_slice and slicing.in_slices(graph, key, refs, raw, device)
    memos: dict[int, dict] = {}
    return KeyStart(sliced, key_statistics(graph, key, refs, raw, device, stats, sliced, memos), memos)


def output_value(graph: Graph, plan: OutputPlan, env: KeyValues, allow_non_finite: bool = False,
                  pool: BufferPool | None = None) -> Value:
    """The finished tensor(s) of one output at one key: cast once, checked finite, on the CPU.

    From a GPU each is copied back once, into a ``pool`` buffer when there is one: complete only
    after ``finish``.
    """
    key = env.key
    if plan.output.kind in ARTIFACT_TYPES:  # a mask or a sparse delta: no cast, the writer encodes it
        return env.value(plan.output.node).cpu()
    if not plan.dtypes[key].is_floating_point:
        return _buffer(graph.holder(plan, key), plan.models, env)
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


def sliced_output_values(graph: Graph, key: str, plans: list[OutputPlan], raw: dict[str, torch.Tensor],
                          device: torch.device, stats: dict[str, Any], allow_non_finite: bool,
                          pool: BufferPool | None, memos: dict[int, dict]) -> list[torch.Tensor]:
    """The outputs at ``key`` computed slice by slice into tensors of the output dtype."""
    outs = []
    for plan in plans:
        shape, dtype = plan.shapes[key], plan.dtypes[key]
        nbytes = math.prod(shape) * dtype.itemsize
        outs.append(typed(pool.take(nbytes), dtype, shape) if pool else torch.empty(shape, dtype=dtype))
    flat_outs = [out.reshape(-1) for out in outs]
    for index, env in enumerate(environments(graph, key, raw, device, stats, True, memos)):
        start = index * slicing.SLICE_ELEMENTS
        for plan, out in zip(plans, flat_outs):
            value = env.value(plan.output.node)
            written = out[start:start + slicing.SLICE_ELEMENTS]
            written.copy_(value if plan.element is None else value[plan.element])
            _check_finite(written, plan, key, allow_non_finite)
    return outs


def environments(graph: Graph, key: str, raw: dict[str, torch.Tensor], device: torch.device,
                  stats: dict[str, Any], sliced: bool, memos: dict[int, dict]) -> Iterator[KeyValues]:
    """The key's values once, or once per slice of its elements (one intra-op thread meanwhile).

    ``memos[i]`` is what operators keep for slice i across the sweeps of one key (``KeyContext.memo``).
    """
    if not sliced:
        yield KeyValues(graph, key, raw, device, stats, memo=memos.setdefault(0, {}))
        return
    generators: dict[str, dict] = {}  # per node: random draws continue from slice to slice
    with slicing.one_thread():
        for index, part in enumerate(slicing.slices(raw)):
            yield KeyValues(graph, key, part, device, stats, shape=next(iter(part.values())).shape,
                             generators=generators, memo=memos.setdefault(index, {}))


def key_statistics(graph: Graph, key: str, refs: list[str], raw: dict[str, torch.Tensor], device: torch.device,
                    stats: dict[str, Any], sliced: bool, memos: dict[int, dict]) -> dict[str, Any]:
    """``stats`` with, for each node behind ``refs`` that has key passes, what they found at this key.

    The passes of a node run one after another over the key (whole, or slice by slice), after those
    of the nodes it reads, whose values they may need.
    """
    key_stats = stats
    for name in graph.nodes_behind(refs):
        node = graph.nodes[name]
        if not graph.holds(name, key) or not node.selects(key) or not graph.is_floating(name, key):
            continue
        params = graph.params_for(node, key)
        found = stats.get(name)
        for key_pass in node.op.key_passes(params, frozenset(node.inputs)):
            state = key_pass.init(params, found)
            if not key_pass.skipped(params, found):
                for env in environments(graph, key, raw, device, key_stats, sliced, memos):
                    key_pass.accumulate(state, env.inputs(node), params, env.context(node))
            found = key_pass.finalize(state, params, found)
            key_stats = {**key_stats, name: found}
    return key_stats


def tensors_of(values: list[Value]) -> list[torch.Tensor]:
    return [t for v in values for t in (v if isinstance(v, list) else [v])]


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


def _buffer(primary: str, models: Iterable[str], env: KeyValues) -> torch.Tensor:
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


class KeyValues:
    """Per-key values of models and nodes, each computed at most once for this key."""

    def __init__(self, graph: Graph, key: str, raw: dict[str, torch.Tensor], device: torch.device,
                 stats: dict[str, Any], shape: tuple[int, ...] | None = None,
                 generators: dict[str, dict] | None = None, memo: dict[str, dict] | None = None):
        self.graph = graph
        self.key = key
        self.shape = shape  # a slice of the key's elements (see sliced_output_values), else None
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
        if ref in self.graph.layouts.routes:
            return self.value(self.graph.layouts.routes[ref][self.key])
        if ref not in self.cache:
            self.cache[ref] = self._model(ref) if ref in self.graph.sources else self._node(self.graph.nodes[ref])
        return self.cache[ref]

    def _model(self, name: str) -> torch.Tensor:
        source = self.graph.sources[name]
        if name in self.raw:
            tensor = self.raw[name]
        elif self.key not in source.keys and source.value_type == ADAPTER:  # an adapter that leaves it alone
            return LowRank()
        elif self.key not in source.keys:  # an artifact that leaves the key out: all-False / zero
            dtype = source.info(source.keys[0]).dtype if source.keys else torch.float32
            return torch.zeros(self.graph.shape_of(self.key), dtype=dtype, device=self.device)
        else:  # a sequence's checkpoint, read when its fold reaches it
            tensor = source.read(self.key)
            self.lazy_bytes += tensor.nbytes
        if isinstance(tensor, LowRank):
            return tensor.to(self.device)
        if not tensor.dtype.is_floating_point:
            return tensor.to(device=self.device)  # masks stay boolean
        return to_device(tensor, self.device, compute_dtype(tensor.dtype))

    def _sequence(self, name: str) -> TensorSequence:
        members = self.graph.recipe.sequences[name]
        return TensorSequence([step for step, _ in members], lambda index: self._model(members[index][1]))

    def _node(self, node: Node) -> Value:
        if not node.selects(self.key):
            return self._unchanged(node)
        return node.op.fn(**self.inputs(node), p=self.graph.params_for(node, self.key), ctx=self.context(node))

    def inputs(self, node: Node) -> dict[str, Value]:
        return {slot: self.value(ref) if isinstance(ref, str) else [self.value(r) for r in ref]
                for slot, ref in node.inputs.items()}

    def context(self, node: Node) -> KeyContext:
        keys = self.graph.key_lists[node.name]
        key = node.context_key(self.key)  # a renamed node computes its own key under the stack's name
        blocks = block_index_for(keys)
        position = blocks.position(key)
        block, num_blocks = position if position else (None, max(blocks.stacks.values(), default=0))
        shared = None if self.generators is None else self.generators.setdefault(node.name, {})
        kept = None if self.memo is None else self.memo.setdefault(node.name, KeyState())
        return KeyContext(key, block, num_blocks, keys, node.seed, self.stats.get(node.name), shared, kept)

    def _unchanged(self, node: Node) -> Value:
        """An unselected key: a Checkpoint keeps its primary input's value, a Delta is zero."""
        if node.result == CHECKPOINT:
            sequence = self.graph.recipe.sequences.get(node.primary)
            return self.value(sequence[-1][1] if sequence else node.primary)
        if node.result == ADAPTER:
            return LowRank()  # the adapter leaves the key alone
        shape = self.shape or self.graph.info(node.name, self.key).shape
        zero = torch.zeros(shape, dtype=torch.bool if node.result == MASK else torch.float32, device=self.device)
        if is_list_type(node.result):
            return [zero.clone() for _ in range(node.list_length or 1)]
        return zero
