"""A recipe file read as YAML, with the line of every value, so that every error can name it.

Only plain values, lists and mappings are accepted (an explicit tag is refused with its line), a key
given twice in a mapping is an error, and a budget of values stops alias bombs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergebench.errors import MergebenchError, located
from mergebench.io.reading import read_text

MAX_YAML_NODES = 100_000
# What yaml.safe_load resolves plain scalars, lists and mappings to. Anything else is an explicit tag
# (!!binary, !!set, !!python/...): refused with its line rather than constructed or silently dropped.
PLAIN_YAML_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in
                            ("str", "int", "float", "bool", "null", "map", "seq", "timestamp"))


def read_yaml(file: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """A recipe file's data and the line of every value in it, before any validation."""
    return parse_yaml(read_text(file, "recipe"), file)


class Locator:
    """Turns a path inside the recipe document into ``file:line: message``."""

    def __init__(self, file: Path, lines: dict[tuple[Any, ...], int]):
        self.file = file
        self.lines = lines

    def line(self, loc: tuple[Any, ...]) -> int | None:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return None

    def error(self, loc: tuple[Any, ...], message: str) -> MergebenchError:
        return located(self.file, self.line(loc), message)

    def pydantic(self, exc: ValidationError, loc: tuple[Any, ...], prefix: str = "") -> MergebenchError:
        first = exc.errors()[0]
        field_loc = tuple("from" if part == "from_" else part for part in first["loc"])
        full = (*loc, *field_loc)
        name = ".".join(str(p) for p in full) or "recipe"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown name"
        elif first["type"] == "missing":
            message = "required but missing"
        return self.error(full, f"{prefix}{name}: {message}")


def parse_yaml(text: str, file: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """yaml.safe_load, plus the line of every mapping value and list item, with a node budget."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise located(file, line, f"YAML syntax error: {problem}") from None
    lines: dict[tuple[Any, ...], int] = {}
    budget = [MAX_YAML_NODES]
    constructor = yaml.SafeLoader("")

    def convert(node: yaml.Node, path: tuple[Any, ...]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise located(file, node.start_mark.line + 1, "recipe too large (more than "
                          f"{MAX_YAML_NODES} YAML values; an alias bomb?)")
        if node.tag not in PLAIN_YAML_TAGS:
            raise located(file, node.start_mark.line + 1, f"YAML tag {node.tag!r} is not allowed in a recipe "
                                                          f"(only plain values, lists and mappings)")
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                key = convert(key_node, (*path, "<key>"))
                if not isinstance(key, (str, int, float, bool)):
                    raise located(file, key_node.start_mark.line + 1, "mapping keys must be plain values")
                if key in result:
                    raise located(file, key_node.start_mark.line + 1,
                                  f"duplicate key {key!r} (first on line {lines[(*path, key)]})")
                lines[(*path, key)] = key_node.start_mark.line + 1
                result[key] = convert(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return constructor.construct_object(node, deep=True)

    if root is None:
        raise located(file, None, "the recipe is empty")
    return convert(root, ()), lines
