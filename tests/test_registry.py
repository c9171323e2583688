"""Registering an operator: its function is checked against its signatures at import, not mid-run."""

from __future__ import annotations

import pytest

from mergebench.operators.base import CHECKPOINT, check_slots, list_of, signature

SIGNATURES = [signature(CHECKPOINT, base=CHECKPOINT, models=list_of(CHECKPOINT)), signature(CHECKPOINT,
                                                                                            models=list_of(CHECKPOINT))]


def test_a_function_that_takes_every_slot_registers():
    def merge(p, ctx, models, base=None):
        return models[0]

    check_slots("merge", merge, SIGNATURES)


def test_a_slot_the_function_does_not_take_is_refused():
    def merge(p, ctx, models):
        return models[0]

    with pytest.raises(TypeError, match="slot 'base', which merge does not take"):
        check_slots("merge", merge, SIGNATURES)


def test_a_parameter_a_signature_does_not_give_is_refused():
    def merge(p, ctx, models, base):
        return base

    with pytest.raises(TypeError, match=r"needs 'base', which signature \(models: \[Checkpoint\]\)"):
        check_slots("merge", merge, SIGNATURES)


def test_p_and_ctx_are_required():
    def merge(models, base=None):
        return models[0]

    with pytest.raises(TypeError, match="must take 'p'"):
        check_slots("merge", merge, SIGNATURES)
