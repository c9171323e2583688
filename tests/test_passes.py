"""The executor's hooks for operators that are not per-tensor, proven with two test operators.

``unit_norm`` needs a global statistic (the L2 norm of a whole delta) before any key can be written;
``sort_hidden`` is a cross-tensor operator: it plans a permutation of an MLP's hidden units from
``fc1`` (visited first, in network order) and applies it to the rows of ``fc1`` and the columns of
``fc2``, so the network computes the same function.
"""

from __future__ import annotations

import math
import re

import torch
from safetensors.torch import save_file

from conftest import read_checkpoint, write_recipe
from mergebench import operators as ops
from mergebench.engine.runner import RunOptions, run_recipe
from mergebench.io.checkpoint import Checkpoint
from mergebench.operators.base import (
    CHECKPOINT,
    DELTA,
    REGISTRY,
    StatisticsPass,
    operator,
    signature,
)
from mergebench.recipe import load_recipe


def _accumulate_square(state, inputs, params, ctx):
    state["sum_sq"] += float(inputs["delta"].double().square().sum())


if "unit_norm" not in REGISTRY:

    @operator(
        "unit_norm",
        signatures=[signature(DELTA, delta=DELTA)],
        execution="global",
        passes=(StatisticsPass(init=lambda p, stats: {"sum_sq": 0.0}, accumulate=_accumulate_square,
                               finalize=lambda state, p, stats: math.sqrt(state["sum_sq"])),),
    )
    def unit_norm(delta, p, ctx):
        """Scale a delta to global L2 norm 1."""
        return delta / ctx.stats


def _network_order(keys):
    """The layers whose incoming weights define a permutation (all but the last), input side first."""
    layers = sorted(keys, key=lambda k: int(re.search(r"fc(\d+)", k).group(1)))
    return [k for k in layers if not k.startswith("fc2.")]


def _plan_permutation(state, inputs, params, ctx):
    if ctx.key == "fc1.weight":
        state["perm"] = torch.argsort(inputs["model"].norm(dim=1), stable=True).cpu()


if "sort_hidden" not in REGISTRY:

    @operator(
        "sort_hidden",
        signatures=[signature(CHECKPOINT, model=CHECKPOINT)],
        execution="cross-tensor",
        passes=(StatisticsPass(init=lambda p, stats: {}, accumulate=_plan_permutation,
                               finalize=lambda state, p, stats: state["perm"], order=_network_order),),
    )
    def sort_hidden(model, p, ctx):
        """Permute the hidden units of fc1 -> fc2 by the norm of their incoming weights."""
        perm = ctx.stats.to(model.device)
        if ctx.key.startswith("fc1."):
            return model[perm].clone()
        return model[:, perm].clone()


def test_global_statistic_pass_matches_brute_force(tmp_path):
    g = torch.Generator().manual_seed(0)
    states = [{f"layers.{i}.w": torch.randn(5, 7, generator=g) for i in range(4)} for _ in range(2)]
    for name, state in zip(("base", "ft"), states):
        save_file(state, tmp_path / f"{name}.safetensors")
    recipe = write_recipe(tmp_path / "norm.yaml", {
        "models": {"base": "base.safetensors", "ft": "ft.safetensors"},
        "nodes": {
            "tv": {"op": "delta", "inputs": {"base": "base", "models": ["ft"]}},
            "ta": {"op": "task_arithmetic", "inputs": {"deltas": "tv"}, "params": {"lambda": 1.0}},
            "unit": {"op": "unit_norm", "inputs": {"delta": "ta"}},
            "again": {"op": "unit_norm", "inputs": {"delta": "unit"}, "exclude": ["layers.0"]},
            "out": {"op": "apply", "inputs": {"base": "base", "delta": "again"}},
        },
        "outputs": [{"from": "out", "path": "out"}],
    })
    result = run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    assert result.summary.passes == 3  # two chained statistics stages, then the main pass
    delta = {k: states[1][k] - states[0][k] for k in states[0]}
    norm = torch.cat([d.flatten().double() for d in delta.values()]).norm()
    unit = {k: d / norm for k, d in delta.items()}
    norm2 = torch.cat([d.flatten().double() for k, d in unit.items() if not k.startswith("layers.0")]).norm()
    merged = read_checkpoint(tmp_path / "out")
    for key, d in unit.items():
        expected = states[0][key] + (torch.zeros_like(d) if key.startswith("layers.0") else d / norm2)
        torch.testing.assert_close(merged[key], expected.float(), rtol=1e-6, atol=1e-6)


