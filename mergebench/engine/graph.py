"""A validated Recipe bound to its inputs: key sets and shapes checked, the per-key plan compiled.

Only headers are read here. The plan says, for every output key, its shape and dtype, and for every
(node, key) which models must be read; ``mergebench plan`` prints its summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.layout import Layouts, RenamedNode, RenamedSource, expand_layouts
from mergebench.errors import MergebenchError
from mergebench.io.reading import read_json_object
from mergebench.io.router import RouterSource
from mergebench.io.safetensors_format import TensorInfo
from mergebench.io.sources import Source, open_source
from mergebench.io.tied_heads import HEAD_KEYS, materialise_heads, tied_pair
from mergebench.io.tokenizers import (
    SENTENCEPIECE_FILE,
    TOKENIZER_FILE,
    has_tokenizer,
    read_chat_template,
    read_vocab,
)
from mergebench.io.writer import PlannedTensor
from mergebench.operators.base import ACTIVATIONS, ARTIFACT_TYPES, CHECKPOINT, GRAM, Params
from mergebench.recipe import MEMORY_PATH, Node, Output, Recipe, primary_model
from mergebench.recipe.schedules import position
from mergebench.surgery.layers import block_index_for
from mergebench.surgery.moe import RouterSpec
from mergebench.surgery.vocab import VocabPlan, first_difference, plan_vocab

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class OutputPlan:
    """One checkpoint to write: an output of the recipe, or one step of an output's series."""

    output: Output
    index: int  # the output's position in the recipe
    element: int | None  # for a series: which element of the node's list; None otherwise
    path: Path
    primary: str  # the model whose buffers, dtypes and files the output inherits
    models: tuple[str, ...]  # every model the output depends on
    tensors: tuple[PlannedTensor, ...]  # in write order
    dtypes: dict[str, torch.dtype]  # output dtype by key

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape by key (the planned tensors', vocabulary surgery and stacks included)."""
        return {t.key: t.shape for t in self.tensors}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class Graph:
    """The recipe's DAG over opened sources; every check that needs headers happens in ``__init__``."""

    def __init__(self, recipe: Recipe, sources: Mapping[str, Source] | None = None, allow_pickle: bool = False):
        self.recipe = recipe
        self.nodes: dict[str, Node] = recipe.nodes
        self.sources: dict[str, Source] = dict(sources or {})
        self._models_of: dict[str, tuple[str, ...]] = {}
        self._key_sets: dict[str, frozenset[str]] = {}
        for name, path in recipe.models.items():
            if name not in self.sources:
                self.sources[name] = open_source(path, allow_pickle, recipe.adapters.get(name))
        weights = [name for name in recipe.models if self.sources[name].value_type == CHECKPOINT]
        untie = any(out.tie_word_embeddings is False for out in recipe.outputs)
        self.sources = materialise_heads(self.sources, weights, everywhere=untie)
        self.vocab = self._plan_vocab()
        template = recipe.chat_template
        if template in recipe.models and read_chat_template(self.sources[template].folder) is None:
            raise MergebenchError(f"{recipe.file}: chat_template names '{template}' ({self.sources[template].label}), "
                                  f"which has no chat template")
        self.layouts = Layouts()
        expand_layouts(recipe, self.sources, self.keys_of, lambda ref, key: self._layout_info(ref, key).shape,
                       self._generated_source, self.layouts)
        self.sources.update(self.layouts.generated)
        self.sources.update(self.layouts.renamed_sources)
        self.nodes = self._with_renamed_nodes()
        for name in recipe.nodes:
            self._check_inputs_agree(self.nodes[name])
            self._check_schedules(self.nodes[name])
        self.outputs = [plan for i, out in enumerate(recipe.outputs) for plan in self._plan_output(i, out)]
        # a layout's edit of each written output's config, made here so that a config it cannot take fails now
        self._config_edits = {plan.path: self._config_edit(plan) for plan in self.outputs
                              if str(plan.path) != MEMORY_PATH}
        self._check_token_sources()
        self.keys = self._key_order()
        self.key_lists = {name: self.keys_of(node.origin if isinstance(node, RenamedNode) else name)
                          for name, node in self.nodes.items()}
        reachable = {n for plan in self.outputs for n in self._nodes_of(plan.output.node)}
        for name in reachable:
            self._check_shapes(self.nodes[name])

    def _with_renamed_nodes(self) -> dict[str, Node]:
        """The recipe's nodes with, before each layout node, the renamed nodes its routes read."""
        nodes: dict[str, Node] = {}
        for name, node in self.recipe.nodes.items():
            nodes.update({r: self.layouts.renamed_nodes[r] for r in self.layouts.before.get(name, [])})
            nodes[name] = node
        return nodes

    def keys_of(self, ref: str) -> tuple[str, ...]:
        """The keys ``ref`` has: a model's, a layout node's routes, else those of the node's primary input."""
        if ref in self.sources:
            return tuple(self.sources[ref].keys)
        if ref in self.layouts.routes:
            return tuple(self.layouts.routes[ref])
        if ref in self.recipe.sequences:
            return self.keys_of(self.recipe.sequences[ref][-1][1])
        return self.keys_of(self.nodes[ref].primary)

    def _layout_info(self, ref: str, key: str) -> TensorInfo:
        """A key's header facts as ``ref`` holds it while layouts are expanded (a node's: its primary input's)."""
        while True:
            source = (self.layouts.renamed_sources.get(ref) or self.layouts.generated.get(ref)
                      or self.sources.get(ref))
            if source is not None:
                return source.info(key)
            if ref in self.layouts.routes:
                ref = self.layouts.routes[ref][key]
            elif ref in self.recipe.sequences:
                ref = self.recipe.sequences[ref][-1][1]
            else:
                ref = (self.layouts.renamed_nodes.get(ref) or self.recipe.nodes[ref]).primary

    def _generated_source(self, name: str, description: object) -> Source:
        """The source of tensors a layout plan makes: a MoE's router, in the dtype of its base's weights."""
        if not isinstance(description, RouterSpec):
            raise TypeError(f"{name}: no source makes {type(description).__name__}")
        base = self.sources.get(description.base)
        floating = next(info for key in self.keys_of(description.base)
                        if (info := self._layout_info(description.base, key)).is_floating)
        return RouterSource(f"{self.recipe.file}: {name}", description, base, floating.dtype)

    def _layout_of(self, plan: OutputPlan) -> str | None:
        """The layout node an output was made by (through the nodes computed on it), if any."""
        ref = plan.output.node
        while ref in self.nodes and ref not in self.layouts.layers:
            ref = self.nodes[ref].primary
        return ref if ref in self.layouts.layers else None

    def output_layers(self, plan: OutputPlan) -> list[tuple[str, int]] | None:
        """For an output a stack made: each of its blocks as (model, that model's block); else None."""
        ref = self._layout_of(plan)
        return self._blocks_of(ref) if ref is not None else None

    def output_config(self, plan: OutputPlan) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The fields an output's config sets and removes when a layout node (a MoE) made it (none otherwise)."""
        return self._config_edits.get(plan.path, ({}, ()))

    def _config_edit(self, plan: OutputPlan) -> tuple[dict[str, Any], tuple[str, ...]]:
        ref = self._layout_of(plan)
        edit = self.layouts.configs.get(ref) if ref is not None else None
        if edit is None:
            return {}, ()
        name = plan.output.copy_files_from
        folder = self.sources[name].folder if name else None
        path = folder / "config.json" if folder is not None else None
        config = read_json_object(path, "model config") if path is not None and path.is_file() else {}
        if not config:
            raise MergebenchError(f"{self.recipe.file}: node '{ref}' ({self.nodes[ref].op.name}) writes its output's "
                                  f"config.json from the copied one, and '{plan.output.copy_files_from}' has none")
        try:
            return edit(config)
        except ValueError as exc:
            raise MergebenchError(f"{self.recipe.file}: node '{ref}': {exc}") from None

    def _blocks_of(self, ref: str) -> list[tuple[str, int]]:
        """(model, block) of each block of a stack, through stacks of stacks and the nodes between."""
        found = []
        for source, block in self.layouts.layers[ref]:
            while source in self.nodes and source not in self.layouts.layers:
                source = self.nodes[source].primary
            if source in self.recipe.sequences:
                source = self.recipe.sequences[source][-1][1]
            found.append(self._blocks_of(source)[block] if source in self.layouts.layers else (source, block))
        return found

    def holds(self, ref: str, key: str) -> bool:
        """Whether ``ref`` has ``key`` (a renamed node has only the keys of its stack's slice)."""
        if ref not in self._key_sets:
            self._key_sets[ref] = frozenset(self.keys_of(ref))
        return key in self._key_sets[ref]

    def refs_of(self, name: str) -> list[str]:
        """What a node reads: its inputs, or for a layout node the refs its keys are routed to."""
        routes = self.layouts.routes.get(name)
        return list(dict.fromkeys(routes.values())) if routes is not None else self.nodes[name].refs()

    def is_renamed(self, name: str) -> bool:
        return name in self.layouts.renamed_nodes

    def recipe_models(self, models: tuple[str, ...]) -> list[str]:
        """The recipe's models behind ``models`` (a renamed source stands for the model it renames; tensors a
        layout made, such as a router, stand for none)."""
        named = (self.sources[m].of if isinstance(self.sources[m], RenamedSource) else m for m in models
                 if m not in self.layouts.generated)
        return list(dict.fromkeys(named))

    def _plan_vocab(self) -> VocabPlan | None:
        """The output vocabulary when the recipe asks for one; an error when vocabularies differ and it does not."""
        folders = {name: src.folder for name, src in self.sources.items()
                   if not self.is_artifact(name)}
        vocabs = {name: read_vocab(folder) for name, folder in folders.items()
                  if folder is not None and has_tokenizer(folder)}
        spec = self.recipe.tokenizer
        if spec is None:
            difference = first_difference(vocabs) if len(vocabs) > 1 else None
            if difference:
                raise MergebenchError(f"{self.recipe.file}: the models' vocabularies differ ({difference}); add "
                                      f"'tokenizer: {{source: base | union | MODEL}}' to the recipe")
            return None
        lacking = sorted(set(folders) - set(vocabs))
        if lacking:
            raise MergebenchError(f"{self.recipe.file}: tokenizer surgery needs a tokenizer ({TOKENIZER_FILE} or "
                                  f"{SENTENCEPIECE_FILE}) in every model; "
                                  f"'{lacking[0]}' ({self.sources[lacking[0]].label}) has none")
        base = primary_model(self.recipe, self.recipe.outputs[0].node)
        sources = {token: (s.source, s.force) for token, s in (spec.tokens or {}).items()}
        try:
            return plan_vocab(spec.source, base, vocabs, spec.pad_to_multiple_of, spec.embeddings, sources)
        except MergebenchError as exc:
            raise MergebenchError(f"{self.recipe.file}: {exc}") from None

    def is_embedding(self, key: str, model: str) -> bool:
        """Whether a model's tensor has one row per token of its vocabulary (and is rearranged to the output's)."""
        return (self.vocab is not None and model in self.vocab.rows and key in self.sources[model].keys
                and self.vocab.is_embedding(key, model, self.sources[model].info(key).shape))

    def models_of(self, ref: str) -> tuple[str, ...]:
        """The models a node depends on, in first-use order (a sequence: each of its checkpoints)."""
        if ref in self.sources:
            return (ref,)
        if ref in self.recipe.sequences:
            return tuple(member for _, member in self.recipe.sequences[ref])
        if ref not in self._models_of:
            seen: dict[str, None] = {}
            for r in self.refs_of(ref):
                seen.update(dict.fromkeys(self.models_of(r)))
            self._models_of[ref] = tuple(seen)
        return self._models_of[ref]

    def _nodes_of(self, ref: str) -> set[str]:
        if ref not in self.nodes:
            return set()
        return {ref}.union(*(self._nodes_of(r) for r in self.refs_of(ref)))

    def needed(self, ref: str, key: str) -> set[str]:
        """The models read ahead to compute ``ref`` at ``key`` (an unselected key reads less).

        A sequence's checkpoints are not among them: operators read those one at a time.
        """
        if ref in self.sources:
            return {ref}
        if ref in self.recipe.sequences:
            return set()
        if ref in self.layouts.routes:
            return self.needed(self.layouts.routes[ref][key], key)
        node = self.nodes[ref]
        if not node.selects(key):
            return self.needed(node.primary, key) if node.result == CHECKPOINT else set()
        return set().union(*(self.needed(r, key) for r in node.refs()))

    def is_elementwise(self, ref: str, key: str) -> bool:
        """Whether ``ref`` at ``key`` may be computed slice by slice (every operator upstream is elementwise)."""
        if ref in self.sources:
            return True
        if ref in self.recipe.sequences:
            return False
        if ref in self.layouts.routes:
            return self.is_elementwise(self.layouts.routes[ref][key], key)
        node = self.nodes[ref]
        if not node.selects(key):
            return node.result != CHECKPOINT or self.is_elementwise(node.primary, key)
        params = self.params_for(node, key)
        return (node.op.elementwise(params)
                and all(p.sliceable for p in node.op.key_passes(params, frozenset(node.inputs)))
                and all(self.is_elementwise(r, key) for r in node.refs()))

    def nodes_behind(self, refs: list[str]) -> list[str]:
        """The nodes computing ``refs``, their inputs included, in topological order."""
        wanted = set().union(*(self._nodes_of(ref) for ref in refs))
        return [name for name in self.nodes if name in wanted]

    def info(self, ref: str, key: str) -> TensorInfo:
        """Header facts of a key as ``ref`` sees it (from its first model holding the key; shapes agree)."""
        if ref in self.layouts.routes:
            return self.info(self.layouts.routes[ref][key], key)
        return next(self.sources[m].info(key) for m in self.models_of(ref) if key in self.sources[m].keys)

    def params_for(self, node: Node, key: str) -> Params:
        """A node's parameters at ``key``: its override's, schedules read at the key's place in its blocks."""
        return node.params_for(key, lambda: self.position(node, key))

    def position(self, node: Node, key: str) -> float:
        """x ∈ [0, 1] of a key among the node's blocks, as schedules read it (semantics §0.8)."""
        own = node.context_key(key)
        found = block_index_for(self.key_lists[node.name]).position(own)
        return position(own, *(found or (None, 0)), node.schedule_outside)

    def holder(self, plan: OutputPlan, key: str) -> str:
        """The model an output's integer or bool tensor is copied from: the primary, or the one a stack routed to."""
        if key in self.sources[plan.primary].keys:
            return plan.primary
        return next(m for m in plan.models if key in self.sources[m].keys)

    def is_floating(self, ref: str, key: str) -> bool:
        return self.info(ref, key).is_floating

    @cached_property
    def bytes_to_read(self) -> int:
        """Stored bytes of every input tensor the main pass reads (each read once, shared by outputs)."""
        total = 0
        for key in self.keys:
            models = set().union(*(self.needed_for_output(plan, key) for plan in self.outputs if key in
                                   plan.dtypes))
            total += sum(self.sources[m].info(key).nbytes for m in models if key in self.sources[m].keys)
        return total

    def needed_for_output(self, plan: OutputPlan, key: str) -> set[str]:
        """The models read for one output at one key (buffers are compared across all of them; an embedding's
        rows may fall back on every model's)."""
        if self.is_embedding(key, plan.primary):
            return set(plan.models)
        if not plan.dtypes[key].is_floating_point:
            return set(plan.models)
        return self.needed(plan.output.node, key)

    def _value_type(self, name: str) -> str | None:
        """Checkpoint, Mask, SparseDelta or Activations for a source; None for a node."""
        source = self.sources.get(name)
        return source.value_type if source is not None else None

    def is_layer_statistics(self, name: str) -> bool:
        """Activations or a Gram file: listed under a layer's weight key, in shapes of their own."""
        return self._value_type(name) in (ACTIVATIONS, GRAM)

    def is_artifact(self, name: str) -> bool:
        return self._value_type(name) in ARTIFACT_TYPES

    def shape_of(self, key: str) -> tuple[int, ...]:
        """A key's shape from the first source holding it (artifacts may leave keys out)."""
        return next(src.info(key).shape for src in self.sources.values() if key in src.keys)

    def _plan_output(self, index: int, out: Output) -> list[OutputPlan]:
        models = self.models_of(out.node)
        weights = [m for m in models if not self.is_artifact(m)]
        primary = primary_model(self.recipe, out.node)
        if self.is_artifact(primary) and weights:
            primary = weights[0]
        reference = self.sources[primary]
        for model in models:
            extra = set(self.sources[model].keys) - set(reference.keys)
            if self.is_artifact(model) and weights and extra:
                raise MergebenchError(f"{self.recipe.file}: '{model}' ({self.sources[model].label}) has tensors the "
                                      f"models lack: {', '.join(sorted(extra)[:5])}")
        routed = any(isinstance(self.sources[m], RenamedSource) for m in models)
        keys = dict.fromkeys(self.keys_of(out.node) if routed else reference.keys)
        if not weights:  # only artifacts: every key any of them lists
            for model in models:
                keys.update(dict.fromkeys(self.sources[model].keys))
        tensors = []
        for key in keys:
            info = self.info(out.node, key) if routed else next(  # a stack's key: the input it is routed to
                self.sources[m] for m in (primary, *models) if key in self.sources[m].keys).info(key)
            if out.kind != CHECKPOINT and not info.is_floating and info.dtype != torch.bool:
                continue  # integer buffers have no place in a mask or a sparse delta
            if out.tie_word_embeddings and HEAD_KEYS.search(key) and tied_pair(list(keys)) is not None:
                continue  # a tied output stores no head: transformers ties it to the embedding
            dtype = DTYPES[out.dtype] if out.dtype and info.is_floating else info.dtype
            shape = (self.vocab.size, *info.shape[1:]) if self.is_embedding(key, primary) else info.shape
            tensors.append(PlannedTensor(key, dtype, shape))
        dtypes = {t.key: t.dtype for t in tensors}
        node = self.nodes.get(out.node)
        if node is None or node.series_steps is None:
            return [OutputPlan(out, index, None, out.path, primary, models, tuple(tensors), dtypes)]
        return [OutputPlan(out, index, i, out.path / f"step-{step}", primary, models, tuple(tensors), dtypes)
                for i, step in enumerate(node.series_steps)]

    def _check_token_sources(self) -> None:
        """A token's rows come from a model the output merges (a model it does not read would be ignored)."""
        if self.vocab is None:
            return
        for plan in self.outputs:
            for row, (source, _) in self.vocab.token_sources.items():
                if source not in plan.models:
                    raise MergebenchError(f"{self.recipe.file}: tokenizer.tokens: {self.vocab.tokens[row]!r} takes its "
                                          f"rows from '{source}', which output '{plan.output.node}' does not merge")

    def _check_inputs_agree(self, node: Node) -> None:
        """A node's weight inputs have the same keys (artifacts and adapters, read or made, may leave keys out; a
        layout node renames)."""
        if node.op.layout is not None:
            return
        expanded = [m for r in node.refs() for m in ([member for _, member in self.recipe.sequences[r]]
                                                     if r in self.recipe.sequences else [r])]
        refs = [r for r in expanded if not self.is_artifact(r)
                and not (r in self.nodes and self.nodes[r].result in ARTIFACT_TYPES)]
        for other in refs[1:]:
            a, b = set(self.keys_of(refs[0])), set(self.keys_of(other))
            if a != b:
                only_a, only_b = sorted(a - b), sorted(b - a)
                detail = "; ".join(
                    f"only in '{name}': {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                    for name, keys in ((refs[0], only_a), (other, only_b)) if keys
                )
                kind = "models" if refs[0] in self.sources and other in self.sources else "inputs"
                raise MergebenchError(f"{self.recipe.file}: {kind} '{refs[0]}' ({self._label(refs[0])}) and "
                                      f"'{other}' ({self._label(other)}) have different tensors: {detail}")

    def _check_schedules(self, node: Node) -> None:
        """A parameter that varies by key cannot feed a statistic over the whole model (one global threshold)."""
        if node.scheduled and node.op.passes(node.params, frozenset(node.inputs)):
            raise MergebenchError(f"{self.recipe.file}: node '{node.name}' ({node.op.name}): a parameter schedule "
                                  f"varies by tensor, but this operator's statistics span the whole model; use its "
                                  f"per-tensor form (scope: per_tensor) or one value")

    def _label(self, ref: str) -> str:
        return self.sources[ref].label if ref in self.sources else f"node {self.nodes[ref].op.name}"

    def _check_shapes(self, node: Node) -> None:
        if node.op.anchor is not None or node.op.layout is not None or self.is_renamed(node.name):
            return  # shapes may differ (mapped onto an anchor; moved by a layout); a renamed node's were checked
        models = self.models_of(node.name)
        reference = self.sources[models[0]]
        for key in reference.keys:
            if not node.selects(key):
                continue
            info = reference.info(key)
            for model in models[1:]:
                if key not in self.sources[model].keys or self.is_layer_statistics(model):
                    continue  # an artifact that leaves the key out (all-False / zero there), or a layer's statistics
                other = self.sources[model].info(key)
                # masks (bool) sit beside weights by design; the recipe's types already checked them
                kinds_differ = other.is_floating != info.is_floating and torch.bool not in (other.dtype, info.dtype)
                realigned = self.is_embedding(key, models[0]) and self.is_embedding(key, model)
                shapes_differ = other.shape[1:] != info.shape[1:] if realigned else other.shape != info.shape
                if shapes_differ or kinds_differ:
                    raise MergebenchError(
                        f"{self.recipe.file}: node '{node.name}': tensor '{key}' is {info.dtype} {list(info.shape)} "
                        f"in '{models[0]}' but {other.dtype} {list(other.shape)} in '{model}' "
                        f"(exclude it from the node to keep the first model's)"
                    )

    def _key_order(self) -> list[str]:
        """Storage order of the first output's primary model, then any keys only other outputs have."""
        order: dict[str, None] = {}
        for plan in self.outputs:
            order.update(dict.fromkeys(t.key for t in plan.tensors))
        return list(order)
