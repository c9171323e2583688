"""Opening an input by its path: the one place that knows every kind of source.

A path is a mask or sparse-delta artifact (told by its metadata), a GGUF file, a PEFT adapter folder,
safetensors weights (a file, a folder or a sharded index; FP8 with block scales dequantized), or — only
when allowed and nothing else is there — pickled weights; weights with an adapter applied are a
checkpoint too. The engine,
the CLI and the analyses open inputs here and see them through ``Source`` alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.io.adapters import AdaptedCheckpoint, AdapterSource, is_adapter
from mergebench.io.artifacts import ArtifactSource, artifact_type
from mergebench.io.checkpoint import Checkpoint, PickledCheckpoint, Source, _pickled_files
from mergebench.io.fp8 import FP8BlockCheckpoint, has_block_scales
from mergebench.io.gguf_source import GGUFCheckpoint

__all__ = ["Source", "open_source"]


def open_source(path: str | os.PathLike[str], allow_pickle: bool = False,
                adapter: str | os.PathLike[str] | None = None) -> Source:
    """A source for ``path``: a mask or sparse-delta artifact, an adapter, safetensors weights, or (only
    when allowed and nothing else is there) pickled weights; with ``adapter`` applied, if given."""
    path = Path(path)
    if adapter is not None:
        return AdaptedCheckpoint(open_source(path, allow_pickle), adapter)
    if artifact_type(path):
        return ArtifactSource(path)
    if path.suffix == ".gguf" and path.is_file():
        return GGUFCheckpoint(path)
    if path.is_dir() and is_adapter(path):
        return AdapterSource(path)
    if allow_pickle and path.exists():
        has_safetensors = path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))
        if not has_safetensors and (path.is_file() or _pickled_files(path)):
            return PickledCheckpoint(path)
    checkpoint = Checkpoint(path)
    return FP8BlockCheckpoint(checkpoint) if has_block_scales(checkpoint) else checkpoint
