"""Opening an input by its path: the one place that knows every kind of source.

A path is a mask or sparse-delta artifact (told by its metadata), safetensors weights (a file, a folder
or a sharded index), or — only when allowed and nothing else is there — pickled weights. The engine,
the CLI and the analyses open inputs here and see them through ``Source`` alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.io.artifacts import ArtifactSource, artifact_type
from mergebench.io.checkpoint import Checkpoint, PickledCheckpoint, Source, _pickled_files

__all__ = ["Source", "open_source"]


def open_source(path: str | os.PathLike[str], allow_pickle: bool = False) -> Source:
    """A source for ``path``: a mask or sparse-delta artifact, safetensors weights, or (only when allowed
    and nothing else is there) pickled weights."""
    path = Path(path)
    if artifact_type(path):
        return ArtifactSource(path)
    if allow_pickle and path.exists():
        has_safetensors = path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))
        if not has_safetensors and (path.is_file() or _pickled_files(path)):
            return PickledCheckpoint(path)
    return Checkpoint(path)
