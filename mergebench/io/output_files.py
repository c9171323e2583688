"""Everything in an output folder besides the weights: the model's own files and the model card.

The output must load the way its source model did, so tokenizer, generation config, chat template
and sentence-transformers modules come along; ``config.json`` changes only in its dtype field.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebench.io.reading import read_json_object

CONFIG_DTYPE_FIELDS = ("torch_dtype", "dtype")
# The companion files a model folder may pass on to an output: configs, tokenizers, chat templates,
# processors, sentence-transformers modules and remote code. Anything else (weights, logs, optimizer
# states, or whatever else shares the folder) stays behind, and is reported.
COMPANION_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")
# Weights, their indexes and the model card are the merge's own business: left behind without a report.
OWN_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.index.json", "README.md")
MODULE_FOLDER = re.compile(r"\d+_[A-Za-z]\w*")  # sentence-transformers' 1_Pooling, 2_Normalize, ...
MAX_COMPANION_BYTES = 64 * 2**20  # a tokenizer.json of a 250k vocabulary is about 20 MB


@dataclass
class CopyReport:
    """What ``copy_model_files`` took from the source folder, and what it left there and why."""

    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def copy_model_files(source: Path, dest: Path, dtype_name: str | None) -> CopyReport:
    """Copy the companion files of model folder ``source`` into ``dest``.

    Only regular files whose real location is inside ``source`` (links are resolved first and followed
    only when they stay inside), whose names are on the companion list and that are at most
    MAX_COMPANION_BYTES; module subfolders one level down under the same rules. Never opens anything
    that is not a regular file (a FIFO would block the run).
    """
    report = CopyReport()
    root = source.resolve()
    for entry in sorted(source.iterdir()):
        _copy_entry(entry, root, dest / entry.name, entry.name, dtype_name, report, depth=0)
    return report


def _copy_entry(entry: Path, root: Path, target: Path, relative: str, dtype_name: str | None, report: CopyReport,
                depth: int) -> None:
    if entry.name.startswith("."):
        return
    real = entry.resolve()
    if real != root and root not in real.parents:
        report.skipped.append((relative, f"a link to {real}, outside the model folder"))
        return
    info = real.stat()
    if stat.S_ISDIR(info.st_mode):
        if depth > 0 or not MODULE_FOLDER.fullmatch(entry.name):
            report.skipped.append((relative, "a folder that is not a sentence-transformers module"))
            return
        target.mkdir()
        for child in sorted(entry.iterdir()):
            _copy_entry(child, root, target / child.name, f"{relative}/{child.name}", dtype_name, report, depth + 1)
        return
    if not stat.S_ISREG(info.st_mode):
        report.skipped.append((relative, "not a regular file"))
        return
    if any(fnmatch.fnmatch(entry.name, p) for p in OWN_FILES):
        return
    if not any(fnmatch.fnmatch(entry.name, p) for p in COMPANION_PATTERNS):
        report.skipped.append((relative, "not a companion file (configs, tokenizers, templates, code)"))
        return
    if info.st_size > MAX_COMPANION_BYTES:
        report.skipped.append((relative, f"{info.st_size} bytes, over the {MAX_COMPANION_BYTES} byte limit"))
        return
    if entry.name == "config.json" and depth == 0 and dtype_name:
        target.write_text(_config_with_dtype(real, dtype_name))
    else:
        shutil.copyfile(real, target)
    report.copied.append(relative)


def _config_with_dtype(config: Path, dtype_name: str) -> str:
    doc = read_json_object(config)
    for name in CONFIG_DTYPE_FIELDS:
        if name in doc:
            doc[name] = dtype_name
    return json.dumps(doc, indent=2) + "\n"


def update_config(dest: Path, fields: dict, remove: tuple[str, ...] = ()) -> None:
    """Set (and ``remove``) fields of a copied ``config.json`` (``vocab_size`` after vocabulary surgery, a
    dequantized model's ``quantization_config``)."""
    path = dest / "config.json"
    if path.exists():
        doc = read_json_object(path)
        doc.update(fields)
        for name in remove:
            doc.pop(name, None)
        path.write_text(json.dumps(doc, indent=2) + "\n")


def read_config_field(dest: Path, name: str) -> Any:
    """A field of a copied ``config.json`` (None without the file or the field)."""
    path = dest / "config.json"
    return read_json_object(path).get(name) if path.exists() else None


def layer_config(folder: Path, layers: list[tuple[Path | None, int]]) -> dict:
    """The ``config.json`` fields of a model whose blocks are ``layers`` (each: its model's folder, its block).

    ``num_hidden_layers`` becomes their count, and every per-layer list of the config (a list as long as
    the model has blocks: ``layer_types``, sliding-window or rope patterns, per-layer sizes) takes, for
    each block, the entry of the model and block it came from (the copied config's own entry when that
    model has no such list).
    """
    own = _config(folder)
    count = own.get("num_hidden_layers")
    fields: dict = {"num_hidden_layers": len(layers)}
    if not isinstance(count, int) or count < 2:
        return fields
    configs = {source: _config(source) for source in {source for source, _ in layers if source is not None}}
    for name, value in own.items():
        if isinstance(value, list) and len(value) == count:
            fields[name] = [_entry(configs.get(source, own), name, block, value) for source, block in layers]
    return fields


def _config(folder: Path | None) -> dict:
    path = folder / "config.json" if folder is not None else None
    return read_json_object(path) if path is not None and path.exists() else {}


def _entry(config: dict, name: str, block: int, fallback: list) -> object:
    listed = config.get(name)
    if isinstance(listed, list) and len(listed) == config.get("num_hidden_layers") and block < len(listed):
        return listed[block]
    return fallback[block] if block < len(fallback) else fallback[-1]


def _upstream(nodes: dict, name: str) -> set[str]:
    """The node ``name`` and every node it reads from: the operators that made one output."""
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in found or current not in nodes:
            continue
        found.add(current)
        for ref in (nodes[current].get("inputs") or {}).values():
            todo.extend([ref] if isinstance(ref, str) else ref)
    return found


def model_card(resolved_recipe: dict, recipe_sha256: str, output_index: int, fingerprints: dict[str, str],
               version: str, notes: list[str] = ()) -> str:
    """A deterministic README.md: what was merged, from which inputs, by which recipe (no times, no hosts)."""
    out = resolved_recipe["outputs"][output_index]
    node = out["from"]
    ops = sorted({resolved_recipe["nodes"][name]["op"] for name in _upstream(resolved_recipe["nodes"], node)})
    front = {"library_name": "transformers", "tags": ["mergebench", "merge", *ops]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Merged with mergebench {version}",
        "",
        f"This checkpoint is output {output_index} of the recipe below (node `{node}`), produced by streaming its "
        f"inputs tensor by tensor.",
        "",
        "## Inputs",
        "",
        "| model | path | fingerprint (sha256 of headers and sampled data) |",
        "|---|---|---|",
        *(f"| {name} | `{resolved_recipe['models'][name]}` | `{fp}` |" for name, fp in fingerprints.items()),
        "",
        *(line for note in notes for line in (note, "")),
        "## Recipe",
        "",
        f"sha256 of the resolved recipe: `{recipe_sha256}`",
        "",
        "```yaml",
        yaml.safe_dump(resolved_recipe, sort_keys=True).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
