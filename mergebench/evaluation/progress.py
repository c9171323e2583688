"""Progress of an evaluation: a bar on a terminal, nothing when the output is piped or captured."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def tracked(items: Sequence[T], description: str) -> Iterable[T]:
    """``items`` with a progress bar on a terminal (stderr), as they are; nothing printed otherwise."""
    if not sys.stderr.isatty():
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, console=Console(stderr=True), transient=True)
