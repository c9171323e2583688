"""Mixtures of experts from dense models (``moe``; semantics §13): loaded by transformers, checked against the
dense models they are made of, routers checked against hand-computed prompt vectors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint
from tests.conftest import WORDS, read_checkpoint, run_merge, save_smollm2, tiny_lm, write_recipe

transformers = pytest.importorskip("transformers")

PROJECTIONS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
MERGEKIT_MOE = str(Path(MERGEKIT_YAML).with_name("mergekit-moe")) if MERGEKIT_YAML else None


def moe_recipe(models: dict[str, Path], experts: list[str], out: Path, **params) -> dict:
    shared, seed = params.pop("shared", None), params.pop("seed", None)
    inputs = {"base": "base", "experts": experts, **({"shared": shared} if shared else {})}
    node = {"op": "moe", "inputs": inputs, "params": params, **({"seed": seed} if seed is not None else {})}
    return {"models": {name: str(path) for name, path in models.items()}, "nodes": {"moe": node},
            "outputs": [{"from": "moe", "path": str(out)}]}


def logits(folder: Path, ids: torch.Tensor, hook=None) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if hook is not None:
        hook(model)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("per_token", [1, 2])
def test_copies_of_the_base_give_the_dense_logits(cli, tmp_path, llama_models, per_token):
    """Four experts that are the base itself agree whatever the router picks: the Mixtral is the dense model."""
    folders, _, _ = llama_models()
    out = tmp_path / "moe"
    run_merge(cli, tmp_path, moe_recipe(folders, ["base"] * 4, out, gate_mode="random",
                                        experts_per_token=per_token))
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["num_local_experts"], config["num_experts_per_tok"]) == (
        ["MixtralForCausalLM"], 4, per_token)
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-5  # the base's, stated
    moe = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(moe).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits(out, IDS), logits(folders["base"], IDS), atol=1e-5, rtol=0)


def test_each_expert_is_its_dense_mlp_bit_for_bit(cli, tmp_path, llama_models):
    """w1/w2/w3 are each expert's gate/down/up projections; attention and norms are the base's; one router
    [experts, hidden] per block, seeded."""
    folders, states, config = llama_models()
    out = tmp_path / "moe"
    written = run_merge(cli, tmp_path, moe_recipe(folders, ["ft1", "ft2", "base"], out, gate_mode="random",
                                                  seed=3))[str(out)]
    for block in range(config["num_hidden_layers"]):
        for e, name in enumerate(["ft1", "ft2", "base"]):
            for projection, short in PROJECTIONS.items():
                key = f"model.layers.{block}.block_sparse_moe.experts.{e}.{short}.weight"
                assert torch.equal(written[key], states[name][f"model.layers.{block}.mlp.{projection}.weight"])
        gate = written[f"model.layers.{block}.block_sparse_moe.gate.weight"]
        assert gate.shape == (3, config["hidden_size"]) and abs(gate.std().item() - 1) < 0.15
    dense = {k: v for k, v in states["base"].items() if ".mlp." not in k}
    assert all(torch.equal(written[k], v) for k, v in dense.items())
    assert not any(".mlp." in k for k in written)
    again = run_merge(cli, tmp_path, moe_recipe(folders, ["ft1", "ft2", "base"], tmp_path / "again",
                                                gate_mode="random", seed=3), recipe="again.yaml")
    assert all(torch.equal(v, again[str(tmp_path / "again")][k]) for k, v in written.items())


def test_eager_call_on_state_dicts_gives_the_written_tensors(cli, tmp_path, llama_models):
    from mergebench import operators as ops

    folders, states, _ = llama_models()
    written = run_merge(cli, tmp_path, moe_recipe(folders, ["ft1", "base"], tmp_path / "moe", gate_mode="random",
                                                  seed=2))[str(tmp_path / "moe")]
    eager = ops.moe(base=states["base"], experts=[states["ft1"], states["base"]], gate_mode="random", seed=2)
    assert eager.keys() == written.keys()
    assert [k for k in eager if not torch.equal(eager[k], written[k])] == []


def test_one_expert_is_the_base_with_the_experts_mlp(cli, tmp_path, llama_models):
    """One expert, one per token: the MoE computes the base's attention around the expert's MLP exactly (a
    swapped w1/w3 would not: silu(gate)·up is not symmetric)."""
    folders, states, config = llama_models()
    out = tmp_path / "moe"
    run_merge(cli, tmp_path, moe_recipe(folders, ["ft1"], out, gate_mode="random", experts_per_token=1))
    grafted = {k: (states["ft1"] if ".mlp." in k else states["base"])[k] for k in states["base"]}
    reference = save_checkpoint(grafted, tmp_path / "grafted", 10**9, config)
    torch.testing.assert_close(logits(out, IDS), logits(reference, IDS), atol=1e-5, rtol=0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


PROMPTS = {"a": {"positive": ["the cat sat on the mat", "a cat"], "negative": ["dog ran"]},
           "b": {"positive": ["the dog ran", "merge models yes"]},
           "c": {"positive": ["no no no"], "negative": ["yes", "the mat"]}}


def _prompted(tmp_path: Path) -> dict[str, Path]:
    base = tiny_lm(tmp_path / "lm")
    return {"base": base, **dict.fromkeys(PROMPTS, base)}


def _ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def test_cheap_embed_rows_are_the_normalised_mean_prompt_embeddings(cli, tmp_path):
    models = _prompted(tmp_path)
    out = tmp_path / "moe"
    written = run_merge(cli, tmp_path, moe_recipe(models, list(PROMPTS), out, gate_mode="cheap_embed",
                                                  prompts=PROMPTS))[str(out)]
    embedding = read_checkpoint(models["base"])["model.embed_tokens.weight"].double()

    def mean(texts):
        return _unit(embedding[[i for t in texts for i in _ids(t)]].mean(0))

    expected = []
    for prompts in PROMPTS.values():
        row = mean(prompts["positive"])
        expected.append(_unit(row - mean(prompts["negative"])) if "negative" in prompts else row)
    for block in range(2):
        gate = written[f"model.layers.{block}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate, torch.stack(expected).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_rows_are_the_base_mlp_inputs(cli, tmp_path, mode):
    """Each block's row is what that block's MLP sees (the post-attention norm's output), at the last token
    or averaged over tokens, averaged over prompts; computed here by transformers hooks of our own."""
    models = _prompted(tmp_path)
    out = tmp_path / "moe"
    written = run_merge(cli, tmp_path, moe_recipe(models, list(PROMPTS), out, gate_mode=mode,
                                                  prompts=PROMPTS))[str(out)]
    dense = transformers.AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()

    def mean(texts):
        seen: list[torch.Tensor] = []
        hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(o[0].double()))
                 for layer in dense.model.layers]
        total = 0
        for text in texts:
            seen.clear()
            with torch.no_grad():
                dense(torch.tensor([_ids(text)]))
            total = total + torch.stack([s[-1] if mode == "hidden" else s.mean(0) for s in seen])
        for hook in hooks:
            hook.remove()
        return _unit(total / len(texts))

    rows = []
    for prompts in PROMPTS.values():
        row = mean(prompts["positive"])
        rows.append(_unit(row - mean(prompts["negative"])) if "negative" in prompts else row)
    for block in range(2):
        expected = torch.stack([r[block] for r in rows]).float()
        torch.testing.assert_close(written[f"model.layers.{block}.block_sparse_moe.gate.weight"], expected,
                                   atol=1e-5, rtol=0)


def _qwen2(folder: Path) -> Path:
    """A tiny Qwen2 (q/k/v biases) saved by transformers."""
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


def test_qwen2_base_makes_a_qwen2_moe_equal_to_it(cli, tmp_path):
    """A Qwen2 base (attention biases) gives Qwen2-MoE; without a shared expert its shared MLP is zero (adds
    nothing), so copies of the base give the dense logits."""
    base = _qwen2(tmp_path / "qwen2")
    out = tmp_path / "moe"
    written = run_merge(cli, tmp_path, moe_recipe({"base": base}, ["base"] * 3, out, gate_mode="uniform_random",
                                                  experts_per_token=2))[str(out)]
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["num_experts"], config["norm_topk_prob"], config["qkv_bias"]) == (
        ["Qwen2MoeForCausalLM"], 3, True, True)
    assert not written["model.layers.0.mlp.shared_expert.down_proj.weight"].any()
    bound = 64 ** -0.5
    assert written["model.layers.1.mlp.gate.weight"].abs().max() <= bound
    torch.testing.assert_close(logits(out, IDS), logits(base, IDS), atol=1e-5, rtol=0)


def test_qwen2_moe_shared_expert_is_gated_by_its_prompts(cli, tmp_path):
    """With a shared expert (here the base) every token adds sigmoid(g·x) times the shared MLP: the MoE of
    base copies equals the dense model whose MLP output is scaled by 1 + sigmoid(g·x), g the written row."""
    base = tiny_lm(tmp_path / "lm")
    models = {"base": base, "a": base, "b": base, "s": base}
    prompts = {"a": {"positive": ["the cat"]}, "b": {"positive": ["dog ran"]}, "s": {"positive": ["yes no"]}}
    out = tmp_path / "moe"
    written = run_merge(cli, tmp_path, moe_recipe(models, ["a", "b"], out, gate_mode="cheap_embed",
                                                  prompts=prompts, shared="s"))[str(out)]
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    embedding = read_checkpoint(base)["model.embed_tokens.weight"].double()
    expected_gate = _unit(embedding[_ids("yes no")].mean(0)).float()
    gates = [written[f"model.layers.{b}.mlp.shared_expert_gate.weight"] for b in range(2)]
    for gate in gates:
        torch.testing.assert_close(gate[0], expected_gate, atol=1e-6, rtol=0)

    def scale_mlps(model):
        for layer, gate in zip(model.model.layers, gates):
            layer.mlp.register_forward_hook(lambda m, a, o, g=gate: o * (1 + torch.sigmoid(a[0] @ g.T)))

    ids = torch.randint(0, len(WORDS), (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(out, ids), logits(base, ids, scale_mlps), atol=1e-5, rtol=0)


def test_an_expert_may_be_a_node(cli, tmp_path, llama_models):
    """A TIES merge of the two fine-tunes is an expert like a model: its MLP tensors are the merge's."""
    folders, _, _ = llama_models()
    merged = run_merge(cli, tmp_path, {
        "models": {k: str(v) for k, v in folders.items()},
        "nodes": {"t": {"op": "ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                        "params": {"density": 0.5}}},
        "outputs": [{"from": "t", "path": str(tmp_path / "ties")}]}, recipe="ties.yaml")[str(tmp_path / "ties")]
    doc = moe_recipe(folders, ["base", "t"], tmp_path / "moe", gate_mode="random")
    doc["nodes"] = {"t": {"op": "ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                          "params": {"density": 0.5}}, **doc["nodes"]}
    written = run_merge(cli, tmp_path, doc)[str(tmp_path / "moe")]
    for projection, short in PROJECTIONS.items():
        assert torch.equal(written[f"model.layers.1.block_sparse_moe.experts.1.{short}.weight"],
                           merged[f"model.layers.1.mlp.{projection}.weight"])


def _refused(cli, tmp_path: Path, doc: dict, *expected: str) -> None:
    path = write_recipe(tmp_path / "bad.yaml", doc)
    result = cli("run", path, "--quiet")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert all(part in message for part in expected), message
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob("moe*partial*"))


def test_bad_moes_exit_2_naming_the_expert(cli, tmp_path, llama_models):
    folders, _, config = llama_models()
    wide = llama_config(hidden=32)
    folders["narrow"] = save_checkpoint(llama_state_dict(wide, seed=5), tmp_path / "narrow", 10**9, wide)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    gpt2.save_pretrained(tmp_path / "gpt2")
    folders["gpt2"] = tmp_path / "gpt2"
    out = tmp_path / "moe"
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1", "narrow"], out, gate_mode="random"),
             "expert 'narrow'", "model.layers.0.mlp.gate_proj.weight", "hidden size 64")
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1", "gpt2"], out, gate_mode="random"),
             "expert 'gpt2'", "model.layers.0.mlp.gate_proj.weight")
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1", "ft2"], out, prompts={
        "ft1": {"positive": ["x"]}, "ft2": {"positive": ["y"]}, "ft3": {"positive": ["z"]}}),
             "prompts for 'ft3'", "ft1, ft2")
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1", "ft2"], out, prompts={"ft1": {"positive": ["x"]}}),
             "expert 'ft2' has no prompts")
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1"], out, gate_mode="random", experts_per_token=2),
             "experts_per_token 2")
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1", "ft2"], out, gate_mode="random", shared="base",
                                       architecture="mixtral"), "shared expert ('base')", "qwen2_moe")
    _refused(cli, tmp_path, moe_recipe(folders, ["ft1", "ft2"], out, prompts={
        "ft1": {"positive": ["x"]}, "ft2": {"positive": ["y"]}}), "tokenizer", "'base'")


