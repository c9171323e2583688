"""Layout operators (``stack``) in the per-key engine: every output key routed to the one input key it is.

A layout operator says, from its inputs' key lists, which input and which of that input's keys
each of its keys is (output block 7 is block 3 of model ``b``). The engine computes every key by
name, so a slice of an input is *renamed*: a model becomes a ``RenamedSource`` whose keys carry the
output's block numbers, and a node becomes a ``RenamedNode``, the same operator over renamed inputs
that still sees its own key (its block, schedules, random draws and statistics are those of the
node unstacked). The executor and the operators never learn that a stack happened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import InnerIdentity
from mergebench.io.safetensors_format import TensorInfo
from mergebench.io.sources import Source
from mergebench.operators.base import ConfigEdit, LayoutInputs, Params
from mergebench.recipe import Node, Recipe


class RenamedSource(InnerIdentity):
    """The tensors of one input under the names a stack gives them (``names``: new name -> its own)."""

    def __init__(self, of: str, inner: Source, names: Mapping[str, str]):
        self.of = of  # the recipe's name of the model renamed
        self.inner = inner
        self._own = dict(names)
        self.label = inner.label
        self.folder = None  # companion files and tokenizers come from the models themselves
        self.value_type = inner.value_type

    @property
    def keys(self) -> list[str]:
        return list(self._own)

    def own_key(self, key: str) -> str:
        return self._own[key]

    def info(self, key: str) -> TensorInfo:
        return self.inner.info(self._own[key])

    def read(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        own = self._own[key]
        return self.inner.read(own) if buffer is None else self.inner.read(own, buffer)

    def map(self, key: str) -> torch.Tensor:
        return self.inner.map(self._own[key])

    @property
    def mappable(self) -> bool:
        return callable(getattr(self.inner, "map", None))



@dataclass(frozen=True)
class RenamedNode(Node):
    """A node computed under a stack's key names: it selects, reads its parameters and draws at its own key."""

    origin: str = ""
    own: Mapping[str, str] = field(default_factory=dict)  # the stack's key -> this node's own key

    def context_key(self, key: str) -> str:
        return self.own.get(key, key)

    def selects(self, key: str) -> bool:
        return super().selects(self.context_key(key))

    def params_for(self, key: str, x: Callable[[], float] = lambda: 0.0) -> Params:
        return super().params_for(self.context_key(key), x)


@dataclass
class Layouts:
    """What expanding the layout nodes added to a graph: routes, renamed sources and renamed nodes."""

    routes: dict[str, dict[str, str]] = field(default_factory=dict)  # layout node -> {its key: ref holding it}
    renamed_sources: dict[str, RenamedSource] = field(default_factory=dict)
    renamed_nodes: dict[str, RenamedNode] = field(default_factory=dict)
    before: dict[str, list[str]] = field(default_factory=dict)  # layout node -> renamed nodes it needs first
    layers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # layout node -> (ref, block) per block
    generated: dict[str, Source] = field(default_factory=dict)  # tensors a plan makes (a MoE's router)
    configs: dict[str, ConfigEdit] = field(default_factory=dict)  # layout node -> its edit of the config


def expand_layouts(recipe: Recipe, sources: Mapping[str, Source], keys_of: Callable[[str], tuple[str, ...]],
                   shape_of: Callable[[str, str], tuple[int, ...]], make: Callable[[str, Any], Source],
                   layouts: Layouts) -> None:
    """Route every key of every layout node of ``recipe`` (in topological order) into ``layouts``.

    ``shape_of(ref, key)`` answers the operator's shape questions; ``make(name, description)`` opens the
    source of the tensors a plan generates (a MoE's router), added under ``NODE:NAME``."""
    for name, node in recipe.nodes.items():
        if node.op.layout is None:
            continue
        refs = node.refs()
        try:
            plan = node.op.layout(node.params, LayoutInputs(dict(node.inputs), {ref: keys_of(ref) for ref in refs},
                                                            shape_of, node.seed))
        except ValueError as exc:
            raise MergebenchError(f"{recipe.file}: node '{name}' ({node.op.name}): {exc}") from None
        made = {local: f"{name}:{local}" for local in plan.generated}
        for local, description in plan.generated.items():
            layouts.generated[made[local]] = make(made[local], description)
        if plan.config is not None:
            layouts.configs[name] = plan.config
        keys = {key: (made.get(ref, ref), own) for key, (ref, own) in plan.keys.items()}
        _Renamer(recipe, {**sources, **layouts.generated}, layouts, name).route(keys, plan.layers)


