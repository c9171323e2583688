"""Opening and finishing one output of a run: its writer (fresh or resumed), what resume may trust,
free space, companion files and the model card. Shared by the local runner and the Ray executor."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mergebench.engine.graph import DTYPES, Graph, OutputPlan
from mergebench.errors import MergebenchError
from mergebench.io.adapter_writer import AdapterWriter, adapter_identity
from mergebench.io.adapters import AdapterSource
from mergebench.io.artifacts import ArtifactWriter
from mergebench.io.fp8 import FP8BlockCheckpoint
from mergebench.io.output_files import copy_model_files, layer_config, model_card, read_config_field, update_config
from mergebench.io.output_guard import artifact_recipe, committed_identity
from mergebench.io.safetensors_format import DTYPE_NAMES
from mergebench.io.tied_heads import HEAD_KEYS, tied_pair
from mergebench.io.tokenizers import read_chat_template, write_chat_template, write_tokenizer
from mergebench.io.writer import CheckpointWriter
from mergebench.recipe import MEMORY_PATH
from mergebench.surgery.layers import INPUT_EMBEDDINGS
from mergebench.surgery.vocab import FALLBACK_RULE
from mergebench.value_types import ADAPTER, ARTIFACT_TYPES

DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                      torch.float64: "float64"}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("mergebench")
    except PackageNotFoundError:
        return "0+unknown"


def finished_by_this_run(graph: Graph, plan: OutputPlan) -> bool:
    """An output an interrupted run of the same recipe on the same inputs already renamed into place (a
    run with several outputs renames them one after another): ``--resume`` may write it again."""
    if plan.output.kind == ADAPTER:
        return committed_identity(plan.path) == adapter_identity(graph.recipe.sha256, plan.output.node)
    if plan.output.kind in ARTIFACT_TYPES:
        return artifact_recipe(plan.path) == (graph.recipe.sha256, plan.output.node)
    return committed_identity(plan.path) == _identity(graph, plan)


def check_free_space(plans: list[OutputPlan]) -> None:
    """Refuse up front when a file system cannot hold the outputs planned on it (shards are preallocated
    sparse, so without this a full disk shows only halfway through the run). Artifacts are left out:
    their size (set bits, nonzero entries) is known only once they are computed."""
    needed: dict[int, tuple[Path, int]] = {}
    for plan in plans:
        if plan.output.kind in ARTIFACT_TYPES or str(plan.path) == MEMORY_PATH:
            continue
        folder = plan.path.parent
        while not folder.exists():
            folder = folder.parent
        device = folder.stat().st_dev
        where, total = needed.get(device, (folder, 0))
        needed[device] = (where, total + plan.nbytes)
    for folder, total in needed.values():
        free = shutil.disk_usage(folder).free
        if total > free:
            raise MergebenchError(f"{folder}: the outputs need {total / 1e9:.2f} GB and the file system has "
                                  f"{free / 1e9:.2f} GB free")


def open_writer(graph: Graph, plan: OutputPlan, resume: bool) -> CheckpointWriter | ArtifactWriter:
    """One output's writer: preallocated shards in ``OUT.partial`` (reopened to resume), an adapter folder,
    or an artifact file."""
    if plan.output.kind == ADAPTER:
        return _adapter_writer(graph, plan)
    if plan.output.kind in ARTIFACT_TYPES:
        return ArtifactWriter(plan.path, plan.output.kind, _artifact_metadata(graph, plan),
                              key_order=[t.key for t in plan.tensors])
    metadata = {"format": "pt", "mergebench_version": version(), "mergebench_recipe_sha256": graph.recipe.sha256}
    return CheckpointWriter(plan.path, list(plan.tensors), plan.output.shard_size, metadata,
                            identity=_identity(graph, plan), resume=resume, inputs=_input_files(graph, plan))


def _adapter_writer(graph: Graph, plan: OutputPlan) -> AdapterWriter:
    """A PEFT folder following the first input adapter's config (PEFT's own rule for merged adapters), with
    the embeddings of the input adapters, or for an extraction those of the usual architectures."""
    adapters = [graph.sources[m] for m in plan.models if isinstance(graph.sources[m], AdapterSource)]
    if adapters:
        embeddings = {key for source in adapters for key in source.adapter.embeddings}
    else:
        embeddings = {t.key for t in plan.tensors if INPUT_EMBEDDINGS.search(t.key)}
    dtype = DTYPES[plan.output.dtype] if plan.output.dtype else torch.float32
    return AdapterWriter(plan.path, _artifact_metadata(graph, plan), adapters[0].config if adapters else {},
                         embeddings, dtype, key_order=[t.key for t in plan.tensors])


def _artifact_metadata(graph: Graph, plan: OutputPlan) -> dict[str, str]:
    """Provenance of a mask or sparse delta: the recipe, the node and the models it came from."""
    node = graph.nodes[plan.output.node]
    return {"created_by": f"mergebench {version()}", "mergebench_recipe_sha256": graph.recipe.sha256,
            "node": node.name, "operator": node.op.name,
            "params": json.dumps(node.params.model_dump(by_alias=True), sort_keys=True),
            "models": json.dumps({m: graph.sources[m].label for m in graph.recipe_models(plan.models)},
                                 sort_keys=True),
            "base_model": graph.sources[plan.primary].label}


def written_bytes(plan: OutputPlan, writer: CheckpointWriter | ArtifactWriter) -> int:
    if isinstance(writer, AdapterWriter):
        return writer.bytes_written
    return plan.nbytes if isinstance(writer, CheckpointWriter) else writer.partial.stat().st_size


def output_details(writer: CheckpointWriter | ArtifactWriter) -> dict[str, Any]:
    """What a run reports of an output beyond its size: an adapter's rank and error per module."""
    if isinstance(writer, AdapterWriter):
        return {"modules": {key: {"rank": rank, "error": error} for key, (rank, error) in writer.report.items()}}
    return {}