def test_plan_states_the_router_cost(cli, tmp_path):
    models = _prompted(tmp_path)
    path = write_recipe(tmp_path / "moe.yaml", moe_recipe(models, list(PROMPTS), tmp_path / "moe", prompts=PROMPTS))
    result = cli("plan", path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("router of 3 experts × 2 blocks: hidden, 8 prompts through base 'base' run by transformers in float32 "
            "(holds 605.70 KB before the merge streams)") in text
    assert not (tmp_path / "moe").exists()


def test_mergekit_moe_config_is_the_native_recipe(cli, tmp_path):
    """mergekit-moe's format (base_model, gate_mode, experts with prompts, experts_per_token, dtype)
    translates to the native moe node: the same bytes."""
    base = tiny_lm(tmp_path / "lm")
    other = tiny_lm(tmp_path / "lm2", seed=1)
    config = {"base_model": str(base), "gate_mode": "cheap_embed", "dtype": "bfloat16", "experts_per_token": 1,
              "experts": [{"source_model": str(base), "positive_prompts": ["the cat"]},
                          {"source_model": str(other), "positive_prompts": ["dog ran"],
                           "negative_prompts": ["the mat"]}]}
    translated = tmp_path / "mk"
    path = tmp_path / "mergekit-moe.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cli("run", path, "--out", translated, "--quiet")
    assert result.exit_code == 0, result.output
    native = moe_recipe({"base": base, "lm": base, "lm2": other}, ["lm", "lm2"], tmp_path / "native",
                        gate_mode="cheap_embed", experts_per_token=1,
                        prompts={"lm": {"positive": ["the cat"]},
                                 "lm2": {"positive": ["dog ran"], "negative": ["the mat"]}})
    native["outputs"][0]["dtype"] = "bfloat16"
    expected = run_merge(cli, tmp_path, native)[str(tmp_path / "native")]
    got = read_checkpoint(translated)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    converted = cli("convert", path, "--out", tmp_path / "converted")
    assert converted.exit_code == 0, converted.output
    node = yaml.safe_load(converted.output)["nodes"]["moe"]
    assert (node["op"], node["inputs"]["experts"], node["params"]["experts_per_token"]) == ("moe", ["lm", "lm2"], 1)


@pytest.mark.skipif(MERGEKIT_MOE is None or not Path(MERGEKIT_MOE).exists(),
                    reason="mergekit 0.1.5 is not installed (MERGEKIT_YAML or mergekit-yaml on the PATH)")
def test_mergekit_moe_parity(cli, tmp_path):
    """The same mergekit-moe config run by mergekit-moe 0.1.5 and by mergebench: equal experts and attention,
    cheap_embed routers within float rounding (mergekit writes transformers 5's fused expert tensors,
    ``mlp.experts.gate_up_proj`` = [w1; w3] and ``down_proj`` = w2; we write the per-expert layout of the
    Hub's Mixtral checkpoints, which transformers converts on load)."""
    models = {}
    for name, seed in (("lm", 0), ("lm2", 1)):
        models[name] = tiny_lm(tmp_path / name, seed=seed)
        settings = json.loads((models[name] / "tokenizer_config.json").read_text())
        settings["eos_token"] = "[UNK]"  # mergekit pads the prompts with the eos token when there is no bos
        (models[name] / "tokenizer_config.json").write_text(json.dumps(settings))
    config = {"base_model": str(models["lm"]), "gate_mode": "cheap_embed", "dtype": "float32", "experts_per_token": 1,
              "experts": [{"source_model": str(models["lm"]), "positive_prompts": ["the cat", "a dog ran"]},
                          {"source_model": str(models["lm2"]), "positive_prompts": ["dog ran"],
                           "negative_prompts": ["the mat"]}]}
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([MERGEKIT_MOE, str(path), str(tmp_path / "theirs")], cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    assert cli("run", path, "--out", tmp_path / "ours", "--quiet").exit_code == 0
    theirs, ours = read_checkpoint(tmp_path / "theirs"), read_checkpoint(tmp_path / "ours")
    for block in range(2):
        p = f"model.layers.{block}."
        for e in range(2):
            q = f"{p}block_sparse_moe.experts.{e}."
            assert torch.equal(theirs[f"{p}mlp.experts.gate_up_proj"][e], torch.cat([ours[q + "w1.weight"],
                                                                                     ours[q + "w3.weight"]]))
            assert torch.equal(theirs[f"{p}mlp.experts.down_proj"][e], ours[q + "w2.weight"])
        torch.testing.assert_close(theirs[f"{p}mlp.gate.weight"], ours[f"{p}block_sparse_moe.gate.weight"],
                                   atol=1e-7, rtol=0)
    shared = set(theirs) & set(ours)
    assert len(shared) == 15 and all(torch.equal(theirs[k], ours[k]) for k in shared)


def test_four_smollm2_experts_load_and_generate_as_the_dense_model(cli, tmp_path):
    """4 × SmolLM2-135M (hidden-state routers from four prompt sets) loads as a Mixtral and, its experts
    being the same model, generates what SmolLM2 generates."""
    folder = tmp_path / "smollm2"
    save_smollm2(folder, torch.bfloat16)
    topics = {"code": "def fibonacci(n): return", "math": "The integral of x squared is",
              "story": "Once upon a time, a dragon", "chat": "Hello! How are you today?"}
    models = {"base": folder, **dict.fromkeys(topics, folder)}
    out = tmp_path / "moe"
    doc = moe_recipe(models, list(topics), out, prompts={k: {"positive": [v]} for k, v in topics.items()})
    run_merge(cli, tmp_path, doc)
    moe = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.tie_word_embeddings
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # copied with the config and the other files
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=2e-3, rtol=0)
        made = moe.generate(ids, max_new_tokens=8, do_sample=False)
        expected = dense.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    # greedy tokens agree wherever the dense model's choice is not a near-tie (float noise of another CPU
    # could flip one), and at least the first four are decided
    gaps = [float(step[0].topk(2).values.diff().abs()) for step in expected.scores]
    decided = next((i for i, gap in enumerate(gaps) if gap < 1e-2), len(gaps))
    assert decided >= 4
    length = ids.shape[1] + decided
    assert torch.equal(made[:, :length], expected.sequences[:, :length])
