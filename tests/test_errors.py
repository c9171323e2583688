"""Bad input: one clear line naming the file (and line), exit code 2, nothing written, inputs untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe


@pytest.fixture
def models(tmp_path):
    save_file({"layers.0.w": torch.ones(4), "layers.1.w": torch.ones(2, 2)}, tmp_path / "a.safetensors")
    save_file({"layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(2, 2)}, tmp_path / "b.safetensors")
    save_file({"layers.0.w": torch.zeros(4)}, tmp_path / "fewer.safetensors")
    save_file({"layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(4)}, tmp_path / "reshaped.safetensors")
    return tmp_path


def _fingerprint(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _recipe(**changes):
    doc = {
        "models": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"wise": {"op": "wise_ft", "inputs": {"zero_shot": "a", "fine_tuned": "b"},
                           "params": {"alpha": 0.5}}},
        "outputs": [{"from": "wise", "path": "out"}],
    }
    doc.update(changes)
    return doc


def _node(**changes):
    node = {"op": "wise_ft", "inputs": {"zero_shot": "a", "fine_tuned": "b"}, "params": {"alpha": 0.5}}
    node.update(changes)
    return {"wise": node}


CASES = {
    "unknown operator": (_recipe(nodes=_node(op="frobnicate")), ":6:", "unknown operator 'frobnicate'"),
    "unknown parameter": (_recipe(nodes=_node(params={"alpah": 0.5})), ":11:", "alpah: unknown name"),
    "bad parameter value": (_recipe(nodes=_node(params={"alpha": "lots"})), ":11:", "valid number"),
    "input naming nothing": (_recipe(nodes=_node(inputs={"zero_shot": "a", "fine_tuned": "c"})), ":9:",
                             "node 'wise': input 'c' names no model or node"),
    "missing input slot": (_recipe(nodes=_node(inputs={"zero_shot": "a"})), ":7:", "takes inputs"),
    "cycle": (_recipe(nodes={
        "x": {"op": "linear", "inputs": {"models": ["a", "y"]}},
        "y": {"op": "linear", "inputs": {"models": ["x", "b"]}},
    }, outputs=[{"from": "x", "path": "out"}]), ":", "cycle: x -> y -> x"),
    "type mismatch": (_recipe(nodes={
        "tv": {"op": "delta", "inputs": {"base": "a", "models": ["b"]}},
        "wise": {"op": "wise_ft", "inputs": {"zero_shot": "a", "fine_tuned": "tv"}},
    }), ":", "input 'fine_tuned' needs Checkpoint, got [Delta]"),
    "output of a delta": (_recipe(nodes={"tv": {"op": "delta", "inputs": {"base": "a", "models": ["b"]}}},
                                  outputs=[{"from": "tv", "path": "out"}]), ":", "add an 'apply' node"),
    "weights length": (_recipe(nodes={"avg": {"op": "linear", "inputs": {"models": ["a", "b"]},
                                              "params": {"weights": [1, 2, 3]}}},
                               outputs=[{"from": "avg", "path": "out"}]), ":", "3 values for 2 models"),
    "unsupported output dtype": (_recipe(outputs=[{"from": "wise", "path": "out", "dtype": "int8"}]), ":",
                                 "outputs.0.dtype"),
    "bad shard size": (_recipe(outputs=[{"from": "wise", "path": "out", "shard_size": "5 parsecs"}]), ":",
                       "not a size"),
    "output inside an input folder": (_recipe(models={"a": "a.safetensors", "b": "bdir"},
                                              outputs=[{"from": "wise", "path": "bdir/out"}]), ":",
                                      "would overwrite input 'b'"),
    "output equal to an input": (_recipe(outputs=[{"from": "wise", "path": "a.safetensors"}]), ":",
                                 "would overwrite input 'a'"),
    "missing model path": (_recipe(models={"a": "a.safetensors", "b": "nowhere"}), "nowhere",
                           "no such file or folder"),
    "key sets differ": (_recipe(models={"a": "a.safetensors", "b": "fewer.safetensors"}), "merge.yaml",
                        "only in 'a': layers.1.w"),
    "shape mismatch": (_recipe(models={"a": "a.safetensors", "b": "reshaped.safetensors"}), "merge.yaml",
                       "tensor 'layers.1.w' is torch.float32 [2, 2] in 'a' but torch.float32 [4]"),
    "no weights in folder": (_recipe(models={"a": "a.safetensors", "b": "empty"}), "empty",
                             "no weights found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_exit_code_2_and_nothing_written(models, cli, case):
    (models / "bdir").mkdir(exist_ok=True)
    save_file({"layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(2, 2)}, models / "bdir" / "model.safetensors")
    (models / "empty").mkdir(exist_ok=True)
    before = _fingerprint(models)
    doc, where, message = CASES[case]
    recipe = write_recipe(models / "merge.yaml", doc)
    result = cli("run", recipe)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    assert where in result.output and message in result.output, result.output
    assert len(result.output.strip().splitlines()) <= 3  # one message (wrapped at most), no traceback
    assert "Traceback" not in result.output
    assert not (models / "out").exists() and not (models / "out.partial").exists()
    assert _fingerprint(models) == before


def test_yaml_syntax_error_names_line(models, cli):
    recipe = models / "merge.yaml"
    recipe.write_text("models:\n  a: a.safetensors\nnodes: [oops\n")
    result = cli("run", recipe)
    assert result.exit_code == 2 and "merge.yaml:" in result.output and "YAML syntax error" in result.output


def test_alias_bomb_is_refused(models, cli):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 9)]
    (models / "bomb.yaml").write_text("\n".join(lines) + "\n")
    result = cli("run", models / "bomb.yaml")
    assert result.exit_code == 2 and "alias bomb" in result.output


def test_set_of_unknown_node(models, cli):
    result = cli("run", write_recipe(models / "merge.yaml", _recipe()), "--set", "nope.alpha=1")
    assert result.exit_code == 2 and "--set nope.alpha" in result.output


def test_set_value_is_validated(models, cli):
    result = cli("run", write_recipe(models / "merge.yaml", _recipe()), "--set", "wise.alpha=abc")
    assert result.exit_code == 2 and "valid number" in result.output


def test_index_naming_a_missing_shard(models, cli):
    folder = models / "sharded"
    folder.mkdir()
    save_file({"layers.0.w": torch.zeros(4)}, folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"layers.0.w": "model-00001-of-00002.safetensors",
                                            "layers.1.w": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("run", write_recipe(models / "merge.yaml", _recipe(models={"a": "a.safetensors", "b": "sharded"})))
    assert result.exit_code == 2 and "model-00002-of-00002.safetensors" in result.output
    assert "does not exist" in result.output


@pytest.mark.parametrize("shard", ["../a.safetensors", "/etc/passwd"])
def test_index_shard_outside_the_folder_is_refused(models, cli, shard):
    folder = models / "evil"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"layers.0.w": shard}}))
    result = cli("inspect", folder)
    assert result.exit_code == 2 and "inside the folder" in result.output


def test_non_finite_result_aborts_and_removes_partial(tmp_path, cli):
    save_file({"w": torch.full((3,), 60000.0, dtype=torch.float16)}, tmp_path / "a.safetensors")
    save_file({"w": torch.full((3,), 60000.0, dtype=torch.float16)}, tmp_path / "b.safetensors")
    recipe = write_recipe(tmp_path / "merge.yaml", {
        "models": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"sum": {"op": "linear", "inputs": {"models": ["a", "b"]}, "params": {"normalize": False}}},
        "outputs": [{"from": "sum", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "non-finite" in result.output and "'w'" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_finite_result_whose_sum_overflows_is_written(tmp_path, cli):
    """Results are checked through their sum first; a sum that overflows is settled element by element."""
    for name in ("a", "b"):
        save_file({"w": torch.full((3,), 60000.0, dtype=torch.float16)}, tmp_path / f"{name}.safetensors")
    recipe = write_recipe(tmp_path / "merge.yaml", {
        "models": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"mean": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
        "outputs": [{"from": "mean", "path": "out"}],
    })
    assert torch.isinf(torch.full((3,), 60000.0, dtype=torch.float16).sum())
    result = cli("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["w"],
                       torch.full((3,), 60000.0, dtype=torch.float16))


def test_differing_integer_buffers_are_refused(tmp_path, cli):
    save_file({"w": torch.ones(2), "ids": torch.arange(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2), "ids": torch.arange(3) + 1}, tmp_path / "b.safetensors")
    recipe = write_recipe(tmp_path / "merge.yaml", {
        "models": {"a": "a.safetensors", "b": "b.safetensors"},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "buffer 'ids' differs" in result.output
