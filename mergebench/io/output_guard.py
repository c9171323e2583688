"""What ``--force`` may replace: only an output that an earlier mergebench run wrote, and nothing else.

A merge must never destroy what it did not create. Every finished checkpoint folder carries a manifest
(``.mergebench-output.json``) listing the entries the run put there; an artifact file carries
``created_by: mergebench`` in its safetensors metadata. ``--force`` replaces a folder only when the
manifest lists everything in it (a file the user added is named and the run refused), an artifact
only when its metadata says mergebench wrote it, and never a symbolic link, a device, a FIFO or
anything else. The scratch paths beside an output (``OUT.partial``) are likewise removed only when
they hold a mergebench journal.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from mergebench.errors import MergebenchError
from mergebench.io.safetensors_header import parse_header

MANIFEST_NAME = ".mergebench-output.json"
LEGACY_SHARD_METADATA = "mergebench_version"  # outputs written before the manifest existed


def write_manifest(folder: Path, created_by: str, identity: str, exclude: Iterable[str] = ()) -> None:
    """Record every entry of a finished output folder (called just before it is renamed into place), and
    the identity of the run (recipe, inputs, layout) that made it."""
    skip = {MANIFEST_NAME, *exclude}
    entries = sorted(name for name in os.listdir(folder) if name not in skip)
    doc = {"created_by": created_by, "identity": identity, "entries": entries}
    (folder / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")


def committed_identity(out: Path) -> str | None:
    """The run identity in a finished output folder's manifest, if it has a readable one."""
    manifest = out / MANIFEST_NAME
    if out.is_symlink() or manifest.is_symlink() or not manifest.is_file():
        return None
    try:
        identity = json.loads(manifest.read_text()).get("identity")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return identity if isinstance(identity, str) else None


def _metadata(path: Path) -> dict[str, str]:
    """A regular safetensors file's metadata; empty for anything else (a link, a folder, not safetensors)."""
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        return parse_header(path).metadata
    except (MergebenchError, OSError):
        return {}


def artifact_recipe(out: Path) -> tuple[str, str] | None:
    """(recipe sha256, node) from a mergebench artifact's metadata, if it is one."""
    metadata = _metadata(out)
    recipe, node = metadata.get("mergebench_recipe_sha256"), metadata.get("node")
    return (recipe, node) if recipe and node else None


def check_may_replace(out: Path, force: bool, artifact: bool) -> None:
    """An existing output is an error without ``force``; with it, only an earlier mergebench output goes."""
    if not os.path.lexists(out):
        return
    if not force:
        raise MergebenchError(f"{out}: already exists (use --force to replace it)")
    check_replaceable(out, artifact)


def check_replaceable(out: Path, artifact: bool) -> None:
    """Raise unless ``out`` is absent or an earlier mergebench output of the same kind (folder or file)."""
    try:
        info = out.lstat()
    except FileNotFoundError:
        return
    refuse = f"{out}: --force replaces only an earlier mergebench output, and this is"
    if stat.S_ISLNK(info.st_mode):
        raise MergebenchError(f"{refuse} a symbolic link (to {os.readlink(out)}); remove the link or choose another "
                              f"output path")
    if stat.S_ISDIR(info.st_mode):
        if artifact:
            raise MergebenchError(f"{refuse} a folder, where this output is a single artifact file")
        _check_folder(out, refuse)
    elif stat.S_ISREG(info.st_mode):
        if not artifact:
            raise MergebenchError(f"{refuse} a file, where this output is a checkpoint folder")
        if not _written_by_mergebench(out, "created_by"):
            raise MergebenchError(f"{refuse} a file that mergebench did not write")
    else:
        raise MergebenchError(f"{refuse} neither a file nor a folder (a device, FIFO or socket)")


def _check_folder(out: Path, refuse: str) -> None:
    present = sorted(os.listdir(out))
    manifest = out / MANIFEST_NAME
    if manifest.is_file() and not manifest.is_symlink():
        try:
            listed = set(json.loads(manifest.read_text()).get("entries", []))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
            raise MergebenchError(f"{refuse} a folder whose {MANIFEST_NAME} is unreadable") from None
        extra = [name for name in present if name != MANIFEST_NAME and name not in listed]
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise MergebenchError(f"{out}: holds entries that the earlier mergebench run did not write ({shown}); "
                                  f"move them away, or choose another output path")
        return
    shards = [out / name for name in present if name.endswith(".safetensors")]
    if not shards or not all(_written_by_mergebench(shard, LEGACY_SHARD_METADATA) for shard in shards):
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise MergebenchError(f"{refuse} a folder that mergebench did not write (it holds: {shown or 'nothing'})")


def _written_by_mergebench(path: Path, field: str) -> bool:
    value = _metadata(path).get(field)
    return isinstance(value, str) and (field != "created_by" or value.startswith("mergebench"))


def check_scratch(partial: Path, marks: Iterable[str]) -> None:
    """``OUT.partial`` may be removed only when it is a real folder holding one of mergebench's ``marks``
    (its journal, or the manifest of an output about to be renamed), or nothing at all."""
    try:
        info = partial.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode) and (any((partial / m).is_file() for m in marks) or not os.listdir(partial)):
        return
    raise MergebenchError(f"{partial}: exists and is not a partial mergebench output; move it away first")
