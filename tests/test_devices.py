"""Every operator through the CLI on a GPU gives the CPU's result (skipped where there is no GPU).

The inputs are bfloat16 (they cross to the device as stored and are upcast there), the outputs
float32, so a difference in the GPU's arithmetic is not hidden by rounding to bfloat16. Masks and
sparse deltas must match exactly: their thresholds are exact on either device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_merge, write_recipe
from mergebench.io.activations import record_activations, save_activations
from mergebench.io.statistics import record_statistics, save_statistics
from mergebench.operators.base import CHECKPOINT, REGISTRY, list_of
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

TINY = ["base", "ft1", "ft2"]
MASKS = {"m1": {"op": "mask_topk", "inputs": {"base": "base", "fine_tuned": "ft1"}, "params": {"proportion": 0.2}},
         "m2": {"op": "mask_topk", "inputs": {"base": "base", "fine_tuned": "ft2"}, "params": {"proportion": 0.2}}}
SPARSE = {"s1": {"op": "sft_extract", "inputs": {"base": "base", "fine_tuned": "ft1"}, "params": {"proportion": 0.1}},
          "s2": {"op": "sft_extract", "inputs": {"base": "base", "fine_tuned": "ft2"}, "params": {"proportion": 0.1}}}
TASKS = {"base": "base", "models": ["ft1", "ft2"]}
MLP_LAYERS = ["0", "2", "4"]

# operator -> (nodes, the node written as a checkpoint, or as an artifact file when it ends in .safetensors)
SPECIAL: dict[str, tuple[dict, str]] = {
    "wise_ft": ({"x": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft1"},
                       "params": {"alpha": 0.3}}}, "x"),
    "linear": ({"x": {"op": "linear", "inputs": {"models": TINY}, "params": {"weights": [1, 2, 3]}}}, "x"),
    "task_arithmetic": ({"x": {"op": "task_arithmetic", "inputs": TASKS, "params": {"lambda": 0.7}}}, "x"),
    "ties": ({"x": {"op": "ties", "inputs": TASKS, "params": {"density": 0.3}},
              "y": {"op": "ties", "inputs": {"deltas": "d"}, "params": {"density": 0.3, "scope": "per_tensor"}},
              "d": {"op": "delta", "inputs": TASKS},
              "z": {"op": "apply", "inputs": {"base": "x", "delta": "y"}}}, "z"),
    "dare": ({"d": {"op": "dare", "inputs": TASKS, "params": {"p": 0.6}},
              "x": {"op": "apply", "inputs": {"base": "base", "delta": "d"}}}, "x"),
    "dare_linear": ({"x": {"op": "dare_linear", "inputs": TASKS, "params": {"p": 0.4}}}, "x"),
    "dare_ties": ({"x": {"op": "dare_ties", "inputs": TASKS, "params": {"p": 0.5}},
                   "y": {"op": "dare_ties", "inputs": TASKS, "params": {"p": 0.5, "scope": "per_tensor"}},
                   "z": {"op": "linear", "inputs": {"models": ["x", "y"]}}}, "z"),
    "darex_q": ({"d": {"op": "darex_q", "inputs": TASKS, "params": {"p": 0.5}},
                 "x": {"op": "apply", "inputs": {"base": "base", "delta": "d"}}}, "x"),
    "delta": ({"d": {"op": "delta", "inputs": TASKS},
               "t": {"op": "task_arithmetic", "inputs": {"deltas": "d"}},
               "x": {"op": "apply", "inputs": {"base": "base", "delta": "t"}}}, "x"),
    "apply": ({"d": {"op": "delta", "inputs": TASKS},
               "x": {"op": "apply", "inputs": {"base": "base", "delta": "d"}, "params": {"scale": 0.5}}}, "x"),
    "lora_extract": ({"e": {"op": "lora_extract", "inputs": {"base": "base", "fine_tuned": "ft1"},
                            "params": {"rank": 4, "svd": "full"}},
                      "x": {"op": "apply", "inputs": {"base": "base", "delta": "e"}}}, "x"),
    "lora_merge": ({"e1": {"op": "lora_extract", "inputs": {"base": "base", "fine_tuned": "ft1"},
                           "params": {"energy": 0.5, "max_rank": 8}},
                    "e2": {"op": "lora_extract", "inputs": {"base": "base", "fine_tuned": "ft2"},
                           "params": {"rank": 6, "svd": "randomized"}},
                    "m": {"op": "lora_merge", "inputs": {"adapters": ["e1", "e2"]},
                          "params": {"combination": "ties_svd", "density": 0.5, "weights": [1, -0.5], "svd": "full"}},
                    "c": {"op": "lora_merge", "inputs": {"adapters": ["e1", "e2"]}, "params": {"combination": "cat"}},
                    "x": {"op": "apply", "inputs": {"base": "base", "delta": ["m", "c"]}, "params": {"scale": 0.5}}},
                   "x"),
    "fisher": ({"x": {"op": "fisher", "inputs": {"models": ["mlp_a", "mlp_b"], "fishers": ["fisher_a", "fisher_b"]}},
                "y": {"op": "wise_ft", "inputs": {"zero_shot": "mlp_a", "fine_tuned": "mlp_b",
                                                  "fishers": ["fisher_a", "fisher_b"]}, "params": {"alpha": 0.4}}},
               "x y"),
    "regmean": ({"x": {"op": "regmean", "inputs": {"models": ["mlp_a", "mlp_b"], "grams": ["gram_a", "gram_b"]},
                       "params": {"alpha": 0.7}}}, "x"),
    "slerp": ({"x": {"op": "slerp", "inputs": {"a": "ft1", "b": "ft2"}, "params": {"t": 0.3}}}, "x"),
    "stack": ({"s": {"op": "slerp", "inputs": {"a": "ft1", "b": "ft2"}, "params": {"t": [0.2, 0.9]}},
               "x": {"op": "stack", "inputs": {"models": ["base", "s"]},
                     "params": {"slices": [{"model": "s", "layers": [1, 2]}, {"model": "base", "layers": [0, 2]},
                                           {"model": "s", "layers": [0, 2]}]}}}, "x"),
    "moe": ({"t": {"op": "ties", "inputs": TASKS, "params": {"density": 0.3}},
             "x": {"op": "moe", "inputs": {"base": "base", "experts": ["ft1", "t", "base"]},
                   "params": {"gate_mode": "random"}, "seed": 1}}, "x"),
    "nearswap": ({"x": {"op": "nearswap", "inputs": {"base": "base", "model": "ft1"}, "params": {"t": 0.01}}}, "x"),
    "nuslerp": ({"x": {"op": "nuslerp", "inputs": {"models": ["ft1", "ft2"]}, "params": {"weights": [1, 2]}},
                 "y": {"op": "nuslerp", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                       "params": {"flatten": False}},
                 "z": {"op": "linear", "inputs": {"models": ["x", "y"]}}}, "z"),
    "mask_topk": (MASKS, "m1.safetensors"),
    "mask_union": ({**MASKS, "u": {"op": "mask_union", "inputs": {"masks": ["m1", "m2"]}}}, "u.safetensors"),
    "mask_intersection": ({**MASKS, "i": {"op": "mask_intersection", "inputs": {"masks": ["m1", "m2"]}}},
                          "i.safetensors"),
    "graft": ({**MASKS, "g": {"op": "graft", "inputs": {"pretrained": "base", "fine_tuned": "ft1", "mask": "m1"}},
               "h": {"op": "graft", "inputs": {"pretrained": "base", "fine_tuned": "ft2"}},
               "x": {"op": "linear", "inputs": {"models": ["g", "h"]}}}, "x"),
    "sft_extract": (SPARSE, "s1.safetensors"),
    "sft_compose": ({**SPARSE, "x": {"op": "sft_compose", "inputs": {"base": "base", "deltas": ["s1", "s2"]}}}, "x"),
    "ema": ({"x": {"op": "ema", "inputs": {"sequence": "run"}, "params": {"decay": 0.8}}}, "x"),
    "bema": ({"x": {"op": "bema", "inputs": {"sequence": "run"}, "params": {"lag": 5, "multiplier": 0.1}}}, "x"),
    "momentum_interp": ({"x": {"op": "momentum_interp", "inputs": {"init": "base", "sequence": "run"},
                               "params": {"tau": 0.5}}}, "x"),
    "align": ({"x": {"op": "align", "inputs": {"model": "mlp_b", "reference": "mlp_a",
                                               "activations": ["acts_b", "acts_a"]},
                     "params": {"layers": MLP_LAYERS, "method": "ot"}},
               "y": {"op": "align", "inputs": {"model": "mlp_b", "reference": "mlp_a"},
                     "params": {"layers": MLP_LAYERS}},
               "z": {"op": "wise_ft", "inputs": {"zero_shot": "mlp_a", "fine_tuned": "y"}}}, "x z"),
    "weight_matching": ({"x": {"op": "weight_matching", "inputs": {"models": ["mlp_a", "mlp_b"]},
                               "params": {"layers": MLP_LAYERS}}}, "x"),
    "ot_fusion": ({"x": {"op": "ot_fusion", "inputs": {"models": ["mlp_a", "mlp_b"]},
                         "params": {"layers": MLP_LAYERS, "solver": "emd"}},
                   "y": {"op": "ot_fusion",
                         "inputs": {"models": ["mlp_a", "mlp_b"], "activations": ["acts_a", "acts_b"]},
                         "params": {"layers": MLP_LAYERS, "solver": "sinkhorn", "reg": 0.05}}}, "x y"),
}


def _derived(op) -> tuple[dict, str] | None:
    """A case for an operator whose every slot takes Checkpoints and that gives a Checkpoint: its first
    signature wired to the tiny Llamas (single slots to base, ft1, ft2 in turn; list slots to all three)."""
    signature = op.signatures[0]
    if signature.result != CHECKPOINT or any(types not in ((CHECKPOINT,), (list_of(CHECKPOINT),))
                                             for types in signature.slots.values()):
        return None
    singles = iter(TINY)
    inputs = {slot: TINY if types == (list_of(CHECKPOINT),) else next(singles)
              for slot, types in signature.slots.items()}
    return {"x": {"op": op.name, "inputs": inputs}}, "x"


SHIPPED = {name: op for name, op in REGISTRY.items() if op.fn.__module__.startswith("mergebench.")}  # not tests'
# operator -> (nodes, the node written as a checkpoint, or as an artifact file when it ends in .safetensors):
# derived for plain Checkpoint operators, written by hand where parameters or other inputs matter
CASES: dict[str, tuple[dict, str]] = {
    **{name: case for name, op in SHIPPED.items() if (case := _derived(op)) is not None}, **SPECIAL}


def test_every_operator_has_a_device_case():
    assert set(CASES) == set(SHIPPED)
    assert {"bitdelta", "breadcrumbs", "lines"} <= set(CASES) - set(SPECIAL)  # derived, not written


@pytest.mark.parametrize("op", sorted(CASES))
def test_every_device_case_is_a_valid_recipe(tmp_path, inputs, op):
    """Checked here, on the CPU, so that the CUDA comparison never fails on a case that was wrong."""
    import mergebench as mb

    nodes, written = CASES[op]
    recipe = write_recipe(tmp_path / "case.yaml", _case_doc(inputs, tmp_path / "out", nodes, written))
    planned = mb.plan(recipe)
    assert {Path(o.path).name for o in planned.graph.outputs} == set(written.split())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Tiny bf16 Llamas (base, two fine-tunes, a two-checkpoint run) and two MLPs with their activations."""
    folder = tmp_path_factory.mktemp("inputs")
    config = llama_config(dtype="bfloat16")
    base = llama_state_dict(config, seed=0, dtype=torch.bfloat16)
    save_checkpoint(base, folder / "base", 40_000, config)
    for seed in (1, 2):
        state = llama_state_dict(config, seed=seed, base=base, noise=0.1, dtype=torch.bfloat16)
        save_checkpoint(state, folder / f"ft{seed}", 40_000, config)
        save_checkpoint(state, folder / "run" / f"checkpoint-{seed}", 40_000, config)
    torch.manual_seed(0)
    for name in ("a", "b"):
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                                  torch.nn.Linear(12, 3))
        save_checkpoint({k: v.detach() for k, v in mlp.state_dict().items()}, folder / f"mlp_{name}")
        save_activations(record_activations(mlp, torch.randn(64, 8), MLP_LAYERS), folder / f"acts_{name}.safetensors",
                         model=f"mlp_{name}")
        inputs = torch.randn(32, 8)
        save_statistics(record_statistics(mlp, [inputs[:16], inputs[16:]], logits=lambda m, b: m(b)),
                        folder / f"stats_{name}")
    return folder