def _identity(graph: Graph, plan: OutputPlan) -> str:
    """What a partial output must have been made from to be resumed: recipe, inputs, layout."""
    digest = hashlib.sha256(f"{graph.recipe.sha256}:{plan.index}:{plan.element}:".encode())
    for name in plan.models:
        source = graph.sources[name]
        fingerprint = source.fingerprint() or source.label
        digest.update(f"{name}={fingerprint};".encode())
    for t in plan.tensors:
        digest.update(f"{t.key}:{t.dtype}:{t.shape};".encode())
    return digest.hexdigest()


def _input_files(graph: Graph, plan: OutputPlan) -> dict[str, list[int]]:
    """The state of every file the output is computed from, journalled so that a resume can refuse
    inputs that changed since (see ``file_states``)."""
    states: dict[str, list[int]] = {}
    for name in plan.models:
        source = graph.sources[name]
        states.update(source.file_states())
    return states


def write_companions(graph: Graph, plan: OutputPlan, writer: CheckpointWriter) -> list[str]:
    """The model's companion files, tokenizer and model card; returns what was left behind, and why."""
    recipe = graph.recipe
    source_name = plan.output.copy_files_from
    source = graph.sources.get(source_name) if source_name else None
    folder = source.folder if source is not None else None
    skipped = []
    if folder is not None:
        report = copy_model_files(folder, writer.partial, _dominant_float_dtype(plan))
        skipped = [f"{folder / name}: {reason}" for name, reason in report.skipped]
    notes = []
    fields, removed = graph.output_config(plan)
    if fields or removed:
        update_config(writer.partial, fields, remove=removed)
        notes.append(f"Architecture: {', '.join(fields.get('architectures', []))} (config written from "
                     f"`{source_name}`'s).")
    if graph.vocab is not None:
        folders = {name: graph.sources[name].folder for name in graph.vocab.rows}
        write_tokenizer(graph.vocab, folders, writer.partial)
        update_config(writer.partial, {"vocab_size": graph.vocab.size})
        notes.append(f"Vocabulary: `{graph.vocab.source}` ({len(graph.vocab.tokens)} tokens, {graph.vocab.size} "
                     f"embedding rows); {FALLBACK_RULE}.")
    if isinstance(source, FP8BlockCheckpoint) and read_config_field(writer.partial, "quantization_config"):
        update_config(writer.partial, {}, remove=("quantization_config",))
        notes.append("Weights: dequantized from FP8 block scales.")
    template = _chat_template(graph, plan)
    if template is not None:
        write_chat_template(writer.partial, template)
        choice = graph.recipe.chat_template
        notes.append("Chat template: " + ("the most common among the inputs" if choice == "auto" else
                                          f"`{choice}`'s" if choice in graph.recipe.models else "the recipe's") + ".")
    tied = tied_output(plan)
    if tied is not None and folder is not None and read_config_field(writer.partial, "tie_word_embeddings") != tied:
        update_config(writer.partial, {"tie_word_embeddings": tied})
        notes.append(f"Head: {'tied to the input embedding' if tied else 'its own tensor (untied)'}.")
    layers = graph.output_layers(plan)
    if layers is not None and folder is not None:
        update_config(writer.partial, layer_config(folder, [(graph.sources[m].folder, i) for m, i in layers]))
        notes.append(f"Layers: {len(layers)} blocks, from " + ", ".join(f"{m}[{i}]" for m, i in layers) + ".")
    inputs = set(graph.recipe_models(plan.models))
    fingerprints = {name: src.fingerprint() for name, src in graph.sources.items()
                    if name in inputs and src.fingerprint() is not None}
    card = model_card(recipe.resolved, recipe.sha256, plan.index, fingerprints, version(), notes)
    (writer.partial / "README.md").write_text(card)
    return skipped


def _chat_template(graph: Graph, plan: OutputPlan) -> str | None:
    """The template the recipe's ``chat_template`` chooses for this output: a model's, the most common among
    the output's inputs (``auto``; the first in recipe order on a tie), or the text given; None to keep the
    copied one."""
    choice = graph.recipe.chat_template
    if choice is None:
        return None
    if choice in graph.recipe.models:
        return read_chat_template(graph.sources[choice].folder)  # the graph checked that it has one
    if choice != "auto":
        return choice
    templates = [read_chat_template(graph.sources[m].folder) for m in graph.recipe_models(plan.models)]
    counts = Counter(t for t in templates if t is not None)
    return max(counts, key=lambda t: (counts[t], -templates.index(t))) if counts else None


def tied_output(plan: OutputPlan) -> bool | None:
    """Whether the output's head is tied to its embedding (it stores none); None for a model without either."""
    keys = [t.key for t in plan.tensors]
    if tied_pair(keys) is None:
        return None
    return not any(HEAD_KEYS.search(key) for key in keys)


def _dominant_float_dtype(plan: OutputPlan) -> str | None:
    """The dtype config.json should announce: the one most of the output's float bytes are stored in."""
    weights: Counter[torch.dtype] = Counter()
    for t in plan.tensors:
        if t.dtype.is_floating_point:
            weights[t.dtype] += t.nbytes
    if not weights:
        return None
    dtype = weights.most_common(1)[0][0]
    return DTYPE_CONFIG_NAMES.get(dtype, DTYPE_NAMES[dtype].lower())
