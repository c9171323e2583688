"""Proof of sameness: a fixed set of recipes (every operator, sliced and not, artifacts, sequences, vocabulary
union, Ray and local) gives, byte for byte, the files recorded in ``tests/data/sameness.json``.

The recipes run in a fresh interpreter with portable kernels (see ``tests/sameness.py``), so the bytes do
not depend on the CPU. A refactoring must leave every hash as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_every_output_file_has_its_recorded_bytes():
    pytest.importorskip("ray")
    golden = json.loads((HERE / "data" / "sameness.json").read_text())
    done = subprocess.run([sys.executable, str(HERE / "sameness.py"), "--ray"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    hashes = json.loads(done.stdout.splitlines()[-1])
    assert hashes.keys() == golden.keys()
    changed = sorted(name for name in golden if hashes[name] != golden[name])
    assert not changed, f"{len(changed)} output files changed: {changed[:10]}"


def test_the_set_covers_every_operator():
    sys.path.insert(0, str(HERE))
    try:
        from sameness import RAY, RECIPES
    finally:
        sys.path.remove(str(HERE))
    shipped = subprocess.run([sys.executable, "-c", "from mergebench.operators import REGISTRY; print(*REGISTRY)"],
                             capture_output=True, text=True, check=True).stdout.split()  # not the tests' own
    used = {node["op"] for doc in (*RECIPES.values(), RAY) for node in doc["nodes"].values()}
    assert sorted(set(shipped) - used) == [] and len(shipped) > 20
