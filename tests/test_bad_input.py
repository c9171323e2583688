"""Careless and hostile input, table-driven: one clear line and exit code 2, naming the file, option, key
or tensor; no traceback; nothing left behind; nothing outside the output path changed.

Each case builds its inputs in a fresh workspace and returns the command line and the words the error
must contain. The workspace is snapshot before and after: every file (bytes), link (target) and other
entry (kind) must be as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_recipe
from mergebench.synthetic import llama_config, llama_state_dict, save_checkpoint

CONFIG = llama_config(layers=2)


def _workspace(root: Path) -> None:
    base = llama_state_dict(CONFIG, seed=0)
    save_checkpoint(base, root / "base", 10**9, CONFIG)
    save_checkpoint(llama_state_dict(CONFIG, seed=1, base=base, noise=0.1), root / "ft", 10**9, CONFIG)


def _recipe(root: Path, **changes) -> Path:
    doc = {"models": {"base": "base", "ft": "ft"},
           "nodes": {"w": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"}}},
           "outputs": [{"from": "w", "path": "out"}]}
    doc.update(changes)
    return write_recipe(root / "merge.yaml", doc)


def _node(root: Path, node: dict, **changes) -> Path:
    return _recipe(root, nodes={"w": node}, **changes)


def _model_folder_with(root: Path, name: str, content: bytes) -> Path:
    """A copy of ``ft`` whose file ``name`` holds ``content``, copied into the output from it."""
    folder = root / "ft2"
    save_checkpoint(llama_state_dict(CONFIG, seed=2), folder, 10**9, CONFIG)
    (folder / name).write_bytes(content)
    return _recipe(root, models={"base": "base", "ft": "ft2"},
                   outputs=[{"from": "w", "path": "out", "copy_files_from": "ft"}])


def _mask_file(root: Path, metadata: dict[str, str], tensors: dict | None = None) -> Path:
    path = root / "mask.safetensors"
    save_file(tensors if tensors is not None else {"mask/model.norm.weight": torch.zeros(1, dtype=torch.uint8)},
              path, metadata={"format": "mergebench.mask/1", **metadata})
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _yaml(root: Path, text: str) -> Path:
    (root / "merge.yaml").write_text(text)
    return root / "merge.yaml"


OK_YAML = ("models: {base: base, ft: ft}\nnodes:\n  w: {op: wise_ft, inputs: {zero_shot: base, fine_tuned: ft}}\n"
           "outputs:\n- {from: w, path: out}\n")
SHAPE = "shape/model.norm.weight"

CASES = {
    # the recipe and its options
    "--set value not YAML": (lambda r: ["run", _recipe(r), "--set", "w.alpha=[1,"], "--set w.alpha=[1,"),
    "duplicate key": (lambda r: ["run", _yaml(r, OK_YAML + "models: {base: base}\n")], "duplicate key 'models'"),
    "duplicate model name": (lambda r: ["run", _yaml(r, OK_YAML.replace("{base: base, ft: ft}",
                                                                        "{base: base, ft: ft, base: ft}"))],
                             "merge.yaml:1: duplicate key 'base'"),
    "!!python tag": (lambda r: ["run", _yaml(r, OK_YAML.replace("path: out", "path: !!python/tuple [a]"))],
                     "merge.yaml:5: YAML tag 'tag:yaml.org,2002:python/tuple'"),
    "!!binary tag": (lambda r: ["run", _yaml(r, OK_YAML.replace("path: out", "path: !!binary aGVsbG8="))],
                     "tag:yaml.org,2002:binary"),
    "!!set tag": (lambda r: ["run", _yaml(r, OK_YAML.replace("{op: wise_ft", "!!set {op: wise_ft"))],
                  "tag:yaml.org,2002:set"),
    "invalid block_regex": (lambda r: ["run", _node(r, {"op": "lines", "inputs": {"base": "base", "fine_tuned": "ft"},
                                                        "params": {"block_regex": "(("}})],
                            "block_regex: Value error, not a valid regular expression"),
    "block_regex without a group": (lambda r: ["run", _node(r, {"op": "lines", "inputs": {"base": "base",
                                                                                          "fine_tuned": "ft"},
                                                                "params": {"block_regex": "layers"}})],
                                    "needs a group"),
    "invalid override regex": (lambda r: ["run", _node(r, {"op": "wise_ft", "inputs": {"zero_shot": "base",
                                                                                       "fine_tuned": "ft"},
                                                           "overrides": [{"match": "[", "params": {}}]})],
                               "invalid regular expression '['"),
    "permutation axis out of range": (lambda r: ["run", _node(r, {
        "op": "align", "inputs": {"model": "ft", "reference": "base"},
        "params": {"spec": {"g": [["model.norm.weight", 3]]}}})], "axis 3 of 'model.norm.weight'"),
    "two outputs at one path": (lambda r: ["run", _recipe(r, outputs=[{"from": "w", "path": "out"},
                                                                      {"from": "w", "path": "out"}])],
                                "outputs 0 and 1 both write"),
    "one output inside another": (lambda r: ["run", _recipe(r, outputs=[{"from": "w", "path": "out"},
                                                                        {"from": "w", "path": "out/inner"}])],
                                  "lies inside output 0"),
    "output at an input's folder": (lambda r: ["run", _recipe(r, outputs=[{"from": "w", "path": "."}]), "--force"],
                                    "would overwrite input 'base'"),
    "output at the recipe's folder": (lambda r: ["run", _recipe_elsewhere(r, "."), "--force"],
                                      "is the recipe's own folder or a folder above it"),
    "output above the recipe's folder": (lambda r: ["run", _recipe_elsewhere(r, ".."), "--force"],
                                         "is the recipe's own folder or a folder above it"),
    # model folders and weight files
    "config.json not UTF-8": (lambda r: ["run", _model_folder_with(r, "config.json", b'{"a": "\xff"}')],
                              "config.json: not UTF-8"),
    "config.json not JSON": (lambda r: ["run", _model_folder_with(r, "config.json", b'{"hidden_size": 8,\n')],
                             "config.json:2: not valid JSON"),
    "config.json not an object": (lambda r: ["run", _model_folder_with(r, "config.json", b"[1, 2]")],
                                  "config.json: expected a JSON object"),
    "tokenizer.json not JSON": (lambda r: ["run", _model_folder_with(r, "tokenizer.json", b"{")],
                                "tokenizer.json:1: not valid JSON"),
    "FIFO as a weight file": (lambda r: ["run", _recipe(r, models={"base": "base",
                                                                   "ft": str(_fifo(r / "w.safetensors"))})],
                              "expected a safetensors file, found a FIFO"),
    "FIFO as the recipe": (lambda r: ["run", _fifo(r / "fifo.yaml")], "fifo.yaml: expected a recipe, found a FIFO"),
    "FIFO as the tokenizer": (lambda r: ["run", _recipe(r)] if _fifo(r / "ft" / "tokenizer.json") else [],
                              "tokenizer.json: expected a tokenizer file, found a FIFO"),
    "index that is not JSON": (lambda r: ["run", _recipe(r, models={"base": "base", "ft": str(_index(r))})],
                               "x.safetensors.index.json: not UTF-8"),
    # masks and sparse deltas: metadata mergebench reads
    "mask shape negative": (lambda r: ["inspect", _mask_file(r, {SHAPE: "[-1]"})], "is not a shape"),
    "mask shape not a list": (lambda r: ["inspect", _mask_file(r, {SHAPE: '{"a": 1}'})], "is not a shape"),
    "mask shape floats": (lambda r: ["inspect", _mask_file(r, {SHAPE: "[1.5]"})], "is not a shape"),
    "mask shape huge": (lambda r: ["inspect", _mask_file(r, {SHAPE: "[1099511627776, 1099511627776]"})],
                        "more than any tensor"),
    "mask shape not JSON": (lambda r: ["inspect", _mask_file(r, {SHAPE: "[[["})], "is not a shape"),
    "mask bits missing": (lambda r: ["inspect", _mask_file(r, {SHAPE: "[4096]"})], "needs 512 packed bytes"),
    "mask tensor missing": (lambda r: ["inspect", _mask_file(r, {SHAPE: "[8]"}, {"other": torch.zeros(1)})],
                            "has no tensor 'mask/model.norm.weight'"),
    "wrong format tag": (lambda r: ["overlap", _mask_file(r, {}), _mask_file(r, {"format": "mergebench.nothing"})],
                         "not a mergebench mask, sparse delta, activations, Fisher or Gram file"),
    "bad mask in overlap": (lambda r: ["overlap", _mask_file(r, {SHAPE: "[-3]"}), _mask_file(r, {SHAPE: "[-3]"})],
                            "is not a shape"),
    "bad mask as an input": (lambda r: ["run", _node(r, {"op": "graft", "inputs": {
        "pretrained": "base", "fine_tuned": "ft", "mask": "m"}}, models={"base": "base", "ft": "ft", "m": str(
            _mask_file(r, {SHAPE: "[2, -2]"}))})], "is not a shape"),
    "metadata not strings": (lambda r: ["inspect", _metadata_not_strings(r)], "__metadata__ is not an object"),
    # other commands' options
    "diff --plot into a missing folder": (lambda r: ["diff", r / "base", r / "ft", "--plot", r / "no" / "d.png"],
                                          "does not exist"),
    "diff --plot not an image": (lambda r: ["diff", r / "base", r / "ft", "--plot", r / "d.txt"],
                                 "must end in one of"),
    "diff --masks out of range": (lambda r: ["diff", r / "base", r / "ft", "--masks", "2"], "--masks 2.0"),
    "sweep range reversed": (lambda r: ["sweep", _recipe(r), "--grid", "w.alpha=1:0:0.1", "--out", r / "s"],
                             "STOP is below START"),
    "sweep range empty value": (lambda r: ["sweep", _recipe(r), "--grid", "w.alpha=0.1,,0.2", "--out", r / "s"],
                                "an empty value"),
    "sweep with a tiny step": (lambda r: ["sweep", _recipe(r), "--grid", "w.alpha=0:1:1e-9", "--out", r / "s"],
                               "1000000001 points, more than the limit of 1000"),
    "sweep over a lowered limit": (lambda r: ["sweep", _recipe(r), "--grid", "w.alpha=0:1:0.01", "--out", r / "s",
                                              "--max-points", "50"], "101 points, more than the limit of 50"),
    "sweep step not finite": (lambda r: ["sweep", _recipe(r), "--grid", "w.alpha=0:1:inf", "--out", r / "s"],
                              "must be finite"),
    "ray address that refuses": (lambda r: ["run", _recipe(r), "--executor", "ray", "--address", "127.0.0.1:1"],
                                 "--address 127.0.0.1:1: no Ray head answers there within 10 s"),
    "ray address malformed": (lambda r: ["run", _recipe(r), "--executor", "ray", "--address", "nowhere"],
                              "expected auto or HOST:PORT"),
}


def _recipe_elsewhere(root: Path, output: str) -> Path:
    """A recipe in its own folder (no input inside it) whose one output is ``output``, relative to it."""
    (root / "recipes" / "r").mkdir(parents=True)
    doc = {"models": {"base": str(root / "base"), "ft": str(root / "ft")},
           "nodes": {"w": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"}}},
           "outputs": [{"from": "w", "path": output}]}
    return write_recipe(root / "recipes" / "r" / "merge.yaml", doc)


def _index(root: Path) -> Path:
    (root / "ft" / "x.safetensors.index.json").write_bytes(b"\xff")
    return root / "ft" / "x.safetensors.index.json"


def _metadata_not_strings(root: Path) -> Path:
    path = root / "odd.safetensors"
    header = json.dumps({"__metadata__": {"format": 5}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's sha256, a link's target, another entry's kind."""
    seen: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                seen[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[str(path)] = stat.S_IFMT(info.st_mode)
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_and_changes_nothing(tmp_path, cli, case):
    _workspace(tmp_path)
    build, expected = CASES[case]
    args = build(tmp_path)
    before = snapshot(tmp_path)
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.output.lstrip().startswith("error: ") and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output  # one message, wrapped at most
    assert expected in " ".join(result.output.split()), result.output
    assert snapshot(tmp_path) == before


# --force: replace only what mergebench wrote ----------------------------------------------------------


def _other_folder(root: Path) -> Path:
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("mine")
    return root / "other"


FORCE_REFUSES = {
    "a link to a folder": (lambda r: os.symlink(_other_folder(r), r / "out") or "out", "a symbolic link"),
    "a dangling link": (lambda r: os.symlink(r / "nowhere", r / "out") or "out", "a symbolic link"),
    "a folder it did not write": (lambda r: _other_folder(r).rename(r / "out") and "out",
                                  "a folder that mergebench did not write (it holds: notes.txt)"),
    "a regular file": (lambda r: (r / "out").write_text("data") and "out", "a file, where this output is a checkpoint"),
    "a character device": (lambda r: "/dev/null", "neither a file nor a folder"),
    "a FIFO": (lambda r: _fifo(r / "out") and "out", "neither a file nor a folder"),
}


@pytest.mark.parametrize("case", sorted(FORCE_REFUSES))
def test_force_refuses_what_mergebench_did_not_write(tmp_path, cli, case):
    _workspace(tmp_path)
    make, expected = FORCE_REFUSES[case]
    recipe = _recipe(tmp_path, outputs=[{"from": "w", "path": make(tmp_path)}])
    before, device = snapshot(tmp_path), os.stat("/dev/null").st_mode
    result = cli("run", recipe, "--force")
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert snapshot(tmp_path) == before and os.stat("/dev/null").st_mode == device


def test_force_replaces_an_earlier_output_but_not_a_file_added_to_it(tmp_path, cli):
    _workspace(tmp_path)
    recipe = _recipe(tmp_path)
    assert cli("run", recipe, "-q").exit_code == 0
    manifest = json.loads((tmp_path / "out" / ".mergebench-output.json").read_text())
    assert manifest["entries"] == sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert cli("run", recipe, "-q", "--set", "w.alpha=0.25", "--force").exit_code == 0
    (tmp_path / "out" / "eval.json").write_text("{}")
    before = snapshot(tmp_path)
    result = cli("run", recipe, "-q", "--force")
    assert result.exit_code == 2 and "did not write (eval.json)" in result.output
    assert snapshot(tmp_path) == before
    (tmp_path / "out" / "eval.json").unlink()
    (tmp_path / "out" / ".mergebench-output.json").unlink()  # an output from before manifests: its shards say so
    assert cli("run", recipe, "-q", "--force").exit_code == 0


def test_force_replaces_an_earlier_artifact_but_not_another_file(tmp_path, cli):
    _workspace(tmp_path)
    out = tmp_path / "mask.safetensors"
    assert cli("extract", tmp_path / "base", tmp_path / "ft", out, "--mask").exit_code == 0
    assert cli("extract", tmp_path / "base", tmp_path / "ft", out, "--mask", "--force").exit_code == 0
    save_file({"x": torch.zeros(2)}, out)
    before = snapshot(tmp_path)
    result = cli("extract", tmp_path / "base", tmp_path / "ft", out, "--mask", "--force")
    assert result.exit_code == 2 and "a file that mergebench did not write" in " ".join(result.output.split())
    assert snapshot(tmp_path) == before


def test_a_foreign_partial_folder_is_not_removed(tmp_path, cli):
    _workspace(tmp_path)
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "keep.txt").write_text("mine")
    recipe = _recipe(tmp_path)
    before = snapshot(tmp_path)
    result = cli("run", recipe, "--force")
    assert result.exit_code == 2 and "is not a partial mergebench output" in " ".join(result.output.split())
    assert snapshot(tmp_path) == before


