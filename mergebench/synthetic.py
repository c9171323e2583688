"""Small Llama-shaped checkpoints made from a seed, for the demo, the tests and the benchmarks.

They have real Hugging Face names, shapes and config, so ``transformers`` loads them as
``LlamaForCausalLM``; "fine-tunes" are the base plus small seeded perturbations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergebench.io.writer import CheckpointWriter, PlannedTensor


def llama_config(hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 vocab: int = 256, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes in the order transformers saves a LlamaForCausalLM."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def llama_state_dict(config: dict, seed: int, base: dict[str, torch.Tensor] | None = None,
                     noise: float = 0.01, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights (norms near 1), or ``base`` plus seeded noise of relative size ``noise``."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in llama_shapes(config).items():
        if base is not None:
            original = base[key].float()
            state[key] = (original + noise * original.abs().mean() * torch.randn(shape, generator=generator)).to(dtype)
        elif key.endswith("norm.weight"):
            state[key] = (1 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=generator) / shape[-1] ** 0.5).to(dtype)
    return state


def save_checkpoint(state: dict[str, torch.Tensor], folder: Path, shard_size: int = 5 * 10**9,
                    config: dict | None = None) -> Path:
    """Write a state dict as an HF folder (sharded with an index when it exceeds ``shard_size``)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    planned = [PlannedTensor(k, t.dtype, tuple(t.shape)) for k, t in state.items()]
    writer = CheckpointWriter(folder, planned, shard_size, {"format": "pt"})
    try:
        for key, tensor in state.items():
            writer.write(key, tensor)
        writer.finish_weights()
        if config is not None:
            (writer.partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (writer.partial / "generation_config.json").write_text(json.dumps({"do_sample": False}) + "\n")
        writer.commit(replace=True)
    except BaseException:
        writer.abort()
        raise
    return folder
