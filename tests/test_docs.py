"""The docs stay true to the code: the operator reference is regenerated and compared."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_operator_reference_is_current():
    result = subprocess.run([sys.executable, "docs/generate_operators.py", "--check"], cwd=ROOT, timeout=120)
    assert result.returncode == 0, "docs/operators.md is stale: run docs/generate_operators.py"


def test_readme_quick_start_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick_start and "make test" in quick_start
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_docs_site_builds_without_warnings(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", tmp_path / "site"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "operators" / "index.html").exists()


def test_the_readme_operator_table_lists_every_operator():
    from mergebench.operators.base import REGISTRY

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Operators"):readme.index("## Benchmarks")]
    named = {name for row in table.splitlines() if row.startswith("| `")
             for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert named == {name for name, op in REGISTRY.items() if op.fn.__module__.startswith("mergebench.")}