# companion files ---------------------------------------------------------------------------------------


def test_companions_are_copied_by_allow_list_and_the_rest_reported(tmp_path, cli):
    _workspace(tmp_path)
    ft = tmp_path / "ft"
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0")
    os.symlink(secret, ft / "etcdir")
    os.symlink(secret / "passwd", ft / "vocab.txt")
    os.symlink(ft / "config.json", ft / "config-link.json")  # a link that stays inside is followed
    _fifo(ft / "special_tokens_map.json")
    (ft / "huge.json").write_bytes(b"")
    os.truncate(ft / "huge.json", 65 * 2**20)  # sparse: no disk used
    (ft / "train.log").write_text("step 1")
    (ft / "1_Pooling").mkdir()
    (ft / "1_Pooling" / "config.json").write_text("{}")
    (ft / "chat_template.jinja").write_text("{{ messages }}")
    result = cli("run", _recipe(tmp_path, outputs=[{"from": "w", "path": "out", "copy_files_from": "ft"}]), "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        ".mergebench-output.json", "1_Pooling", "README.md", "chat_template.jinja", "config-link.json",
        "config.json", "generation_config.json", "model.safetensors"])
    assert not (out / "config-link.json").is_symlink() and (out / "1_Pooling" / "config.json").is_file()
    skipped = "\n".join(json.loads(result.output)["outputs"][0]["files_not_copied"])
    for name, reason in (("etcdir", "outside the model folder"), ("vocab.txt", "outside the model folder"),
                         ("special_tokens_map.json", "not a regular file"), ("huge.json", "byte limit"),
                         ("train.log", "not a companion file")):
        assert f"{ft / name}: " in skipped and reason in skipped.split(f"{ft / name}: ")[1].splitlines()[0]


