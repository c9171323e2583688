"""End to end through the CLI: sharded inputs in, an HF checkpoint out that transformers loads unchanged."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import torch
from safetensors import safe_open

from conftest import read_checkpoint, run_merge, write_recipe
from mergebench.recipe import load_recipe


def _demo_like_recipe(tmp_path, folders, **output):
    return write_recipe(tmp_path / "merge.yaml", {
        "models": {name: str(path) for name, path in folders.items()},
        "nodes": {
            "tv": {"op": "delta", "inputs": {"base": "base", "models": ["ft1", "ft2"]}},
            "merged": {"op": "task_arithmetic", "inputs": {"deltas": "tv"}, "params": {"lambda": 0.6},
                       "exclude": ["lm_head"]},
            "final": {"op": "apply", "inputs": {"base": "base", "delta": "merged"}},
        },
        "outputs": [{"from": "final", "path": "out", "shard_size": "60KB", **output}],
    })


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cli_run_matches_reference_and_writes_hf_layout(tmp_path, cli, llama_models, dtype):
    folders, states, _ = llama_models(dtype)
    recipe = _demo_like_recipe(tmp_path, folders)
    result = cli("run", recipe)
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    out = tmp_path / "out"
    merged = read_checkpoint(out)
    base, ft1, ft2 = states["base"], states["ft1"], states["ft2"]
    for key in base:
        if key == "lm_head.weight":
            expected = base[key]
        else:
            b = base[key].float()
            expected = (b + 0.6 * ((ft1[key].float() - b) + (ft2[key].float() - b))).to(dtype)
        assert merged[key].dtype == dtype
        # float32 arithmetic in another order differs in the last bits; bf16 by at most one rounding step
        rtol = 1e-6 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(merged[key].float(), expected.float(), rtol=rtol, atol=1e-7)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    with safe_open(out / shards[0], "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["mergebench_recipe_sha256"] == load_recipe(recipe).sha256
    assert "mergebench_version" in meta
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert load_recipe(recipe).sha256 in card and str(folders["ft2"]) in card
    assert not (tmp_path / "out.partial").exists()


def test_output_is_deterministic_byte_for_byte(tmp_path, cli, llama_models):
    folders, _, _ = llama_models(torch.bfloat16)
    recipe = _demo_like_recipe(tmp_path, folders)
    assert cli("run", recipe, "--quiet").exit_code == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert cli("run", recipe, "--quiet", "--force").exit_code == 0
    second = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert first == second


def test_existing_output_needs_force(tmp_path, cli, llama_models):
    folders, _, _ = llama_models()
    recipe = _demo_like_recipe(tmp_path, folders)
    assert cli("run", recipe, "--quiet").exit_code == 0
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output


def test_output_dtype_cast_and_config(tmp_path, cli, llama_models):
    folders, states, _ = llama_models(torch.float32)
    assert cli("run", _demo_like_recipe(tmp_path, folders, dtype="float16"), "--quiet").exit_code == 0
    merged = read_checkpoint(tmp_path / "out")
    assert {t.dtype for t in merged.values()} == {torch.float16}
    assert torch.equal(merged["lm_head.weight"], states["base"]["lm_head.weight"].half())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_json_summary(tmp_path, cli, llama_models):
    folders, states, _ = llama_models()
    result = cli("run", _demo_like_recipe(tmp_path, folders), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["tensors"] == len(states["base"]) and doc["passes"] == 1
    total = sum(t.numel() * t.element_size() for t in states["base"].values())
    assert doc["bytes_written"] == total
    assert doc["outputs"][0]["shards"] > 1


def test_transformers_llama_saved_merged_and_reloaded(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    models = {}
    for name in ("base", "ft"):
        model = transformers.LlamaForCausalLM(config).eval()
        model.save_pretrained(tmp_path / name, max_shard_size="50KB")
        models[name] = model
    run_merge(cli, tmp_path, {
        "models": {"base": "base", "ft": "ft"},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"},
                           "params": {"alpha": 0.3}}},
        "outputs": [{"from": "wise", "path": "merged", "shard_size": "40KB"}],
    }, recipe="wise.yaml")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base_sd, ft_sd = models["base"].state_dict(), models["ft"].state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, 0.7 * base_sd[key] + 0.3 * ft_sd[key], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        logits = merged(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 100) and torch.isfinite(logits).all()


def test_plan_and_extract_from_python(tmp_path, llama_models):
    import mergebench as mb
    from mergebench.io.artifacts import load_artifact

    folders, states, _ = llama_models()
    recipe = write_recipe(tmp_path / "ties.yaml", {
        "models": {k: str(v) for k, v in folders.items()},
        "nodes": {"t": {"op": "ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]}}},
        "outputs": [{"from": "t", "path": "out"}]})
    planned = mb.plan(recipe)
    assert planned.passes == 4 and planned.bytes_written == sum(v.nbytes for v in states["base"].values())
    assert planned.reads == {"base": 4, "ft1": 4, "ft2": 4}  # three statistics passes and the merge
    assert planned.may_skip == 1  # the fine histogram, when the coarse one settles the thresholds
    mixed = write_recipe(tmp_path / "mixed.yaml", {
        "models": {k: str(v) for k, v in folders.items()},
        "nodes": {"g": {"op": "ties", "inputs": {"base": "base", "models": ["ft1"]}},
                  "p": {"op": "ties", "inputs": {"base": "base", "models": ["ft2"]},
                        "params": {"scope": "per_tensor"}}},
        "outputs": [{"from": "g", "path": "out-g"}, {"from": "p", "path": "out-p"}]})
    assert mb.plan(mixed).reads == {"base": 4, "ft1": 4, "ft2": 1}  # ft2 counts in no global statistic
    assert not (tmp_path / "out").exists()  # a plan writes nothing
    mb.extract(folders["base"], folders["ft1"], tmp_path / "ft1.safetensors", proportion=0.1)
    sparse = load_artifact(tmp_path / "ft1.safetensors")
    delta = {k: states["ft1"][k].float() - states["base"][k].float() for k in states["base"]}
    kept = sum(int((v != 0).sum()) for v in sparse.values())
    assert kept == int(Decimal("0.1") * sum(v.numel() for v in delta.values()))  # global top-k; random deltas tie not
