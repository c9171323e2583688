"""A validated Recipe bound to its inputs: key sets and shapes checked, the per-key plan compiled.

Only headers are read here. The plan says, for every output key, its shape and dtype, and for every
(node, key) which models must be read; ``mergebench plan`` prints its summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.io.safetensors_format import TensorInfo
from mergebench.io.sources import Source, open_source
from mergebench.io.tokenizers import TOKENIZER_FILE, read_vocab
from mergebench.io.writer import PlannedTensor
from mergebench.operators.base import ACTIVATIONS, ARTIFACT_TYPES, CHECKPOINT
from mergebench.recipe import Node, Output, Recipe, primary_model
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
        for name, path in recipe.models.items():
            if name not in self.sources:
                self.sources[name] = open_source(path, allow_pickle)
        self.vocab = self._plan_vocab()
        self.outputs = [plan for i, out in enumerate(recipe.outputs) for plan in self._plan_output(i, out)]
        self.keys = self._key_order()
        self.key_lists = {name: tuple(self.sources[primary_model(recipe, name)].keys) for name in self.nodes}
        reachable = {n for plan in self.outputs for n in self._nodes_of(plan.output.node)}
        for name in reachable:
            self._check_shapes(self.nodes[name])

    def _plan_vocab(self) -> VocabPlan | None:
        """The output vocabulary when the recipe asks for one; an error when vocabularies differ and it does not."""
        folders = {name: src.folder for name, src in self.sources.items()
                   if not self.is_artifact(name)}
        vocabs = {name: read_vocab(folder) for name, folder in folders.items()
                  if folder is not None and (folder / TOKENIZER_FILE).exists()}
        spec = self.recipe.tokenizer
        if spec is None:
            difference = first_difference(vocabs) if len(vocabs) > 1 else None
            if difference:
                raise MergebenchError(f"{self.recipe.file}: the models' vocabularies differ ({difference}); add "
                                      f"'tokenizer: {{source: base | union | MODEL}}' to the recipe")
            return None
        lacking = sorted(set(folders) - set(vocabs))
        if lacking:
            raise MergebenchError(f"{self.recipe.file}: tokenizer surgery needs a {TOKENIZER_FILE} in every model; "
                                  f"'{lacking[0]}' ({self.sources[lacking[0]].label}) has none")
        base = primary_model(self.recipe, self.recipe.outputs[0].node)
        return plan_vocab(spec.source, base, vocabs, spec.pad_to_multiple_of, spec.embeddings)

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
            for r in self.nodes[ref].refs():
                seen.update(dict.fromkeys(self.models_of(r)))
            self._models_of[ref] = tuple(seen)
        return self._models_of[ref]

    def _nodes_of(self, ref: str) -> set[str]:
        if ref not in self.nodes:
            return set()
        return {ref}.union(*(self._nodes_of(r) for r in self.nodes[ref].refs()))

    def needed(self, ref: str, key: str) -> set[str]:
        """The models read ahead to compute ``ref`` at ``key`` (an unselected key reads less).

        A sequence's checkpoints are not among them: operators read those one at a time.
        """
        if ref in self.sources:
            return {ref}
        if ref in self.recipe.sequences:
            return set()
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
        node = self.nodes[ref]
        if not node.selects(key):
            return node.result != CHECKPOINT or self.is_elementwise(node.primary, key)
        params = node.params_for(key)
        return (node.op.elementwise(params)
                and all(p.sliceable for p in node.op.key_passes(params, frozenset(node.inputs)))
                and all(self.is_elementwise(r, key) for r in node.refs()))

    def nodes_behind(self, refs: list[str]) -> list[str]:
        """The nodes computing ``refs``, their inputs included, in topological order."""
        wanted = set().union(*(self._nodes_of(ref) for ref in refs))
        return [name for name in self.nodes if name in wanted]

    def info(self, ref: str, key: str) -> TensorInfo:
        """Header facts of a key as ``ref`` sees it (from its first model holding the key; shapes agree)."""
        return next(self.sources[m].info(key) for m in self.models_of(ref) if key in self.sources[m].keys)

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
        if not self.is_floating(plan.primary, key):
            return set(plan.models)
        return self.needed(plan.output.node, key)

    def _value_type(self, name: str) -> str | None:
        """Checkpoint, Mask, SparseDelta or Activations for a source; None for a node."""
        source = self.sources.get(name)
        return source.value_type if source is not None else None

    def is_activations(self, name: str) -> bool:
        return self._value_type(name) == ACTIVATIONS

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
        for model in weights:
            self._check_same_keys(reference, primary, self.sources[model], model)
        for model in models:
            extra = set(self.sources[model].keys) - set(reference.keys)
            if self.is_artifact(model) and weights and extra:
                raise MergebenchError(f"{self.recipe.file}: '{model}' ({self.sources[model].label}) has tensors the "
                                      f"models lack: {', '.join(sorted(extra)[:5])}")
        keys = dict.fromkeys(reference.keys)
        if not weights:  # only artifacts: every key any of them lists
            for model in models:
                keys.update(dict.fromkeys(self.sources[model].keys))
        tensors = []
        for key in keys:
            source = next(self.sources[m] for m in (primary, *models) if key in self.sources[m].keys)
            info = source.info(key)
            if out.kind != CHECKPOINT and not info.is_floating and info.dtype != torch.bool:
                continue  # integer buffers have no place in a mask or a sparse delta
            dtype = DTYPES[out.dtype] if out.dtype and info.is_floating else info.dtype
            shape = (self.vocab.size, *info.shape[1:]) if self.is_embedding(key, primary) else info.shape
            tensors.append(PlannedTensor(key, dtype, shape))
        dtypes = {t.key: t.dtype for t in tensors}
        node = self.nodes.get(out.node)
        if node is None or node.series_steps is None:
            return [OutputPlan(out, index, None, out.path, primary, models, tuple(tensors), dtypes)]
        return [OutputPlan(out, index, i, out.path / f"step-{step}", primary, models, tuple(tensors), dtypes)
                for i, step in enumerate(node.series_steps)]

    def _check_same_keys(self, reference: Source, ref_name: str, other: Source, other_name: str) -> None:
        a, b = set(reference.keys), set(other.keys)
        if a != b:
            only_a, only_b = sorted(a - b), sorted(b - a)
            detail = "; ".join(
                f"only in '{name}': {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                for name, keys in ((ref_name, only_a), (other_name, only_b)) if keys
            )
            raise MergebenchError(f"{self.recipe.file}: models '{ref_name}' ({reference.label}) and "
                                  f"'{other_name}' ({other.label}) have different tensors: {detail}")

    def _check_shapes(self, node: Node) -> None:
        if node.op.anchor is not None:  # shapes may differ: the operator maps every input onto the anchor
            return
        models = self.models_of(node.name)
        reference = self.sources[models[0]]
        for key in reference.keys:
            if not node.selects(key):
                continue
            info = reference.info(key)
            for model in models[1:]:
                if key not in self.sources[model].keys or self.is_activations(model):
                    continue  # an artifact that leaves the key out (all-False / zero there), or a layer's activations
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
