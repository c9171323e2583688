"""The safetensors file layout, read and written by hand.

We parse headers ourselves (rather than through ``safe_open``) so that every claim a file makes is
checked before a byte of tensor data is trusted, and so tensors can be read with ``pread`` into
buffers we own: no mmap page faults counted as RSS, no whole-file mapping.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mergebench.errors import MergebenchError
from mergebench.io.reading import require_regular_file

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without touching any other tensor."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None  # None for tensors held in memory
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    raw: bytes  # the JSON bytes as stored, for fingerprints


def read_header(path: Path) -> Header:
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
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in doc.items():
        tensors[key] = _tensor_info(path, key, entry, data_start, data_len)
        begin, end = entry["data_offsets"]
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise MergebenchError(f"{path}: tensors '{key_a}' and '{key_b}' overlap")
    return Header(tensors=tensors, metadata=dict(metadata), raw=bytes(raw))


def _tensor_info(path: Path, key: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise MergebenchError(f"{path}: tensor '{key}' has a malformed header entry")
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise MergebenchError(f"{path}: tensor '{key}' has unsupported dtype '{entry['dtype']}'")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise MergebenchError(f"{path}: tensor '{key}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise MergebenchError(f"{path}: tensor '{key}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise MergebenchError(f"{path}: tensor '{key}' lies outside the file (offsets {begin}..{end})")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise MergebenchError(
            f"{path}: tensor '{key}' holds {end - begin} bytes but shape {shape} of {entry['dtype']} needs {expected}"
        )
    return TensorInfo(key, dtype, tuple(shape), path, data_start + begin, end - begin)


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out back to back in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the reference writer does, so the
    data section starts aligned.
    """
    doc: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        doc[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
