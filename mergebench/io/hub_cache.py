"""Model references by Hugging Face repo id, resolved in the local cache only: a merge never downloads.

``org/name`` (or ``org/name@REVISION``, a branch, tag or commit hash) is the snapshot folder of the
cache that ``huggingface_hub`` fills (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``): ``models--org--name/refs/REVISION`` names the commit, and
``snapshots/COMMIT`` holds the files. The layout is read directly (no ``huggingface_hub`` import, no
network); a repo id that is not cached is one error naming it and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergebench.errors import MergebenchError

REPO_ID = re.compile(r"(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


def is_repo_id(reference: str) -> bool:
    """Whether ``reference`` reads as ``org/name[@revision]`` (a local path that exists is never one)."""
    return REPO_ID.fullmatch(reference) is not None


def hub_cache() -> Path:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE") or home / "hub")


def cached_snapshot(reference: str) -> Path:
    """The cached snapshot folder of ``org/name[@revision]`` (default revision ``main``), or one clear error."""
    match = REPO_ID.fullmatch(reference)
    if match is None:
        raise MergebenchError(f"'{reference}' is not a repo id (org/name or org/name@revision)")
    repo = f"{match['org']}/{match['name']}"
    revision = match["revision"] or "main"
    root = hub_cache() / f"models--{match['org']}--{match['name']}"
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = root / "snapshots" / commit
    if not (commit and "/" not in commit and snapshot.is_dir()):
        pinned = f" --revision {revision}" if match["revision"] else ""
        raise MergebenchError(f"model '{reference}' is neither a local path nor in the Hugging Face cache ({root}); "
                              f"mergebench does not download: fetch it first (huggingface-cli download {repo}{pinned})")
    return snapshot
