"""The operators' public module: every operator of this package, as a function.

Importing it discovers and imports every operator module in the folder (a module registers its
operators with the ``@operator`` decorator of ``mergebench.operators.base``): adding an operator is one
file and its golden tests, nothing to list here. Each registered operator is exported under its name,
bound to the API: eager on tensors or state dicts, lazy on ``mergebench.load`` checkpoints
(``ops.wise_ft(zero_shot=a, fine_tuned=b, alpha=0.4)``). The contract in ``base`` knows nothing of
the API or the engine; the binding lives here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from mergebench.operators.base import REGISTRY, Operator

CONTRACT_MODULES = {"base"}  # the contract, not operator families


def bind(op: Operator) -> Callable[..., Any]:
    """``op`` as a function of its slots and parameters, computed now or built into a lazy graph."""

    def call(**kwargs: Any) -> Any:
        from mergebench.api import call_operator  # the API sits above the operators: bound at call time

        return call_operator(op, kwargs)

    call.__name__ = call.__qualname__ = op.name
    call.__doc__ = op.doc
    call.operator = op  # type: ignore[attr-defined]
    return call


for _module in pkgutil.iter_modules(__path__):
    if _module.name not in CONTRACT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")
globals().update({name: bind(op) for name, op in REGISTRY.items()})  # shadows the modules of the same name


def __getattr__(name: str) -> Callable[..., Any]:
    """Operators registered after import (a plug-in, a test's own) are bound on first use."""
    if name in REGISTRY:
        return bind(REGISTRY[name])
    raise AttributeError(f"module 'mergebench.operators' has no attribute {name!r}")


__all__ = ["REGISTRY", "Operator", "bind", *sorted(REGISTRY)]
