"""GGUF files (llama.cpp's format) as checkpoints: each tensor dequantized as the stream reaches it, under
its Hugging Face name.

The ``gguf`` package reads the file (memory-mapped) and dequantizes every type it knows (F32, F16,
BF16, Q8_0, Q4_0/1, Q5_0/1 and the K-quants). Names follow llama.cpp's conversion backwards for the
architectures whose Hugging Face layout is the Llama one: ``llama`` (Llama, Mistral), ``mistral``,
``qwen2`` and ``gemma``. llama.cpp permutes the rows of a Llama model's query and key projections for
its rotary layout; they are permuted back here (as ``transformers`` does when it loads a GGUF file), so
the tensors equal ``transformers``' dequantized model bit for bit. For Gemma, whose RMSNorm scales by
1 + w, llama.cpp stores every ``norm.weight`` plus 1 (``GemmaModel`` in ``convert_hf_to_gguf.py``);
the 1 is taken off again. The file carries no ``config.json``
or tokenizer folder: an output takes its companion files from a Hugging Face folder
(``copy_files_from``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import OneFileIdentity
from mergebench.io.safetensors_format import TensorInfo
from mergebench.value_types import CHECKPOINT

ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma")
PERMUTED = ("llama", "mistral")  # query and key rows permuted by llama.cpp's converter
NORM_OFFSET = {"gemma": 1.0}  # added to every norm weight by llama.cpp's converter
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_OUTSIDE = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = ("rope_freqs",)  # derived from the config by transformers, not a weight
_NATIVE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_name(name: str) -> str | None:
    """The Hugging Face key of a GGUF tensor (``blk.3.attn_q.weight``: ``model.layers.3.self_attn.q_proj.weight``)."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match[2] in _BLOCK:
        return f"model.layers.{match[1]}.{_BLOCK[match[2]]}.{match[3]}"
    stem, _, kind = name.rpartition(".")
    return f"{_OUTSIDE[stem]}.{kind}" if stem in _OUTSIDE else None


class GGUFCheckpoint(OneFileIdentity):
    """A ``.gguf`` file read tensor by tensor; ``info`` gives each tensor's dequantized dtype and shape."""

    value_type = CHECKPOINT
    folder = None

    def __init__(self, path: str | os.PathLike[str]):
        try:
            import gguf
        except ImportError:
            raise MergebenchError(f"{path}: reading GGUF needs the gguf package (pip install gguf)") from None
        self._gguf = gguf
        self.path = Path(path)
        self.label = str(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, KeyError, IndexError) as exc:
            raise MergebenchError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in ARCHITECTURES:
            raise MergebenchError(f"{self.path}: GGUF architecture '{self.architecture}' is not read (mergebench maps "
                                  f"{', '.join(ARCHITECTURES)} to Hugging Face names)")
        self.heads = int(self._field(f"{self.architecture}.attention.head_count"))
        self.kv_heads = int(self._field(f"{self.architecture}.attention.head_count_kv", self.heads))
        self._tensors: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            key = hf_name(tensor.name)
            if key is None:
                if tensor.name.split(".")[0] in _SKIPPED:
                    continue
                raise MergebenchError(f"{self.path}: tensor '{tensor.name}' has no Hugging Face name in the "
                                      f"{self.architecture} layout")
            self._tensors[key] = tensor
        self.reads: dict[str, int] = {}

    def _field(self, name: str, default: Any = None) -> Any:
        field = self._reader.fields.get(name)
        if field is None:
            if default is None:
                raise MergebenchError(f"{self.path}: GGUF metadata has no '{name}'")
            return default
        value = field.parts[field.data[0]]
        return bytes(value).decode() if field.types[0] == self._gguf.GGUFValueType.STRING else value[0]

    @property
    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        tensor = self._tensors[key]
        dtype = _NATIVE.get(tensor.tensor_type.name, torch.float32)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        return TensorInfo(key, dtype, shape, self.path, int(tensor.data_offset),
                          int(np.prod(shape)) * dtype.itemsize)

    def read(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key]
        shape = self.info(key).shape
        self.reads[key] = self.reads.get(key, 0) + 1
        name = tensor.tensor_type.name
        if name in _NATIVE:
            data = torch.from_numpy(np.array(tensor.data)).view(_NATIVE[name]) if name == "BF16" else \
                torch.from_numpy(np.array(tensor.data))
        else:
            data = torch.from_numpy(self._gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        data = data.reshape(shape)
        if self.architecture in PERMUTED and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            data = _unpermute(data, self.heads if "q_proj" in key else self.kv_heads)
        if self.architecture in NORM_OFFSET and key.endswith("norm.weight"):
            data = data - NORM_OFFSET[self.architecture]
        return data.contiguous()



def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation: rows (head, pair, half) back to (head, half, pair)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
