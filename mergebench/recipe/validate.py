"""YAML recipe -> a validated Recipe, checked whole before any weight is read.

Every error names the recipe file and the line of the offending value: unknown operator or
parameter, a bad value, an input naming nothing, a cycle, a type mismatch along an edge, an
output written inside an input, over the recipe or over another output.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergebench.errors import MergebenchError
from mergebench.io.hub_cache import is_repo_id
from mergebench.io.kinds import artifact_type, is_adapter
from mergebench.io.sequences import is_glob, resolve_sequence, step_of
from mergebench.operators.base import (
    ADAPTER,
    ARTIFACT_TYPES,
    CHECKPOINT,
    FILE_ARTIFACTS,
    REGISTRY,
    SEQUENCE,
    Operator,
    Params,
    is_list_type,
    list_of,
)
from mergebench.recipe.mergekit import is_mergekit, resolve_model, translate
from mergebench.recipe.mergekit_moe import is_mergekit_moe, translate_moe
from mergebench.recipe.schedules import ParamSchedules, ScheduleError, split_schedules
from mergebench.recipe.schema import (
    MEMORY_PATH,
    AdaptedSpec,
    Node,
    NodeSpec,
    Output,
    OutputSpec,
    Recipe,
    RecipeSpec,
    SequenceSpec,
    parse_size,
)
from mergebench.recipe.yaml_lines import Locator, read_yaml


def load_recipe(path: str | Path, sets: dict[str, str] | None = None, out: str | Path | None = None) -> Recipe:
    """Read a YAML recipe (or a mergekit config), apply ``--set node.param=value`` overrides, and validate it
    whole; ``out`` is the output path (a mergekit config names none; a native recipe's single output)."""
    file = Path(path)
    data, lines = read_recipe_data(file, None if out is None else Path(out).absolute())
    return build_recipe(data, file, lines, sets or {}, base_dir=file.resolve().parent)


def convert_mergekit(file: Path, out: str | Path) -> dict[str, Any]:
    """The native recipe a mergekit config translates to, validated against its models (``mergebench convert``)."""
    data, lines = read_yaml(file)
    if not is_mergekit(data) and not is_mergekit_moe(data):
        raise MergebenchError(f"{file}: not a mergekit config (it names no merge_method) nor a mergekit-moe one "
                              f"(base_model and experts)")
    recipe = _translated(data, Locator(file, lines), file.resolve().parent, str(out))
    build_recipe(copy.deepcopy(recipe), file, {}, {}, base_dir=file.resolve().parent)  # validation mutates
    return recipe


def _translated(data: dict[str, Any], where: Locator, base_dir: Path, out: str | None) -> dict[str, Any]:
    """The native recipe of a mergekit or mergekit-moe config."""
    return (translate_moe if is_mergekit_moe(data) else translate)(data, where, base_dir, out)


def read_recipe_data(file: Path, out: str | Path | None = None, mergekit_out: str | None = None
                     ) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """The native recipe a file holds (a mergekit config translated) and its lines, with ``out`` applied;
    ``mergekit_out`` is where a mergekit config writes when ``out`` is not given (a sweep moves it anyway)."""
    data, lines = read_yaml(file)
    where = Locator(file, lines)
    if is_mergekit(data) or is_mergekit_moe(data):
        target = out if out is not None else mergekit_out
        return _translated(data, where, file.resolve().parent, None if target is None else str(target)), {}
    if out is not None and isinstance(data, dict):
        outputs = data.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
            raise where.error(("outputs",), "--out replaces the path of a recipe's single output; this recipe "
                                            "does not have exactly one")
        outputs[0]["path"] = str(out)
    return data, lines


def build_recipe(
    data: Any,
    file: Path,
    lines: dict[tuple[Any, ...], int],
    sets: dict[str, Any],
    base_dir: Path,
    in_memory: frozenset[str] = frozenset(),
    model_types: dict[str, str] | None = None,
    memory_sequences: dict[str, list[tuple[int, str]]] | None = None,
) -> Recipe:
    """Validate recipe data (from YAML or from the Python API).

    Models in ``in_memory`` are not paths; ``model_types`` lets an in-memory model be a Delta;
    ``memory_sequences`` are sequences of in-memory models (step, model name).
    """
    where = Locator(file, lines)
    if not isinstance(data, dict):
        raise where.error((), "a recipe is a mapping with 'models', 'nodes' and 'outputs'")
    _apply_sets(data, sets, where)
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as exc:
        raise where.pydantic(exc, ()) from None
    models: dict[str, str] = {}
    sequences: dict[str, tuple[tuple[int, str], ...]] = {}
    artifact_types: dict[str, str] = {}
    adapters: dict[str, str] = {}
    for name, entry in spec.models.items():
        if name in in_memory:
            models[name] = entry
        elif isinstance(entry, str) and not is_glob(entry):
            models[name] = _model_path(entry, base_dir, where, ("models", name))
            kind = artifact_type(models[name]) or (ADAPTER if is_adapter(models[name]) else None)
            if kind:
                artifact_types[name] = kind
        elif isinstance(entry, AdaptedSpec):
            models[name], adapters[name] = _adapted(name, entry, spec, base_dir, where)
        else:
            members = _resolve_sequence(name, entry, base_dir, where)
            sequences[name] = tuple((step, f"{name}@{step}") for step, _ in members)
            models.update({f"{name}@{step}": path for step, path in members})
    for name, members in (memory_sequences or {}).items():
        sequences[name] = tuple(members)
    sequences.update(_listed_sequences(spec, models, set(sequences) | set(artifact_types), in_memory))
    types = {**(model_types or {}), **artifact_types, **dict.fromkeys(sequences, SEQUENCE)}
    nodes = _check_nodes(spec, where, types, sequences)
    outputs = tuple(_check_output(i, out, nodes, models, sequences, base_dir, where, in_memory, adapters)
                    for i, out in enumerate(spec.outputs))
    _check_output_paths(outputs, file, where)
    resolved = spec.model_dump(by_alias=True, exclude_none=True)
    resolved["models"] = {name: {"base": path, "adapter": adapters[name]} if name in adapters else path
                          for name, path in models.items()}
    if sequences:
        resolved["sequences"] = {name: [list(m) for m in members] for name, members in sequences.items()}
    for out_doc, out in zip(resolved["outputs"], outputs):
        out_doc["path"] = str(out.path)
        if out.copy_files_from:
            out_doc["copy_files_from"] = out.copy_files_from
    if spec.tokenizer and spec.tokenizer.source not in ("base", "union", *models):
        raise where.error(("tokenizer", "source"), f"tokenizer source '{spec.tokenizer.source}' is not base, union "
                                                   f"or a model")
    if spec.tokenizer and spec.tokenizer.embeddings:
        _compile(spec.tokenizer.embeddings, where, ("tokenizer", "embeddings"))
    for token, token_spec in ((spec.tokenizer.tokens or {}) if spec.tokenizer else {}).items():
        if token_spec.source not in models:
            raise where.error(("tokenizer", "tokens", token, "source"), f"token {token!r} takes its rows from "
                                                                        f"'{token_spec.source}', which is not a model")
    template = spec.chat_template
    if template is not None and template != "auto" and template not in models and not _is_jinja(template):
        raise where.error(("chat_template",), f"chat_template '{template}' is not a model's name, 'auto' or a Jinja "
                                              f"template (one with {{{{ }}}} or {{% %}})")
    return Recipe(file, models, sequences, nodes, outputs, spec.seed, resolved, spec.tokenizer, adapters, template)


def _is_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def _model_path(reference: str, base_dir: Path, where: Locator, loc: tuple[Any, ...]) -> str:
    """A model's absolute path: a local path (which need not exist yet: opening it says so), or a repo id
    that is not a local path, from the Hugging Face cache."""
    local = base_dir / reference
    if not local.exists() and is_repo_id(reference):
        return resolve_model(reference, base_dir, where, loc)
    return str(local.resolve())


def _adapted(name: str, entry: AdaptedSpec, spec: RecipeSpec, base_dir: Path, where: Locator) -> tuple[str, str]:
    """(base path, adapter path) of a model given as a base with an adapter; the base may name another model."""
    base = spec.models.get(entry.base)
    if base is not None and not isinstance(base, str):
        raise where.error(("models", name, "base"), f"base '{entry.base}' must be a model given by its path")
    base_path = _model_path(base if base is not None else entry.base, base_dir, where, ("models", name, "base"))
    adapter_path = _model_path(entry.adapter, base_dir, where, ("models", name, "adapter"))
    if not is_adapter(adapter_path):
        raise where.error(("models", name, "adapter"), f"{adapter_path} is not a PEFT adapter folder (it has no "
                                                        f"adapter_config.json)")
    return base_path, adapter_path


def _listed_sequences(spec: RecipeSpec, models: dict[str, str], not_checkpoints: set[str],
                      in_memory: frozenset[str]) -> dict[str, tuple[tuple[int, str], ...]]:
    """A Sequence slot given a list of model names is the sequence of those models, in that order.

    Its steps come from the models' paths (``checkpoint-500``) when every path has one and they rise in
    the order given, else they are 0..n-1. The node's input is rewired to the sequence, named
    ``NODE.SLOT``; the list itself stays a list wherever a slot takes one.
    """
    listed: dict[str, tuple[tuple[int, str], ...]] = {}
    for node_name, node in spec.nodes.items():
        op = REGISTRY.get(node.op)
        if op is None:
            continue  # reported by the node's own check
        for slot, ref in list(node.inputs.items()):
            takes = {t for sig in op.signatures for t in sig.slots.get(slot, ())}
            if not isinstance(ref, list) or SEQUENCE not in takes or list_of(CHECKPOINT) in takes or not ref:
                continue
            if not all(r in models and r not in not_checkpoints for r in ref):
                continue
            steps = [None if r in in_memory else step_of(models[r]) for r in ref]
            if None in steps or any(b <= a for a, b in zip(steps, steps[1:])):
                steps = list(range(len(ref)))
            name = f"{node_name}.{slot}"
            listed[name] = tuple(zip(steps, ref))
            node.inputs[slot] = name
    return listed


def _resolve_sequence(name: str, entry: str | list[str] | SequenceSpec, base_dir: Path,
                      where: Locator) -> list[tuple[int, str]]:
    line = where.line(("models", name))
    location = f"{where.file}:{line}: sequence '{name}'" if line else f"{where.file}: sequence '{name}'"
    if isinstance(entry, SequenceSpec):
        return resolve_sequence(entry.paths, entry.steps, entry.allow_gaps, base_dir, location)
    return resolve_sequence(entry, None, False, base_dir, location)


def _check_nodes(spec: RecipeSpec, where: Locator, model_types: dict[str, str],
                 sequences: dict[str, tuple[tuple[int, str], ...]]) -> dict[str, Node]:
    for name in spec.nodes:
        if name in spec.models or name in sequences:
            raise where.error(("nodes", name), f"node '{name}' has the same name as a model")
    order = _topological_order(spec, where)
    nodes: dict[str, Node] = {}
    for name in order:
        node_spec = spec.nodes[name]
        nodes[name] = _check_node(name, node_spec, spec, nodes, where, model_types, sequences)
    return nodes


def _check_node(name: str, spec: NodeSpec, recipe: RecipeSpec, done: dict[str, Node], where: Locator,
                model_types: dict[str, str], sequences: dict[str, tuple[tuple[int, str], ...]]) -> Node:
    loc = ("nodes", name)
    op = REGISTRY.get(spec.op)
    if op is None:
        known = ", ".join(sorted(REGISTRY))
        raise where.error((*loc, "op"), f"node '{name}': unknown operator '{spec.op}' (known: {known})")
    sig = op.signature_for(set(spec.inputs))
    if sig is None:
        accepted = "; ".join(s.describe() for s in op.signatures)
        raise where.error((*loc, "inputs"), f"node '{name}': {op.name} takes inputs {accepted}, "
                                            f"got ({', '.join(spec.inputs)})")
    lengths: dict[str, int] = {}
    for slot, ref in spec.inputs.items():
        got = _ref_type(ref, recipe, done, model_types, where, (*loc, "inputs", slot))
        if got not in sig.slots[slot]:
            raise where.error((*loc, "inputs", slot), f"node '{name}': input '{slot}' needs "
                              f"{' or '.join(sig.slots[slot])}, got {got}")
        if isinstance(ref, list):
            lengths[slot] = len(ref)
        elif is_list_type(got):
            lengths[slot] = done[ref].list_length
    params, schedules = _validate_params(op, spec.params, where, (*loc, "params"), name)
    problem = op.check(params, lengths) if op.check else None
    if not problem and op.check_inputs:
        problem = op.check_inputs(params, spec.inputs)
    if problem:
        raise where.error((*loc, "params"), f"node '{name}': {problem}")
    overrides = []
    for i, override in enumerate(spec.overrides):
        merged = {**spec.params, **override.params}
        override_params, override_schedules = _validate_params(op, merged, where, (*loc, "overrides", i, "params"),
                                                               name)
        overrides.append((_compile(override.match, where, (*loc, "overrides", i, "match")), override_params,
                          override_schedules))
    return Node(
        name=name,
        op=op,
        signature=sig,
        inputs=dict(spec.inputs),
        params=params,
        schedules=schedules,
        schedule_outside=spec.schedule_outside or (0.0, 1.0),
        overrides=tuple(overrides),
        include=tuple(_compile(p, where, (*loc, "include", i)) for i, p in enumerate(spec.include)),
        exclude=tuple(_compile(p, where, (*loc, "exclude", i)) for i, p in enumerate(spec.exclude)),
        seed=recipe.seed if spec.seed is None else spec.seed,
        list_length=next(iter(lengths.values()), None) if is_list_type(sig.result) else None,
        series_steps=_series_steps(op, params, spec, sequences),
    )


def _series_steps(op: Operator, params: Params, spec: NodeSpec,
                  sequences: dict[str, tuple[tuple[int, str], ...]]) -> tuple[int, ...] | None:
    runs = [ref for ref in spec.inputs.values() if isinstance(ref, str) and ref in sequences]
    if op.series is None or not runs:
        return None
    emitted = op.series(params, [step for step, _ in sequences[runs[0]]])
    return tuple(emitted) if emitted else None


def _ref_type(ref: str | list[str], recipe: RecipeSpec, done: dict[str, Node], model_types: dict[str, str],
              where: Locator, loc: tuple[Any, ...]) -> str:
    if isinstance(ref, list):
        if not ref:
            raise where.error(loc, "an input list must not be empty")
        types = {_ref_type(r, recipe, done, model_types, where, (*loc, i)) for i, r in enumerate(ref)}
        if len(types) != 1 or is_list_type(next(iter(types))):
            raise where.error(loc, f"list elements must all be single values of one type, got {sorted(types)}")
        return list_of(types.pop())
    if ref in model_types:
        return model_types[ref]
    if ref in recipe.models:
        return CHECKPOINT
    if ref in done:
        return done[ref].result
    raise where.error(loc, f"node '{loc[1]}': input '{ref}' names no model or node")


def _validate_params(op: Operator, values: dict[str, Any], where: Locator, loc: tuple[Any, ...],
                     node: str) -> tuple[Params, ParamSchedules]:
    """The typed parameters (a schedule stands in by its first number) and the schedules, every number of
    every schedule validated in its place."""
    try:
        plain, schedules, variants = split_schedules(values, op.params)
    except ScheduleError as exc:
        raise where.error((*loc, exc.name), f"node '{node}' ({op.name}): '{exc.name}': {exc}") from None
    try:
        params = op.params.model_validate(plain)
        for variant in variants:
            op.params.model_validate({**plain, **variant})
    except ValidationError as exc:
        raise where.pydantic(exc, loc, prefix=f"node '{node}' ({op.name}): ") from None
    return params, schedules


def _compile(pattern: str, where: Locator, loc: tuple[Any, ...]) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise where.error(loc, f"invalid regular expression {pattern!r}: {exc}") from None


def _topological_order(spec: RecipeSpec, where: Locator) -> list[str]:
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*trail[trail.index(name):], name])
            raise where.error(("nodes", name), f"the nodes form a cycle: {cycle}")
        state[name] = "visiting"
        for ref in spec.nodes[name].inputs.values():
            for r in [ref] if isinstance(ref, str) else ref:
                if r in spec.nodes:
                    visit(r, [*trail, name])
        state[name] = "done"
        order.append(name)

    for name in spec.nodes:
        visit(name, [])
    return order


