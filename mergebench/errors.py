"""The one exception type users see: a wrong recipe or a wrong input (CLI exit code 2)."""

from __future__ import annotations


class MergebenchError(Exception):
    """A problem with the user's recipe or inputs, phrased as one line that names the culprit.

    The CLI prints it without a traceback and exits with code 2; anything else is a bug (exit 1).
    """


def located(path: object, line: int | None, message: str) -> MergebenchError:
    """An error that points at a file (and a line in it, when known), the way compilers do."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return MergebenchError(f"{where}: {message}")
