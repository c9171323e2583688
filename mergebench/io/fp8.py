"""FP8 checkpoints with block scales (DeepSeek-V3's layout, ``quant_method: fp8``) dequantized on read.

Each quantized weight ``K.weight`` is stored as float8 (e4m3) beside ``K.weight_scale_inv``, one float32
scale per block of ``weight_block_size`` (default 128 × 128) entries: W = float(W_fp8) · scale of its
block. The source lists the weights under their own names, dequantized to bfloat16 (the dtype the
reference conversion writes; operators compute in float32 from it as from any bf16 weight), and hides
the scales. An output's ``config.json`` loses the ``quantization_config``: it is no longer quantized.
"""

from __future__ import annotations

import math

import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Checkpoint, InnerIdentity
from mergebench.io.kinds import SCALE_SUFFIX
from mergebench.io.reading import read_json_object
from mergebench.io.safetensors_format import TensorInfo

DEQUANTIZED = torch.bfloat16
DEFAULT_BLOCK = (128, 128)


class FP8BlockCheckpoint(InnerIdentity):
    """A safetensors checkpoint whose float8 weights read dequantized by their block scales."""

    mappable = False  # dequantized tensors are computed, not seen in the file

    def __init__(self, inner: Checkpoint):
        self.inner = inner
        self.label, self.folder, self.value_type = inner.label, inner.folder, inner.value_type
        self.block = self._block_size()
        self._scales = {key.removesuffix(SCALE_SUFFIX): key for key in inner.keys if key.endswith(SCALE_SUFFIX)}
        stored = set(inner.keys)
        for weight, scale in self._scales.items():
            if weight not in stored:
                raise MergebenchError(f"{inner.label}: '{scale}' scales '{weight}', which is not there")
            rows, cols = inner.info(weight).shape[-2:]
            expected = (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
            if tuple(inner.info(scale).shape) != expected:
                raise MergebenchError(f"{inner.label}: '{scale}' is {list(inner.info(scale).shape)}, where "
                                      f"'{weight}' {[rows, cols]} in blocks of {list(self.block)} needs "
                                      f"{list(expected)}")
        self._keys = [key for key in inner.keys if not key.endswith(SCALE_SUFFIX)]

    def _block_size(self) -> tuple[int, int]:
        config_path = self.inner.folder / "config.json" if self.inner.folder else None
        if config_path is None or not config_path.is_file():
            return DEFAULT_BLOCK
        quantization = read_json_object(config_path, "model config").get("quantization_config") or {}
        block = quantization.get("weight_block_size") or DEFAULT_BLOCK
        if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                            for b in block)):
            raise MergebenchError(f"{config_path}: quantization_config.weight_block_size {block!r} is not two "
                                  f"positive integers")
        return int(block[0]), int(block[1])

    @property
    def keys(self) -> list[str]:
        return self._keys

    def info(self, key: str) -> TensorInfo:
        info = self.inner.info(key)
        if key not in self._scales:
            return info
        return TensorInfo(key, DEQUANTIZED, info.shape, info.file, info.offset, info.numel * DEQUANTIZED.itemsize)

    def read(self, key: str) -> torch.Tensor:
        if key not in self._scales:
            return self.inner.read(key)
        weight = self.inner.read(key).float()
        scale = self.inner.read(self._scales[key]).float()
        rows, cols = weight.shape[-2:]
        expanded = scale.repeat_interleave(self.block[0], 0)[:rows].repeat_interleave(self.block[1], 1)[:, :cols]
        return (weight * expanded).to(DEQUANTIZED)

