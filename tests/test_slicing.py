"""Elementwise merges computed slice by slice (and with reused buffers) equal whole-tensor computation."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import read_checkpoint, run_merge
from mergebench.engine import pipeline, slicing
from mergebench.engine.buffers import BufferPool
from mergebench.io.checkpoint import Checkpoint
from mergebench.io.writer import CheckpointWriter

NODES = {
    "linear": {"op": "linear", "inputs": {"models": ["base", "ft1", "ft2"]}, "params": {"weights": [0.2, 0.3, 0.5]}},
    "task_arithmetic": {"op": "task_arithmetic", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                        "params": {"lambda": 0.7}},
    "ties_global": {"op": "ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                    "params": {"density": 0.3, "scope": "global"}},
    "lines": {"op": "lines", "inputs": {"base": "base", "fine_tuned": "ft1"}, "params": {"alpha": 0.2}},
    "ties_per_tensor": {"op": "ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},  # key passes
                        "params": {"density": 0.3, "scope": "per_tensor"}},
    "dare_ties": {"op": "dare_ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},  # draws continue
                  "params": {"p": 0.5, "scope": "per_tensor"}, "seed": 7},                    # slice to slice
    "dare_ties_global": {"op": "dare_ties", "inputs": {"base": "base", "models": ["ft1", "ft2"]},
                         "params": {"p": 0.5, "density": 0.5}},
    "dare_linear": {"op": "dare_linear", "inputs": {"base": "base", "models": ["ft1", "ft2"]}, "params": {"p": 0.3}},
    "slerp": {"op": "slerp", "inputs": {"a": "ft1", "b": "ft2"}, "params": {"t": 0.3}},
}


def _run(tmp_path, cli, folders, node: dict, name: str, extra_nodes: dict | None = None):
    doc = {"models": {k: str(v) for k, v in folders.items()}, "nodes": {"merge": node, **(extra_nodes or {})},
           "outputs": [{"from": "merge", "path": name}]}
    return run_merge(cli, tmp_path, doc, "--device", "cpu", recipe=f"{name}.yaml")[name]


def _assert_same_bytes(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key].view(torch.uint8), expected[key].view(torch.uint8)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", sorted(NODES))
def test_slices_give_the_same_bytes_as_whole_tensors(tmp_path, cli, llama_models, monkeypatch, dtype, merge):
    folders, _, _ = llama_models(dtype)
    whole = _run(tmp_path, cli, folders, NODES[merge], "whole")
    sliced_keys = []
    slices = slicing.slices

    def counted(raw):
        sliced_keys.append(next(iter(raw.values())).numel())
        return slices(raw)

    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 1000)  # uneven: most tensors end in a partial slice
    monkeypatch.setattr(slicing, "slices", counted)
    sliced = _run(tmp_path, cli, folders, NODES[merge], "sliced")
    _assert_same_bytes(sliced, whole)
    assert sum(n > 1000 for n in sliced_keys) >= 10  # SLERP too: its angle is a key pass, then it is elementwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", ["linear", "ties_global", "ties_per_tensor", "dare_ties"])
def test_inputs_let_go_behind_their_slices_give_the_same_bytes(tmp_path, cli, llama_models, monkeypatch, dtype,
                                                                merge):
    """Large mapped inputs are faulted in as their slices are read and their pages let go behind them (memory
    of a window, not of the tensor); sweeps after the first (key passes, then the merge) read them back from
    the file. Here every mapped tensor counts as large and pages go after every slice: the same bytes."""
    from mergebench.io import checkpoint

    folders, _, _ = llama_models(dtype)
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 1000)
    kept = _run(tmp_path, cli, folders, NODES[merge], "kept")
    released = []
    libc = checkpoint._LIBC

    class CountingLibc:
        def madvise(self, address, length, advice):
            released.append(length if advice == checkpoint.MADV_DONTNEED else 0)
            return libc.madvise(address, length, advice)

    monkeypatch.setattr(checkpoint, "WHOLE_MAPPING_BYTES", 0)
    monkeypatch.setattr(slicing, "RELEASE_EVERY", 1)
    monkeypatch.setattr(checkpoint, "_LIBC", CountingLibc())
    let_go = _run(tmp_path, cli, folders, NODES[merge], "let_go")
    _assert_same_bytes(let_go, kept)
    assert sum(released) > 3 * 4096 * 10  # pages of every large key's inputs went


def test_a_delta_chain_and_two_outputs_are_sliced_together(tmp_path, cli, llama_models, monkeypatch):
    folders, states, _ = llama_models(torch.bfloat16)
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 999)
    run_merge(cli, tmp_path, {
        "models": {k: str(v) for k, v in folders.items()},
        "nodes": {"deltas": {"op": "delta", "inputs": {"base": "base", "models": ["ft1", "ft2"]}},
                  "merged": {"op": "apply", "inputs": {"base": "base", "delta": "deltas"}, "params": {"scale": 0.5},
                             "exclude": ["norm"]},
                  "wise": {"op": "wise_ft", "inputs": {"zero_shot": "base", "fine_tuned": "ft2"},
                           "params": {"alpha": 0.25}}},
        "outputs": [{"from": "merged", "path": "merged"}, {"from": "wise", "path": "wise"}],
    }, "--device", "cpu", recipe="chain.yaml")
    merged, wise = read_checkpoint(tmp_path / "merged"), read_checkpoint(tmp_path / "wise")
    for key, base in states["base"].items():
        b, f1, f2 = (states[m][key].float() for m in ("base", "ft1", "ft2"))
        expected = base if "norm" in key else (b + 0.5 * (f1 - b) + 0.5 * (f2 - b)).to(torch.bfloat16)
        assert torch.equal(merged[key], expected), key
        assert torch.equal(wise[key], (0.75 * b + 0.25 * f2).to(torch.bfloat16)), key


def test_the_pool_reuses_its_own_buffers_and_ignores_others():
    pool = BufferPool(capacity=2)
    first = pool.take(400)
    as_floats = first.view(torch.float32).reshape(10, 10)
    pool.give(as_floats)
    again = pool.take(100)  # the smallest free buffer that fits: the same memory
    assert again.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    foreign = torch.zeros(1000, dtype=torch.uint8)
    pool.give(foreign)  # not the pool's: never handed out later
    assert pool.take(1000).untyped_storage().data_ptr() != foreign.data_ptr()
    buffers = [pool.take(n) for n in (10, 20, 30)]
    for b in buffers:
        pool.give(b)
    assert sorted(b.numel() for b in pool._free) == [20, 30]  # over capacity: the smallest is dropped


def test_a_free_thread_takes_the_next_key_while_an_older_one_computes():
    """A large key (an embedding matrix) does not hold up the keys after it: "large" finishes only once
    "next", submitted after "small" was handed on, has been computed beside it."""
    next_done = threading.Event()

    def work(key: str, raw: dict) -> bool:
        if key == "large":
            return next_done.wait(timeout=10)
        if key == "next":
            next_done.set()
        return True

    items = ((key, {}) for key in ("large", "small", "next"))
    done = list(pipeline.side_by_side(items, work, torch.device("cpu"), workers=2))
    assert done == [("small", True), ("next", True), ("large", True)]


@pytest.mark.parametrize("merge", ["linear", "ties_per_tensor", "dare_ties", "slerp", "ties_global",
                                   "dare_ties_global"])  # the last two: statistics passes side by side
def test_keys_computed_side_by_side_give_the_same_bytes(tmp_path, cli, llama_models, monkeypatch, merge):
    folders, _, _ = llama_models(torch.bfloat16)
    monkeypatch.setattr(pipeline, "compute_threads", lambda device: 1)
    alone = _run(tmp_path, cli, folders, NODES[merge], "alone")
    written = []
    write = CheckpointWriter.write

    def recorded(self, key, tensor):
        written.append(key)
        return write(self, key, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", recorded)
    monkeypatch.setattr(pipeline, "compute_threads", lambda device: 3)
    side_by_side = _run(tmp_path, cli, folders, NODES[merge], "side_by_side")
    _assert_same_bytes(side_by_side, alone)
    # every key written once, in whichever order the keys finished
    assert sorted(written) == sorted(Checkpoint(folders["base"]).keys)
