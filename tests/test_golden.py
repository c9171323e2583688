"""The golden examples of semantics (§1, §9.0, §9.1), through the eager API and through a YAML recipe."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_checkpoint, run_merge
from mergebench import operators as ops

T = torch.tensor


def close(actual, expected):
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


def test_wise_ft_golden():
    close(ops.wise_ft(zero_shot=T([1.0, 2, 3, 4]), fine_tuned=T([3.0, 2, 1, 0]), alpha=0.25), [1.5, 2.0, 2.5, 3.0])


def test_wise_ft_default_alpha_is_half():
    close(ops.wise_ft(zero_shot=T([0.0, 2]), fine_tuned=T([2.0, 4])), [1.0, 3.0])


@pytest.mark.parametrize(("normalize", "expected"), [(True, [2.5, 5.0]), (False, [10.0, 20.0])])
def test_linear_golden(normalize, expected):
    close(ops.linear(models=[T([1.0, 2]), T([3.0, 6])], weights=[1, 3], normalize=normalize), expected)


def test_task_arithmetic_golden():
    base = T([1.0, 1, 1])
    models = [base + T([1.0, 0, -1]), base + T([0.0, 2, 2])]
    close(ops.task_arithmetic(base=base, models=models, **{"lambda": 0.5}), [1.5, 2.0, 1.5])


def test_task_arithmetic_negation():
    base, tau = T([1.0, 1, 1]), T([1.0, 0, -1])
    close(ops.task_arithmetic(base=base, models=[base + tau], weights=[-1], lambda_=0.5), [0.5, 1.0, 1.5])


def test_task_arithmetic_default_lambda_is_0_3():
    close(ops.task_arithmetic(base=T([0.0]), models=[T([1.0]), T([2.0])]), [0.9])


def test_delta_then_task_arithmetic_then_apply_composes():
    base = T([1.0, 1, 1])
    deltas = ops.delta(base=base, models=[base + T([1.0, 0, -1]), base + T([0.0, 2, 2])])
    close(deltas[0], [1.0, 0, -1])
    close(deltas[1], [0.0, 2, 2])
    merged = ops.task_arithmetic(deltas=deltas, lambda_=0.5)
    close(merged, [0.5, 1.0, 0.5])
    close(ops.apply(base=base, delta=merged), [1.5, 2.0, 1.5])
    close(ops.apply(base=base, delta=deltas, scale=0.5), [1.5, 2.0, 1.5])


def test_state_dicts_keep_keys_and_buffers():
    sd0 = {"layers.0.w": T([1.0, 2]), "ids": torch.arange(3)}
    sd1 = {"layers.0.w": T([3.0, 4]), "ids": torch.arange(3)}
    out = ops.wise_ft(zero_shot=sd0, fine_tuned=sd1, alpha=0.5)
    assert list(out) == ["layers.0.w", "ids"]
    close(out["layers.0.w"], [2.0, 3.0])
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], torch.arange(3))


def test_eager_results_keep_the_key_order_when_a_large_key_finishes_last():
    states = [{"embed": torch.full((4_000_000,), float(i)), **{f"layers.{j}.w": torch.ones(3) * i for j in range(6)}}
              for i in range(2)]
    out = ops.wise_ft(zero_shot=states[0], fine_tuned=states[1], alpha=0.5)
    assert list(out) == list(states[0])
    assert torch.equal(out["embed"][:2], T([0.5, 0.5]))


GOLDEN_RECIPES = [
    ("wise_ft", {"zero_shot": "a", "fine_tuned": "b"}, {"alpha": 0.25},
     {"a": [1.0, 2, 3, 4], "b": [3.0, 2, 1, 0]}, [1.5, 2.0, 2.5, 3.0]),
    ("linear", {"models": ["a", "b"]}, {"weights": [1, 3]}, {"a": [1.0, 2], "b": [3.0, 6]}, [2.5, 5.0]),
    ("linear", {"models": ["a", "b"]}, {"weights": [1, 3], "normalize": False},
     {"a": [1.0, 2], "b": [3.0, 6]}, [10.0, 20.0]),
    ("task_arithmetic", {"base": "a", "models": ["b", "c"]}, {"lambda": 0.5},
     {"a": [1.0, 1, 1], "b": [2.0, 1, 0], "c": [1.0, 3, 3]}, [1.5, 2.0, 1.5]),
]


@pytest.mark.parametrize(("op", "inputs", "params", "models", "expected"), GOLDEN_RECIPES)
def test_golden_through_yaml_and_cli(tmp_path, cli, op, inputs, params, models, expected):
    for name, values in models.items():
        save_file({"layers.0.w": T(values)}, tmp_path / f"{name}.safetensors")
    run_merge(cli, tmp_path, {
        "models": {name: f"{name}.safetensors" for name in models},
        "nodes": {"m": {"op": op, "inputs": inputs, "params": params}},
        "outputs": [{"from": "m", "path": "out"}],
    })
    close(read_checkpoint(tmp_path / "out")["layers.0.w"], expected)
