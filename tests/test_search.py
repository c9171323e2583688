"""Search over merge parameters with Optuna: the optimum a grid finds, in fewer evaluations; resumable."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_lm, write_recipe
from mergebench.synthetic import save_checkpoint

pytest.importorskip("optuna")


def read_trials(folder: Path) -> list[dict[str, str]]:
    with open(folder / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def wise(tmp_path):
    """WiSE-FT of two one-tensor models, scored by closeness to the merge at α = 0.37 (an interior optimum)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    save_checkpoint({"w": a}, tmp_path / "a")
    save_checkpoint({"w": b}, tmp_path / "b")
    target = 0.63 * a + 0.37 * b
    recipe = write_recipe(tmp_path / "wise.yaml", {
        "models": {"a": "a", "b": "b"},
        "nodes": {"w": {"op": "wise_ft", "inputs": {"zero_shot": "a", "fine_tuned": "b"}}},
        "outputs": [{"from": "w", "path": "unused"}]})
    calls = []

    def closeness(out: Path) -> dict[str, float]:
        calls.append(out)
        merged = load_file(out / "model.safetensors")["w"]
        return {"closeness": -float((merged - target).square().sum())}

    return recipe, closeness, calls


def test_search_finds_the_grid_optimum_in_fewer_evaluations(tmp_path, wise):
    import mergebench as mb

    recipe, closeness, calls = wise
    grid = mb.sweep(recipe, {"w.alpha": [round(0.05 * i, 2) for i in range(21)]}, tmp_path / "grid",
                    evaluate=closeness, device="cpu")
    best_grid = max(grid, key=lambda p: p.metrics["closeness"])
    assert best_grid.params["w.alpha"] == 0.35  # the grid point nearest 0.37
    calls.clear()
    result = mb.search(recipe, {"w.alpha": (0.0, 1.0)}, tmp_path / "search", closeness, ["closeness"], trials=16,
                       device="cpu")
    assert len(calls) == 16 < len(grid)
    found = result.best[0]
    assert found["metrics"]["closeness"] >= best_grid.metrics["closeness"]
    assert abs(found["params"]["w.alpha"] - 0.37) < 0.02
    assert not any((tmp_path / "search").glob("trial-*"))  # merged trials are removed once scored
    best = yaml.safe_load(result.best_recipe.read_text())
    assert best["nodes"]["w"]["params"]["alpha"] == found["params"]["w.alpha"]
    assert Path(best["models"]["a"]).is_absolute()


def test_a_killed_search_resumes_where_it_stopped(tmp_path, wise):
    import mergebench as mb

    recipe, closeness, calls = wise

    def dies_on_the_third(out: Path) -> dict[str, float]:
        if len(calls) == 2:
            calls.append(out)
            raise KeyboardInterrupt
        return closeness(out)

    with pytest.raises(KeyboardInterrupt):
        mb.search(recipe, {"w.alpha": (0.0, 1.0)}, tmp_path / "s", dies_on_the_third, ["closeness"], trials=6,
                  device="cpu")
    first = read_trials(tmp_path / "s")
    assert [r["state"] for r in first] == ["COMPLETE", "COMPLETE"]
    result = mb.search(recipe, {"w.alpha": (0.0, 1.0)}, tmp_path / "s", closeness, ["closeness"], trials=6,
                       device="cpu")
    assert len(result.trials) == 6
    rows = read_trials(tmp_path / "s")
    assert [r["w.alpha"] for r in rows[:2]] == [r["w.alpha"] for r in first]  # the first trials were kept
    assert sum(r["state"] == "COMPLETE" for r in rows) == 6


def test_search_command_with_two_objectives_writes_a_pareto_front(cli, tmp_path):
    a, b = tiny_lm(tmp_path / "a", seed=0), tiny_lm(tmp_path / "b", seed=1)
    (tmp_path / "one.txt").write_text("the cat sat on the mat")
    (tmp_path / "two.txt").write_text("a dog ran merge models yes no")
    recipe = write_recipe(tmp_path / "wise.yaml", {
        "models": {"a": str(a), "b": str(b)},
        "nodes": {"w": {"op": "wise_ft", "inputs": {"zero_shot": "a", "fine_tuned": "b"}}},
        "outputs": [{"from": "w", "path": "unused"}]})
    result = cli("search", recipe, "--space", "w.alpha=0:1", "--eval",
                 f"ppl:{tmp_path / 'one.txt'} ppl:{tmp_path / 'two.txt'}", "--objective", "one.ppl",
                 "--objective", "two.ppl", "--trials", "6", "--out", tmp_path / "s1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "best recipe" in result.output and (tmp_path / "s1" / "best.yaml").exists()
    assert (tmp_path / "s1" / "pareto.png").stat().st_size > 0
    rows = read_trials(tmp_path / "s1")
    assert len(rows) == 6 and {"one.ppl", "two.ppl", "one.ppl_tokens"} <= set(rows[0])
    result = cli("search", recipe, "--space", "w.alpha=0:1", "--eval", f"ppl:{tmp_path / 'one.txt'}",
                 "--objective", "nope", "--trials", "2", "--out", tmp_path / "s2", "--device", "cpu")
    assert result.exit_code == 2 and "gave no nope" in " ".join(result.output.split())
    assert cli("search", recipe, "--space", "w.alpha=1:0", "--eval", "ppl:x", "--objective", "ppl").exit_code == 2
