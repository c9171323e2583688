"""The Python API: operators called eagerly on tensors and state dicts, or lazily on checkpoints.

Both paths build the same validated Recipe a YAML file builds and run it through the same executor,
so a notebook, a recipe and the CLI cannot disagree about a number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergebench.analysis.sweeps import MAX_GRID_POINTS, SweepPoint, run_sweep
from mergebench.engine.executor import execute
from mergebench.engine.graph import Graph
from mergebench.engine.memory import peak_memory_estimate
from mergebench.engine.pipeline import DictSink
from mergebench.engine.runner import RunOptions, RunResult, run_recipe
from mergebench.engine.stages import reads_per_model, statistics_stages
from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import StateDictSource
from mergebench.operators.base import (
    ARTIFACT_TYPES,
    CHECKPOINT,
    REGISTRY,
    SEQUENCE,
    Operator,
    element_type,
    is_list_type,
)
from mergebench.recipe import MEMORY_PATH, build_recipe, load_recipe

COMMON_FIELDS = ("include", "exclude", "overrides", "seed")
PYTHON_SOURCE = Path("<python>")
EAGER_TENSOR_KEY = "tensor"


@dataclass(frozen=True, eq=False)
class ModelRef:
    """A checkpoint on disk, not yet read: the leaf of a lazy graph (``mergebench.load``)."""

    path: str


@dataclass(frozen=True, eq=False)
class LazyNode:
    """An operator applied to lazy inputs; ``save`` streams it to a checkpoint."""

    op: Operator
    inputs: dict[str, Any]
    params: dict[str, Any]
    common: dict[str, Any] = field(default_factory=dict)

    def save(
        self,
        path: str | os.PathLike[str],
        device: str = "auto",
        dtype: str | None = None,
        shard_size: int | str = "5GB",
        copy_files_from: ModelRef | None = None,
        force: bool = False,
        seed: int = 0,
    ) -> RunResult:
        """Stream this node to ``path`` (HF layout); config and tokenizer come from its primary model."""
        doc, names = _recipe_doc(self)
        output: dict[str, Any] = {"from": names[id(self)], "path": os.fspath(path), "shard_size": shard_size}
        if dtype:
            output["dtype"] = dtype
        if copy_files_from is not None:
            output["copy_files_from"] = names[id(copy_files_from)]
        doc["outputs"] = [output]
        doc["seed"] = seed
        recipe = build_recipe(doc, PYTHON_SOURCE, {}, {}, base_dir=Path.cwd())
        return run_recipe(recipe, RunOptions(device=device, force=force))


def load(path: str | os.PathLike[str]) -> ModelRef:
    """A lazy handle on a checkpoint (``.safetensors`` file, HF folder or sharded index)."""
    return ModelRef(os.fspath(path))


def run(recipe_path: str | os.PathLike[str], set: Mapping[str, Any] | None = None, device: str = "auto",
        force: bool = False, resume: bool = False, allow_non_finite: bool = False,
        allow_pickle: bool = False, executor: str = "local", address: str | None = None,
        out: str | os.PathLike[str] | None = None) -> RunResult:
    """Run a YAML recipe or a mergekit config, with ``set={"node.param": value}`` overriding parameters as
    ``--set`` does.

    The keyword flags are the CLI's ``--force``, ``--resume``, ``--allow-non-finite``, ``--allow-pickle``,
    ``--executor`` (``"ray"``: on a Ray cluster), ``--address`` and ``--out`` (the output of a mergekit
    config, or of a recipe with one output).
    """
    recipe = load_recipe(recipe_path, dict(set or {}), out)
    options = RunOptions(device=device, force=force, resume=resume, allow_non_finite=allow_non_finite,
                         allow_pickle=allow_pickle, executor=executor, address=address)
    return run_recipe(recipe, options)


def sweep(recipe_path: str | os.PathLike[str], grid: Mapping[str, list[Any]], out_dir: str | os.PathLike[str],
          evaluate: Callable[[Path], dict[str, float]] | str | None = None, device: str = "auto",
          force: bool = False, executor: str = "local", address: str | None = None,
          resources: Mapping[str, float] | None = None, max_points: int = MAX_GRID_POINTS,
          keep: bool = False) -> list[SweepPoint]:
    """Merge every point of ``grid`` ({"node.param": [values]}) in one pass and score each output with
    ``evaluate`` (a callable on the output folder returning metrics, a shell command with ``{out}``, or
    built-in evaluator specs such as ``"ppl:val.txt"``, which score each point in memory unless ``keep``).

    ``executor="ray"`` runs each point (merge, then evaluation) as a Ray task needing ``resources``
    ({"num_gpus": 1} for a GPU evaluation)."""
    return run_sweep(recipe_path, dict(grid), out_dir, evaluate, device=device, force=force, executor=executor,
                     address=address, resources=dict(resources or {}), max_points=max_points, keep=keep)


def search(recipe_path: str | os.PathLike[str], space: Mapping[str, tuple[float, float]],
           out_dir: str | os.PathLike[str], evaluate: Callable[[Path], dict[str, float]] | str,
           objectives: list[str], trials: int = 40, sampler: str = "tpe", seed: int = 0, device: str = "auto",
           keep: bool = False, executor: str = "local", parallel: int = 1, address: str | None = None,
           resources: Mapping[str, float] | None = None) -> Any:
    """Optuna search over ``space`` ({"node.param": (low, high)}) for ``objectives`` ("metric[:min|max]"), each
    trial a merge scored by ``evaluate`` (a callable on the output folder, built-in specs, or a command);
    resumable from ``out_dir/study.db``; ``executor="ray"`` runs ``parallel`` trials at a time as Ray tasks
    (mergebench.analysis.search)."""
    from mergebench.analysis.search import Parallel, Space, parse_objective, run_search

    if executor not in ("local", "ray"):
        raise MergebenchError(f"--executor {executor}: expected local or ray")
    spaces = [Space(target, float(low), float(high)) for target, (low, high) in space.items()]
    ray = Parallel(parallel, address, dict(resources or {})) if executor == "ray" else None
    return run_search(recipe_path, spaces, out_dir, evaluate, [parse_objective(o) for o in objectives], trials,
                      sampler, seed, device, keep, ray)


@dataclass(frozen=True)
class RunPlan:
    """What a run of a recipe would do, without reading a weight: the planned graph (models, nodes in
    evaluation order, outputs), the passes over the inputs, bytes read per pass and written, and the
    estimated peak memory beyond the interpreter."""

    graph: Graph
    passes: int
    bytes_per_pass: int
    bytes_written: int
    peak_memory: int
    reads: dict[str, int]  # how many times each model is read, at most (statistics passes and the main pass)
    may_skip: int = 0  # statistics passes a run skips when earlier ones settle their result (counted in passes)


def plan(recipe_path: str | os.PathLike[str], set: Mapping[str, Any] | None = None,
         allow_pickle: bool = False, out: str | os.PathLike[str] | None = None) -> RunPlan:
    """Check a recipe against its inputs' headers and plan it (``mergebench plan``); writes nothing."""
    graph = Graph(load_recipe(recipe_path, dict(set or {}), out), allow_pickle=allow_pickle)
    stages = statistics_stages(graph)
    return RunPlan(graph, 1 + len(stages), graph.bytes_to_read, sum(o.nbytes for o in graph.outputs),
                   peak_memory_estimate(graph), reads_per_model(graph), sum(stage.may_skip for stage in stages))


