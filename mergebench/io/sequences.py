"""Checkpoint sequences of one training run: which files, in which order, at which steps.

A sequence is written in a recipe as a glob (``./run/checkpoint-*``), a list of paths, or a mapping
with ``paths`` (a glob or a list), optional explicit ``steps`` and ``allow_gaps``. Steps are parsed
from the names HF Trainer and common loops use (``checkpoint-500``, ``step_1200``, ``global_step300``,
``epoch-3``, ``iter_40``); the order is the order of the steps.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from mergebench.errors import MergebenchError

GLOB_CHARS = re.compile(r"[*?\[]")
STEP_PATTERN = re.compile(r"(?:checkpoint|global_step|step|iter|iteration|epoch)[-_]?(\d+)", re.IGNORECASE)


def is_glob(path: str) -> bool:
    return bool(GLOB_CHARS.search(path))


def step_of(path: str) -> int | None:
    """The step in the last component of a checkpoint's path, or None."""
    matches = STEP_PATTERN.findall(Path(path).name)
    return int(matches[-1]) if matches else None


def resolve_sequence(paths: str | list[str], steps: list[int] | None, allow_gaps: bool, base_dir: Path,
                     where: str) -> list[tuple[int, str]]:
    """(step, absolute path) pairs in step order; ``where`` prefixes every error (recipe file and line)."""
    if isinstance(paths, str):
        pattern = str(base_dir / paths)
        found = sorted(glob.glob(pattern))
        if not found:
            raise MergebenchError(f"{where}: the sequence pattern {paths!r} matches nothing")
    else:
        found = [str(base_dir / p) for p in paths]
    if not found:
        raise MergebenchError(f"{where}: a sequence needs at least one checkpoint")
    if steps is None:
        parsed = [step_of(p) for p in found]
        missing = [p for p, s in zip(found, parsed) if s is None]
        if missing:
            raise MergebenchError(f"{where}: no step number in the name {Path(missing[0]).name!r} "
                                  f"(name it like checkpoint-500, or give 'steps')")
        steps = parsed
    elif len(steps) != len(found):
        raise MergebenchError(f"{where}: {len(steps)} steps for {len(found)} checkpoints")
    pairs = sorted(zip(steps, (str(Path(p).resolve()) for p in found)))
    for (a, path_a), (b, path_b) in zip(pairs, pairs[1:]):
        if a == b:
            raise MergebenchError(f"{where}: step {a} appears twice ({path_a} and {path_b})")
    gaps = sorted({b - a for (a, _), (b, _) in zip(pairs, pairs[1:])})
    if len(gaps) > 1 and not allow_gaps:
        spacing = gaps[0]
        expected = pairs[0][0]
        for step, _ in pairs:
            if step != expected:
                raise MergebenchError(f"{where}: checkpoints are {spacing} steps apart but step {expected} is "
                                      f"missing (set allow_gaps: true if the spacing is meant to vary)")
            expected += spacing
        raise MergebenchError(f"{where}: uneven spacing between checkpoints ({gaps}); set allow_gaps: true")
    return [(step, path) for step, path in pairs]
