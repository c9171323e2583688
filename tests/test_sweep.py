"""Sweeps: grid parsing, one pass for every point, evaluation by command or callable, results and plot."""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_checkpoint, write_recipe
from mergebench.analysis.sweeps import parse_grid, run_sweep
from mergebench.errors import MergebenchError


def test_parse_grid_includes_the_stop_on_the_grid():
    target, values = parse_grid("wise.alpha=0:1:0.1")
    assert target == "wise.alpha" and values == [round(0.1 * i, 10) for i in range(11)]
    assert parse_grid("n.p=0:0.3:0.1")[1] == [0.0, 0.1, 0.2, 0.3]
    assert parse_grid("n.p=0:1:0.3")[1] == [0.0, 0.3, 0.6, 0.9]
    assert parse_grid("lines.beta=0.2,0.5")[1] == [0.2, 0.5]
    assert parse_grid("ties.agg=mean,sum")[1] == ["mean", "sum"]
    for bad in ("alpha=0:1:0.1", "n.p=0:1:0", "n.p=a:b:c", "n.p"):
        with pytest.raises(MergebenchError):
            parse_grid(bad)


@pytest.fixture
def wise_recipe(tmp_path):
    save_file({"layers.0.w": torch.tensor([0.0, 10.0]), "ids": torch.arange(2)}, tmp_path / "zs.safetensors")
    save_file({"layers.0.w": torch.tensor([10.0, 0.0]), "ids": torch.arange(2)}, tmp_path / "ft.safetensors")
    return write_recipe(tmp_path / "wise.yaml", {
        "models": {"zs": "zs.safetensors", "ft": "ft.safetensors"},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "zs", "fine_tuned": "ft"}},
                  "half": {"op": "linear", "inputs": {"models": ["wise", "zs"]}}},
        "outputs": [{"from": "half", "path": "unused"}],
    })


EVAL = (f"{sys.executable} -c \"import json, sys; from safetensors.torch import load_file; "
        f"w = load_file(sys.argv[1] + '/model.safetensors')['layers.0.w']; "
        f"assert float(w[0]) < 4, 'too far'; print('log line'); "
        f"print(json.dumps({{'first': float(w[0]), 'second': float(w[1])}}))\" {{out}}")


def test_sweep_merges_every_point_and_evaluates(tmp_path, cli, wise_recipe):
    result = cli("sweep", wise_recipe, "--grid", "wise.alpha=0:1:0.25", "--eval", EVAL, "--out", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "sw" / "results.csv").read_text().splitlines()))
    assert [float(r["wise.alpha"]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for row in rows:
        alpha = float(row["wise.alpha"])
        merged = read_checkpoint(row["output"])["layers.0.w"]
        expected = 0.5 * ((1 - alpha) * torch.tensor([0.0, 10.0]) + alpha * torch.tensor([10.0, 0.0])) + \
            0.5 * torch.tensor([0.0, 10.0])
        torch.testing.assert_close(merged, expected)
        if float(expected[0]) < 4:
            assert row["error"] == "" and float(row["first"]) == pytest.approx(float(expected[0]))
        else:  # the evaluator failed on this point: reported, and the sweep went on
            assert "eval exited 1" in row["error"] and "too far" in row["error"]
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    assert "too far" in result.output


def test_sweep_api_with_a_callable_and_a_product_grid(tmp_path, wise_recipe):
    import mergebench as mb

    def score(path):
        return {"sum": float(read_checkpoint(path)["layers.0.w"].sum())}

    points = mb.sweep(wise_recipe, {"wise.alpha": [0.0, 1.0], "half.normalize": [True, False]}, tmp_path / "sw",
                      evaluate=score)
    assert len(points) == 4 and all(p.error is None for p in points)
    by_params = {(p.params["wise.alpha"], p.params["half.normalize"]): p.metrics["sum"] for p in points}
    assert by_params[(0.0, True)] == pytest.approx(10.0) and by_params[(1.0, False)] == pytest.approx(20.0)


def test_a_failing_merge_point_is_reported(tmp_path, wise_recipe):
    save_file({"layers.0.w": torch.tensor([6e4, 6e4], dtype=torch.float16), "ids": torch.arange(2)},
              tmp_path / "big.safetensors")
    recipe = write_recipe(tmp_path / "sum.yaml", {
        "models": {"a": "big.safetensors"},
        "nodes": {"s": {"op": "linear", "inputs": {"models": ["a", "a"]}}},
        "outputs": [{"from": "s", "path": "unused"}],
    })
    points = run_sweep(recipe, {"s.normalize": [True, False]}, tmp_path / "sw")
    assert points[0].error is None and "non-finite" in points[1].error
    assert (points[0].outputs[0] / "model.safetensors").exists() and not points[1].outputs[0].exists()


def test_sweep_of_an_unknown_node(tmp_path, cli, wise_recipe):
    result = cli("sweep", wise_recipe, "--grid", "nope.alpha=0,1")
    assert result.exit_code == 2 and "no node 'nope'" in result.output
