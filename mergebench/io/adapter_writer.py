"""Writing an Adapter output as a PEFT LoRA folder that ``peft`` loads unchanged.

Each key's ``LowRank`` update becomes ``lora_A`` = down and ``lora_B`` = up (transposed back for an
embedding or a ``fan_in_fan_out`` adapter), and the config gives every module ``lora_alpha = r``:
the scale is already in ``up``, so PEFT's scale must be 1 (``rank_pattern`` and ``alpha_pattern``
name, escaped, each module whose rank differs from the most common one). Whole tensors become
``modules_to_save``. The folder appears by one rename, with a report of each module's rank and
reconstruction error in its README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mergebench.errors import MergebenchError
from mergebench.io.adapters import PREFIX, WEIGHTS_FILE
from mergebench.io.artifacts import ArtifactWriter
from mergebench.io.kinds import ADAPTER_CONFIG
from mergebench.io.output_guard import check_may_replace, check_scratch, write_manifest
from mergebench.surgery.low_rank import LowRank
from mergebench.value_types import ADAPTER

# what a written config keeps from its template (the first input adapter's): the rest is this file's to say
KEPT_FIELDS = ("task_type", "base_model_name_or_path", "revision", "fan_in_fan_out", "bias")


def adapter_identity(recipe_sha256: str, node: str) -> str:
    """What an adapter folder's manifest says made it: the recipe and its node (``--resume`` may redo it)."""
    return f"{recipe_sha256}:{node}"


class AdapterWriter(ArtifactWriter):
    """An Adapter output: ``OUT.partial/`` gets ``adapter_model.safetensors`` and its config, then becomes ``OUT``.

    ``embeddings`` are the keys whose module is an ``nn.Embedding`` (PEFT stores those factors
    transposed, as ``lora_embedding_A/B``); ``template`` is the config the output follows where it
    does not say otherwise; ``dtype`` the factors' stored dtype.
    """

    def __init__(self, path: Path, metadata: dict[str, str], template: dict[str, Any], embeddings: Iterable[str],
                 dtype: torch.dtype, key_order: Iterable[str] = ()):
        super().__init__(path, ADAPTER, metadata, key_order)
        check_scratch(self.partial, (WEIGHTS_FILE, ADAPTER_CONFIG))
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        self._assembled = self.partial / WEIGHTS_FILE
        self.template = {k: template[k] for k in KEPT_FIELDS if k in template}
        self.embeddings = frozenset(embeddings)
        self.dtype = dtype
        self.report: dict[str, tuple[int | None, float | None]] = {}  # key -> (rank, relative error); None: whole

    def write(self, key: str, value: LowRank) -> int:
        if value.empty:
            return 0
        written = 0
        module = key.removesuffix(".weight")
        if value.whole is not None:
            written += self._add(key, f"{PREFIX}{key}", value.whole.detach().to("cpu", self.dtype))
            self.report[key] = (None, None)
        if value.up is not None:
            down = value.down.detach().to("cpu", torch.float32)
            up = (value.up.detach().to("cpu", torch.float32) * value.scale).to(self.dtype)  # PEFT's scale will be 1
            down = down.to(self.dtype)
            if key in self.embeddings:  # (vocab, dim) = up·down, stored as lora_embedding_B·A transposed
                written += self._add(key, f"{PREFIX}{module}.lora_embedding_A", up.T.contiguous())
                written += self._add(key, f"{PREFIX}{module}.lora_embedding_B", down.T.contiguous())
            elif self.template.get("fan_in_fan_out"):
                written += self._add(key, f"{PREFIX}{module}.lora_A.weight", up.T.contiguous())
                written += self._add(key, f"{PREFIX}{module}.lora_B.weight", down.T.contiguous())
            else:
                written += self._add(key, f"{PREFIX}{module}.lora_A.weight", down)
                written += self._add(key, f"{PREFIX}{module}.lora_B.weight", up)
            self.report[key] = (value.rank, value.error)
        return written

    @property
    def bytes_written(self) -> int:
        return self._assembled.stat().st_size

    def finish_weights(self) -> None:
        super().finish_weights()
        if self._finished_elsewhere:
            return
        (self.partial / ADAPTER_CONFIG).write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
        (self.partial / "README.md").write_text(self._card())

    def config(self) -> dict[str, Any]:
        """The PEFT config of what was written (every module's scale 1: see the module docstring)."""
        ranks = {key.removesuffix(".weight"): rank for key, (rank, _) in self.report.items() if rank is not None}
        whole = sorted(key.rsplit(".", 1)[0] for key, (rank, _) in self.report.items() if rank is None)
        both = sorted(set(ranks) & set(whole))
        if both:  # PEFT wraps a module one way or the other
            raise MergebenchError(f"{self.path}: module '{both[0]}' would be both a LoRA target and saved whole "
                                  f"(modules_to_save); keep its other tensors out of modules_to_save")
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
        odd = {re.escape(module): rank for module, rank in sorted(ranks.items()) if rank != r}
        return {**self.template, "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False,
                "target_modules": sorted(ranks), "rank_pattern": odd, "alpha_pattern": dict(odd),
                "modules_to_save": sorted(set(whole)) or None, "lora_dropout": 0.0, "inference_mode": True,
                "init_lora_weights": True, "bias": self.template.get("bias", "none")}

    def _card(self) -> str:
        rows = [f"| `{key}` | {rank if rank is not None else 'whole'} | "
                f"{'' if error is None else f'{error:.3g}'} |" for key, (rank, error) in sorted(self.report.items())]
        return ("# LoRA adapter written by mergebench\n\n"
                f"From node `{self.metadata.get('node', '')}` ({self.metadata.get('operator', '')}) of recipe "
                f"`{self.metadata.get('mergebench_recipe_sha256', '')}`.\n\n"
                "| tensor | rank | relative error ‖Δ − B·A‖/‖Δ‖ |\n|---|---|---|\n" + "\n".join(rows) + "\n")

    def prepare(self) -> None:
        made_by = adapter_identity(self.metadata.get("mergebench_recipe_sha256", ""), self.metadata.get("node", ""))
        write_manifest(self.partial, self.metadata.get("created_by", "mergebench"), made_by)

    def commit(self, replace: bool) -> None:
        if os.path.lexists(self.path):
            check_may_replace(self.path, replace, artifact=False)
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)

    close = abort
