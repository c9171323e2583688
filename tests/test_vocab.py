"""Vocabulary surgery: merging models whose tokenizers differ by added tokens."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import read_checkpoint, write_recipe
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

BASE_VOCAB = {"[UNK]": 0, "hello": 1, "world": 2, "merge": 3, "weights": 4, "the": 5}
ADDED = {"base": [], "chat": [("<|im_start|>", True), ("model", False)], "soup": [("soup", False), ("model", False)]}


def _tokenizer(name: str) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(dict(BASE_VOCAB), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for token, special in ADDED[name]:
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


@pytest.fixture
def vocab_models(tmp_path):
    """Three tiny Llamas: the base, a chat fine-tune (+2 tokens) and a soup fine-tune (+2, one shared)."""

    def make(tied: bool = False):
        states, vocabs = {}, {}
        base_config = llama_config(vocab=len(BASE_VOCAB), hidden=16, intermediate=32, heads=2, kv_heads=1)
        base_state = llama_state_dict(base_config, seed=0)
        for i, name in enumerate(ADDED):
            tok = _tokenizer(name)
            vocab = [tok.id_to_token(j) for j in range(tok.get_vocab_size())]
            config = {**base_config, "vocab_size": len(vocab), "tie_word_embeddings": tied}
            state = llama_state_dict(config, seed=i)
            for key in state:  # fine-tunes of the base: shared tokens start from the base rows
                if key in ("model.embed_tokens.weight", "lm_head.weight"):
                    state[key][: len(BASE_VOCAB)] = base_state[key] + 0.1 * i
                else:
                    state[key] = base_state[key] + 0.1 * i
            if tied:
                state.pop("lm_head.weight")
            folder = save_checkpoint(state, tmp_path / name, config=config)
            tok.save(str(folder / "tokenizer.json"))
            states[name], vocabs[name] = state, vocab
        return states, vocabs

    return make


def _recipe(tmp_path, source, **tokenizer):
    return write_recipe(tmp_path / "merge.yaml", {
        "models": {name: name for name in ADDED},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": list(ADDED)}}},
        "outputs": [{"from": "avg", "path": "out"}],
        **({"tokenizer": {"source": source, **tokenizer}} if source else {}),
    })


def _expected_row(states, vocabs, key, token):
    """The rule: each model's own row, else the base's, else the mean of the models that have the token."""
    having = [states[m][key][vocabs[m].index(token)] for m in ADDED if token in vocabs[m]]
    fallback = states["base"][key][vocabs["base"].index(token)] if token in vocabs["base"] else \
        torch.stack(having).mean(0)
    rows = [states[m][key][vocabs[m].index(token)] if token in vocabs[m] else fallback for m in ADDED]
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("source", ["union", "base", "chat"])
def test_each_source(tmp_path, cli, vocab_models, source):
    states, vocabs = vocab_models()
    result = cli("run", _recipe(tmp_path, source), "--quiet")
    assert result.exit_code == 0, result.output
    expected_tokens = {"base": vocabs["base"], "chat": vocabs["chat"],
                       "union": vocabs["base"] + ["<|im_start|>", "model", "soup"]}[source]
    out = read_checkpoint(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(expected_tokens)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[key].shape[0] == len(expected_tokens)
        for row, token in enumerate(expected_tokens):
            torch.testing.assert_close(out[key][row], _expected_row(states, vocabs, key, token), rtol=1e-6, atol=1e-6)
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert [tok.id_to_token(i) for i in range(tok.get_vocab_size())] == expected_tokens
    if source == "union":
        ids = tok.encode("<|im_start|> hello soup model").ids
        assert ids == [6, 1, 8, 7] and tok.decode(ids, skip_special_tokens=False) == "<|im_start|> hello soup model"
    assert "Vocabulary" in (tmp_path / "out" / "README.md").read_text()


def test_union_output_loads_with_transformers(tmp_path, cli, vocab_models):
    transformers = pytest.importorskip("transformers")
    vocab_models()
    assert cli("run", _recipe(tmp_path, "union", pad_to_multiple_of=8), "--quiet").exit_code == 0
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.config.vocab_size == 16 and model.model.embed_tokens.weight.shape[0] == 16  # 9 tokens padded to 16
    assert torch.equal(model.model.embed_tokens.weight[9:], torch.zeros(7, 16))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    ids = tokenizer("<|im_start|> hello soup", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, 16) and torch.isfinite(logits).all()


def test_tied_embeddings_are_written_once(tmp_path, cli, vocab_models):
    transformers = pytest.importorskip("transformers")
    states, vocabs = vocab_models(tied=True)
    assert cli("run", _recipe(tmp_path, "union"), "--quiet").exit_code == 0
    out = read_checkpoint(tmp_path / "out")
    assert "lm_head.weight" not in out and out["model.embed_tokens.weight"].shape[0] == 9
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_differing_vocabularies_need_a_tokenizer_setting(tmp_path, cli, vocab_models):
    vocab_models()
    result = cli("run", _recipe(tmp_path, None))
    assert result.exit_code == 2
    assert "vocabularies differ" in result.output and "<|im_start|>" in result.output and "tokenizer:" in result.output


def test_unknown_tokenizer_source(tmp_path, cli, vocab_models):
    vocab_models()
    result = cli("run", _recipe(tmp_path, "nobody"))
    assert result.exit_code == 2 and "tokenizer source 'nobody'" in result.output
