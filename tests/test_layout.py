"""The package's shape: no import cycles, and dependencies that point one way through the layers.

cli → api → engine → {recipe, io, surgery, the operators}; the operators see only their contract and
surgery; io, surgery and recipe never reach up into the engine. Every import counts, a function's lazy
one too: it ties two modules together as surely as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mergebench": ROOT / "mergebench", "mergebench.operators": ROOT / "operators",
            "mergebench.cli": ROOT / "cli"}
# layer of a module -> layers it must not import at module level
FORBIDDEN = {
    "io": {"engine", "api", "cli", "analysis", "recipe", "operators"},
    "surgery": {"engine", "api", "cli", "analysis", "recipe", "io"},
    "recipe": {"engine", "api", "cli", "analysis"},
    "operators": {"engine", "api", "cli", "analysis", "recipe", "io"},
    "engine": {"api", "cli"},
    "analysis": {"api", "cli"},
    "api": {"cli"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = [p for p in file.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "mergebench" and parts and parts[0] in ("operators", "cli"):
                continue
            found[".".join([package, *parts])] = file
    return found


def imported(name: str, file: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports, at module level or inside a function (a lazy import
    still ties the two modules together), but not under ``if TYPE_CHECKING``."""
    tree = ast.parse(file.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
               ast.unparse(node.test) for child in node.body for n in ast.walk(child)}
    edges = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                edges.add(submodule if submodule in known else node.module)
    return {edge for edge in edges if edge in known and edge != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, file, set(found)) for name, file in found.items()}


def layer(name: str) -> str:
    if name == "mergebench.operators":  # the operators' public module binds them to the API
        return "public"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "top"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*trail[trail.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_dependencies_point_down_the_layers():
    wrong = sorted(f"{name} imports {target}" for name, targets in graph().items() for target in targets
                   if layer(target) in FORBIDDEN.get(layer(name), set()))
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_the_package():
    edges = graph()
    assert {"mergebench.io.checkpoint", "mergebench.engine.executor", "mergebench.operators.ties",
            "mergebench.cli.app"} <= edges.keys()
    assert "mergebench.io.safetensors_format" in edges["mergebench.io.checkpoint"]
    assert "mergebench.api" in edges["mergebench.operators"]  # a lazy import is seen
