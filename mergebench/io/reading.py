"""Reading a model folder's small files (configs, tokenizers, indexes) without trusting them.

Each read names the file when it fails: not a regular file (a FIFO would block the run forever, a
device could be endless), not UTF-8, not JSON, not a JSON object.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from mergebench.errors import MergebenchError


def require_regular_file(path: Path, what: str = "file") -> None:
    """Raise unless ``path`` (links followed) is a regular file: never open a FIFO, socket or device."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise MergebenchError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise MergebenchError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise MergebenchError(f"{path}: expected a {what}, found {kind}")


def read_text(path: Path, what: str = "file") -> str:
    """The UTF-8 text of a regular file, or one error naming it."""
    require_regular_file(path, what)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergebenchError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MergebenchError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def read_json_object(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from a regular UTF-8 file, or one error naming the file and line."""
    try:
        doc = json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise MergebenchError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise MergebenchError(f"{path}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise MergebenchError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc
