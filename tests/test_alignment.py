"""Permutation alignment (Git Re-Basin weight matching): the golden example, and aligned models that
compute exactly the same function (MLP, tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from conftest import read_checkpoint, run_merge, write_recipe
from mergebench import operators as ops
from mergebench.surgery.permutations import build_spec, permute, transformer_ffn, weight_matching
from mergebench.synthetic import save_checkpoint

T = torch.tensor
A = {"fc1.weight": T([[1.0, 2], [3, 4]]), "fc2.weight": T([[5.0, 6]])}
B = {"fc1.weight": T([[3.0, 4], [1, 2]]), "fc2.weight": T([[6.0, 5]])}


def test_weight_matching_golden():
    spec = build_spec("auto", ["fc1", "fc2"], list(A))
    assert spec.groups == {"hidden0": (("fc1.weight", 0), ("fc2.weight", 1))}
    perms = weight_matching(spec, A, B)
    assert perms["hidden0"].tolist() == [1, 0]
    merged = ops.weight_matching(models=[A, B], layers=["fc1", "fc2"])
    assert all(torch.equal(merged[k], A[k]) for k in A)  # π(B) = A, so the merge is A exactly
    aligned = ops.align(model=B, reference=A, layers=["fc1", "fc2"])
    assert all(torch.equal(aligned[k], A[k]) for k in A)


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                               torch.nn.Linear(12, 3))


def test_align_preserves_an_mlp_and_raises_the_similarity():
    model_a, model_b = _mlp(0), _mlp(1)
    sd_a = model_a.state_dict()
    sd_b = {k: v.clone() for k, v in model_b.state_dict().items()}
    aligned = ops.align(model=sd_b, reference=sd_a)  # auto: the nn.Sequential chain 0 -> 2 -> 4
    x = torch.randn(32, 6)
    model_b.load_state_dict(aligned)
    torch.testing.assert_close(model_b(x), _mlp(1)(x), rtol=1e-5, atol=1e-6)
    before = sum(float((sd_a[k] * sd_b[k]).sum()) for k in sd_a)
    after = sum(float((sd_a[k] * aligned[k]).sum()) for k in sd_a)
    assert after > before


def test_ffn_specs_for_llama_gpt2_bert():
    llama = transformer_ffn(["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                             "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"])
    assert llama.groups == {"model.layers.0": (("model.layers.0.mlp.gate_proj.weight", 0),
                                               ("model.layers.0.mlp.up_proj.weight", 0),
                                               ("model.layers.0.mlp.down_proj.weight", 1))}
    gpt2 = transformer_ffn(["transformer.h.3.mlp.c_fc.weight", "transformer.h.3.mlp.c_fc.bias",
                            "transformer.h.3.mlp.c_proj.weight"])
    assert gpt2.groups["transformer.h.3"] == (("transformer.h.3.mlp.c_fc.weight", 1),
                                              ("transformer.h.3.mlp.c_fc.bias", 0),
                                              ("transformer.h.3.mlp.c_proj.weight", 0))
    bert = transformer_ffn(["encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.intermediate.dense.bias",
                            "encoder.layer.1.output.dense.weight"])
    assert set(bert.groups) == {"encoder.layer.1"}


def test_permute_applies_every_axis():
    spec = build_spec({"g": [["w", 0], ["v", 1]]}, None, ["w", "v"])
    perms = {"g": T([2, 0, 1])}
    assert torch.equal(permute(torch.arange(3.0), "w", spec, perms), T([2.0, 0, 1]))
    assert torch.equal(permute(torch.arange(6.0).reshape(2, 3), "v", spec, perms), T([[2.0, 0, 1], [5, 3, 4]]))


def test_align_of_a_tiny_llama_keeps_its_logits(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    models = {}
    for seed, name in ((0, "reference"), (1, "model")):
        torch.manual_seed(seed)
        models[name] = transformers.LlamaForCausalLM(config).eval()
        models[name].save_pretrained(tmp_path / name)
    run_merge(cli, tmp_path, {
        "models": {"model": "model", "reference": "reference"},
        "nodes": {"aligned": {"op": "align", "inputs": {"model": "model", "reference": "reference"}},
                  "merged": {"op": "wise_ft", "inputs": {"zero_shot": "reference", "fine_tuned": "aligned"}}},
        "outputs": [{"from": "aligned", "path": "aligned"}, {"from": "merged", "path": "merged"}],
    }, recipe="align.yaml")
    aligned = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "aligned").eval()
    ids = torch.tensor([[1, 7, 9, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(aligned(ids).logits, models["model"](ids).logits, rtol=1e-4, atol=1e-5)
    written = read_checkpoint(tmp_path / "aligned")
    original = models["model"].state_dict()
    up, q = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(written[up], original[up])  # FFN neurons reordered
    assert torch.equal(written[q], original[q])  # attention untouched by the FFN spec


def test_two_alignments_of_different_models_in_one_recipe(tmp_path, cli):
    from mergebench.synthetic import llama_config, llama_state_dict

    config = llama_config()
    llamas = {name: llama_state_dict(config, seed=seed) for seed, name in ((1, "l1"), (2, "l2"))}
    for name, state in {"a": A, "b": B, **llamas}.items():
        save_checkpoint(state, tmp_path / name, config=config if name in llamas else None)
    run_merge(cli, tmp_path, {  # each planning pass visits only its own models' keys
        "models": {name: name for name in ("a", "b", "l1", "l2")},
        "nodes": {"mlp": {"op": "align", "inputs": {"model": "b", "reference": "a"},
                          "params": {"layers": ["fc1", "fc2"]}},
                  "llama": {"op": "align", "inputs": {"model": "l1", "reference": "l2"}}},
        "outputs": [{"from": "mlp", "path": "out-mlp"}, {"from": "llama", "path": "out-llama"}],
    }, recipe="r.yaml")
    assert all(torch.equal(v, A[k]) for k, v in read_checkpoint(tmp_path / "out-mlp").items())
    expected = ops.align(model=llamas["l1"], reference=llamas["l2"])
    assert all(torch.equal(v, expected[k]) for k, v in read_checkpoint(tmp_path / "out-llama").items())


def test_weight_matching_needs_two_models(tmp_path, cli):
    for name, state in (("a", A), ("b", B), ("c", B)):
        save_checkpoint(state, tmp_path / name)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "a", "b": "b", "c": "c"},
        "nodes": {"m": {"op": "weight_matching", "inputs": {"models": ["a", "b", "c"]},
                        "params": {"layers": ["fc1", "fc2"]}}},
        "outputs": [{"from": "m", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "exactly 2 models" in result.output


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def test_ot_fusion_golden_swap():
    a = {"fc1.weight": T([[3.0, 5], [1, 1]]), "fc1.bias": T([10.0, 20]), "fc2.weight": T([[7.0, 5]])}
    b = {"fc1.weight": T([[1.0, 2], [3, 4]]), "fc1.bias": T([0.0, 0]), "fc2.weight": T([[5.0, 6]])}
    fused = ops.ot_fusion(models=[a, b], layers=["fc1", "fc2"])
    close(fused["fc1.weight"], [[1, 1.5], [3, 4.5]])
    close(fused["fc1.bias"], [10, 5])
    close(fused["fc2.weight"], [[5, 6.5]])
    vanilla = ops.linear(models=[a, b])
    close(vanilla["fc1.weight"], [[2, 3.5], [2, 2.5]])


def test_ot_fusion_of_a_permuted_copy_is_the_anchor():
    a = {"fc1.weight": T([[3.0, 4], [1, 2]]), "fc2.weight": T([[6.0, 5]])}
    b = {"fc1.weight": T([[1.0, 2], [3, 4]]), "fc2.weight": T([[5.0, 6]])}
    fused = ops.ot_fusion(models=[a, b], layers=["fc1", "fc2"])
    for key in b:
        close(fused[key], b[key])
    aligned_only = ops.ot_fusion(models=[a, b], layers=["fc1", "fc2"], s=0.0)
    for key in b:  # s = 0: A transported onto B's neuron order, which for a permuted copy is B itself
        close(aligned_only[key], b[key])


def test_ot_fusion_conv_then_flatten_then_linear():
    g = torch.Generator().manual_seed(0)
    conv_b, linear_b = torch.randn(2, 2, 3, 3, generator=g), torch.randn(4, 8, generator=g)
    swap = T([1, 0])
    conv_a = conv_b[swap]  # output channels swapped
    linear_a = linear_b.reshape(4, 2, 4)[:, swap].reshape(4, 8)  # and the matching input blocks
    fused = ops.ot_fusion(models=[{"conv.weight": conv_a, "fc.weight": linear_a},
                                  {"conv.weight": conv_b, "fc.weight": linear_b}], layers=["conv", "fc"])
    close(fused["conv.weight"], conv_b)
    close(fused["fc.weight"], linear_b)


def test_sinkhorn_plan_is_close_to_the_exact_one():
    import numpy as np
    import ot

    from mergebench.surgery.transport import ground_cost, transport_map

    g = torch.Generator().manual_seed(0)
    cost = ground_cost(torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), squared=False)
    cost = cost / cost.max()
    uniform = np.full(8, 1 / 8)
    plan = ot.sinkhorn(uniform, uniform, cost, 1e-2, method="sinkhorn_log", numItermax=10000, stopThr=1e-9)
    assert np.abs(plan.sum(1) - uniform).max() < 1e-4 and np.abs(plan.sum(0) - uniform).max() < 1e-4
    exact = ot.emd(uniform, uniform, cost)
    assert 0 <= (plan * cost).sum() - (exact * cost).sum() <= 1e-2
    soft = transport_map(cost, "sinkhorn", 1e-2)
    assert torch.allclose(soft.sum(0), torch.ones(8, dtype=torch.float64), atol=1e-5)  # columns renormalized


def test_ot_fusion_through_a_recipe(tmp_path, cli):
    a = {"fc1.weight": T([[3.0, 4], [1, 2]]), "fc2.weight": T([[6.0, 5]])}
    b = {"fc1.weight": T([[1.0, 2], [3, 4]]), "fc2.weight": T([[5.0, 6]])}
    save_checkpoint(a, tmp_path / "a")
    save_checkpoint(b, tmp_path / "b")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "a", "b": "b"},
        "nodes": {"f": {"op": "ot_fusion", "inputs": {"models": ["a", "b"]}, "params": {"layers": ["fc1", "fc2"],
                                                                                         "solver": "emd"}}},
        "outputs": [{"from": "f", "path": "out"}],
    })
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    out = read_checkpoint(tmp_path / "out")
    for key in b:
        close(out[key], b[key])


def test_ot_fusion_into_a_narrower_anchor(tmp_path, cli):
    from mergebench.surgery.transport import ground_cost, transport_map

    rows_a, rows_b = T([[1.0, 2], [3, 4], [5, 6]]), T([[1.0, 2], [5, 6]])
    t_hat = transport_map(ground_cost(rows_a, rows_b, squared=False), "emd", 0.01)
    close(t_hat, [[2 / 3, 0], [1 / 3, 1 / 3], [0, 2 / 3]])
    a = {"fc1.weight": rows_a, "fc2.weight": T([[3.0, 3, 3]])}
    b = {"fc1.weight": rows_b, "fc2.weight": T([[1.0, 1]])}
    fused = ops.ot_fusion(models=[a, b], layers=["fc1", "fc2"])
    close(fused["fc1.weight"], [[4 / 3, 7 / 3], [14 / 3, 17 / 3]])
    close(fused["fc2.weight"], [[2, 2]])  # W2_A·T̂ = [[3, 3]], averaged with [[1, 1]]
    save_checkpoint(a, tmp_path / "wide")
    save_checkpoint(b, tmp_path / "narrow")
    run_merge(cli, tmp_path, {
        "models": {"wide": "wide", "narrow": "narrow"},
        "nodes": {"f": {"op": "ot_fusion", "inputs": {"models": ["wide", "narrow"]},
                        "params": {"layers": ["fc1", "fc2"]}}},
        "outputs": [{"from": "f", "path": "out"}],
    }, recipe="r.yaml")
    out = read_checkpoint(tmp_path / "out")
    assert out["fc1.weight"].shape == (2, 2)  # the anchor's width
    close(out["fc1.weight"], [[4 / 3, 7 / 3], [14 / 3, 17 / 3]])


def test_align_by_ot_preserves_an_mlp():
    model_a, model_b = _mlp(0), _mlp(1)
    aligned = ops.align(model=model_b.state_dict(), reference=model_a.state_dict(), method="ot",
                        layers=["0", "2", "4"])
    x = torch.randn(16, 6)
    expected = model_b(x)
    model_b.load_state_dict(aligned)
    torch.testing.assert_close(model_b(x), expected, rtol=1e-5, atol=1e-5)  # the 1e-7 renormalisation epsilon


def test_independent_groups_are_solved_alone():
    from mergebench.surgery.permutations import independent_groups

    ffn = transformer_ffn([f"model.layers.{i}.mlp.{n}.weight" for i in range(3) for n in ("gate_proj", "up_proj",
                                                                                         "down_proj")])
    assert independent_groups(ffn) == set(ffn.groups)  # one block's neurons never touch another block's tensors
    chain = build_spec("auto", ["a", "b", "c"], ["a.weight", "b.weight", "c.weight"])
    assert independent_groups(chain) == set()  # b.weight is read by both hidden groups


def test_weight_matching_across_conv_flatten_linear():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    a, b = Net(), Net()
    x = torch.randn(5, 1, 4, 4)
    expected = b(x)
    aligned = ops.align(model=b.state_dict(), reference=a.state_dict(), layers=["conv", "fc"])
    b.load_state_dict(aligned)
    torch.testing.assert_close(b(x), expected, rtol=1e-5, atol=1e-6)  # channels and their flattened blocks moved


def _mlp_and_permuted_copy(tmp_path):
    """An MLP, the same MLP with both hidden layers' units shuffled, and each one's recorded activations."""
    from mergebench.io.activations import record_activations, save_activations

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                              torch.nn.Linear(12, 3))
    p1, p2 = torch.randperm(16), torch.randperm(12)
    state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    shuffled = {"0.weight": state["0.weight"][p1], "0.bias": state["0.bias"][p1],
                "2.weight": state["2.weight"][p2][:, p1], "2.bias": state["2.bias"][p2],
                "4.weight": state["4.weight"][:, p2], "4.bias": state["4.bias"]}
    twin = torch.nn.Sequential(*[type(m)(*([m.in_features, m.out_features] if hasattr(m, "in_features") else []))
                                 for m in mlp])
    twin.load_state_dict(shuffled)
    inputs = torch.randn(200, 8)
    for name, model, weights in (("a", mlp, state), ("b", twin, shuffled)):
        save_checkpoint(weights, tmp_path / name)
        save_activations(record_activations(model, inputs, ["0", "2", "4"]), tmp_path / f"acts_{name}.safetensors",
                         model=name)
    return state, shuffled


@pytest.mark.parametrize("op", ["align", "ot_fusion"])
def test_activation_cost_finds_the_shuffle(tmp_path, cli, op):
    state, shuffled = _mlp_and_permuted_copy(tmp_path)
    params = {"layers": ["0", "2", "4"], **({"method": "ot"} if op == "align" else {})}

    def run(activations: list[str]) -> dict[str, torch.Tensor]:
        inputs = {"model": "a", "reference": "b"} if op == "align" else {"models": ["a", "b"]}
        out = f"out-{'-'.join(activations)}"
        run_merge(cli, tmp_path, {
            "models": {"a": "a", "b": "b", "acts_a": "acts_a.safetensors", "acts_b": "acts_b.safetensors"},
            "nodes": {"x": {"op": op, "inputs": {**inputs, "activations": activations}, "params": params}},
            "outputs": [{"from": "x", "path": out}],
        }, recipe="r.yaml")
        return read_checkpoint(tmp_path / out)

    matched = run(["acts_a", "acts_b"])  # A's units carried onto B's: A becomes B (fused: the average of equals)
    for key, value in shuffled.items():
        close(matched[key], value, tol=1e-5)
    blind = run(["acts_a", "acts_a"])  # the same activations twice: the cost says "keep the order"
    for key, value in state.items():
        expected = value if op == "align" else (value + shuffled[key]) / 2
        close(blind[key], expected, tol=1e-5)


def test_activations_must_match_the_layer_widths(tmp_path, cli):
    _mlp_and_permuted_copy(tmp_path)
    from mergebench.io.activations import save_activations

    save_activations({"0": torch.randn(200, 16), "2": torch.randn(200, 11), "4": torch.randn(200, 3)},
                     tmp_path / "acts_bad.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "a", "b": "b", "acts_a": "acts_a.safetensors", "acts_bad": "acts_bad.safetensors"},
        "nodes": {"x": {"op": "ot_fusion", "inputs": {"models": ["a", "b"], "activations": ["acts_a", "acts_bad"]},
                        "params": {"layers": ["0", "2", "4"]}}},
        "outputs": [{"from": "x", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2
    assert "activations of layer '2' for model 1 have shape [200, 11]; the layer has 12 neurons" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, a unit carries two query heads
def test_aligning_attention_heads_undoes_a_head_shuffle(tmp_path, cli, kv_heads):
    """The model is the reference with every block's heads reversed: aligning its heads gives the reference's
    attention weights back, and the aligned model computes what the model did."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=50,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(3)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "reference")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    units = torch.arange(kv_heads).flip(0)
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn"
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = state[f"{prefix}.{name}.weight"]
            state[f"{prefix}.{name}.weight"] = weight.reshape(kv_heads, -1, 32)[units].reshape(weight.shape)
        o = state[f"{prefix}.o_proj.weight"]
        state[f"{prefix}.o_proj.weight"] = o.reshape(32, kv_heads, -1)[:, units].reshape(o.shape)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "model")
    recipe = write_recipe(tmp_path / "heads.yaml", {
        "models": {"model": "model", "reference": "reference"},
        "nodes": {"aligned": {"op": "align", "inputs": {"model": "model", "reference": "reference"},
                              "params": {"attention_heads": kv_heads}}},
        "outputs": [{"from": "aligned", "path": "aligned"}],
    })
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    aligned = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "aligned").eval()
    ids = torch.tensor([[1, 7, 9, 3, 4, 11]])
    with torch.no_grad():
        torch.testing.assert_close(aligned(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    written, original = read_checkpoint(tmp_path / "aligned"), reference.state_dict()
    for key in written:
        if "self_attn" in key:
            assert torch.equal(written[key], original[key]), key
        assert not torch.equal(state[key], original[key]) or "self_attn" not in key  # the shuffle was real


def test_attention_head_groups_for_llama_and_bert():
    from mergebench.surgery.permutations import attention_heads

    llama = attention_heads([f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkvo"], heads=2)
    assert llama.groups == {"model.layers.0.heads": (("model.layers.0.self_attn.q_proj.weight", 0),
                                                     ("model.layers.0.self_attn.k_proj.weight", 0),
                                                     ("model.layers.0.self_attn.v_proj.weight", 0),
                                                     ("model.layers.0.self_attn.o_proj.weight", 1))}
    assert llama.units == {"model.layers.0.heads": 2}
    bert = attention_heads(["encoder.layer.3.attention.self.query.weight", "encoder.layer.3.attention.self.key.bias",
                            "encoder.layer.3.attention.output.dense.weight", "encoder.layer.3.output.dense.weight"], 12)
    assert [k for k, _ in bert.groups["encoder.layer.3.heads"]] == [
        "encoder.layer.3.attention.self.query.weight", "encoder.layer.3.attention.self.key.bias",
        "encoder.layer.3.attention.output.dense.weight"]
