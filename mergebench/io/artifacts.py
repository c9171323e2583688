"""Masks and sparse deltas as files: small, typed, safetensors underneath (semantics §6.5).

A *Mask* file holds, per key, the row-major flattened boolean mask packed 8 to a byte
(``mask/K``, uint8, ``numpy.packbits`` big-endian bit order). A *SparseDelta* file holds, per key,
strictly increasing row-major flat indices (``sparse/K/indices``, int64) and their values
(``sparse/K/values``, float32). Shapes and provenance live in the header metadata (``shape/K`` as JSON,
``format``, ``base_model``, ``created_by``, ...). Keys an artifact does not list are all-False / zero.

In a recipe an artifact is a model like any other; its type (Mask or SparseDelta) comes from the
``format`` in its header, and each key reads back as a dense bool mask or float32 delta.

An *Activations* file holds, per layer of a chain, what that layer output on inputs shared by the
models being aligned (``activations/LAYER``, float32 ``[samples, neurons]``; mergebench.io.activations
records them). As a source it lists each under the layer's weight key (``LAYER.weight``), so the
alignment planning pass sees a layer's activations beside its weights. *Gram* (``gram/LAYER``, the
``[in, in]`` XᵀX of a linear layer's inputs, under ``LAYER.weight``) and *Fisher* files (``fisher/K``,
a parameter's diagonal Fisher, under ``K``) are recorded statistics stored the same way
(mergebench.io.statistics).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Checkpoint, OneFileIdentity
from mergebench.io.kinds import ARTIFACT_FORMATS, ARTIFACT_TYPES
from mergebench.io.output_guard import check_may_replace
from mergebench.io.safetensors_format import TensorInfo, encode_header
from mergebench.io.safetensors_header import parse_header
from mergebench.surgery.layers import BlockIndex
from mergebench.value_types import ACTIVATIONS, DENSE_STATISTICS, FISHER, GRAM, MASK


class ArtifactSource(OneFileIdentity):
    """A Mask or SparseDelta file seen as a source: ``read(key)`` gives the dense bool mask or float32 delta."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.label = str(path)
        self.folder = None
        self._file = Checkpoint(self.path)
        metadata = parse_header(self.path).metadata
        self.value_type = ARTIFACT_TYPES.get(metadata.get("format", ""))
        if self.value_type is None:
            raise MergebenchError(f"{self.path}: not a mergebench mask, sparse delta, activations, Fisher or Gram file")
        self.metadata = metadata
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._stored: dict[str, str] = {}  # model key -> tensor name, for dense statistics
        if self.value_type in DENSE_STATISTICS:
            prefix, suffix = DENSE_STATISTICS[self.value_type]
            for name in self._file.keys:
                info = self._file.info(name)
                if not name.startswith(prefix) or not info.is_floating or not _dense_shape_ok(self.value_type,
                                                                                              info.shape):
                    raise MergebenchError(f"{self.path}: '{name}' is not {prefix}NAME {DENSE_SHAPES[self.value_type]}")
                key = (name[len(prefix):] + suffix).lstrip(".")  # a model that is one layer: 'weight'
                self._shapes[key] = info.shape
                self._stored[key] = name
        stored = set(self._file.keys)
        for name, value in metadata.items():
            if name.startswith("shape/"):
                key = name[len("shape/"):]
                self._shapes[key] = _stored_shape(self.path, name, value)
                needed = [f"mask/{key}"] if self.value_type == MASK else [f"sparse/{key}/indices",
                                                                         f"sparse/{key}/values"]
                missing = [n for n in needed if n not in stored]
                if missing:
                    raise MergebenchError(f"{self.path}: metadata {name} has no tensor '{missing[0]}'")
                if self.value_type == MASK:
                    packed = self._file.info(f"mask/{key}")
                    bits = math.prod(self._shapes[key])
                    if packed.dtype != torch.uint8 or math.prod(packed.shape) != (bits + 7) // 8:
                        raise MergebenchError(f"{self.path}: 'mask/{key}' holds {math.prod(packed.shape)} "
                                              f"{packed.dtype} values, where shape {list(self._shapes[key])} needs "
                                              f"{(bits + 7) // 8} packed bytes")
        self.reads = self._file.reads

    @property
    def keys(self) -> list[str]:
        return list(self._shapes)

    def info(self, key: str) -> TensorInfo:
        dtype = torch.bool if self.value_type == MASK else torch.float32
        shape = self._shapes[key]
        return TensorInfo(key, dtype, shape, None, 0, math.prod(shape) * dtype.itemsize)

    def read(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        numel = math.prod(shape)
        if self.value_type in DENSE_STATISTICS:
            return self._file.read(self._stored[key]).to(torch.float32)
        if self.value_type == MASK:
            packed = self._file.read(f"mask/{key}").numpy()
            bits = np.unpackbits(packed, count=numel, bitorder="big")
            return torch.from_numpy(bits.astype(bool)).reshape(shape)
        indices = self._file.read(f"sparse/{key}/indices")
        values = self._file.read(f"sparse/{key}/values").to(torch.float32)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise MergebenchError(f"{self.path}: indices of '{key}' fall outside its shape {list(shape)}")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[indices] = values
        return dense.reshape(shape)

    def stored_entries(self, key: str) -> int:
        """How many entries of a key the file stores (set bits of a mask, indices of a sparse delta)."""
        if self.value_type in DENSE_STATISTICS:
            return math.prod(self._shapes[key])
        if self.value_type == MASK:
            return int(self.read(key).sum())
        return self._file.info(f"sparse/{key}/indices").numel



@dataclass(frozen=True)
class _Entry:
    key: str  # the model key it belongs to (a layer, for activations)
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # where its bytes are in the side file
    nbytes: int


DENSE_SHAPES = {ACTIVATIONS: "of shape [samples, neurons]", GRAM: "of shape [in, in]", FISHER: "(float)"}


def _dense_shape_ok(value_type: str, shape: tuple[int, ...]) -> bool:
    if value_type == ACTIVATIONS:
        return len(shape) == 2
    if value_type == GRAM:
        return len(shape) == 2 and shape[0] == shape[1]
    return True


MAX_ARTIFACT_ELEMENTS = 2**40  # far beyond any real tensor, well inside int64 arithmetic


def _stored_shape(path: Path, name: str, value: object) -> tuple[int, ...]:
    """A shape from an artifact's metadata: a JSON list of non-negative integers of sane total size."""
    try:
        dims = json.loads(value) if isinstance(value, str) else None
    except (ValueError, RecursionError):
        dims = None
    if not (isinstance(dims, list) and len(dims) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)):
        raise MergebenchError(f"{path}: metadata {name} is not a shape (a list of non-negative integers): "
                              f"{str(value)[:80]!r}")
    extent = math.prod(d for d in dims if d)  # zeros aside: the strides must fit too
    if extent > MAX_ARTIFACT_ELEMENTS:
        raise MergebenchError(f"{path}: metadata {name} claims {extent} elements, more than any tensor")
    return tuple(dims)


