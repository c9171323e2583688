"""Reading and writing safetensors by hand: layouts other tools read, headers that lie are refused."""

from __future__ import annotations

import json
import mmap
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebench.errors import MergebenchError
from mergebench.io.checkpoint import Checkpoint
from mergebench.io.writer import PlannedTensor, plan_shards
from mergebench.recipe import parse_size


def _raw_file(path, header: dict | bytes, data: bytes = b""):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool,
                                   torch.uint8, torch.float64])
def test_reads_every_dtype_like_safetensors(tmp_path, dtype):
    tensors = {"x": (torch.arange(24).reshape(2, 3, 4) % 5).to(dtype), "scalar": torch.tensor(3).to(dtype),
               "empty": torch.zeros(0, 3, dtype=dtype)}
    save_file(tensors, tmp_path / "t.safetensors")
    ckpt = Checkpoint(tmp_path / "t.safetensors")
    for key, tensor in tensors.items():
        for read in (ckpt.read(key), ckpt.map(key)):
            assert read.dtype == tensor.dtype and read.shape == tensor.shape and torch.equal(read, tensor)


def test_a_mapped_tensor_at_any_offset_is_private_to_the_run(tmp_path):
    """Mapping starts at a page boundary whatever the tensor's offset; writing to it never reaches the file."""
    data = torch.arange(3000, dtype=torch.float64)
    header = {"pad": {"dtype": "U8", "shape": [5], "data_offsets": [0, 5]},
              "x": {"dtype": "F64", "shape": [3000], "data_offsets": [5, 5 + data.nbytes]}}
    body = json.dumps(header).encode()
    body += b" " * ((3 - len(body) - 13) % 8)  # x starts at 8 + len(body) + 5, 3 bytes past a multiple of 8
    path = _raw_file(tmp_path / "odd.safetensors", body, bytes(range(5)) + data.numpy().tobytes())
    before = path.read_bytes()
    ckpt = Checkpoint(path)
    mapped = ckpt.map("x")
    assert ckpt.info("x").offset % 8 == 3 and torch.equal(mapped, data)
    mapped.add_(1)
    assert torch.equal(mapped, data + 1) and path.read_bytes() == before and torch.equal(ckpt.read("x"), data)


def test_a_file_system_that_cannot_map_files_is_read_instead(tmp_path, monkeypatch):
    save_file({"x": torch.arange(5000, dtype=torch.float32)}, tmp_path / "t.safetensors")
    ckpt = Checkpoint(tmp_path / "t.safetensors")

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # ENODEV: what mmap gives where a file system has no mapping

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert torch.equal(ckpt.map("x"), torch.arange(5000, dtype=torch.float32)) and ckpt.reads["x"] == 1


def test_a_file_cut_short_after_opening_is_refused_by_name(tmp_path):
    save_file({"x": torch.ones(4096)}, tmp_path / "t.safetensors")
    ckpt = Checkpoint(tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "r+b") as f:
        f.truncate(1000)
    for read in (ckpt.read, ckpt.map):
        with pytest.raises(MergebenchError, match="t.safetensors: file ended early"):
            read("x")


def test_keys_come_in_storage_order_across_shards(tmp_path):
    save_file({"b": torch.ones(2), "a": torch.ones(3)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c": torch.ones(1)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(tmp_path)
    offsets = [ckpt.info(k).offset for k in ckpt.keys[:2]]
    assert ckpt.keys[2] == "c" and offsets == sorted(offsets)


def test_plan_shards_fills_in_order():
    tensors = [PlannedTensor(f"t{i}", torch.float32, (10,)) for i in range(5)]  # 40 bytes each
    shards = plan_shards(tensors, 100)
    assert [[t.key for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [s.name for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [s.name for s in plan_shards(tensors, 10**6)] == ["model.safetensors"]
    assert len(plan_shards(tensors, 1)) == 5  # a tensor larger than the shard size gets a shard of its own


def test_written_shards_load_with_the_safetensors_library(tmp_path):
    from mergebench.synthetic import save_checkpoint

    state = {"w": torch.randn(3, 5), "ids": torch.arange(7), "h": torch.randn(4).half()}
    save_checkpoint(state, tmp_path / "out", shard_size=30)
    loaded = {}
    for file in sorted((tmp_path / "out").glob("*.safetensors")):
        loaded.update(load_file(file))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize(("size", "expected"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30),
                                                (1234, 1234), ("1.5KB", 1500), ("64kib", 65536)])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["0", "-1GB", "5 parsecs", "GB", 0])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError):
        parse_size(size)


BAD_HEADERS = {
    "header longer than the file": (b"x" * 10, lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"),
                                    "header claims 1000 bytes"),
    "not JSON": (b"{nope", None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "not a JSON object"),
    "unknown dtype": ({"x": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, None, "unsupported dtype 'F7'"),
    "out of bounds": ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, "outside the file"),
    "wrong byte length": ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, None, "needs 8"),
    "overlap": ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, None, "overlap"),
    "negative shape": ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, None, "invalid shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_lying_headers_are_refused_with_the_file_name(tmp_path, case):
    header, writer, message = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    if writer:
        writer(path)
    else:
        _raw_file(path, header, b"\0" * 8)
    with pytest.raises(MergebenchError, match=message) as info:
        Checkpoint(path)
    assert str(path) in str(info.value)