def _check_output(i: int, out: OutputSpec, nodes: dict[str, Node], models: dict[str, str],
                  sequences: dict[str, tuple[tuple[int, str], ...]], base_dir: Path, where: Locator,
                  in_memory: frozenset[str], adapters: dict[str, str]) -> Output:
    loc = ("outputs", i)
    if out.from_ in nodes:
        value_type = nodes[out.from_].result
    elif out.from_ in models:
        value_type = CHECKPOINT
    elif out.from_ in sequences:
        value_type = SEQUENCE
    else:
        raise where.error((*loc, "from"), f"output {i} comes from '{out.from_}', which names no node or model")
    kind = value_type if value_type in ARTIFACT_TYPES else CHECKPOINT
    if out.path == MEMORY_PATH:
        return Output(out.from_, Path(MEMORY_PATH), out.dtype, parse_size(out.shard_size), None, kind)
    is_series = out.from_ in nodes and nodes[out.from_].series_steps is not None
    if value_type not in (CHECKPOINT, *ARTIFACT_TYPES) and not is_series:
        raise where.error((*loc, "from"), f"output {i} comes from '{out.from_}', a {value_type}: add an 'apply' "
                                          f"node to turn it into a Checkpoint")
    if value_type in FILE_ARTIFACTS and not out.path.endswith(".safetensors"):
        raise where.error((*loc, "path"), f"output {i} is a {value_type} file: its path must end in .safetensors")
    path = _output_path(base_dir, out.path)
    inputs = [*models.items(), *((f"{name}'s adapter", path) for name, path in adapters.items())]
    for name, model_path in inputs:
        if name in in_memory:
            continue
        model = Path(model_path)
        inside_model = model.is_dir() and model in path.parents
        if path == model or path in model.parents or inside_model:
            raise where.error((*loc, "path"), f"output path {path} would overwrite input '{name}' ({model})")
    copy_from = out.copy_files_from
    if value_type in ARTIFACT_TYPES:
        copy_from = None
    elif copy_from is None and "copy_files_from" not in out.model_fields_set:
        copy_from = out.from_
    if copy_from is not None:
        copy_from = _primary_model(copy_from, nodes, sequences)
    if copy_from is not None and copy_from not in models:
        raise where.error((*loc, "copy_files_from"), f"copy_files_from names '{copy_from}', which is not a model")
    return Output(out.from_, path, out.dtype, parse_size(out.shard_size), copy_from, kind, out.tie_word_embeddings)


