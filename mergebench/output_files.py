"""Everything in an output folder besides the weights: the model's own files and the model card.

The output must load the way its source model did, so tokenizer, generation config, chat template
and sentence-transformers modules come along; ``config.json`` changes only in its dtype field.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import yaml

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.index.json", "README.md")
CONFIG_DTYPE_FIELDS = ("torch_dtype", "dtype")


def copy_model_files(source: Path, dest: Path, dtype_name: str | None) -> list[str]:
    """Copy every non-weight file and folder of ``source`` into ``dest``; returns the names copied."""
    copied = []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or any(fnmatch.fnmatch(entry.name, p) for p in WEIGHT_PATTERNS):
            continue
        target = dest / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, ignore=shutil.ignore_patterns(*WEIGHT_PATTERNS))
        elif entry.name == "config.json" and dtype_name:
            target.write_text(_config_with_dtype(entry, dtype_name))
        else:
            shutil.copyfile(entry, target)
        copied.append(entry.name)
    return copied


def _config_with_dtype(config: Path, dtype_name: str) -> str:
    doc = json.loads(config.read_text())
    for name in CONFIG_DTYPE_FIELDS:
        if name in doc:
            doc[name] = dtype_name
    return json.dumps(doc, indent=2) + "\n"


def update_config(dest: Path, fields: dict) -> None:
    """Set fields of a copied ``config.json`` (e.g. ``vocab_size`` after vocabulary surgery)."""
    path = dest / "config.json"
    if path.exists():
        doc = json.loads(path.read_text())
        doc.update(fields)
        path.write_text(json.dumps(doc, indent=2) + "\n")


def model_card(resolved_recipe: dict, recipe_sha256: str, output_index: int, fingerprints: dict[str, str],
               version: str, notes: list[str] = ()) -> str:
    """A deterministic README.md: what was merged, from which inputs, by which recipe (no times, no hosts)."""
    out = resolved_recipe["outputs"][output_index]
    node = out["from"]
    ops = sorted({spec["op"] for spec in resolved_recipe["nodes"].values()})
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