# resume, interrupts, resources -------------------------------------------------------------------------


def test_an_interrupted_run_says_how_to_resume_and_resume_refuses_a_changed_input(tmp_path, cli, monkeypatch):
    from mergebench.io import writer

    _workspace(tmp_path)
    recipe = _recipe(tmp_path)

    def interrupted(self):
        self.sync()  # every tensor is on disk and journalled, as when a long run is stopped late
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(writer.CheckpointWriter, "finish_weights", interrupted)
        result = cli("run", recipe, "-q")
    assert result.exit_code == 130
    assert f"continue with: mergebench run {recipe} --resume" in " ".join(result.output.split())
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()

    shard = tmp_path / "ft" / "model.safetensors"
    stamp = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-4:] = bytes(4) if data[-4:] != bytes(4) else b"\x01\x02\x03\x04"  # the last tensor, same size
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # the mtime restored: only ctime tells
    result = cli("run", recipe, "-q", "--resume")
    assert result.exit_code == 2, result.output
    assert f"{shard}: changed: its change time (it was written to) since the interrupted run began" in " ".join(
        result.output.split())
    assert not (tmp_path / "out").exists()
    assert cli("run", recipe, "-q").exit_code == 0  # starting over is always possible


def test_resume_after_an_interrupt_with_unchanged_inputs_finishes(tmp_path, cli, monkeypatch):
    from mergebench.io import writer

    _workspace(tmp_path)
    recipe = _recipe(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(writer.CheckpointWriter, "finish_weights", lambda self: (self.sync(), (_ for _ in ()).throw(
            KeyboardInterrupt)))
        assert cli("run", recipe, "-q").exit_code == 130
    assert cli("run", recipe, "-q", "--resume").exit_code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_not_enough_free_space_is_refused_before_writing(tmp_path, cli, monkeypatch):
    import shutil as shutil_module

    _workspace(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**12, 10**12, 1000))
    recipe = _recipe(tmp_path)
    before = snapshot(tmp_path)
    result = cli("run", recipe)
    assert result.exit_code == 2 and "the outputs need 0.00 GB and the file system has 0.00 GB free" in " ".join(
        result.output.split())
    assert snapshot(tmp_path) == before


