"""The Ray executor writes the same bytes as the local one, on a local Ray cluster started here."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from mergebench.synthetic import save_checkpoint


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install 'mergebench[ray]')")
    ray.init(num_cpus=3, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def _files(folder: Path) -> dict[str, bytes]:
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _local_then_ray(tmp_path: Path, cli, recipe: Path, outputs: list[str]) -> None:
    """Run locally, keep the outputs, run on Ray into the same paths: every file equal byte for byte."""
    result = cli("run", recipe, "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    local = {name: _files(tmp_path / name) for name in outputs}
    for name in outputs:
        path = tmp_path / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = cli("run", recipe, "--json", "--device", "cpu", "--executor", "ray")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["device"] == "ray (cpu)"
    for name in outputs:
        remote = _files(tmp_path / name)
        assert remote.keys() == local[name].keys(), name
        for file, data in local[name].items():
            assert remote[file] == data, (name, file)
        assert not list(tmp_path.glob("*.partial*")), "partial outputs left behind"


def test_every_operator_class_gives_the_local_bytes(tmp_path, cli, llama_models, ray_cluster):
    folders, _, _ = llama_models(torch.bfloat16, shard_size=30_000)  # several output shards: several tasks
    recipe = write_recipe(tmp_path / "classes.yaml", {
        "models": {k: str(v) for k, v in folders.items()},
        "nodes": {
            "ties": {"op": "ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},  # global statistics
                     "params": {"density": 0.3}},
            "dare": {"op": "dare_ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},  # per tensor, seeded
                     "params": {"p": 0.5, "scope": "per_tensor"}, "seed": 3},
            "aligned": {"op": "align", "inputs": {"model": "ft1", "reference": "ft2"}},  # alignment planning
            "mask": {"op": "mask_topk", "inputs": {"base": "base", "fine_tuned": "ft1"}, "params": {"k": 500}},
        },
        "outputs": [{"from": "ties", "path": "ties", "shard_size": 30_000},
                    {"from": "dare", "path": "dare", "shard_size": 30_000},
                    {"from": "aligned", "path": "aligned", "shard_size": 30_000, "copy_files_from": "ft1"},
                    {"from": "mask", "path": "mask.safetensors"}],
    })
    _local_then_ray(tmp_path, cli, recipe, ["ties", "dare", "aligned", "mask.safetensors"])
    assert len(list((tmp_path / "ties").glob("*.safetensors"))) > 2


def test_a_sequence_gives_the_local_bytes(tmp_path, cli, llama_models, ray_cluster):
    folders, states, _ = llama_models(torch.float32)
    for step, seed in ((100, 5), (200, 6), (300, 7)):
        run_state = {k: v + 0.01 * seed for k, v in states["base"].items()}
        save_checkpoint(run_state, tmp_path / "run" / f"checkpoint-{step}", 40_000)
    recipe = write_recipe(tmp_path / "seq.yaml", {
        "models": {"run": "run/checkpoint-*"},
        "nodes": {"ema": {"op": "ema", "inputs": {"sequence": "run"}, "params": {"decay": 0.7}}},
        "outputs": [{"from": "ema", "path": "ema", "shard_size": 40_000}],
    })
    _local_then_ray(tmp_path, cli, recipe, ["ema"])


def _wise_and_scorer(tmp_path: Path, llama_models) -> tuple[Path, Path]:
    """A WiSE-FT recipe of the tiny Llamas, and a script printing the summed final norm of an output as JSON."""
    folders, _, _ = llama_models(torch.float32)
    recipe = write_recipe(tmp_path / "wise.yaml", {
        "models": {"zs": str(folders["base"]), "ft": str(folders["ft1"])},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "zs", "fine_tuned": "ft"}}},
        "outputs": [{"from": "wise", "path": "out"}],
    })
    scorer = tmp_path / "score.py"
    scorer.write_text("import json, sys\nfrom safetensors.torch import load_file\nfrom pathlib import Path\n"
                      "t = {k: v for f in sorted(Path(sys.argv[1]).glob('*.safetensors')) for k, v in "
                      "load_file(f).items()}\nprint(json.dumps({'norm': float(t['model.norm.weight'].sum())}))\n")
    return recipe, scorer


def test_a_sweep_runs_its_points_as_tasks(tmp_path, cli, llama_models, ray_cluster):
    recipe, scorer = _wise_and_scorer(tmp_path, llama_models)
    results = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"sweep-{executor}"
        result = cli("sweep", recipe, "--grid", "wise.alpha=0:1:0.5", "--eval", f"{sys.executable} {scorer} {{out}}",
                     "--out", out, "--executor", executor, "--cpus-per-point", "1")
        assert result.exit_code == 0, result.output
        results[executor] = (out / "results.csv").read_text().replace(str(out), "OUT")
    assert results["ray"] == results["local"]
    assert results["ray"].count("\n") == 4  # header + three points, each with its metric


def test_without_ray_the_flag_names_the_extra(tmp_path, cli, llama_models, monkeypatch):
    folders, _, _ = llama_models(torch.float32)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": str(folders["base"]), "b": str(folders["ft1"])},
        "nodes": {"m": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
        "outputs": [{"from": "m", "path": "out"}],
    })
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    result = cli("run", recipe, "--executor", "ray")
    assert result.exit_code == 2
    assert "pip install 'mergebench[ray]'" in result.output
    assert not (tmp_path / "out").exists()


def test_search_trials_run_side_by_side_as_tasks(tmp_path, cli, llama_models, ray_cluster):
    """Two trials at a time on Ray: the study reaches its trials with every trial scored, each trial's model
    removed once scored; the same seed gives the first trials the local search gives."""
    pytest.importorskip("optuna")
    recipe, scorer = _wise_and_scorer(tmp_path, llama_models)
    rows = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"search-{executor}"
        result = cli("search", recipe, "--space", "wise.alpha=0:1", "--eval", f"{sys.executable} {scorer} {{out}}",
                     "--objective", "norm:max", "--trials", "4", "--out", out, "--executor", executor,
                     "--parallel", "2", "--cpus-per-trial", "1")
        assert result.exit_code == 0, result.output
        with open(out / "trials.csv", newline="") as f:
            rows[executor] = list(csv.DictReader(f))
        assert not any(out.glob("trial-*"))
    assert len(rows["ray"]) == 4 and all(r["state"] == "COMPLETE" and r["norm"] for r in rows["ray"])
    assert [r["wise.alpha"] for r in rows["ray"][:2]] == [r["wise.alpha"] for r in rows["local"][:2]]