def test_cross_tensor_pass_preserves_the_function(tmp_path):
    g = torch.Generator().manual_seed(1)
    mlp = {"fc2.weight": torch.randn(3, 8, generator=g), "fc1.weight": torch.randn(8, 4, generator=g),
           "fc1.bias": torch.randn(8, generator=g)}  # stored out of network order on purpose
    save_file(mlp, tmp_path / "mlp.safetensors")
    recipe = write_recipe(tmp_path / "sort.yaml", {
        "models": {"mlp": "mlp.safetensors"},
        "nodes": {"sorted": {"op": "sort_hidden", "inputs": {"model": "mlp"}}},
        "outputs": [{"from": "sorted", "path": "out"}],
    })
    source = Checkpoint(tmp_path / "mlp.safetensors")
    run_recipe(load_recipe(recipe), RunOptions(device="cpu"), sources={"mlp": source})
    assert source.reads["fc1.weight"] == 2 and source.reads["fc2.weight"] == 1  # planning reads only what it needs
    out = read_checkpoint(tmp_path / "out")
    norms = out["fc1.weight"].norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1])

    def forward(p, x):
        return torch.relu(x @ p["fc1.weight"].T + p["fc1.bias"]) @ p["fc2.weight"].T

    x = torch.randn(16, 4, generator=g)
    torch.testing.assert_close(forward(out, x), forward(mlp, x), rtol=1e-5, atol=1e-5)


def test_eager_api_runs_statistics_passes():
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    out = ops.unit_norm(delta=delta)
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.8]))




def _visit(state, inputs, params, ctx):
    state.append(ctx.key)


def _visit_pass(finalize):
    return StatisticsPass(init=lambda p, stats: [], accumulate=_visit, finalize=finalize, combine=lambda a, b: a + b)


if "visit_order" not in REGISTRY:

    @operator(
        "visit_order",
        signatures=[signature(CHECKPOINT, model=CHECKPOINT)],
        execution="global",
        passes=(_visit_pass(lambda state, p, stats: {"first": state}),
                _visit_pass(lambda state, p, stats: {**stats, "second": state})),
    )
    def visit_order(model, p, ctx):
        """Leaves its input as it is; its statistics record the order in which its two passes visited the keys."""
        return model


def test_reads_alternate_direction_ending_backwards_before_the_main_pass(tmp_path, monkeypatch):
    """With inputs larger than the page cache, a read that starts where the previous one ended finds those keys
    cached; passes that combine may visit keys in any order, so the last one before the main pass runs backwards."""
    from mergebench.engine import pipeline
    from mergebench.engine.executor import compute_statistics
    from mergebench.engine.graph import Graph
    from mergebench.engine.stages import statistics_stages

    monkeypatch.setattr(pipeline, "compute_threads", lambda device: 1)  # one thread: keys in the order given
    keys = [f"layers.{i}.w" for i in range(5)]
    save_file({k: torch.full((2,), float(i)) for i, k in enumerate(keys)}, tmp_path / "d.safetensors")

    def graph(name, nodes):
        return Graph(load_recipe(write_recipe(tmp_path / f"{name}.yaml", {
            "models": {"a": "d.safetensors", "b": "d.safetensors"}, "nodes": nodes,
            "outputs": [{"from": "n", "path": "out"}]})))

    visits = graph("visits", {"n": {"op": "visit_order", "inputs": {"model": "a"}}})
    assert [stage.backwards for stage in statistics_stages(visits)] == [False, True]
    found = compute_statistics(visits, torch.device("cpu")).stats["n"]
    assert found["first"] == keys and found["second"] == keys[::-1]
    norms = graph("norms", {"tv": {"op": "delta", "inputs": {"base": "a", "models": ["b"]}},
                            "ta": {"op": "task_arithmetic", "inputs": {"deltas": "tv"}},
                            "unit": {"op": "unit_norm", "inputs": {"delta": "ta"}},
                            "n": {"op": "apply", "inputs": {"base": "a", "delta": "unit"}}})
    assert [stage.backwards for stage in statistics_stages(norms)] == [False]  # a float sum: keys in order
    ties = statistics_stages(graph("ties", {"n": {"op": "ties", "inputs": {"base": "a", "models": ["b"]}}}))
    assert [stage.may_skip for stage in ties] == [False, True, False]  # the fine histogram, usually settled
    assert [stage.backwards for stage in ties] == [False, False, True]  # planned as skipped
