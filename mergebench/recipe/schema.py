"""What a recipe may say (the pydantic schema of the YAML) and what a validated one is (Recipe, Node, Output)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergebench.operators.base import CHECKPOINT, Operator, Params, Signature, list_of
from mergebench.recipe.schedules import ParamSchedules

MEMORY_PATH = "<memory>"  # an output kept in memory (the eager API): any value type, no files
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with a unit (``500MB``, ``5GB``, ``1GiB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{value!r} is not a size such as 500MB, 5GB or 1GiB")
    try:
        size = int(Decimal(match.group(1)) * _UNITS[match.group(2).upper()])
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a size such as 500MB, 5GB or 1GiB") from None
    if size <= 0:
        raise ValueError("must be positive")
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OverrideSpec(_Strict):
    match: str
    params: dict[str, Any]


class NodeSpec(_Strict):
    op: str
    inputs: dict[str, str | list[str]]
    params: dict[str, Any] = Field(default_factory=dict)
    overrides: list[OverrideSpec] = Field(default_factory=list)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    seed: int | None = None
    schedule_outside: tuple[float, float] | None = Field(
        None, description="x at which schedules read keys before the blocks and keys after them (default 0, 1)")


class OutputSpec(_Strict):
    from_: str = Field(alias="from")
    path: str
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    shard_size: int | str = "5GB"
    copy_files_from: str | None = None
    tie_word_embeddings: bool | None = Field(
        None, description="write the head tied to the input embedding (true: no lm_head tensor), untied (false), "
                          "or by default untied exactly when some input has its own head")

    @field_validator("shard_size")
    @classmethod
    def _valid_size(cls, value: int | str) -> int | str:
        parse_size(value)
        return value


class SequenceSpec(_Strict):
    paths: str | list[str]
    steps: list[int] | None = None
    allow_gaps: bool = False


class AdaptedSpec(_Strict):
    """A model made of a base and a PEFT LoRA adapter applied to it as it is read (mergebench.io.adapters)."""

    base: str = Field(description="the base model: a path, or the name of another model of the recipe")
    adapter: str = Field(description="the PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")


class TokenSourceSpec(_Strict):
    """Where one token's embedding rows come from (mergebench.surgery.vocab)."""

    source: str = Field(description="the model whose rows the token takes")
    force: bool = Field(False, description="take them even where every input has the token (default: only where "
                                           "an input lacks it)")


class TokenizerSpec(_Strict):
    """How to merge models whose vocabularies differ (mergebench.surgery.vocab)."""

    source: str = Field("base", description="base, union, or a model's name: the output vocabulary")
    pad_to_multiple_of: int | None = Field(None, ge=1)
    embeddings: str | None = Field(None, description="regex of embedding-like keys (default: the usual names)")
    tokens: dict[str, TokenSourceSpec] | None = Field(None, description="per token: the model its rows come from")


class RecipeSpec(_Strict):
    models: dict[str, str | list[str] | SequenceSpec | AdaptedSpec]
    nodes: dict[str, NodeSpec]
    outputs: list[OutputSpec] = Field(min_length=1)
    seed: int = 0
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = Field(None, description="the output's chat template: a model's name, 'auto' (the "
                                                        "most common among the inputs) or a Jinja template")


@dataclass(frozen=True)
class Node:
    """A node after validation: its operator, the signature its inputs chose, typed parameters."""

    name: str
    op: Operator
    signature: Signature
    inputs: dict[str, str | list[str]]
    params: Params
    overrides: tuple[tuple[re.Pattern[str], Params, ParamSchedules], ...]
    include: tuple[re.Pattern[str], ...]
    exclude: tuple[re.Pattern[str], ...]
    seed: int
    list_length: int | None  # how many values a list-valued node yields
    series_steps: tuple[int, ...] | None = None  # a sequence node emitting a series: its steps
    schedules: ParamSchedules = ParamSchedules()  # parameters that vary with the key (semantics §0.8)
    schedule_outside: tuple[float, float] = (0.0, 1.0)  # x of keys before the blocks, after them

    @property
    def result(self) -> str:
        return list_of(CHECKPOINT) if self.series_steps else self.signature.result

    @property
    def primary(self) -> str:
        """The input an unselected key passes through from (the first slot; the first element of a list,
        or the element the operator's ``anchor`` picks; a layout operator names its own)."""
        if self.op.primary is not None:
            return self.op.primary(self.params)
        ref = self.inputs[next(iter(self.signature.slots))]
        if isinstance(ref, str):
            return ref
        return ref[self.op.anchor(self.params, len(ref))] if self.op.anchor else ref[0]

    def context_key(self, key: str) -> str:
        """The key as the operator sees it (its own name, where a stack renamed it; semantics §10)."""
        return key

    def refs(self) -> list[str]:
        return [r for ref in self.inputs.values() for r in ([ref] if isinstance(ref, str) else ref)]

    def selects(self, key: str) -> bool:
        """semantics §0.2: include (if any) must match, no exclude may match (re.search)."""
        if self.include and not any(p.search(key) for p in self.include):
            return False
        return not any(p.search(key) for p in self.exclude)

    @property
    def scheduled(self) -> bool:
        return bool(self.schedules) or any(schedules for _, _, schedules in self.overrides)

    def params_for(self, key: str, x: Callable[[], float] = lambda: 0.0) -> Params:
        """The parameters at ``key``: its override's (first match), schedules read at the key's place ``x()``."""
        params, schedules = self.params, self.schedules
        for pattern, override, override_schedules in self.overrides:
            if pattern.search(key):
                params, schedules = override, override_schedules
                break
        return params.model_copy(update=schedules.values_at(key, x())) if schedules else params


@dataclass(frozen=True)
class Output:
    node: str
    path: Path
    dtype: str | None
    shard_size: int
    copy_files_from: str | None
    kind: str = CHECKPOINT  # or Mask / SparseDelta: an artifact file rather than a checkpoint folder
    tie_word_embeddings: bool | None = None  # None: untied exactly when some input has its own head


@dataclass(frozen=True)
class Recipe:
    """A recipe that passed every check that needs no weights; models are absolute paths."""

    file: Path
    models: dict[str, str]
    sequences: dict[str, tuple[tuple[int, str], ...]]  # name -> (step, member model) in step order
    nodes: dict[str, Node]  # in topological order
    outputs: tuple[Output, ...]
    seed: int
    resolved: dict[str, Any]  # the recipe as run (after --set, paths absolute), for provenance
    tokenizer: TokenizerSpec | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # model name -> adapter applied to its path
    chat_template: str | None = None  # a model's name, 'auto', or a Jinja template (semantics §0.11)

    @property
    def sha256(self) -> str:
        canonical = json.dumps(self.resolved, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
