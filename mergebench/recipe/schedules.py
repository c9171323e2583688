"""Per-layer parameter schedules: a numeric parameter that varies with the key (semantics §0.8).

Any float parameter of any operator (and each number of a list-of-floats parameter, such as
``weights``) may be given as

- a number: the same everywhere;
- a gradient ``[v0, v1, ..., vn]``: read at x ∈ [0, 1], linearly between its points, where x is the
  key's place in its stack of blocks (x = ℓ/(L − 1) for block ℓ of L; x = 1 when L = 1, as mergekit;
  outside the blocks x = 0 for keys before them, such as embeddings, and x = 1 for the rest);
- filtered values ``[{filter: mlp, value: 0.5}, {value: 0}]``: the first entry whose ``filter`` is a
  substring of the key (no filter, or ``*``, matches every key) gives the value, itself a number
  or a gradient. A key that no entry matches takes the parameter's default.

This is mergekit's ``gradient`` and ``filter`` (``evaluate_setting``) on the native recipe.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mergebench.surgery.layers import BEFORE_BLOCKS

Gradient = tuple[float, ...]


@dataclass(frozen=True)
class Rule:
    """One entry of a schedule: a value (a number or a gradient) for keys containing ``filter``."""

    filter: str | None
    value: float | Gradient

    def matches(self, key: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in key


@dataclass(frozen=True)
class Schedule:
    rules: tuple[Rule, ...]

    def at(self, key: str, x: float) -> float | None:
        """The value at ``key`` placed at ``x``; None when no rule matches (the default applies)."""
        for rule in self.rules:
            if rule.matches(key):
                return read_gradient(rule.value, x) if isinstance(rule.value, tuple) else rule.value
        return None

    def numbers(self) -> list[float]:
        """Every number written in the schedule: an interpolated value lies between two of them."""
        return [v for rule in self.rules for v in (rule.value if isinstance(rule.value, tuple) else (rule.value,))]

    @property
    def covers_every_key(self) -> bool:
        return any(rule.filter in (None, "*") for rule in self.rules)


def read_gradient(points: Sequence[float], x: float) -> float:
    """``points`` read at x ∈ [0, 1]: at s = x·(n − 1), (1 − f)·v_⌊s⌋ + f·v_⌊s⌋₊₁ with f = s − ⌊s⌋."""
    scaled = x * (len(points) - 1)
    low = min(int(math.floor(scaled)), len(points) - 1)
    high = min(low + 1, len(points) - 1)
    frac = scaled - low
    return (1 - frac) * points[low] + frac * points[high]


def position(key: str, block: int | None, num_blocks: int, outside: tuple[float, float] = (0.0, 1.0)) -> float:
    """x of a key: ℓ/(L − 1) inside a stack of L blocks (1 when L = 1); outside them ``outside[0]`` (0) before
    the blocks and ``outside[1]`` (1) after them."""
    if block is None:
        return outside[0] if BEFORE_BLOCKS.search(key) else outside[1]
    return block / (num_blocks - 1) if num_blocks > 1 else 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_schedule(value: Any) -> Schedule | None:
    """The schedule ``value`` writes, None for anything not a list (the parameter's type checks it);
    ValueError for a malformed one."""
    if not isinstance(value, list):
        return None
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        if len(value) < 2:
            raise ValueError("a gradient needs at least 2 values")
        return Schedule((Rule(None, tuple(float(v) for v in value)),))
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        rules = []
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ValueError(f"a filtered value is {{filter: SUBSTRING, value: NUMBER | [NUMBERS]}}, got {entry}")
            inner = parse_schedule(entry["value"])
            if inner is not None and (len(inner.rules) != 1 or inner.rules[0].filter is not None):
                raise ValueError("a filtered value's value is a number or a gradient, not more filters")
            filter_ = entry.get("filter")
            if filter_ is not None and not isinstance(filter_, str):
                raise ValueError(f"a filter is a substring of tensor names, got {filter_!r}")
            rules.append(Rule(filter_, inner.rules[0].value if inner else float(entry["value"])))
        return Schedule(tuple(rules))
    raise ValueError(f"a list here is a gradient [v0, v1, ...] or filtered values [{{filter, value}}], "
                     f"got {value!r}")


class ScheduleError(ValueError):
    def __init__(self, name: str, problem: str):
        super().__init__(problem)
        self.name = name


def _float_field(annotation: Any) -> str | None:
    """'scalar' for float (or float | None) fields, 'list' for list[float] ones, None otherwise."""
    args = typing.get_args(annotation)
    if annotation is float:
        return "scalar"
    if typing.get_origin(annotation) is list and args == (float,):
        return "list"
    if typing.get_origin(annotation) in (Union, types.UnionType):
        kinds = {_float_field(a) for a in args if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def schedulable_fields(model: type[BaseModel]) -> dict[str, tuple[str, str]]:
    """Recipe name (alias or field name) -> (field name, 'scalar' | 'list') for the float parameters."""
    found = {}
    for name, info in model.model_fields.items():
        kind = _float_field(info.annotation)
        if kind:
            found[info.alias or name] = (name, kind)
    return found


UNCOVERED = ("has filtered values that leave some keys without a value: end them with {value: ...}, which "
             "matches every key")


@dataclass(frozen=True)
class ParamSchedules:
    """The scheduled parameters of one node: field -> (a schedule, the value where none of its filters match),
    and for list fields one schedule or number per element (each element's schedule covers every key)."""

    scalar: tuple[tuple[str, Schedule, Any], ...] = ()
    listed: tuple[tuple[str, tuple[Schedule | float, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.scalar or self.listed)

    def values_at(self, key: str, x: float) -> dict[str, Any]:
        """The concrete parameter values at one key placed at ``x``."""
        update: dict[str, Any] = {}
        for field, schedule, default in self.scalar:
            value = schedule.at(key, x)
            update[field] = default if value is None else value
        for field, elements in self.listed:
            update[field] = [e.at(key, x) if isinstance(e, Schedule) else e for e in elements]
        return update


def split_schedules(values: Mapping[str, Any], model: type[BaseModel]
                    ) -> tuple[dict[str, Any], ParamSchedules, list[dict[str, Any]]]:
    """(the values with each schedule replaced by its first number, the schedules, variants to validate).

    Every variant puts one other number of one schedule in place: a schedule is valid when each
    number it writes is (an interpolated value lies between two of them).
    """
    fields = schedulable_fields(model)
    plain = dict(values)
    scalar: list[tuple[str, Schedule, Any]] = []
    listed: list[tuple[str, tuple[Schedule | float, ...]]] = []
    variants: list[dict[str, Any]] = []
    for name, value in values.items():
        if name not in fields:
            continue
        try:
            _split_one(name, value, model.model_fields[fields[name][0]], fields[name], plain, scalar, listed,
                       variants)
        except ValueError as exc:
            raise ScheduleError(name, str(exc)) from None
    return plain, ParamSchedules(tuple(scalar), tuple(listed)), variants


def _split_one(name: str, value: Any, info: FieldInfo, found: tuple[str, str], plain: dict[str, Any],
               scalar: list[tuple[str, Schedule, Any]], listed: list[tuple[str, tuple[Schedule | float, ...]]],
               variants: list[dict[str, Any]]) -> None:
    field, kind = found
    if kind == "scalar":
        schedule = parse_schedule(value)
        if schedule is None:
            return
        if not schedule.covers_every_key and info.is_required():
            raise ValueError(UNCOVERED)
        numbers = schedule.numbers()
        plain[name] = numbers[0]
        scalar.append((field, schedule, None if info.is_required() else info.default))
        variants.extend({name: number} for number in numbers[1:])
    elif isinstance(value, list) and any(isinstance(v, list) for v in value):
        elements = tuple(parse_schedule(v) or _number(v) for v in value)
        if any(isinstance(e, Schedule) and not e.covers_every_key for e in elements):
            raise ValueError(UNCOVERED)
        firsts = [e.numbers()[0] if isinstance(e, Schedule) else e for e in elements]
        plain[name] = firsts
        listed.append((field, elements))
        for i, element in enumerate(elements):
            if isinstance(element, Schedule):
                variants.extend({name: [*firsts[:i], n, *firsts[i + 1:]]} for n in element.numbers()[1:])


def _number(value: Any) -> float:
    if not _is_number(value):
        raise ValueError(f"expected a number, a gradient or filtered values, got {value!r}")
    return float(value)
