"""Mixtures of experts built from dense models (semantics §13): key names, router vectors, configs.

A dense Llama/Mistral/Qwen2 block has one MLP (``mlp.gate_proj``, ``up_proj``, ``down_proj``). The MoE
keeps the base's attention, norms and embeddings and puts each expert's MLP of the same block side by
side behind a router, a linear map from the MLP's input to one logit per expert (``[E, hidden]``).
Two layouts are written as the Hub stores them and ``transformers`` loads them:

- ``mixtral``: ``block_sparse_moe.experts.E.w1/w2/w3`` (gate, down, up) and ``block_sparse_moe.gate``;
- ``qwen2_moe``: ``mlp.experts.E.{gate,up,down}_proj``, ``mlp.gate``, and a shared expert
  (``mlp.shared_expert.*`` scaled by ``sigmoid(mlp.shared_expert_gate · x)``) that every token uses.

Router rows come from prompts: a row is the normalised mean of what the base makes of an expert's
positive prompts, minus that of its negative prompts (each side normalised first), normalised.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ARCHITECTURES = ("mixtral", "qwen2_moe")
GATE_MODES = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPTED_MODES = ("hidden", "hidden_avg", "cheap_embed")
# a dense block's MLP weight: (block prefix, which projection)
MLP_KEY = re.compile(r"^(.*?(?:^|\.)layers\.\d+\.)mlp\.(gate_proj|up_proj|down_proj)\.weight$")
MLP_ANY = re.compile(r"(?:^|\.)layers\.\d+\.mlp\.")
ATTENTION_BIAS = re.compile(r"(?:^|\.)self_attn\.([qkvo])_proj\.bias$")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # a dense MLP's, in its storage order
# What each supported base reads when its config.json leaves a field out (transformers' defaults); the MoE
# classes default otherwise (Mixtral: rope θ 10⁶, ε 10⁻⁵, 8 key/value heads), so the MoE config states them.
BASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2,
                "sliding_window": 4096},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}
SUPPORTED_MODEL_TYPES = tuple(BASE_DEFAULTS)
ROPE_THETA = 10000.0  # every supported base's default
DROPPED_FIELDS = ("attention_bias", "mlp_bias", "pretraining_tp")  # Llama's, which the MoE configs lack


def expert_key(architecture: str, prefix: str, projection: str, expert: int) -> str:
    """The MoE key of expert ``expert``'s ``projection`` in the block whose keys start with ``prefix``."""
    if architecture == "mixtral":
        return f"{prefix}block_sparse_moe.experts.{expert}.{MIXTRAL_NAMES[projection]}.weight"
    return f"{prefix}mlp.experts.{expert}.{projection}.weight"


def router_key(architecture: str, prefix: str) -> str:
    return f"{prefix}block_sparse_moe.gate.weight" if architecture == "mixtral" else f"{prefix}mlp.gate.weight"


def shared_key(prefix: str, projection: str) -> str:
    return f"{prefix}mlp.shared_expert.{projection}.weight"


def shared_gate_key(prefix: str) -> str:
    return f"{prefix}mlp.shared_expert_gate.weight"


@dataclass(frozen=True)
class Prompts:
    """What should (positive) and should not (negative) be routed to one expert."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouterSpec:
    """The router tensors a MoE needs, as plain data: which base, how each row is made, and at which keys.

    ``rows`` has one entry per router row (the experts in order, then the shared expert for its gate):
    its name in messages and its prompts (None in the random modes). ``zeros`` are keys written as zeros
    (the shared expert of a ``qwen2_moe`` made without one: ``sigmoid(0) · 0`` adds nothing)."""

    base: str  # the input whose embeddings or hidden states the prompts go through
    mode: str
    seed: int
    hidden: int
    router_keys: tuple[str, ...]  # one per block, [experts, hidden]
    rows: tuple[tuple[str, Prompts | None], ...]  # experts, in order
    shared_keys: tuple[str, ...] = ()  # one per block, [1, hidden]
    shared_row: tuple[str, Prompts | None] | None = None
    zeros: tuple[tuple[str, tuple[int, ...]], ...] = ()
    gate_dtype: str = "float32"

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self.router_keys:
            return (len(self.rows), self.hidden)
        if key in self.shared_keys:
            return (1, self.hidden)
        return dict(self.zeros)[key]

    @property
    def keys(self) -> list[str]:
        return [*self.router_keys, *self.shared_keys, *(key for key, _ in self.zeros)]


def random_rows(seed: int, key: str, shape: tuple[int, ...], uniform: bool) -> torch.Tensor:
    """Seeded router rows for one key, the same on every machine: N(0, 1) like mergekit's ``random``, or
    ``uniform_random``'s U(−1/√hidden, 1/√hidden), torch.nn.Linear's initialisation."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if uniform:
        bound = 1 / math.sqrt(shape[-1])
        return torch.rand(shape, generator=generator, dtype=torch.float64).mul_(2 * bound).sub_(bound).float()
    return torch.randn(shape, generator=generator, dtype=torch.float64).float()


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def prompt_row(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """A router row from the mean vector of the positive prompts and of the negative ones (per block:
    ``[..., hidden]``): each side normalised, their difference normalised."""
    row = _unit(positive.double())
    if negative is not None:
        row = _unit(row - _unit(negative.double()))
    return row.float()


def mean_embedding(embedding: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``cheap_embed``: the mean input embedding over every token of every prompt."""
    ids = torch.tensor([i for prompt in token_ids for i in prompt], dtype=torch.long)
    return embedding.index_select(0, ids).double().mean(dim=0)


def moe_config(base: dict[str, Any], architecture: str, experts: int, per_token: int, intermediate: int,
               shared_intermediate: int | None, qkv_bias: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The fields to set and to remove on a copy of the base's ``config.json`` for the MoE; a ValueError
    for a base no MoE layout takes."""
    model_type = base.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the base is a '{model_type}' model; a MoE is built from "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    heads, hidden = base.get("num_attention_heads"), base.get("hidden_size")
    if architecture == "qwen2_moe" and base.get("head_dim") not in (None, (hidden or 0) // (heads or 1)):
        raise ValueError(f"the base's head_dim {base.get('head_dim')} is not hidden_size / num_attention_heads, "
                         f"which qwen2_moe assumes")
    implied = {name: value for name, value in BASE_DEFAULTS[model_type].items() if name not in base}
    if "num_key_value_heads" not in base:
        implied["num_key_value_heads"] = heads
    if "rope_theta" not in base and "rope_parameters" not in base:
        implied["rope_theta"] = ROPE_THETA
    common = {**implied, "num_experts_per_tok": per_token, "intermediate_size": intermediate,
              "output_router_logits": False, "router_aux_loss_coef": base.get("router_aux_loss_coef", 0.001)}
    if architecture == "mixtral":
        fields = {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                  "num_local_experts": experts, "router_jitter_noise": 0.0,
                  "sliding_window": implied.get("sliding_window", base.get("sliding_window"))
                  if model_type == "mistral" else None}
    else:
        fields = {**common, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                  "num_experts": experts, "moe_intermediate_size": intermediate,
                  "shared_expert_intermediate_size": shared_intermediate or 1, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True, "qkv_bias": qkv_bias,
                  "use_sliding_window": False, "sliding_window": None}
    return fields, tuple(name for name in DROPPED_FIELDS if name in base)