def _linear_over(root: Path, count: int) -> Path:
    for i in range(count):
        save_file({"w": torch.full((4,), float(i))}, root / f"m{i}.safetensors")
    return write_recipe(root / "many.yaml", {
        "models": {f"m{i}": f"m{i}.safetensors" for i in range(count)},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": [f"m{i}" for i in range(count)]}}},
        "outputs": [{"from": "avg", "path": "out"}]})


@pytest.mark.parametrize("hard", [80, 4096])
def test_many_inputs_need_descriptors_the_process_may_open(tmp_path, hard):
    import resource
    import subprocess
    import sys

    recipe = _linear_over(tmp_path, 60)
    command = [str(Path(sys.executable).parent / "mergebench"), "run", str(recipe), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (80, hard)))
    if hard == 80:
        assert result.returncode == 2 and "60 weight files" in result.stderr and "ulimit -n" in result.stderr
    else:  # the soft limit is raised as far as the run needs
        assert result.returncode == 0, result.stderr
        assert torch.equal(_read(tmp_path / "out")["w"], torch.full((4,), 29.5))


def _read(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# what a newcomer reads ---------------------------------------------------------------------------------


def test_help_and_ops_print_brackets_as_written(cli):
    run_help = " ".join(cli("run", "--help").output.split())
    assert "'mergebench[ray]'" in run_help and "<bool>" not in run_help
    align = cli("ops", "align").output
    assert "[[key, axis]," in align  # rich markup once took [key, axis] for a style and dropped it
    fusion = cli("ops", "ot_fusion").output
    assert "PydanticUndefined" not in fusion and "required" in fusion


def test_an_error_prints_a_path_as_it_is(tmp_path, cli):
    result = cli("run", tmp_path / ":thumbs_up: [bold]x[/].yaml")
    assert result.exit_code == 2 and ":thumbs_up: [bold]x[/].yaml" in " ".join(result.output.split())


def test_plan_shows_selection_and_cards_tag_only_their_operators(tmp_path, cli):
    _workspace(tmp_path)
    recipe = _recipe(tmp_path, nodes={
        "w": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft"}, "include": ["layers"],
              "exclude": ["norm"], "overrides": [{"match": "mlp", "params": {"alpha": 0.25}}]},
        "avg": {"op": "linear", "inputs": {"models": ["base", "ft"]}}},
        outputs=[{"from": "w", "path": "out-w"}, {"from": "avg", "path": "out-avg"}])
    plan = " ".join(cli("plan", recipe).output.replace("│", " ").split())
    assert "include: layers" in plan and "exclude: norm" in plan and 'override mlp: {"alpha": 0.25}' in plan
    assert cli("run", recipe, "-q").exit_code == 0
    tags = {name: (tmp_path / name / "README.md").read_text().split("---")[1] for name in ("out-w", "out-avg")}
    assert "wise_ft" in tags["out-w"] and "linear" not in tags["out-w"]
    assert "linear" in tags["out-avg"] and "wise_ft" not in tags["out-avg"]


