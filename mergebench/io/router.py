"""The router tensors of a MoE (``RouterSpec``) as a source the engine reads like any other input.

The random modes draw each key on its own. The prompted modes need the base's tokenizer and either its
input embedding (``cheap_embed``) or the base model itself: ``hidden`` loads it once with
``transformers`` from its folder's config and the base source's own tensors (so an adapted, GGUF or
FP8 base runs as it is merged), runs every prompt alone (no padding to mistake for a last token) and
keeps the input of each block's MLP, which is what the router multiplies. All router rows are made at
the first read, under a lock, and kept (they are [experts, hidden] per block).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import torch

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Source
from mergebench.io.hf_models import model_from_state
from mergebench.io.safetensors_format import TensorInfo
from mergebench.io.tied_heads import tied_pair
from mergebench.io.tokenizers import has_tokenizer
from mergebench.surgery.moe import PROMPTED_MODES, Prompts, RouterSpec, mean_embedding, prompt_row, random_rows
from mergebench.value_types import CHECKPOINT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RouterSource:
    """Router rows (and a missing shared expert's zeros) under the keys ``spec`` plans, in ``dtype``."""

    folder = None
    value_type = CHECKPOINT
    mappable = False

    def __init__(self, label: str, spec: RouterSpec, base: Source | None, dtype: torch.dtype):
        self.label, self.spec, self.base, self.dtype = label, spec, base, dtype
        self._made: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()
        if spec.mode not in PROMPTED_MODES:
            return
        if base is None:
            raise MergebenchError(f"{label}: gate_mode {spec.mode} runs the prompts through the base, so base "
                                  f"'{spec.base}' must be a model of the recipe, not a node")
        folder = base.folder
        if folder is None or not has_tokenizer(folder):
            raise MergebenchError(f"{label}: gate_mode {spec.mode} tokenizes the prompts with the base's tokenizer; "
                                  f"'{spec.base}' ({base.label}) has none")
        if spec.mode != "cheap_embed" and not (folder / "config.json").is_file():
            raise MergebenchError(f"{label}: gate_mode {spec.mode} runs the base with transformers; '{spec.base}' "
                                  f"({base.label}) has no config.json")
        if spec.mode == "cheap_embed" and tied_pair(base.keys) is None:
            raise MergebenchError(f"{label}: gate_mode cheap_embed reads the base's token embedding; "
                                  f"'{spec.base}' ({base.label}) has none")

    @property
    def keys(self) -> list[str]:
        return self.spec.keys

    def info(self, key: str) -> TensorInfo:
        shape = self.spec.shape(key)
        numel = shape[0] * shape[1]
        return TensorInfo(key, self.dtype, shape, None, 0, numel * self.dtype.itemsize)

    def read(self, key: str) -> torch.Tensor:
        if key in dict(self.spec.zeros):
            return torch.zeros(self.spec.shape(key), dtype=self.dtype)
        if self.spec.mode not in PROMPTED_MODES:
            return random_rows(self.spec.seed, key, self.spec.shape(key), self.spec.mode == "uniform_random"
                               ).to(self.dtype)
        with self._lock:
            if self._made is None:
                self._made = self._prompted_rows()
        return self._made[key].to(self.dtype)

    def fingerprint(self) -> str | None:
        inner = self.base.fingerprint() if self.base is not None and self.spec.mode in PROMPTED_MODES else ""
        return hashlib.sha256(f"{inner}:{self.spec!r}:{self.dtype}".encode()).hexdigest()

    def file_states(self) -> dict[str, list[int]]:
        return self.base.file_states() if self.base is not None and self.spec.mode in PROMPTED_MODES else {}

    @property
    def total_bytes(self) -> int:
        return 0

    @property
    def preparation_bytes(self) -> int:
        """Memory the prompted modes hold while making the rows: the base model in ``gate_dtype`` (plus its
        stored weights while they are loaded into it) for ``hidden``, the embedding for ``cheap_embed``."""
        if self.spec.mode not in PROMPTED_MODES or self.base is None:
            return 0
        if self.spec.mode == "cheap_embed":
            return self.base.info(tied_pair(self.base.keys)[1]).nbytes
        stored = sum(self.base.info(k).nbytes for k in self.base.keys)
        numel = sum(self.base.info(k).numel for k in self.base.keys)
        return stored + numel * DTYPES[self.spec.gate_dtype].itemsize

    def describe(self) -> str:
        """How the router is made, for ``plan`` (which adds ``preparation_bytes``)."""
        spec = self.spec
        if spec.mode not in PROMPTED_MODES:
            return (f"router of {len(spec.rows)} experts × {len(spec.router_keys)} blocks: {spec.mode} "
                    f"(seed {spec.seed})")
        count = sum(len(p.positive) + len(p.negative) for _, p in self._rows() if p is not None)
        how = ("mean token embeddings" if spec.mode == "cheap_embed" else
               f"base '{spec.base}' run by transformers in {spec.gate_dtype}")
        return (f"router of {len(spec.rows)} experts × {len(spec.router_keys)} blocks: {spec.mode}, {count} prompts "
                f"through {how}")

    def _rows(self) -> list[tuple[str, Prompts | None]]:
        return [*self.spec.rows, *([self.spec.shared_row] if self.spec.shared_row else [])]

    def _prompted_rows(self) -> dict[str, torch.Tensor]:
        """Every router key's rows: per expert, its prompts' mean vector per block made into a row."""
        try:
            import transformers
        except ImportError:
            raise MergebenchError(f"{self.label}: gate_mode {self.spec.mode} needs transformers: "
                                  f"pip install 'mergebench[moe]'") from None
        assert self.base is not None and self.base.folder is not None  # checked when opened
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.base.folder)
        tokens = {text: tokenizer(text)["input_ids"] for _, prompts in self._rows() if prompts is not None
                  for text in (*prompts.positive, *prompts.negative)}
        empty = next((text for text, ids in tokens.items() if not ids), None)
        if empty is not None:
            raise MergebenchError(f"{self.label}: the prompt {empty!r} has no tokens")
        blocks = len(self.spec.router_keys)
        if self.spec.mode == "cheap_embed":
            embedding = self.base.read(tied_pair(self.base.keys)[1])

            def mean_vectors(texts: Sequence[str]) -> torch.Tensor:
                return mean_embedding(embedding, [tokens[t] for t in texts]).expand(blocks, -1)
        else:
            mean_vectors = _MlpInputs(self.base, self.spec, tokens).mean

        rows = []
        for _, prompts in self._rows():
            assert prompts is not None  # the operator requires prompts in these modes
            negative = mean_vectors(prompts.negative) if prompts.negative else None
            rows.append(prompt_row(mean_vectors(prompts.positive), negative))  # [blocks, hidden]
        experts = torch.stack(rows[:len(self.spec.rows)], dim=1)  # [blocks, experts, hidden]
        made = {key: experts[b] for b, key in enumerate(self.spec.router_keys)}
        if self.spec.shared_row is not None:
            made.update({key: rows[-1][b:b + 1] for b, key in enumerate(self.spec.shared_keys)})
        return made