def extract(base: str | os.PathLike[str], fine_tuned: str | os.PathLike[str], out: str | os.PathLike[str], *,
            mask: bool = False, proportion: float | None = None, k: int | None = None, scope: str = "global",
            eps: float = 1e-7, include: list[str] | None = None, exclude: list[str] | None = None,
            device: str = "auto", force: bool = False) -> RunResult:
    """A fine-tune as an artifact in one streamed pass (``mergebench extract``): its SparseDelta (top-K by
    |Δ| with ``proportion`` or ``k``, else every |Δ| > ``eps``), or with ``mask`` the Mask of its top
    ``proportion`` (default 0.01) entries."""
    call: dict[str, Any] = {"base": load(base), "fine_tuned": load(fine_tuned), "scope": scope,
                            "include": list(include or []), "exclude": list(exclude or [])}
    if k is not None:
        call["k"] = k
    if mask:
        call["proportion"] = proportion if proportion is not None else 0.01
    else:
        call["eps"] = eps
        if proportion is not None:
            call["proportion"] = proportion
    node = call_operator(REGISTRY["mask_topk" if mask else "sft_extract"], call)
    return node.save(out, device=device, force=force)


def extract_lora(base: str | os.PathLike[str], fine_tuned: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 rank: int | None = None, energy: float | None = None, min_rank: int = 1,
                 max_rank: int | None = None, target_modules: str | None = None,
                 modules_to_save: str | None = None, svd: str = "auto", dtype: str | None = None,
                 device: str = "auto", force: bool = False) -> RunResult:
    """A fine-tune as a PEFT LoRA adapter of its base in one streamed pass (``mergebench extract-lora``):
    the ``lora_extract`` operator with these parameters; the result lists each module's rank and error."""
    params = {"rank": rank, "energy": energy, "min_rank": min_rank, "max_rank": max_rank,
              "target_modules": target_modules, "modules_to_save": modules_to_save, "svd": svd}
    node = call_operator(REGISTRY["lora_extract"], {"base": load(base), "fine_tuned": load(fine_tuned),
                                                    **{k: v for k, v in params.items() if v is not None}})
    return node.save(out, device=device, dtype=dtype, force=force)


