"""Write docs/operators.md from the operator registry, so the reference cannot drift from the code.

    .venv/bin/python docs/generate_operators.py          # rewrite docs/operators.md
    .venv/bin/python docs/generate_operators.py --check  # exit 1 if it is stale (the test suite runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from mergebench.operators.base import REGISTRY, type_name

TARGET = Path(__file__).parent / "operators.md"


def render() -> str:
    lines = ["# Operator reference", "",
             "Generated from the operator registry by `docs/generate_operators.py`; `mergebench ops NAME` prints "
             "the same.", "",
             "Every operator also takes `include` and `exclude` (regexes searched in each key; unselected keys "
             "pass through from the primary input, or give a zero Delta), `overrides` (a list of "
             "`{match, params}`, first match wins) and `seed`.", ""]
    for op in sorted(REGISTRY.values(), key=lambda o: o.name):
        lines += [f"## `{op.name}`", "", op.doc, "", f"Implements: {op.paper}.", "",
                  f"Execution class: {op.execution}.", "", "Inputs:", ""]
        lines += [f"- `{sig.describe()}`" for sig in op.signatures]
        lines.append("")
        fields = op.params.model_fields
        if fields:
            lines += ["| parameter | type | default | meaning |", "|---|---|---|---|"]
            for name, info in fields.items():
                default = "required" if info.is_required() else f"`{info.default!r}`"
                lines.append(f"| `{info.alias or name}` | `{type_name(info.annotation)}` | {default} | "
                             f"{info.description or ''} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.read_text() == text else 1)
    TARGET.write_text(text)