def test_diff_json_is_strict_json(tmp_path, cli):
    _workspace(tmp_path)
    result = cli("diff", tmp_path / "base", tmp_path / "base", tmp_path / "base", "--json")  # zero deltas: no cosine
    assert result.exit_code == 0

    def refuse(constant):
        raise AssertionError(f"invalid JSON constant {constant}")

    report = json.loads(result.output, parse_constant=refuse)
    assert any(value is None for row in report.values() for value in row.values())


def test_grid_size_counts_the_product_before_building():
    from mergebench.analysis.sweeps import grid_size, parse_grid
    from mergebench.errors import MergebenchError

    assert parse_grid("w.alpha=0:1:0.1")[1] == pytest.approx([i / 10 for i in range(11)])
    assert len(parse_grid("w.alpha=0:1:0.002")[1]) == 501 and len(parse_grid("w.alpha=0:1:0.001", 2000)[1]) == 1001
    assert grid_size({"a.x": [1] * 30, "b.y": [2] * 30}) == 900
    with pytest.raises(MergebenchError, match="1200 points, more than the limit of 1000"):
        grid_size({"a.x": [1] * 40, "b.y": [2] * 30})


def test_resume_after_a_kill_between_the_journal_and_the_shards(tmp_path, cli, monkeypatch):
    from mergebench.io import writer

    _workspace(tmp_path)
    recipe = _recipe(tmp_path)
    real = writer.CheckpointWriter._open_shards

    def killed(self, metadata, fresh):
        if fresh:
            raise KeyboardInterrupt  # the journal is written, no shard exists yet
        return real(self, metadata, fresh)

    with monkeypatch.context() as patch:
        patch.setattr(writer.CheckpointWriter, "_open_shards", killed)
        assert cli("run", recipe, "-q").exit_code == 130
    assert sorted(p.name for p in (tmp_path / "out.partial").iterdir()) == [".mergebench-journal"]
    assert cli("run", recipe, "-q", "--resume").exit_code == 0
    resumed = snapshot(tmp_path / "out")
    assert cli("run", recipe, "-q", "--force").exit_code == 0
    assert snapshot(tmp_path / "out") == resumed  # the bytes of a run that never stopped