def record(model: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str], *,
           stats: tuple[str, ...] = ("fisher", "gram"), labels: str = "given", max_examples: int | None = None,
           max_length: int = 512, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """A Hugging Face model's diagonal Fisher and/or Gram matrices on a local data file (``mergebench record``),
    written as ``OUT/fisher.safetensors`` and ``OUT/gram.safetensors`` for ``fisher``, ``wise_ft`` and
    ``regmean``. Any ``torch.nn.Module``: ``mergebench.io.statistics.record_statistics``."""
    from mergebench.analysis.record import record as record_model

    return record_model(model, data, out, tuple(stats), labels, max_examples, max_length, seed, force)


def call_operator(op: Operator, kwargs: dict[str, Any]) -> Any:
    """``ops.NAME(**slots, **params)``: lazy if any input is a ModelRef or LazyNode, else computed now."""
    slot_names = {slot for sig in op.signatures for slot in sig.slots}
    inputs = {k: v for k, v in kwargs.items() if k in slot_names}
    common = {k: v for k, v in kwargs.items() if k in COMMON_FIELDS}
    params = {k: v for k, v in kwargs.items() if k not in slot_names and k not in COMMON_FIELDS}
    if _is_lazy(inputs):
        return LazyNode(op, inputs, params, common)
    return _eager(op, inputs, params, common)