class _MlpInputs:
    """The base model with a hook on every block's MLP: the mean, over prompts, of each block's MLP input
    at the last token (``hidden``) or over the tokens (``hidden_avg``)."""

    def __init__(self, base: Source, spec: RouterSpec, tokens: dict[str, list[int]]):
        import transformers

        assert base.folder is not None
        state = {key: base.read(key) for key in base.keys}
        self.model = model_from_state(transformers.AutoModelForCausalLM, base.folder, state,
                                      DTYPES[spec.gate_dtype]).eval()
        del state
        layers = _decoder_layers(self.model)
        if layers is None or len(layers) != len(spec.router_keys):
            raise MergebenchError(f"gate_mode {spec.mode}: {base.label} does not run as a decoder of "
                                  f"{len(spec.router_keys)} blocks with an 'mlp' each under transformers")
        self.last = spec.mode == "hidden"
        self.tokens = tokens
        self.seen: list[torch.Tensor] = []
        for layer in layers:
            layer.mlp.register_forward_pre_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        states = args[0][0].double()  # [tokens, hidden] of the one prompt
        self.seen.append(states[-1] if self.last else states.mean(dim=0))

    def mean(self, texts: Sequence[str]) -> torch.Tensor:
        total = None
        for text in texts:
            self.seen = []
            with torch.no_grad():
                self.model(input_ids=torch.tensor([self.tokens[text]]))
            found = torch.stack(self.seen)  # [blocks, hidden]
            total = found if total is None else total + found
        assert total is not None
        return total / len(texts)


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and all(hasattr(layer, "mlp") for layer in layers):
        return layers
    return None