class ArtifactWriter:
    """Writes an artifact whose tensor sizes are known only as they come: data to a side file, header last.

    Keys may come in any order (compute threads hand each on as it is done); the file lists them in
    ``key_order`` (others after, as they came), so its bytes do not depend on timing. The file
    appears at ``path`` by one rename once complete, like a checkpoint folder.
    """

    def __init__(self, path: Path, value_type: str, metadata: dict[str, str], key_order: Iterable[str] = ()):
        self.path = path
        self.value_type = value_type
        # an adapter's weights are a plain PyTorch safetensors file, as PEFT writes it
        self.metadata = {**metadata, "format": ARTIFACT_FORMATS.get(value_type, "pt")}
        self.partial = path.with_name(path.name + ".partial")
        self._assembled = self.partial  # where finish_weights puts the file (a subclass may put it in a folder)
        self._data_path = path.with_name(path.name + ".partial-data")
        self._rank = {key: i for i, key in enumerate(key_order)}
        self._entries: list[_Entry] = []
        self._shapes: dict[str, str] = {}
        self._data_bytes = 0
        self.stored = 0  # entries kept (set bits or indices)
        self.dense_bytes = 0  # what the same keys take as dense float32 tensors
        path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in finish/abort
        self._finished_elsewhere = False

    def finished_elsewhere(self) -> None:
        """Another process (a Ray task) wrote and finished this artifact's partial file; only commit is left."""
        self._data.close()
        self._finished_elsewhere = True

    def write(self, key: str, value: torch.Tensor) -> int:
        if self.value_type in DENSE_STATISTICS:  # ``key`` names the statistic (a layer); the values are kept as is
            prefix = DENSE_STATISTICS[self.value_type][0]
            return self._add(key, f"{prefix}{key}", value.detach().to("cpu", torch.float32))
        flat = value.detach().to("cpu").reshape(-1)
        self._shapes[key] = json.dumps(list(value.shape))
        self.dense_bytes += flat.numel() * 4
        if self.value_type == MASK:
            packed = np.packbits(flat.to(torch.bool).numpy(), bitorder="big")
            self.stored += int(flat.to(torch.bool).sum())
            return self._add(key, f"mask/{key}", torch.from_numpy(packed))
        indices = torch.nonzero(flat, as_tuple=True)[0].to(torch.int64)
        self.stored += indices.numel()
        return (self._add(key, f"sparse/{key}/indices", indices)
                + self._add(key, f"sparse/{key}/values", flat[indices].to(torch.float32)))

    def _add(self, key: str, name: str, tensor: torch.Tensor) -> int:
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._data.write(data)
        self._entries.append(_Entry(key, name, tensor.dtype, tuple(tensor.shape), self._data_bytes, len(data)))
        self._data_bytes += len(data)
        return len(data)

    done: frozenset[str] = frozenset()  # nothing to resume: an artifact is cheap to recompute
    shards = (None,)  # one file

    def finish_weights(self) -> None:
        self._data.close()
        if self._finished_elsewhere:
            return

        def rank(key: str) -> int:
            return self._rank.get(key, len(self._rank))  # a stable sort keeps the rest as they came

        entries = sorted(self._entries, key=lambda entry: rank(entry.key))
        metadata = {**self.metadata, **{f"shape/{key}": self._shapes[key] for key in sorted(self._shapes, key=rank)}}
        with open(self._assembled, "wb") as out, open(self._data_path, "rb") as data:
            out.write(encode_header([(e.name, e.dtype, e.shape) for e in entries], metadata))
            for entry in entries:
                data.seek(entry.offset)
                for start in range(0, entry.nbytes, 1 << 24):
                    out.write(data.read(min(1 << 24, entry.nbytes - start)))
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()

    def prepare(self) -> None:
        """Nothing left to make durable: ``finish_weights`` wrote and fsynced the whole file."""

    def commit(self, replace: bool) -> None:
        check_may_replace(self.path, replace, artifact=True)
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._data.close()
        for leftover in (self._data_path, self.partial):
            leftover.unlink(missing_ok=True)

    close = abort


