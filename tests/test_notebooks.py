"""Every notebook runs top to bottom, and every claim it asserts was executed and held.

A notebook's claims are its ``assert`` statements, each with its claim as the message. The kernel
records each assert that passes (an IPython AST transformer appends a record after every assert), so
the test checks what ran — not that the word ``assert`` appears in a cell's text.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

RECORD_CLAIMS = """\
import ast as _ast


class _RecordPassedAsserts(_ast.NodeTransformer):
    def visit_Assert(self, node):
        record = _ast.parse(f"_passed_claims.add({_ast.unparse(node.msg)!r})").body[0]
        return [node, _ast.copy_location(record, node)]


_passed_claims = set()
get_ipython().ast_transformers.append(_RecordPassedAsserts())
"""

REPORT_CLAIMS = "import json as _json; print(_json.dumps(sorted(_passed_claims)))"


def claims(cells: list) -> set[str]:
    """The message of every assert in the notebook's code, as the kernel's transformer keys it."""
    found = set()
    for cell in cells:
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Assert):
                assert node.msg is not None, f"an assert without its claim as message: {ast.unparse(node)}"
                found.add(ast.unparse(node.msg))
    return found


def passed_claims(notebook, folder: Path) -> set[str]:
    """Run the notebook in a kernel (in ``folder``) and return the claims whose asserts passed."""
    notebook.cells.insert(0, nbformat.v4.new_code_cell(RECORD_CLAIMS))
    notebook.cells.append(nbformat.v4.new_code_cell(REPORT_CLAIMS))
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    return set(json.loads("".join(o.get("text", "") for o in notebook.cells[-1].outputs)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_its_claims_hold(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    expected = claims(code)
    assert claims([code[-1]]), "the last cell asserts the headline"
    passed = passed_claims(notebook, tmp_path)
    assert passed == expected, f"claims that never ran: {sorted(expected - passed)}"


def test_a_claim_that_never_ran_is_missing_from_the_report(tmp_path):
    source = "def check(x):\n    assert x > 0, 'positive'\ncheck(1)\nif False:\n    assert False, 'skipped'"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    assert claims(notebook.cells) == {"'positive'", "'skipped'"}
    assert passed_claims(notebook, tmp_path) == {"'positive'"}


def test_claims_are_read_from_every_assert():
    source = "x = 1\nassert x == 1, 'one'\nfor i in range(2):\n    assert i < 2, f'{i} small'"
    cells = [nbformat.v4.new_code_cell(source)]
    assert claims(cells) == {"'one'", "f'{i} small'"}
    with pytest.raises(AssertionError, match="without its claim"):
        claims([nbformat.v4.new_code_cell("assert True")])
