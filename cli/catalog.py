"""What ``mergebench ops`` shows of each operator, without importing torch to show it.

The operators are torch functions: listing them from the registry costs ``import torch`` (two seconds)
before a line is printed. ``operators.json`` beside this module holds what the listing shows of the
built-in operators; it is written from the registry (``python -m mergebench.cli.catalog``) and a test
fails when it differs from it. A process that has already imported the operators (a notebook, a test
that registered its own) is shown its live registry instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CATALOG = Path(__file__).with_name("operators.json")
OPERATORS_PACKAGE = "mergebench.operators"


def operator_entries() -> list[dict[str, Any]]:
    """Each operator's name, class, signatures, docstring, paper and parameter rows, sorted by name."""
    if OPERATORS_PACKAGE in sys.modules:
        return registry_entries(built_in_only=False)
    return json.loads(CATALOG.read_text(encoding="utf-8"))


def registry_entries(built_in_only: bool) -> list[dict[str, Any]]:
    """The entries as the registry describes them (importing the operators, and torch)."""
    from mergebench.operators.base import REGISTRY, type_name

    entries = []
    for op in sorted(REGISTRY.values(), key=lambda o: o.name):
        if built_in_only and not op.fn.__module__.startswith(OPERATORS_PACKAGE + "."):
            continue
        params = [[info.alias or name, type_name(info.annotation),
                   "required" if info.is_required() else repr(info.default), info.description or ""]
                  for name, info in op.params.model_fields.items()]
        entries.append({"name": op.name, "execution": op.execution, "doc": op.doc, "paper": op.paper,
                        "inputs": [sig.describe() for sig in op.signatures], "params": params})
    return entries


def render() -> str:
    return json.dumps(registry_entries(built_in_only=True), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    CATALOG.write_text(render(), encoding="utf-8")
    print(f"wrote {CATALOG}")
