"""The safetensors header, parsed and checked without torch (``mergebench inspect`` lists a checkpoint with it).

Every claim a header makes is checked before a byte of tensor data is trusted: a JSON object within the
file, dtypes known, shapes and offsets consistent with each other and the file's size, no overlaps.
``safetensors_format.tensor_info`` turns what this finds into a torch-typed ``TensorInfo``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.io.reading import require_regular_file

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name: (torch's name for it, bytes per entry)
DTYPE_INFO: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "U16": ("uint16", 2),
    "U32": ("uint32", 4), "U64": ("uint64", 8),
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its header describes it: dtype by its safetensors name, absolute byte offset."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]


def parse_header(path: Path) -> Header:
    """Parse and validate a safetensors header; every inconsistency is an error naming the file."""
    require_regular_file(path, "safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise MergebenchError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise MergebenchError(
                f"{path}: header claims {header_len} bytes but the file holds {size} (corrupt or not safetensors)"
            )
        raw = f.read(header_len)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergebenchError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise MergebenchError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergebenchError(f"{path}: __metadata__ is not an object of strings")
    tensors: dict[str, StoredTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in doc.items():
        tensors[key] = _stored_tensor(path, key, entry, data_start, data_len)
        begin, end = entry["data_offsets"]
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise MergebenchError(f"{path}: tensors '{key_a}' and '{key_b}' overlap")
    return Header(tensors=tensors, metadata=dict(metadata))


def _stored_tensor(path: Path, key: str, entry: object, data_start: int, data_len: int) -> StoredTensor:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise MergebenchError(f"{path}: tensor '{key}' has a malformed header entry")
    if entry["dtype"] not in DTYPE_INFO:
        raise MergebenchError(f"{path}: tensor '{key}' has unsupported dtype '{entry['dtype']}'")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise MergebenchError(f"{path}: tensor '{key}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise MergebenchError(f"{path}: tensor '{key}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise MergebenchError(f"{path}: tensor '{key}' lies outside the file (offsets {begin}..{end})")
    expected = math.prod(shape) * DTYPE_INFO[entry["dtype"]][1]
    if end - begin != expected:
        raise MergebenchError(
            f"{path}: tensor '{key}' holds {end - begin} bytes but shape {shape} of {entry['dtype']} needs {expected}"
        )
    return StoredTensor(key, entry["dtype"], tuple(shape), path, data_start + begin, end - begin)
