"""The per-seed summary the notebooks assert on: golden values of the mean, spread and t interval."""

from __future__ import annotations

import math

import pytest

from mergebench.analysis.seeds import over_seeds


def test_summary_golden_values():
    summary = over_seeds("x", [1, 2, 3, 4, 5])
    assert summary.mean == 3
    assert summary.std == pytest.approx(math.sqrt(2.5))
    # t(0.975, 4) = 2.776445105 (tables); margin = t · s / √n
    assert summary.margin == pytest.approx(2.776445105 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert summary.lower == pytest.approx(3 - summary.margin)
    assert "1.000, 2.000, 3.000, 4.000, 5.000" in str(summary)


def test_one_value_has_no_interval_and_none_is_an_error():
    single = over_seeds("x", [0.5])
    assert single.std == 0 and single.margin == math.inf and single.lower == -math.inf
    with pytest.raises(ValueError, match="no values"):
        over_seeds("x", [])
