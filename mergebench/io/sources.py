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

from mergebench.io.adapters import AdaptedCheckpoint, AdapterSource
from mergebench.io.artifacts import ArtifactSource
from mergebench.io.checkpoint import Checkpoint, PickledCheckpoint, Source
from mergebench.io.fp8 import FP8BlockCheckpoint
from mergebench.io.gguf_source import GGUFCheckpoint
from mergebench.io.kinds import has_block_scales, source_kind

__all__ = ["Source", "open_source"]


def open_source(path: str | os.PathLike[str], allow_pickle: bool = False,
                adapter: str | os.PathLike[str] | None = None) -> Source:
    """A source for ``path``: a mask or sparse-delta artifact, an adapter, safetensors weights, or (only
    when allowed and nothing else is there) pickled weights; with ``adapter`` applied, if given."""
    path = Path(path)
    if adapter is not None:
        return AdaptedCheckpoint(open_source(path, allow_pickle), adapter)
    kind = source_kind(path, allow_pickle)
    if kind == "artifact":
        return ArtifactSource(path)
    if kind == "gguf":
        return GGUFCheckpoint(path)
    if kind == "adapter":
        return AdapterSource(path)
    if kind == "pickled":
        return PickledCheckpoint(path)
    checkpoint = Checkpoint(path)
    return FP8BlockCheckpoint(checkpoint) if has_block_scales(checkpoint.keys) else checkpoint
