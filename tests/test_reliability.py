"""Crash safety, resume, locking, write errors and untrusted files (issue: reliability and security)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import read_checkpoint, write_recipe
from mergebench.engine.runner import RunOptions, run_recipe
from mergebench.errors import MergebenchError
from mergebench.io import writer as writer_module
from mergebench.io.writer import JOURNAL_NAME, OutputError, OutputLock
from mergebench.recipe import load_recipe
from mergebench.synthetic import save_checkpoint

MERGEBENCH = Path(sys.executable).parent / "mergebench"


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _digest(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in _tree_bytes(folder).items()}


@pytest.fixture
def three_models(tmp_path):
    """Three models of 48 tensors of 256 KiB, in shards of 2 MB; a recipe with two outputs."""
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b", "c"):
        state = {f"model.layers.{i}.w": torch.randn(256, 256, generator=g) for i in range(48)}
        state["ids"] = torch.arange(10)
        save_checkpoint(state, tmp_path / name, shard_size=2_000_000, config={"model_type": "test"})
    recipe = write_recipe(tmp_path / "merge.yaml", {
        "models": {"a": "a", "b": "b", "c": "c"},
        "nodes": {"ta": {"op": "task_arithmetic", "inputs": {"base": "a", "models": ["b", "c"]}},
                  "ties": {"op": "ties", "inputs": {"base": "a", "models": ["b", "c"]}, "params": {"density": 0.4}}},
        "outputs": [{"from": "ta", "path": "out-ta", "shard_size": "3MB"},
                    {"from": "ties", "path": "out-ties", "dtype": "bfloat16", "shard_size": "3MB"}],
    })
    return tmp_path, recipe


def _journal_entries(partial: Path) -> int:
    try:
        return len((partial / JOURNAL_NAME).read_text().splitlines()) - 1
    except FileNotFoundError:
        return -1


@pytest.mark.parametrize("kill_after", [0, 3, 9, "random"])
def test_sigkill_then_resume_gives_the_bytes_of_a_clean_run(three_models, kill_after):
    folder, recipe = three_models
    env = {**os.environ, "MERGEBENCH_SYNC_BYTES": "1000000"}
    subprocess.run([MERGEBENCH, "run", recipe, "--quiet"], check=True, env=env, timeout=300)
    for name in ("out-ta", "out-ties"):  # the reference: the same recipe, run without interruption
        (folder / name).rename(folder / f"clean-{name}")

    inputs_before = {name: _digest(folder / name) for name in ("a", "b", "c")}
    process = subprocess.Popen([MERGEBENCH, "run", recipe, "--quiet"], env=env)
    partial = folder / "out-ta.partial"
    deadline = time.monotonic() + 120
    if kill_after == "random":
        time.sleep(1.0 + (hash(str(folder)) % 1000) / 1000)
    else:
        while _journal_entries(partial) < kill_after and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode == -signal.SIGKILL:  # each output is whole or absent (renamed one after the other)
        for name in ("out-ta", "out-ties"):
            assert not (folder / name).exists() or _tree_bytes(folder / name) == _tree_bytes(folder / f"clean-{name}")

    result = subprocess.run([MERGEBENCH, "run", recipe, "--quiet", "--resume"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("out-ta", "out-ties"):
        assert _tree_bytes(folder / name) == _tree_bytes(folder / f"clean-{name}"), name
        assert not (folder / f"{name}.partial").exists() and not (folder / f"{name}.lock").exists()
    assert {name: _digest(folder / name) for name in ("a", "b", "c")} == inputs_before


def load_recipe_doc(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _disk_full_midway(recipe: Path, monkeypatch) -> OutputError:
    """Run until the 40th write fails with ENOSPC, journaling every 500 kB; returns the error."""
    monkeypatch.setattr(writer_module, "JOURNAL_EVERY_BYTES", 500_000)
    calls = {"n": 0}
    real_pwrite = os.pwrite

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", failing_pwrite)
    with pytest.raises(OutputError) as info:
        run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    monkeypatch.setattr(writer_module.os, "pwrite", real_pwrite)
    return info.value


def test_resume_skips_what_the_journal_holds(three_models, monkeypatch):
    folder, recipe = three_models
    inputs_before = {name: _digest(folder / name) for name in ("a", "b", "c")}
    error = _disk_full_midway(recipe, monkeypatch)
    assert "the disk is full" in str(error) and "--resume" in str(error)
    assert (folder / "out-ta.partial").exists() and not (folder / "out-ta").exists()
    assert {name: _digest(folder / name) for name in ("a", "b", "c")} == inputs_before

    resumed = run_recipe(load_recipe(recipe), RunOptions(device="cpu", resume=True))
    assert 0 < resumed.summary.tensors < 2 * 49  # only what the journal did not confirm was computed again
    fresh = write_recipe(folder / "fresh.yaml", {**load_recipe_doc(recipe), "outputs": [
        {"from": "ta", "path": "fresh-ta", "shard_size": "3MB"},
        {"from": "ties", "path": "fresh-ties", "dtype": "bfloat16", "shard_size": "3MB"}]})
    run_recipe(load_recipe(fresh), RunOptions(device="cpu"))
    for name in ("ta", "ties"):
        a, b = read_checkpoint(folder / f"out-{name}"), read_checkpoint(folder / f"fresh-{name}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_fsync_failing_beside_the_writes_stops_the_run(three_models, monkeypatch):
    """Shards are made durable in the background while later tensors are written: its error still surfaces."""
    folder, recipe = three_models
    monkeypatch.setattr(writer_module, "JOURNAL_EVERY_BYTES", 500_000)
    real_fsync = os.fsync
    journaled = {"n": 0}

    def failing_fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("model-"):
            journaled["n"] += 1
            if journaled["n"] == 5:
                raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(writer_module.os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="out-t.*partial: cannot write \\(Input/output error\\)"):
        run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    monkeypatch.setattr(writer_module.os, "fsync", real_fsync)
    assert (folder / "out-ta.partial").exists() and not (folder / "out-ta").exists()
    assert not (folder / "out-ta.lock").exists()


def test_resume_refuses_a_different_recipe(three_models, cli, monkeypatch):
    folder, recipe = three_models
    _disk_full_midway(recipe, monkeypatch)
    result = cli("run", recipe, "--resume", "--set", "ta.lambda=0.9")
    assert result.exit_code == 2 and "different recipe or from different inputs" in result.output


def test_resume_refuses_changed_inputs(three_models, cli, monkeypatch):
    folder, recipe = three_models
    _disk_full_midway(recipe, monkeypatch)
    state = read_checkpoint(folder / "b")
    state["model.layers.0.w"] = state["model.layers.0.w"] + 1
    save_checkpoint(state, folder / "b", shard_size=2_000_000)
    result = cli("run", recipe, "--resume")
    assert result.exit_code == 2 and "cannot resume" in result.output


def test_a_second_run_on_the_same_output_fails_fast(three_models, cli):
    folder, recipe = three_models
    with OutputLock(folder / "out-ties"):
        started = time.monotonic()
        result = cli("run", recipe)
        assert result.exit_code == 2 and "another mergebench run" in result.output
        assert time.monotonic() - started < 5
        assert not (folder / "out-ta.partial").exists()
    assert cli("run", recipe, "--quiet").exit_code == 0


def test_unwritable_output_is_one_clear_error(tmp_path, cli):
    save_file({"w": torch.ones(3)}, tmp_path / "a.safetensors")
    (tmp_path / "not-a-folder").write_text("a file where a folder should be")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "a.safetensors"},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a"]}}},
        "outputs": [{"from": "avg", "path": "not-a-folder/out"}],
    })
    result = cli("run", recipe)
    assert result.exit_code == 2 and "cannot write" in result.output and "not-a-folder" in result.output


def test_allow_non_finite_writes_anyway(tmp_path, cli):
    save_file({"w": torch.full((3,), 60000.0, dtype=torch.float16)}, tmp_path / "a.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "a.safetensors", "b": "a.safetensors"},
        "nodes": {"sum": {"op": "linear", "inputs": {"models": ["a", "b"]}, "params": {"normalize": False}}},
        "outputs": [{"from": "sum", "path": "out"}],
    })
    assert cli("run", recipe, "--quiet").exit_code == 2
    assert cli("run", recipe, "--quiet", "--allow-non-finite").exit_code == 0
    assert torch.isinf(read_checkpoint(tmp_path / "out")["w"]).all()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/mergebench-pwned",))


def test_pickled_weights_are_refused_unless_allowed(tmp_path, cli):
    (tmp_path / "a").mkdir()
    torch.save({"w": torch.ones(3)}, tmp_path / "a" / "pytorch_model.bin")
    save_file({"w": torch.full((3,), 3.0)}, tmp_path / "b.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "models": {"a": "a", "b": "b.safetensors"},
        "nodes": {"avg": {"op": "linear", "inputs": {"models": ["a", "b"]}}},
        "outputs": [{"from": "avg", "path": "out"}],
    })
    refused = cli("run", recipe)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    allowed = cli("run", recipe, "--quiet", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    torch.testing.assert_close(read_checkpoint(tmp_path / "out")["w"], torch.full((3,), 2.0))


def test_weights_only_refuses_code_in_a_pickle(tmp_path, cli):
    (tmp_path / "evil").mkdir()
    torch.save({"w": torch.ones(3), "payload": _Evil()}, tmp_path / "evil" / "pytorch_model.bin")
    result = cli("inspect", tmp_path / "evil", "--allow-pickle")
    assert result.exit_code == 2 and "weights_only" in result.output
    assert not Path("/tmp/mergebench-pwned").exists()


def test_index_shard_through_a_symlink_outside_is_refused(tmp_path, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.ones(2)}, outside / "secret.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    (model / "shard.safetensors").symlink_to(outside / "secret.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.safetensors"}}))
    result = cli("inspect", model)
    assert result.exit_code == 2 and "outside the model folder" in result.output


def test_lock_file_is_removed_and_not_inside_the_output(three_models, cli):
    folder, recipe = three_models
    assert cli("run", recipe, "--quiet").exit_code == 0
    assert not list(folder.glob("*.lock"))
    assert JOURNAL_NAME not in os.listdir(folder / "out-ta")


def test_a_mergebench_error_removes_partial_outputs(three_models, monkeypatch):
    folder, recipe = three_models

    def bad_value(*args, **kwargs):
        raise MergebenchError("boom")

    monkeypatch.setattr("mergebench.engine.runner.execute", bad_value)
    with pytest.raises(MergebenchError):
        run_recipe(load_recipe(recipe), RunOptions(device="cpu"))
    assert not (folder / "out-ta.partial").exists() and not (folder / "out-ties.partial").exists()