def _case_doc(inputs: Path, out: Path, nodes: dict, written: str) -> dict:
    models = {name: str(inputs / name) for name in ("base", "ft1", "ft2", "mlp_a", "mlp_b")}
    models.update({"run": str(inputs / "run" / "checkpoint-*"), "acts_a": str(inputs / "acts_a.safetensors"),
                   "acts_b": str(inputs / "acts_b.safetensors")})
    models.update({f"{kind}_{m}": str(inputs / f"stats_{m}" / f"{kind}.safetensors") for kind in ("fisher", "gram")
                   for m in "ab"})
    used = {ref for node in nodes.values() for refs in node["inputs"].values()
            for ref in ([refs] if isinstance(refs, str) else refs)}
    outputs = [{"from": name.removesuffix(".safetensors"), "path": str(out / name),
                **({} if name.endswith(".safetensors") else {"dtype": "float32"})} for name in written.split()]
    return {"models": {m: p for m, p in models.items() if m in used}, "nodes": nodes, "outputs": outputs}


def _run(cli, inputs: Path, out: Path, op: str, device: str) -> dict[str, dict[str, torch.Tensor]]:
    nodes, written = CASES[op]
    doc = _case_doc(inputs, out, nodes, written)
    written_back = run_merge(cli, out.parent, doc, "--device", device, recipe=out.with_suffix(".yaml").name)
    return {name: written_back[str(out / name)] for name in written.split()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("op", sorted(CASES))
def test_operator_on_cuda_matches_the_cpu(tmp_path, cli, inputs, op):
    on_cpu = _run(cli, inputs, tmp_path / "cpu", op, "cpu")
    on_gpu = _run(cli, inputs, tmp_path / "gpu", op, "cuda")
    for name, expected in on_cpu.items():
        assert on_gpu[name].keys() == expected.keys()
        for key, value in expected.items():
            exact = value.dtype == torch.bool or name.endswith(".safetensors")
            tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
            torch.testing.assert_close(on_gpu[name][key], value, **tolerance,
                                       msg=lambda m, at=f"{name} {key}": f"{at}: {m}")
