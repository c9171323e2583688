"""Examples from a local file: plain text (one example per non-empty line) or JSON Lines (one object per line).

Errors name the file and line. Nothing here downloads: a dataset is a file the user has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergebench.errors import MergebenchError
from mergebench.io.reading import read_text


def read_examples(path: Path, fields: tuple[str, ...] = ("text",), limit: int | None = None) -> list[dict[str, Any]]:
    """The examples of a ``.jsonl`` file (objects with ``fields``) or of any other text file (``{"text": line}``)."""
    lines = read_text(path, "data file").splitlines()
    examples: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            examples.append({"text": line})
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MergebenchError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(example, dict):
            raise MergebenchError(f"{path}:{number}: expected a JSON object, found {type(example).__name__}")
        missing = [f for f in fields if f not in example]
        if missing:
            raise MergebenchError(f"{path}:{number}: the example has no '{missing[0]}'")
        examples.append(example)
    if not examples:
        raise MergebenchError(f"{path}: no examples")
    return examples
