"""Properties every merge keeps: exact end points, streaming == eager, layout independence, one read per tensor."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_checkpoint, write_recipe
from mergebench import operators as ops
from mergebench.engine.runner import RunOptions, run_recipe
from mergebench.io.checkpoint import Checkpoint
from mergebench.recipe import load_recipe
from mergebench.synthetic import save_checkpoint


def _wise_recipe(tmp_path, folders, alpha, **output):
    return write_recipe(tmp_path / "wise.yaml", {
        "models": {"zs": str(folders["base"]), "ft": str(folders["ft1"])},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "zs", "fine_tuned": "ft"},
                           "params": {"alpha": alpha}}},
        "outputs": [{"from": "wise", "path": "out", **output}],
    })


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("alpha", "source"), [(0.0, "base"), (1.0, "ft1")])
def test_alpha_end_points_reproduce_an_input_bit_for_bit(tmp_path, cli, llama_models, dtype, alpha, source):
    folders, states, _ = llama_models(dtype)
    states[source]["model.norm.weight"][0] = -0.0  # signed zeros must survive too
    save_checkpoint(states[source], folders[source], 40_000)
    result = cli("run", _wise_recipe(tmp_path, folders, alpha), "--quiet")
    assert result.exit_code == 0, result.output
    merged = read_checkpoint(tmp_path / "out")
    for key, tensor in states[source].items():
        assert merged[key].dtype == dtype
        assert torch.equal(merged[key].view(torch.uint8), tensor.view(torch.uint8)), key


def test_streaming_equals_eager(tmp_path, llama_models):
    folders, states, _ = llama_models(torch.bfloat16)
    recipe = write_recipe(tmp_path / "ta.yaml", {
        "models": {name: str(path) for name, path in folders.items()},
        "nodes": {"ta": {"op": "task_arithmetic", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                         "params": {"lambda": 0.7, "weights": [1.0, -0.5]}}},
        "outputs": [{"from": "ta", "path": "out"}],
    })
    run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    streamed = read_checkpoint(tmp_path / "out")
    eager = ops.task_arithmetic(base=states["base"], models=[states["ft1"], states["ft2"]], lambda_=0.7,
                                weights=[1.0, -0.5])
    assert streamed.keys() == eager.keys()
    for key in eager:
        assert torch.equal(streamed[key], eager[key]), key


def test_lazy_api_equals_yaml(tmp_path, llama_models):
    import mergebench as mb

    folders, _, _ = llama_models()
    base, ft = mb.load(folders["base"]), mb.load(folders["ft1"])
    mb_result = ops.wise_ft(zero_shot=base, fine_tuned=ft, alpha=0.3).save(tmp_path / "lazy", device="cpu")
    assert mb_result.summary.tensors == len(Checkpoint(folders["base"]).keys)
    mb.run(_wise_recipe(tmp_path, folders, 0.3), device="cpu")
    lazy, yaml_out = read_checkpoint(tmp_path / "lazy"), read_checkpoint(tmp_path / "out")
    for key in yaml_out:
        assert torch.equal(lazy[key], yaml_out[key]), key
    assert json.loads((tmp_path / "lazy" / "config.json").read_text())["model_type"] == "llama"


def test_run_api_set_overrides_a_parameter(tmp_path, llama_models):
    import mergebench as mb

    folders, states, _ = llama_models()
    mb.run(_wise_recipe(tmp_path, folders, 0.9), set={"wise.alpha": 0.0}, device="cpu")
    merged = read_checkpoint(tmp_path / "out")
    assert all(torch.equal(merged[k], states["base"][k]) for k in merged)


@pytest.mark.parametrize(("input_shard", "output_shard"), [(10**9, "10MB"), (20_000, "30000"), (5_000, "1KB")])
def test_result_independent_of_input_and_output_sharding(tmp_path, cli, llama_models, input_shard, output_shard):
    folders, states, _ = llama_models(torch.float32, shard_size=input_shard)
    result = cli("run", _wise_recipe(tmp_path, folders, 0.37, shard_size=output_shard), "--quiet")
    assert result.exit_code == 0, result.output
    merged = read_checkpoint(tmp_path / "out")
    for key in states["base"]:
        expected = 0.63 * states["base"][key] + 0.37 * states["ft1"][key]
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-7)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert (len(shards) == 1) == (shards == ["model.safetensors"])
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() == (len(shards) > 1)


def test_result_independent_of_key_order(tmp_path, llama_models):
    folders, states, _ = llama_models()
    reversed_states = {k: states["ft1"][k] for k in reversed(list(states["ft1"]))}
    save_checkpoint(reversed_states, tmp_path / "ft1-reversed", 30_000)
    outputs = {}
    for name, ft in (("ordered", folders["ft1"]), ("reversed", tmp_path / "ft1-reversed")):
        recipe = write_recipe(tmp_path / f"{name}.yaml", {
            "models": {"zs": str(folders["base"]), "ft": str(ft)},
            "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "zs", "fine_tuned": "ft"}}},
            "outputs": [{"from": "wise", "path": name}],
        })
        run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
        outputs[name] = read_checkpoint(tmp_path / name)
    for key in outputs["ordered"]:
        assert torch.equal(outputs["ordered"][key], outputs["reversed"][key]), key


def test_two_outputs_read_each_input_tensor_once(tmp_path, llama_models):
    folders, _, _ = llama_models()
    recipe = write_recipe(tmp_path / "two.yaml", {
        "models": {name: str(path) for name, path in folders.items()},
        "nodes": {
            "tv": {"op": "delta", "inputs": {"base": "base", "models": ["ft1", "ft2"]}},
            "ta": {"op": "task_arithmetic", "inputs": {"deltas": "tv"}},
            "merged": {"op": "apply", "inputs": {"base": "base", "delta": "ta"}},
            "wise": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft1"}},
        },
        "outputs": [{"from": "merged", "path": "a"}, {"from": "wise", "path": "b", "dtype": "bfloat16"}],
    })
    sources = {name: Checkpoint(path) for name, path in folders.items()}
    run_recipe(load_recipe(recipe), RunOptions(device="cpu"), sources=sources)
    for name, source in sources.items():
        assert set(source.reads) == set(source.keys), name
        assert set(source.reads.values()) == {1}, name


def test_excluded_keys_are_not_read_from_other_models(tmp_path, llama_models):
    folders, states, _ = llama_models()
    recipe = write_recipe(tmp_path / "ex.yaml", {
        "models": {"zs": str(folders["base"]), "ft": str(folders["ft1"])},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "zs", "fine_tuned": "ft"},
                           "exclude": ["embed_tokens"], "overrides": [{"match": "lm_head", "params": {"alpha": 1.0}}]}},
        "outputs": [{"from": "wise", "path": "out"}],
    })
    sources = {"zs": Checkpoint(folders["base"]), "ft": Checkpoint(folders["ft1"])}
    run_recipe(load_recipe(recipe), RunOptions(device="cpu"), sources=sources)
    assert "model.embed_tokens.weight" not in sources["ft"].reads
    merged = read_checkpoint(tmp_path / "out")
    assert torch.equal(merged["model.embed_tokens.weight"], states["base"]["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], states["ft1"]["lm_head.weight"])
    torch.testing.assert_close(merged["model.norm.weight"],
                               0.5 * states["base"]["model.norm.weight"] + 0.5 * states["ft1"]["model.norm.weight"])