class _Renamer:
    def __init__(self, recipe: Recipe, sources: Mapping[str, Source], layouts: Layouts, node: str):
        self.recipe, self.sources, self.layouts, self.node = recipe, sources, layouts, node
        self.order: list[str] = []

    def route(self, keys: Mapping[str, tuple[str, str]], layers: list[tuple[str, int]]) -> None:
        by_input: dict[str, dict[str, str]] = {}
        for key, (ref, own) in keys.items():
            by_input.setdefault(ref, {})[key] = own
        renamed = {ref: self.renamed(ref, names, f"{self.node}:{ref}") for ref, names in by_input.items()}
        self.layouts.routes[self.node] = {key: renamed[ref] for key, (ref, _) in keys.items()}
        self.layouts.before[self.node] = self.order
        self.layouts.layers[self.node] = layers

    def renamed(self, ref: str, names: dict[str, str], label: str) -> str:
        """``ref`` with its keys ``names.values()`` under the names ``names.keys()`` (itself if no key moves)."""
        if all(new == own for new, own in names.items()) and ref not in self.layouts.routes:
            return ref
        if ref in self.recipe.sequences:
            raise MergebenchError(f"{self.recipe.file}: node '{self.node}': '{ref}' is a sequence of checkpoints, "
                                  f"which a stack cannot renumber; stack the node that folds it")
        name = f"{label}#{len(self.layouts.renamed_sources) + len(self.layouts.renamed_nodes)}"
        if ref in self.layouts.renamed_sources:  # renamed again (a stack of a stack): compose the names
            inner = self.layouts.renamed_sources[ref]
            self.layouts.renamed_sources[name] = RenamedSource(inner.of, inner.inner,
                                                               {new: inner.own_key(own) for new, own in names.items()})
            return name
        if ref in self.sources:
            held = set(self.sources[ref].keys)  # an artifact may leave keys out: all-False / zero there
            self.layouts.renamed_sources[name] = RenamedSource(ref, self.sources[ref],
                                                               {new: own for new, own in names.items() if own in held})
            return name
        if ref in self.layouts.routes:  # a stack of a stack: route each key to what the inner stack routed it to
            inner = self.layouts.routes[ref]
            grouped: dict[str, dict[str, str]] = {}
            for new, own in names.items():
                grouped.setdefault(inner[own], {})[new] = own
            self.layouts.routes[name] = {}
            for target, part in grouped.items():
                moved = self.renamed(target, part, f"{label}/{target}")
                self.layouts.routes[name].update(dict.fromkeys(part, moved))
            return name
        node = self.recipe.nodes[ref] if ref in self.recipe.nodes else self.layouts.renamed_nodes[ref]
        origin = node.origin if isinstance(node, RenamedNode) else node.name
        own_of = node.context_key
        inputs: dict[str, Any] = {
            slot: self.renamed(r, names, f"{label}.{slot}") if isinstance(r, str)
            else [self.renamed(x, names, f"{label}.{slot}[{i}]") for i, x in enumerate(r)]
            for slot, r in node.inputs.items()}
        kept = {f.name: getattr(node, f.name) for f in fields(Node) if f.name not in ("name", "inputs")}
        self.layouts.renamed_nodes[name] = RenamedNode(**kept, name=name, inputs=inputs, origin=origin,
                                                       own={new: own_of(own) for new, own in names.items()})
        self.order.append(name)
        return name

