"""Which files hold a checkpoint's weights, and what their headers say they hold, without torch.

A checkpoint is a ``.safetensors`` file, a folder with ``model.safetensors`` or one ``*.safetensors`` file, or
a sharded index (``*.safetensors.index.json``) whose shards must lie inside its folder and hold the keys it
maps to them. ``Checkpoint`` opens one through here; ``mergebench inspect`` lists one through here alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.io.reading import read_json_object, require_regular_file
from mergebench.io.safetensors_header import StoredTensor, parse_header

PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def stored_tensors(path: Path, files: list[tuple[Path, set[str] | None]]) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint at ``path`` (its ``weight_files``), in storage order (file by file, offset
    by offset): each key once, each where the index says."""
    found: dict[str, StoredTensor] = {}
    for file, expected_keys in files:
        header = parse_header(file)
        if expected_keys is not None:
            missing = sorted(set(expected_keys) - header.tensors.keys())
            if missing:
                raise MergebenchError(f"{file}: the index maps '{missing[0]}' to this shard but it is not there")
        for key, stored in sorted(header.tensors.items(), key=lambda item: item[1].offset):
            if expected_keys is not None and key not in expected_keys:
                continue
            if key in found:
                raise MergebenchError(f"{file}: tensor '{key}' is also stored in {found[key].file}")
            found[key] = stored
    if not found:
        raise MergebenchError(f"{path}: the checkpoint holds no tensors")
    return found


def weight_files(path: Path) -> list[tuple[Path, set[str] | None]]:
    """The safetensors files of a checkpoint, each with the keys an index assigns to it (None: all)."""
    if not path.exists():
        raise MergebenchError(f"{path}: no such file or folder")
    if not path.is_dir():
        require_regular_file(path, "safetensors file" if path.suffix == ".safetensors" else "weight file")
        if path.name.endswith(".index.json"):
            return indexed_files(path)
        if path.suffix != ".safetensors":
            hint = " (pickled weights need --allow-pickle)" if any(path.match(p) for p in PICKLED_WEIGHTS) else ""
            raise MergebenchError(f"{path}: not a .safetensors file{hint}")
        return [(path, None)]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise MergebenchError(f"{path}: several weight indexes ({', '.join(i.name for i in indexes)}); name one")
    if indexes:
        return indexed_files(indexes[0])
    if (path / "model.safetensors").is_file():
        return [(path / "model.safetensors", None)]
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return [(files[0], None)]
    if files:
        raise MergebenchError(f"{path}: several .safetensors files and no index to say how they fit together")
    if pickled_files(path):
        raise MergebenchError(f"{path}: only pickled weights ({pickled_files(path)[0].name}), which can run code "
                              f"when loaded; mergebench reads safetensors (--allow-pickle loads them with "
                              f"torch.load(weights_only=True))")
    raise MergebenchError(f"{path}: no weights found (no .safetensors file or index)")


def indexed_files(index: Path) -> list[tuple[Path, set[str] | None]]:
    doc = read_json_object(index, "weight index")
    try:
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (KeyError, TypeError):
        raise MergebenchError(f"{index}: not a weight index (needs a 'weight_map' object)") from None
    folder = index.parent.resolve()
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\x00" in shard:
            raise MergebenchError(f"{index}: tensor '{key}' maps to {shard!r}, not a shard file name")
        by_shard.setdefault(shard, set()).add(key)
    files = []
    for shard in sorted(by_shard):
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise MergebenchError(f"{index}: shard name {shard!r} must be a plain name inside the folder")
        file = (index.parent / shard).resolve()
        if folder not in file.parents:
            raise MergebenchError(f"{index}: shard {shard!r} resolves outside the model folder")
        if not file.is_file():
            raise MergebenchError(f"{index}: names shard {shard!r}, which does not exist")
        files.append((file, by_shard[shard]))
    return files


def pickled_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