def describe(source: ArtifactSource) -> list[tuple[str, int, int]]:
    """(stack/block label, stored entries, elements) per block of an artifact, blocks in order."""
    blocks = BlockIndex(source.keys)
    rows: dict[str, list[int]] = {}
    for key in source.keys:
        position = blocks.position(key)
        label = "outside blocks" if position is None else f"block {position[0]}"
        entry = rows.setdefault(label, [0, 0])
        entry[0] += source.stored_entries(key)
        entry[1] += math.prod(source.info(key).shape)
    return [(label, stored, total) for label, (stored, total) in rows.items()]


def mask_overlap(sources: Iterable[ArtifactSource]) -> dict[str, dict[str, float]]:
    """Jaccard |A∩B|/|A∪B| of every pair of masks, per block and overall (the paper's task-similarity proxy)."""
    masks = list(sources)
    for mask in masks:
        if mask.value_type != MASK:
            raise MergebenchError(f"{mask.label}: not a mask")
    keys = sorted(set().union(*(m.keys for m in masks)))
    blocks = BlockIndex(keys)
    report: dict[str, dict[str, float]] = {}
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            counts: dict[str, list[int]] = {}
            for key in keys:
                position = blocks.position(key)
                label = "outside blocks" if position is None else f"block {position[0]}"
                ma = a.read(key) if key in a.keys else None
                mb = b.read(key) if key in b.keys else None
                if ma is None and mb is None:
                    continue
                ma = torch.zeros_like(mb) if ma is None else ma
                mb = torch.zeros_like(ma) if mb is None else mb
                for name in (label, "overall"):
                    entry = counts.setdefault(name, [0, 0])
                    entry[0] += int((ma & mb).sum())
                    entry[1] += int((ma | mb).sum())
            pair = f"{Path(a.label).name} ~ {Path(b.label).name}"
            report[pair] = {name: (inter / union if union else 0.0) for name, (inter, union) in
                            sorted(counts.items(), key=lambda item: _block_order(item[0]))}
    return report


def _block_order(label: str) -> tuple[int, int]:
    match = re.fullmatch(r"block (\d+)", label)
    return (0, int(match.group(1))) if match else (1 if label == "outside blocks" else 2, 0)


def save_artifact(values: dict[str, torch.Tensor], path: str | os.PathLike[str], value_type: str,
                  metadata: dict[str, str] | None = None, force: bool = False) -> Path:
    """Write a dict of masks (bool) or dense deltas (zeros are not stored) as an artifact file.

    ``metadata`` values must be strings, as the safetensors format requires of its metadata."""
    odd = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if odd:
        raise MergebenchError(f"{path}: metadata '{odd[0]}' is not a string (safetensors metadata maps strings "
                              f"to strings)")
    writer = ArtifactWriter(Path(path), value_type, {"created_by": "mergebench", **(metadata or {})})
    try:
        for key, value in values.items():
            writer.write(key, value)
        writer.finish_weights()
        writer.commit(force)
    except BaseException:
        writer.abort()
        raise
    return Path(path)


def load_artifact(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every key of a mask or sparse-delta file, dense (bool masks, float32 deltas)."""
    source = ArtifactSource(path)
    return {key: source.read(key) for key in source.keys}
