"""Write a sharded safetensors checkpoint whose layout is fixed before the first tensor is computed.

Because every output shape and dtype is known from the plan, each shard's header is written up front
and its file preallocated; a tensor is written at its offset the moment it exists, so memory never
holds a shard. Everything goes to ``OUT.partial/``, which becomes ``OUT`` by one rename at the end:
an ``OUT`` that exists is always complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.safetensors_format import encode_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], shard_size: int) -> list[Shard]:
    """Fill shards in order, starting a new one when the next tensor would overflow (as transformers does)."""
    shards: list[Shard] = [Shard("")]
    for tensor in tensors:
        if shards[-1].tensors and shards[-1].nbytes + tensor.nbytes > shard_size:
            shards.append(Shard(""))
        shards[-1].tensors.append(tensor)
    if len(shards) == 1:
        shards[0].name = "model.safetensors"
    else:
        for i, shard in enumerate(shards, 1):
            shard.name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class CheckpointWriter:
    """Preallocated shards in ``OUT.partial``; ``write`` puts a tensor at its planned offset."""

    def __init__(self, out: Path, tensors: list[PlannedTensor], shard_size: int, metadata: dict[str, str]):
        self.out = out
        self.partial = partial_path(out)
        self.shards = plan_shards(tensors, shard_size)
        self._where: dict[str, tuple[int, int, PlannedTensor]] = {}
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self._fds: list[int] = []
        for shard in self.shards:
            header = encode_header([(t.key, t.dtype, t.shape) for t in shard.tensors], metadata)
            fd = os.open(self.partial / shard.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + shard.nbytes)
            offset = len(header)
            for t in shard.tensors:
                self._where[t.key] = (fd, offset, t)
                offset += t.nbytes

    def write(self, key: str, tensor: torch.Tensor) -> int:
        """Write one finished tensor (on the CPU, planned dtype and shape); returns the bytes written."""
        fd, offset, planned = self._where[key]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"'{key}': produced {tensor.dtype} {tuple(tensor.shape)}, planned {planned}")
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        return done

    def finish_weights(self) -> None:
        """fsync every shard and write the index (only when there are several shards, as HF does)."""
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.key: s.name for s in self.shards for t in s.tensors},
            }
            (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def commit(self, force: bool) -> None:
        """Make the output visible in one rename; an older ``OUT`` is replaced only with ``force``."""
        _fsync_tree(self.partial)
        if self.out.exists():
            if not force:
                raise MergebenchError(f"{self.out}: already exists (use --force to replace it)")
            old = self.out.with_name(self.out.name + ".old")
            os.replace(self.out, old)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.partial, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
