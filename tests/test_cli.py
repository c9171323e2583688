"""The CLI's other commands, and the promise that --help answers without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import write_recipe
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint


def _without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """``mergebench ARGS`` in a fresh interpreter, which fails if the command imported torch."""
    code = ("import sys; from mergebench.cli.app import app\n"
            f"try:\n    app({args!r}, prog_name='mergebench')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_help_does_not_import_torch():
    result = _without_torch(["--help"])
    for command in ("run", "plan", "ops", "inspect"):
        assert command in result.stdout


@pytest.mark.parametrize("args", [["ops"], ["ops", "ties"], ["ops", "nope"]])
def test_ops_does_not_import_torch(args):
    """The listing comes from the catalog written from the registry (cli/operators.json), not the registry."""
    result = _without_torch(args)
    if args[-1] == "ties":
        assert result.stdout.startswith("ties (global statistic)") and "densities" in result.stdout
    if args[-1] == "nope":
        assert "unknown operator 'nope'" in result.stdout + result.stderr


def test_inspect_of_safetensors_weights_does_not_import_torch(tmp_path):
    """A checkpoint's listing comes from its headers; torch loads only for what must be read (FP8, GGUF, ...)."""
    config = llama_config(layers=2)
    save_checkpoint(llama_state_dict(config, seed=0), tmp_path / "m", shard_size=50_000, config=config)
    result = _without_torch(["inspect", str(tmp_path / "m")])
    assert "model.layers.1.mlp.down_proj.weight" in result.stdout and "blocks per stack: model: 2" in result.stdout
    assert "float32" in result.stdout and "21 tensors" in result.stdout


def test_operator_catalog_is_the_registry():
    from mergebench.cli.catalog import CATALOG, render

    assert CATALOG.read_text(encoding="utf-8") == render(), \
        "cli/operators.json is stale: python -m mergebench.cli.catalog writes it"


def test_console_script_exit_code_for_bad_input(tmp_path):
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    result = subprocess.run([bin_dir / "mergebench", "run", tmp_path / "missing.yaml"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "missing.yaml" in result.stderr and "Traceback" not in result.stderr


def test_ops_lists_every_operator_and_shows_each(cli):
    from mergebench.operators.base import REGISTRY

    listing = cli("ops")
    assert listing.exit_code == 0
    listed = {line.split("│")[1].strip() for line in listing.output.splitlines() if line.startswith("│")}
    assert set(REGISTRY) <= listed
    for name, op in REGISTRY.items():  # the tests' own operators too: they must show as well
        shown = cli("ops", name)
        assert shown.exit_code == 0 and shown.output.startswith(f"{name} ({op.execution})")
        for field_name, info in op.params.model_fields.items():
            assert (info.alias or field_name) in shown.output, (name, field_name)
    one = cli("ops", "task_arithmetic")
    assert one.exit_code == 0
    assert "lambda" in one.output and "0.3" in one.output and "[Delta]" in one.output
    assert cli("ops", "nope").exit_code == 2


def test_inspect_shows_tensors_and_blocks(tmp_path, cli):
    config = llama_config(layers=3)
    save_checkpoint(llama_state_dict(config, seed=0), tmp_path / "m", shard_size=50_000, config=config)
    result = cli("inspect", tmp_path / "m")
    assert result.exit_code == 0
    assert "model.layers.2.mlp.down_proj.weight" in result.output and "blocks per stack: model: 3" in result.output
    assert "2/3" in result.output  # block 2 of 3
    assert "30 tensors" in result.output  # embeddings + 3 blocks of 9 + final norm + head


def test_plan_summarizes_without_writing(tmp_path, cli):
    config = llama_config()
    for seed in (0, 1):
        save_checkpoint(llama_state_dict(config, seed=seed), tmp_path / f"m{seed}", config=config)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "m0", "b": "m1"},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
        "outputs": [{"from": "avg", "path": "out", "dtype": "bfloat16"}],
    })
    result = cli("plan", recipe)
    assert result.exit_code == 0, result.output
    total = sum(t.numel() * 4 for t in llama_state_dict(config, seed=0).values())
    assert "linear" in result.output and "bfloat16" in result.output and "peak memory" in result.output
    assert f"read {2 * total / 1e3:.2f} KB per pass" in result.output
    assert f"write {total / 2 / 1e3:.2f} KB" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: asking for CUDA is no error")
def test_device_cuda_without_gpu_is_a_clear_error(tmp_path, cli):
    save_checkpoint({"w": torch.ones(2)}, tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "m", "b": "m"},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    result = cli("run", recipe, "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_plan_estimates_two_keys_side_by_side_one_read_ahead_two_waiting_for_the_writer(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from mergebench.engine.graph import Graph
    from mergebench.engine.memory import peak_memory_estimate
    from mergebench.recipe import load_recipe

    for name in ("m0", "m1"):  # float32, stored in key order a, b, c, d, e
        save_file({"a": torch.ones(1000), "b": torch.ones(10), "c": torch.ones(10), "d": torch.ones(2000),
                   "e": torch.ones(3000)}, tmp_path / f"{name}.safetensors")

    def estimate(node: dict) -> int:
        recipe = write_recipe(tmp_path / "r.yaml", {
            "models": {"m0": "m0.safetensors", "m1": "m1.safetensors"},
            "nodes": {"merge": node}, "outputs": [{"from": "merge", "path": "out"}]})
        return peak_memory_estimate(Graph(load_recipe(recipe)))

    # worst moment: d and e computed (inputs 16000 + 24000, outputs 8000 + 12000 bytes), b and c waiting
    # for the writer (two outputs of 40 bytes), nothing left to read ahead; and the pool's largest output
    # buffer (e's 12000 bytes), kept
    assert estimate({"op": "linear", "inputs": {"models": ["m0", "m1"]}}) == 40000 + 20000 + 40 + 40 + 12000
    # SLERP is elementwise once its key pass found the angle: as linear
    assert estimate({"op": "slerp", "inputs": {"a": "m0", "b": "m1"}}) == 40000 + 20000 + 40 + 40 + 12000
    # DELLA ranks each row's entries: not elementwise, whole float32 values too, (2 models + 1 node + 1) per element
    assert estimate({"op": "della", "inputs": {"base": "m0", "models": ["m1"]}}) == \
        40000 + 20000 + 80000 + 40 + 40 + 12000
    # inputs above WHOLE_MAPPING_BYTES (d, e) hold a window of 2 × RELEASE_EVERY slices each (2 × 100 × 4 bytes),
    # and nothing while they wait to be computed
    from mergebench.engine import memory

    monkeypatch.setattr(memory, "WHOLE_MAPPING_BYTES", 5000)
    monkeypatch.setattr(memory, "RELEASE_EVERY", 1)
    monkeypatch.setattr(memory, "SLICE_ELEMENTS", 100)
    assert estimate({"op": "linear", "inputs": {"models": ["m0", "m1"]}}) == 4 * 800 + 20000 + 40 + 40 + 12000


def test_importing_the_cli_does_not_import_torch():
    """``mergebench --help`` answers at once: the CLI module leaves torch to the commands that need it."""
    import subprocess
    import sys

    probe = "import sys, mergebench.cli.app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
