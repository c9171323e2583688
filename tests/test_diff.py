"""Weight-diff analysis: per-block norms, changed fraction, cosine, sign agreement and mask overlap."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture
def three(tmp_path):
    base = {"model.layers.0.w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "model.layers.1.w": torch.tensor([1.0, 1.0]),
            "embed.w": torch.tensor([2.0, 2.0]), "ids": torch.arange(3)}
    a = {**base, "model.layers.0.w": base["model.layers.0.w"] + torch.tensor([1.0, 0.0, -1.0, 2.0]),
         "model.layers.1.w": base["model.layers.1.w"] + torch.tensor([0.5, 0.0])}
    b = {**base, "model.layers.0.w": base["model.layers.0.w"] + torch.tensor([1.0, 3.0, 1.0, -2.0])}
    for name, state in (("base", base), ("a", a), ("b", b)):
        save_file(state, tmp_path / f"{name}.safetensors")
    return tmp_path


def test_diff_numbers(three, cli):
    result = cli("diff", three / "base.safetensors", three / "a.safetensors", three / "b.safetensors",
                 "--masks", "0.5", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    block0, block1, overall = report["block 00"], report["block 01"], report["overall"]
    assert block0["norm a"] == pytest.approx(math.sqrt(6)) and block0["norm b"] == pytest.approx(math.sqrt(15))
    assert block0["relative norm a"] == pytest.approx(math.sqrt(6) / math.sqrt(30))
    assert block0["changed a"] == pytest.approx(0.75) and block1["changed b"] == 0.0
    assert block0["cosine a~b"] == pytest.approx((1 + 0 - 1 - 4) / (math.sqrt(6) * math.sqrt(15)))
    assert block0["sign agreement a~b"] == pytest.approx(1 / 3)  # both moved at 3 entries, agree at the first
    assert block0["mask jaccard a~b"] == pytest.approx(1 / 4)  # top-2 with ties kept: {0, 2, 3} vs {1, 3}
    assert report["outside blocks"]["norm a"] == 0.0
    assert overall["norm a"] == pytest.approx(math.sqrt(6.25))
    assert "ids" not in json.dumps(report)  # integer buffers are not weights


def test_diff_table_and_plot(three, cli, tmp_path):
    result = cli("diff", three / "base.safetensors", three / "a.safetensors", three / "b.safetensors", "--plot",
                 tmp_path / "diff.png")
    assert result.exit_code == 0, result.output
    assert "sign agreement" in result.output and "a~b" in result.output
    assert (tmp_path / "diff.png").stat().st_size > 1000


def test_diff_needs_matching_checkpoints(three, cli):
    save_file({"other": torch.ones(2)}, three / "other.safetensors")
    result = cli("diff", three / "base.safetensors", three / "other.safetensors")
    assert result.exit_code == 2 and "lacks tensors" in result.output
    assert cli("diff", three / "base.safetensors").exit_code == 2