def _is_lazy(value: Any) -> bool:
    if isinstance(value, (ModelRef, LazyNode)):
        return True
    if isinstance(value, dict) and not _is_state_dict(value):
        return any(_is_lazy(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_lazy(v) for v in value)
    return False


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def _recipe_doc(root: LazyNode) -> tuple[dict[str, Any], dict[int, str]]:
    """Name every model and node of a lazy graph and write it down as recipe data."""
    doc: dict[str, Any] = {"models": {}, "nodes": {}}
    names: dict[int, str] = {}

    def name_of(value: Any) -> str:
        if id(value) in names:
            return names[id(value)]
        if isinstance(value, ModelRef):
            names[id(value)] = f"model_{len(doc['models'])}"
            doc["models"][names[id(value)]] = value.path
        elif isinstance(value, LazyNode):
            inputs = {slot: [name_of(v) for v in ref] if isinstance(ref, (list, tuple)) else name_of(ref)
                      for slot, ref in value.inputs.items()}
            names[id(value)] = f"{value.op.name}_{len(doc['nodes'])}"
            doc["nodes"][names[id(value)]] = {"op": value.op.name, "inputs": inputs, "params": value.params,
                                              **value.common}
        else:
            raise MergebenchError(f"cannot mix a {type(value).__name__} with lazy checkpoints; use mergebench.load")
        return names[id(value)]

    name_of(root)
    return doc, names


def _eager(op: Operator, inputs: dict[str, Any], params: dict[str, Any], common: dict[str, Any]) -> Any:
    """Run one operator on in-memory values through the executor, returning the same kind of value."""
    signature = op.signature_for(set(inputs))
    if signature is None:
        accepted = "; ".join(s.describe() for s in op.signatures)
        raise MergebenchError(f"{op.name} takes inputs {accepted}, got ({', '.join(inputs)})")
    sources = _MemorySources()
    model_types: dict[str, str] = {}
    sequences: dict[str, list[tuple[int, str]]] = {}
    refs: dict[str, Any] = {}
    for slot, value in inputs.items():
        if SEQUENCE in signature.slots[slot]:
            sequences[slot] = [(int(step), sources.add(f"{slot}@{step}", state))
                               for step, state in _steps_and_states(slot, value)]
            refs[slot] = slot
            continue
        is_list = isinstance(value, (list, tuple))
        accepted = [t for t in signature.slots[slot] if is_list_type(t) == is_list]
        value_type = element_type(accepted[0]) if accepted else CHECKPOINT
        if is_list:
            refs[slot] = [sources.add(f"{slot}_{i}", v, value_type) for i, v in enumerate(value)]
        else:
            refs[slot] = sources.add(slot, value, value_type)
        model_types.update(dict.fromkeys([refs[slot]] if not is_list else refs[slot], value_type))
    node = {"op": op.name, "inputs": refs, "params": params, **common}
    output: dict[str, Any] = {"from": "result", "path": MEMORY_PATH}
    if signature.result not in (CHECKPOINT, *ARTIFACT_TYPES):
        output["dtype"] = "float32"  # deltas stay exact until something applies them
    doc = {"models": dict.fromkeys(sources, MEMORY_PATH), "nodes": {"result": node}, "outputs": [output],
           "seed": common.get("seed", 0)}
    recipe = build_recipe(doc, PYTHON_SOURCE, {}, {}, base_dir=Path.cwd(), in_memory=frozenset(sources),
                          model_types=model_types, memory_sequences=sequences)
    graph = Graph(recipe, sources)
    sink = DictSink()
    plain_tensors = bool(sources.bare)
    execute(graph, [sink], sources.device)
    values = {t.key: sink.values[t.key] for t in graph.outputs[0].tensors}  # keys finish in any order
    if is_list_type(signature.result):
        count = len(next(iter(values.values())))
        results = [{k: v[i] for k, v in values.items()} for i in range(count)]
        return [r[EAGER_TENSOR_KEY] for r in results] if plain_tensors else results
    return values[EAGER_TENSOR_KEY] if plain_tensors else values


def _steps_and_states(slot: str, value: Any) -> list[tuple[int, Any]]:
    """A sequence given eagerly: ``{step: state}`` or a list of ``(step, state)`` pairs, in step order."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        pairs = sorted((int(step), state) for step, state in pairs)
    except (TypeError, ValueError):
        raise MergebenchError(f"input '{slot}': a sequence is {{step: state dict}} or [(step, state dict), ...]"
                              ) from None
    if not pairs:
        raise MergebenchError(f"input '{slot}': a sequence needs at least one checkpoint")
    return pairs


class _MemorySources(dict):
    """The in-memory inputs of an eager call, by model name; remembers which were bare tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.bare: set[str] = set()

    def add(self, name: str, value: Any, value_type: str = CHECKPOINT) -> str:
        """A state dict (or a bare tensor) as a source of the type its slot takes (a Mask, a Gram, ...)."""
        if isinstance(value, torch.Tensor):
            value = {EAGER_TENSOR_KEY: value}
            self.bare.add(name)
        if not _is_state_dict(value):
            raise MergebenchError(f"input '{name}': expected a tensor or a state dict, got {type(value).__name__}")
        self[name] = StateDictSource(value, name)
        self[name].value_type = value_type
        return name

    @property
    def device(self) -> torch.device:
        """Where the inputs live (the first tensor's device): eager results are computed there."""
        for source in self.values():
            for key in source.keys:
                return source.read(key).device
        return torch.device("cpu")
