"""What kind of input a path is, told from its name, its folder and its headers alone (no torch).

``open_source`` builds a source of the kind this names; ``mergebench inspect`` lists plain safetensors
weights from their headers without importing torch, and opens everything else as a source.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from mergebench.io.safetensors_header import parse_header
from mergebench.io.weight_files import pickled_files
from mergebench.value_types import ACTIVATIONS, FISHER, GRAM, MASK, SPARSE_DELTA

ARTIFACT_FORMATS = {MASK: "mergebench.mask/1", SPARSE_DELTA: "mergebench.sparse_delta/1",
                    ACTIVATIONS: "mergebench.io.activations/1", FISHER: "mergebench.fisher/1",
                    GRAM: "mergebench.gram/1"}
ARTIFACT_TYPES = {name: value_type for value_type, name in ARTIFACT_FORMATS.items()}
ADAPTER_CONFIG = "adapter_config.json"
SCALE_SUFFIX = "_scale_inv"  # FP8 weights' block scales: ``W_scale_inv`` beside ``W``

Kind = Literal["artifact", "gguf", "adapter", "pickled", "safetensors"]


def artifact_type(path: str | os.PathLike[str]) -> str | None:
    """Mask or SparseDelta (or another artifact type) when ``path`` is a mergebench artifact file, else None."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    return ARTIFACT_TYPES.get(parse_header(path).metadata.get("format", ""))


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def has_block_scales(keys: Iterable[str]) -> bool:
    """Whether safetensors weights are FP8 with block scales (read dequantized)."""
    return any(key.endswith(SCALE_SUFFIX) for key in keys)


def source_kind(path: str | os.PathLike[str], allow_pickle: bool = False) -> Kind:
    """An artifact (told by its metadata), a GGUF file, a PEFT adapter folder, pickled weights (only when
    allowed and no safetensors are there), or else safetensors weights (a file, a folder or an index)."""
    path = Path(path)
    if artifact_type(path):
        return "artifact"
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if path.is_dir() and is_adapter(path):
        return "adapter"
    if allow_pickle and path.exists():
        has_safetensors = path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))
        if not has_safetensors and (path.is_file() or pickled_files(path)):
            return "pickled"
    return "safetensors"
