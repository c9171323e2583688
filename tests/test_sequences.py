"""Checkpoint sequences: momentum interpolation, EMA and BEMA over a training run (semantics §7, §8)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_checkpoint, run_merge, write_recipe
from mergebench import operators as ops
from mergebench.engine.runner import RunOptions, run_recipe
from mergebench.io.checkpoint import Checkpoint
from mergebench.io.sequences import step_of
from mergebench.recipe import load_recipe

T = torch.tensor
BEMA_RUN = {0: T([0.0, 0, 0]), 1: T([4.0, 8, -4]), 2: T([10.0, 0, 5])}
BEMA_PARAMS = {"lag": 7, "multiplier": 9, "ema_power": 0.5, "bias_power": 0.5}


def close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=1e-5)


def test_bema_golden():
    close(ops.bema(sequence=BEMA_RUN, **BEMA_PARAMS), [4.8, 1.6, 1.2])
    close(ops.bema(sequence={0: BEMA_RUN[0], 1: BEMA_RUN[1]}, **BEMA_PARAMS), [2, 4, -2])


def test_bema_without_bias_correction_is_the_ema():
    close(ops.bema(sequence=BEMA_RUN, bias_correction=False, **BEMA_PARAMS), [2.8, 1.6, 0.2])
    ema_params = {k: v for k, v in BEMA_PARAMS.items() if k != "bias_power"}
    close(ops.ema(sequence=BEMA_RUN, **ema_params), [2.8, 1.6, 0.2])


def test_bema_with_init_as_anchor_and_burn_in():
    run = {10: BEMA_RUN[1], 11: BEMA_RUN[2], 5: T([99.0, 99, 99])}  # step 5 is before the burn-in: ignored
    close(ops.bema(sequence=run, init=BEMA_RUN[0], update_after=9, **BEMA_PARAMS), [4.8, 1.6, 1.2])


def test_bema_without_ema_uses_the_iterate():
    # EMA_k = θ_k, BEMA = θ_2 + α_2·(θ_2 − θ_0) with α_2 = 0.2
    close(ops.bema(sequence=BEMA_RUN, ema=False, **BEMA_PARAMS), [12, 0, 6])


def test_momentum_golden_and_closed_form():
    init, run = T([0.0, 0, 0]), {1: T([1.0, 2, 4]), 2: T([2.0, 2, 0])}
    close(ops.momentum_interp(init=init, sequence=run, tau=0.5), [1.25, 1.5, 1.0])
    tau_eff = 0.9**3
    expected = tau_eff**2 * init + (1 - tau_eff) * (tau_eff * run[1] + run[2])
    close(ops.momentum_interp(init=init, sequence=run, tau=0.9, steps_per_checkpoint=3), expected)
    assert torch.equal(ops.momentum_interp(init=init, sequence=run, tau=1.0), init)
    assert torch.equal(ops.momentum_interp(init=init, sequence=run, tau=0.0), run[2])


def test_ema_with_decay_equals_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    states = {}
    for step in range(1, 7):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
        averaged.update_parameters(model)
        states[step * 100] = {k: v.clone() for k, v in model.state_dict().items()}
    result = ops.ema(sequence=states, decay=0.9)
    for key, value in averaged.module.state_dict().items():
        assert torch.equal(result[key], value), key


def test_step_parsing():
    assert step_of("run/checkpoint-500") == 500
    assert step_of("/x/step_1200") == 1200
    assert step_of("global_step300") == 300
    assert step_of("epoch-3.safetensors") == 3
    assert step_of("final") is None


def _save_run(folder, steps, keys=("model.layers.0.w", "model.layers.1.w", "ids"), seed=0):
    g = torch.Generator().manual_seed(seed)
    states = {}
    for step in steps:
        state = {k: torch.randn(64, 32, generator=g) for k in keys if k != "ids"}
        if "ids" in keys:
            state["ids"] = torch.arange(5)
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        save_file(state, folder / f"checkpoint-{step}" / "model.safetensors")
        states[step] = state
    return states


def test_streaming_fold_equals_eager_fold_bit_for_bit(tmp_path, cli):
    states = _save_run(tmp_path / "run", [200, 400, 600, 800, 1000, 1200])  # 1000 sorts before 200 as text
    run_merge(cli, tmp_path, {
        "models": {"run": "run/checkpoint-*"},
        "nodes": {"bema": {"op": "bema", "inputs": {"sequence": "run"}, "params": {"lag": 5, "multiplier": 0.1}},
                  "ema": {"op": "ema", "inputs": {"sequence": "run"}, "params": {"decay": 0.8}}},
        "outputs": [{"from": "bema", "path": "out-bema"}, {"from": "ema", "path": "out-ema"}],
    }, recipe="r.yaml")
    eager_bema = ops.bema(sequence=states, lag=5, multiplier=0.1)
    eager_ema = ops.ema(sequence=states, decay=0.8)
    for name, eager in (("out-bema", eager_bema), ("out-ema", eager_ema)):
        written = read_checkpoint(tmp_path / name)
        assert written.keys() == eager.keys()
        for key in eager:
            assert torch.equal(written[key], eager[key]), (name, key)
    assert torch.equal(read_checkpoint(tmp_path / "out-bema")["ids"], torch.arange(5))


def test_each_checkpoint_tensor_is_read_once_per_fold(tmp_path):
    _save_run(tmp_path / "run", [1, 2, 3])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"run": {"paths": ["run/checkpoint-3", "run/checkpoint-1", "run/checkpoint-2"]}},
        "nodes": {"avg": {"op": "ema", "inputs": {"sequence": "run"}, "params": {"decay": 0.5}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    loaded = load_recipe(recipe)
    assert [step for step, _ in loaded.sequences["run"]] == [1, 2, 3]
    sources = {name: Checkpoint(path) for name, path in loaded.models.items()}
    run_recipe(loaded, RunOptions(device="cpu"), sources=sources)
    for source in sources.values():
        assert source.reads["model.layers.0.w"] == 1


def test_momentum_from_a_recipe_with_explicit_steps(tmp_path, cli):
    states = _save_run(tmp_path / "run", [1, 2])
    zero = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in states[1].items()}
    save_file(zero, tmp_path / "zs.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"zs": "zs.safetensors",
                   "run": {"paths": ["run/checkpoint-1", "run/checkpoint-2"], "steps": [10, 20]}},
        "nodes": {"slow": {"op": "momentum_interp", "inputs": {"init": "zs", "sequence": "run"},
                           "params": {"tau": 0.5}}},
        "outputs": [{"from": "slow", "path": "out"}],
    })
    assert cli("run", recipe, "--quiet").exit_code == 0
    written = read_checkpoint(tmp_path / "out")
    close(written["model.layers.0.w"], 0.25 * states[1]["model.layers.0.w"] + 0.5 * states[2]["model.layers.0.w"])


@pytest.mark.parametrize(("models", "message"), [
    ({"run": "run/checkpoint-*"}, "step 300 is missing"),
    ({"run": "nothing-*"}, "matches nothing"),
    ({"run": {"paths": ["run/checkpoint-100", "run/checkpoint-200"], "steps": [5, 5]}}, "step 5 appears twice"),
    ({"run": ["run/checkpoint-100", "odd/final"]}, "no step number in the name 'final'"),
    ({"run": {"paths": "run/checkpoint-*", "steps": [1, 2]}}, "2 steps for 4 checkpoints"),
])
def test_sequence_errors(tmp_path, cli, models, message):
    _save_run(tmp_path / "run", [100, 200, 400, 500])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": models,
        "nodes": {"avg": {"op": "ema", "inputs": {"sequence": "run"}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "r.yaml:2: sequence 'run'" in result.output


def test_gaps_allowed_when_asked(tmp_path, cli):
    _save_run(tmp_path / "run", [100, 200, 400])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"run": {"paths": "run/checkpoint-*", "allow_gaps": True}},
        "nodes": {"avg": {"op": "bema", "inputs": {"sequence": "run"}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    assert cli("run", recipe, "--quiet").exit_code == 0


def test_mismatched_key_sets_in_a_sequence(tmp_path, cli):
    _save_run(tmp_path / "run", [1, 2])
    _save_run(tmp_path / "run", [3], keys=("model.layers.0.w",))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"run": "run/checkpoint-*"},
        "nodes": {"avg": {"op": "ema", "inputs": {"sequence": "run"}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "run@3" in result.output and "different tensors" in result.output


def test_a_sequence_is_not_a_checkpoint(tmp_path, cli):
    _save_run(tmp_path / "run", [1, 2])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"run": "run/checkpoint-*", "b": "run/checkpoint-1"},
        "nodes": {"w": {"op": "wise_ft", "inputs": {"zero_shot": "b", "fine_tuned": "run"}}},
        "outputs": [{"from": "w", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "needs Checkpoint, got Sequence" in result.output


def test_a_series_from_one_pass(tmp_path, cli):
    states = _save_run(tmp_path / "run", [200, 400, 600, 800, 1000, 1200, 1400])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"run": "run/checkpoint-*", "start": "run/checkpoint-200"},
        "nodes": {"bema": {"op": "bema", "inputs": {"sequence": "run"}, "params": {"every": 3, "lag": 5}},
                  "slow": {"op": "momentum_interp", "inputs": {"init": "start", "sequence": "run"},
                           "params": {"every": 2, "tau": 0.9}}},
        "outputs": [{"from": "bema", "path": "bema-series", "dtype": "bfloat16"},
                    {"from": "slow", "path": "slow-series"}],
    })
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "bema-series").iterdir()) == ["step-1200", "step-1400", "step-600"]
    assert sorted(p.name for p in (tmp_path / "slow-series").iterdir()) == [
        "step-1200", "step-1400", "step-400", "step-800"]
    for step in (600, 1200, 1400):
        prefix = {s: v for s, v in states.items() if s <= step}
        expected = ops.bema(sequence=prefix, lag=5)
        out = read_checkpoint(tmp_path / "bema-series" / f"step-{step}")
        for key in expected:
            assert torch.equal(out[key], expected[key].to(out[key].dtype)), (step, key)
    prefix = {s: v for s, v in states.items() if s <= 800}
    expected = ops.momentum_interp(init=states[200], sequence=prefix, tau=0.9)
    out = read_checkpoint(tmp_path / "slow-series" / "step-800")
    assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_a_list_of_model_names_is_a_sequence_in_that_order(tmp_path, cli):
    run = {100: T([0.0, 1, 2]), 200: T([4.0, 8, -4]), 300: T([10.0, 0, 5])}
    for step, value in run.items():
        save_file({"w": value}, tmp_path / f"checkpoint-{step}.safetensors")
        save_file({"w": value}, tmp_path / f"plain-{step // 100}.safetensors")  # no step in the name
    named = {f"c{i}": f"checkpoint-{step}.safetensors" for i, step in enumerate(run)}
    plain = {f"p{i}": f"plain-{i + 1}.safetensors" for i in range(3)}
    params = {"lag": 7, "multiplier": 9}
    outputs = run_merge(cli, tmp_path, {
        "models": {**named, **plain, "run": "checkpoint-*.safetensors"},
        "nodes": {"listed": {"op": "bema", "inputs": {"sequence": list(named)}, "params": params},
                  "globbed": {"op": "bema", "inputs": {"sequence": "run"}, "params": params},
                  "unnumbered": {"op": "bema", "inputs": {"sequence": list(plain)}, "params": params}},
        "outputs": [{"from": n, "path": n} for n in ("listed", "globbed", "unnumbered")]})
    assert torch.equal(outputs["listed"]["w"], outputs["globbed"]["w"])  # steps 100, 200, 300 from the names
    expected = ops.bema(sequence={0: run[100], 1: run[200], 2: run[300]}, **params)  # steps 0, 1, 2
    assert torch.equal(outputs["unnumbered"]["w"], expected)
    assert not torch.equal(outputs["unnumbered"]["w"], outputs["listed"]["w"])  # the steps matter to BEMA
