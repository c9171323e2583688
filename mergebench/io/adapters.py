"""PEFT LoRA adapters as sources: an adapter alone (an ``Adapter``), or applied to its base (a ``Checkpoint``).

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose keys are
``base_model.model.M.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` / ``_B`` for an
embedding) per target module ``M``, and whole tensors ``base_model.model.K`` for what it saves whole
(``modules_to_save``; ``M.base_layer.weight`` for an embedding saved beside its LoRA). Each module's
scale is PEFT's: ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), ``alpha_pattern`` and the rank
the tensors have taking precedence. Both sources list updates under the base model's keys
(``M.weight``), with the factors in the weight's stored orientation (mergebench.surgery.low_rank).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Checkpoint, Source, file_states, sampled_fingerprint
from mergebench.io.kinds import ADAPTER_CONFIG
from mergebench.io.reading import read_json_object
from mergebench.io.safetensors_format import TensorInfo
from mergebench.surgery.low_rank import LowRank
from mergebench.value_types import ADAPTER, CHECKPOINT

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?")
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)"}


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, refused with its file and key named when mergebench cannot apply it exactly."""
    path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise MergebenchError(f"{folder}: not a PEFT adapter (no {ADAPTER_CONFIG})")
    config = read_json_object(path, "adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise MergebenchError(f"{path}: peft_type '{config['peft_type']}': only LORA adapters are read")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise MergebenchError(f"{path}: {field} is set: {what} cannot be applied as a low-rank update")
    if config.get("target_parameters"):
        raise MergebenchError(f"{path}: target_parameters is set: adapters on bare parameters are not read")
    for field in ("r", "lora_alpha"):
        value = config.get(field, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise MergebenchError(f"{path}: '{field}' is {value!r}, not a positive number")
    for field in ("alpha_pattern", "rank_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise MergebenchError(f"{path}: '{field}' is not a mapping of module patterns to numbers")
    return config


@dataclass(frozen=True)
class _Module:
    """One LoRA module of an adapter file: its factor tensors' names, how to orient them, its scale."""

    down: str  # lora_A's tensor name
    up: str  # lora_B's
    embedding: bool  # an nn.Embedding (lora_embedding_A/B)
    transposed: bool  # fan_in_fan_out or an embedding: the stored weight is (B·A)ᵀ
    scale: float
    shape: tuple[int, ...]  # of the update, as the weight is stored


class AdapterFile:
    """The tensors of one adapter folder by the base key they change; headers and config read once."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.config = read_adapter_config(self.folder)
        weights = self.folder / WEIGHTS_FILE
        if not weights.exists():
            hint = " (adapter_model.bin is pickled: convert it to safetensors)" if (
                self.folder / "adapter_model.bin").exists() else ""
            raise MergebenchError(f"{self.folder}: no {WEIGHTS_FILE}{hint}")
        self.file = Checkpoint(weights)
        self.modules: dict[str, _Module] = {}
        self.whole: dict[str, str] = {}  # base key -> tensor name of a tensor saved whole
        factors: dict[str, dict[str, str]] = {}
        for name in self.file.keys:
            if not name.startswith(PREFIX):
                raise MergebenchError(f"{weights}: tensor '{name}' is not under '{PREFIX}' (not a PEFT adapter?)")
            match = _FACTOR.fullmatch(name[len(PREFIX):])
            if match:
                factors.setdefault(match["module"], {})[match["kind"]] = name
            else:
                key = name[len(PREFIX):].replace(".base_layer.", ".")
                self.whole[key] = name
        for module, kinds in factors.items():
            self.modules[f"{module}.weight"] = self._module(weights, module, kinds)

    def _module(self, weights: Path, module: str, kinds: dict[str, str]) -> _Module:
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_name = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b_name = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a_name is None or b_name is None:
            raise MergebenchError(f"{weights}: module '{module}' has {' and '.join(sorted(kinds))} but not both "
                                  f"LoRA factors")
        a, b = self.file.info(a_name), self.file.info(b_name)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise MergebenchError(f"{weights}: '{a_name}' is {list(a.shape)}: only LoRA on linear and embedding "
                                  f"layers is read (not convolutions)")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise MergebenchError(f"{weights}: '{b_name}' is {list(b.shape)} but '{a_name}' is {list(a.shape)}: "
                                  f"their ranks differ")
        config = self.config
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        transposed = embedding or bool(config.get("fan_in_fan_out"))
        if embedding:  # lora_embedding_A is (r, vocab), B is (dim, r): the weight (vocab, dim) += (B·A)ᵀ
            shape = (a.shape[1], b.shape[0])
        else:
            shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        return _Module(a_name, b_name, embedding, transposed, scale, shape)

    @property
    def keys(self) -> list[str]:
        return [*self.modules, *(k for k in self.whole if k not in self.modules)]

    @property
    def embeddings(self) -> list[str]:
        return [key for key, module in self.modules.items() if module.embedding]

    def update(self, key: str) -> LowRank:
        """The adapter's change to base ``key``, in float32: its factors (scale in ``up``), or a whole tensor."""
        whole = self.file.read(self.whole[key]) if key in self.whole else None
        module = self.modules.get(key)
        if module is None:
            return LowRank(whole=whole)
        a = self.file.read(module.down).float()
        b = self.file.read(module.up).float()
        if module.transposed:  # (B·A)ᵀ = Aᵀ·Bᵀ
            return LowRank(down=b.T.contiguous(), up=a.T.contiguous(), whole=whole, scale=module.scale)
        return LowRank(down=a, up=b, whole=whole, scale=module.scale)

    def update_shape(self, key: str) -> tuple[int, ...]:
        if key in self.modules:
            return self.modules[key].shape
        return self.file.info(self.whole[key]).shape

    def nbytes(self, key: str) -> int:
        names = [self.modules[key].down, self.modules[key].up] if key in self.modules else []
        names += [self.whole[key]] if key in self.whole else []
        return sum(self.file.info(n).nbytes for n in names)

    def fingerprint(self) -> str:
        return sampled_fingerprint([self.folder / ADAPTER_CONFIG, self.folder / WEIGHTS_FILE])

    @property
    def total_bytes(self) -> int:
        return self.file.total_bytes

    def file_states(self) -> dict[str, list[int]]:
        return file_states([self.folder / ADAPTER_CONFIG, self.folder / WEIGHTS_FILE])


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for ``alpha_pattern``: the first pattern that matches the module's name at a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class AdapterSource:
    """An adapter folder alone (type ``Adapter``): each key reads as its ``LowRank`` update."""

    value_type = ADAPTER
    folder = None

    def __init__(self, path: str | os.PathLike[str]):
        self.adapter = AdapterFile(path)
        self.label = str(path)
        self.config = self.adapter.config

    @property
    def keys(self) -> list[str]:
        return self.adapter.keys

    def info(self, key: str) -> TensorInfo:
        """The update's shape and float32, with the bytes its stored factors take."""
        return TensorInfo(key, torch.float32, self.adapter.update_shape(key), None, 0, self.adapter.nbytes(key))

    def read(self, key: str) -> LowRank:
        return self.adapter.update(key)

    @property
    def total_bytes(self) -> int:
        return self.adapter.total_bytes

    def fingerprint(self) -> str:
        return self.adapter.fingerprint()

    def file_states(self) -> dict[str, list[int]]:
        return self.adapter.file_states()


class AdaptedCheckpoint:
    """A base checkpoint with an adapter applied per key as it is read: ``W + s·B·A`` in float32.

    Keys the adapter does not touch read as the base's (in its dtype); the model is never written
    out. Applying in float32 and rounding once, at the output, is more exact than PEFT's
    ``merge_and_unload`` on a bf16 model, which rounds the merged weight to bf16 first.
    """

    value_type = CHECKPOINT

    def __init__(self, base: Source, adapter: str | os.PathLike[str]):
        if base.value_type != CHECKPOINT:
            raise MergebenchError(f"{base.label}: an adapter applies to model weights, and this is a {base.value_type}")
        self.base = base
        self.adapter = AdapterFile(adapter)
        self.label = f"{base.label}+{adapter}"
        self.folder = base.folder
        base_keys = set(base.keys)
        weights = self.adapter.folder / WEIGHTS_FILE
        for key in self.adapter.keys:
            if key not in base_keys:
                raise MergebenchError(f"{weights}: the adapter changes '{key}', which base {base.label} does not have "
                                      f"(an adapter for another model?)")
            expected, found = base.info(key).shape, self.adapter.update_shape(key)
            if tuple(expected) != tuple(found):
                raise MergebenchError(f"{weights}: the adapter's update of '{key}' is {list(found)} but the base "
                                      f"{base.label} has it {list(expected)}")

    @property
    def keys(self) -> list[str]:
        return self.base.keys

    def info(self, key: str) -> TensorInfo:
        return self.base.info(key)

    def read(self, key: str) -> torch.Tensor:
        if key not in self.adapter.modules and key not in self.adapter.whole:
            return self.base.read(key)
        update = self.adapter.update(key)
        weight = self.base.read(key) if update.whole is None else update.whole
        if update.up is None:
            return weight
        weight = weight.to(torch.float64 if weight.dtype == torch.float64 else torch.float32, copy=True)
        return weight.addmm_(update.up.to(weight.dtype), update.down.to(weight.dtype), alpha=update.scale)

    @property
    def total_bytes(self) -> int:
        return self.base.total_bytes + self.adapter.total_bytes

    def fingerprint(self) -> str | None:
        base = self.base.fingerprint()
        return None if base is None else f"{base}+{self.adapter.fingerprint()}"

    def file_states(self) -> dict[str, list[int]]:
        return {**self.base.file_states(), **self.adapter.file_states()}