def _output_path(base_dir: Path, given: str) -> Path:
    """The absolute output path with its folders' links resolved but not its last component's: a link
    given as the output is refused as a link, never followed to what it points at."""
    path = Path(os.path.normpath(base_dir / given))
    return path.parent.resolve() / path.name


def _check_output_paths(outputs: tuple[Output, ...], recipe_file: Path, where: Locator) -> None:
    """No two outputs at one path or one inside another; none at the recipe's folder or above it."""
    on_disk = {i: out.path for i, out in enumerate(outputs) if str(out.path) != MEMORY_PATH}
    recipe = Path(recipe_file).resolve() if Path(recipe_file).is_file() else None
    for i, path in on_disk.items():
        if recipe is not None and path in recipe.parents:
            raise where.error(("outputs", i, "path"), f"output {i} ({path}) is the recipe's own folder or a folder "
                                                      f"above it: writing it would replace the recipe")
        for j, other in on_disk.items():
            if j <= i:
                continue
            if other == path:
                raise where.error(("outputs", j, "path"), f"outputs {i} and {j} both write {path}")
            if path in other.parents or other in path.parents:
                outer, inner = (i, j) if path in other.parents else (j, i)
                raise where.error(("outputs", inner, "path"), f"output {inner} ({on_disk[inner]}) lies inside "
                                                              f"output {outer} ({on_disk[outer]})")


def _primary_model(ref: str, nodes: dict[str, Node], sequences: dict[str, tuple[tuple[int, str], ...]]) -> str:
    while ref in nodes:
        ref = nodes[ref].primary
    if ref in sequences:  # a training run: its latest checkpoint
        ref = sequences[ref][-1][1]
    return ref


def primary_model(recipe: Recipe, ref: str) -> str:
    """The model a node's non-weight files, buffers and default dtypes come from."""
    return _primary_model(ref, recipe.nodes, recipe.sequences)


def _apply_sets(data: dict[str, Any], sets: dict[str, Any], where: Locator) -> None:
    for target, value in sets.items():
        node, _, param = target.partition(".")
        nodes = data.get("nodes")
        if not param or not isinstance(nodes, dict) or node not in nodes or not isinstance(nodes[node], dict):
            raise MergebenchError(f"--set {target}: expected NODE.PARAM naming a node of {where.file}")
        nodes[node].setdefault("params", {})
        if not isinstance(nodes[node]["params"], dict):
            raise where.error(("nodes", node, "params"), f"node '{node}': params must be a mapping")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise MergebenchError(f"--set {target}={value}: not a valid YAML value ({problem})") from None
        nodes[node]["params"][param] = value
