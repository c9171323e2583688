"""The operator contract and the registry.

An operator is a plain per-key function on float32 torch tensors, registered under its recipe name
with the types of its input slots, the type of its result and a pydantic model of its parameters.
It knows nothing of files, shards, devices or key order: the engine reads, upcasts, selects keys,
applies per-key overrides, casts and writes. Operators that need a number computed over the whole
model first (a global threshold, an L1 norm) declare a ``StatisticsPass``; the executor streams it
before the main pass and hands its result to the function as ``ctx.stats``.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict

from mergebench.surgery.numerics import draw_seed
from mergebench.value_types import (  # noqa: F401 - the contract's vocabulary, re-exported for operators
    ACTIVATIONS,
    ADAPTER,
    ARTIFACT_TYPES,
    CHECKPOINT,
    DELTA,
    FILE_ARTIFACTS,
    FISHER,
    GRAM,
    MASK,
    SEQUENCE,
    SPARSE_DELTA,
    element_type,
    is_list_type,
    list_of,
)


class TensorSequence:
    """One key of every checkpoint of a training run, read one at a time as it is iterated.

    Iterating yields (step, float32 tensor) in step order; only the tensor in hand is in memory,
    so a fold over a long run costs O(1) tensors per key.
    """

    def __init__(self, steps: list[int], load: Callable[[int], torch.Tensor]):
        self.steps = steps
        self._load = load

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        for index, step in enumerate(self.steps):
            yield step, self._load(index)


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return pattern


Regex = Annotated[str, AfterValidator(_compiles)]  # a parameter that is a regular expression


def type_name(annotation: object) -> str:
    """A parameter's type as users read it: ``float | None``, ``list[LayerSlice]`` (no module paths, no
    validators)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)


class Params(BaseModel):
    """Base of every operator's parameter model: unknown names are errors, ``lambda`` may be ``lambda_``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


@dataclass(frozen=True)
class Signature:
    """One accepted set of input slots (each with the value types it takes) and the result it gives."""

    slots: dict[str, tuple[str, ...]]
    result: str

    def describe(self) -> str:
        slots = ", ".join(f"{name}: {' | '.join(types)}" for name, types in self.slots.items())
        return f"({slots}) -> {self.result}"


def signature(result: str, **slots: str | tuple[str, ...]) -> Signature:
    return Signature({k: (v,) if isinstance(v, str) else v for k, v in slots.items()}, result)


@dataclass
class KeyContext:
    """What an operator may know about the key it is computing, beyond the tensors themselves."""

    key: str
    block: int | None  # 0-based block index (semantics §0.6, default regex, stacks separate)
    num_blocks: int  # L of the key's stack (of the model's largest stack for keys outside blocks)
    keys: tuple[str, ...]  # every key of the primary model, for operators with their own block rules
    seed: int
    stats: Any = None  # what the operator's statistics passes found, if it has any
    # Where the engine keeps per-key state: ``shared`` across the slices of one sweep (random streams),
    # ``kept`` for this key (or slice of it) across its passes and its merge. Operators use
    # ``generator``, ``words`` and ``cached``; how and where the values are stored is the engine's.
    shared: MutableMapping[Any, Any] | None = None
    kept: MutableMapping[Any, Any] | None = None

    def cached(self, name: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` once per key: later calls (another pass over the key, the merge) get the same value.

        The engine decides where the value lives meanwhile (a boolean mask on the CPU is kept as bits).
        """
        if self.kept is None:
            return make()
        if name in self.kept:
            return self.kept[name]
        made = self.kept[name] = make()
        return made

    def generator(self, stream: str, input_index: int) -> torch.Generator:
        """A CPU generator for this key, so random draws do not depend on device, order or sharding.

        When a key is computed in slices, the slices of one sweep share each generator: the draws
        continue where the previous slice stopped, so they are those of the whole tensor in order.
        """
        return self._shared("torch", stream, input_index, lambda seed: torch.Generator().manual_seed(seed))

    def words(self, stream: str, input_index: int) -> np.random.RandomState:
        """The 32-bit words ``generator(stream, input_index)`` draws from, made faster by numpy.

        torch's CPU generator is the reference MT19937 seeded with the low 32 bits of its seed, as is
        numpy's ``RandomState``: the words are the same (tested), and a DARE mask drawn from them costs
        3.6–4.3 ns per entry where ``torch.rand`` took 4.0–5.1. Shared by the slices of a sweep like
        ``generator``.
        """
        return self._shared("numpy", stream, input_index, lambda seed: np.random.RandomState(seed & 0xFFFFFFFF))

    def _shared(self, kind: str, stream: str, input_index: int, make: Callable[[int], Any]) -> Any:
        """The ``kind`` of generator for (stream, input) at this key, made once per sweep from its seed."""
        name = (kind, stream, input_index)
        if self.shared is not None and name in self.shared:
            return self.shared[name]
        made = make(draw_seed(self.seed, stream, input_index, self.key))
        if self.shared is not None:
            self.shared[name] = made
        return made


@dataclass(frozen=True)
class StatisticsPass:
    """One streamed pass over every selected key that leaves a small state for what follows.

    ``init(params, stats)`` starts a state; ``accumulate(state, inputs, params, ctx)`` sees the same
    per-key inputs the operator function will see, with ``ctx.stats`` holding what earlier passes
    found; ``finalize(state, params, stats)`` returns the new ``ctx.stats``. An operator may need
    several passes in sequence (TIES: a coarse and a fine histogram for its exact global threshold,
    then the majority sign); passes of different nodes that can run together share one read.

    Alignment planning (OT fusion, weight matching) is the same hook with an ``order``: it returns
    the keys the pass needs, in network order, so the state can carry the map of layer l into
    layer l+1 and keep only the maps; memory is then bounded by one layer group, never the model.

    ``sliceable`` promises that accumulating a key equals accumulating the slices of its flattened
    inputs one after another (sums, counts, histograms of elementwise values), so the executor may
    feed a large key in small slices; such a pass keeps no input tensor in its state, so the
    executor may also reuse the input buffers once a key is done.

    ``combine(a, b)`` merges two states that accumulated different keys into the state that would
    have accumulated all of them (histograms add, counts add); ``init`` must then return a fresh
    state at each call. Passes that declare it let the executor accumulate keys side by side, each
    compute thread into a state of its own.

    ``skip(params, stats)`` may say, before the pass reads anything, that accumulating would change
    nothing (TIES's fine histogram when the coarse one already settled every threshold): the pass's
    result is then ``finalize(init(...))``, and a read whose passes all skip is not made.
    """

    init: Callable[[Params, Any], Any]
    accumulate: Callable[[Any, dict[str, Any], Params, KeyContext], None]
    finalize: Callable[[Any, Params, Any], Any] = lambda state, params, stats: state
    order: Callable[[list[str]], list[str]] | None = None
    sliceable: bool = False
    combine: Callable[[Any, Any], Any] | None = None
    host: bool = False  # accumulate sees the inputs on the CPU; the engine moves the finished stats to the device
    skip: Callable[[Params, Any], bool] | None = None

    def skipped(self, params: Params, stats: Any) -> bool:
        return self.skip is not None and self.skip(params, stats)


Passes = Callable[[Params, frozenset[str]], "tuple[StatisticsPass, ...]"]


@dataclass(frozen=True)
class LayoutInputs:
    """What a layout operator plans from: its inputs by slot, each input's keys, the shape of an input's
    key (``shape(input, key)``) and the node's seed (for what it draws)."""

    slots: dict[str, str | list[str]]
    keys: dict[str, tuple[str, ...]]
    shape: Callable[[str, str], tuple[int, ...]]
    seed: int = 0


ConfigEdit = Callable[[dict[str, Any]], "tuple[dict[str, Any], tuple[str, ...]]"]


@dataclass(frozen=True)
class LayoutPlan:
    """What a layout operator returns: for each of its keys (in order) the input and that input's key it
    is, and for each of its blocks the input and block it came from (for per-layer config lists).

    A key may also come from a tensor the inputs do not hold (a MoE's router): ``generated`` names such
    tensors' makers (``keys`` routes to the name), each a plain description the engine hands to the io
    layer, which makes the tensors. ``config`` turns the primary input's ``config.json`` into the fields
    the output's sets and removes (a ValueError for a config it cannot take)."""

    keys: dict[str, tuple[str, str]]
    layers: list[tuple[str, int]]
    generated: dict[str, Any] = field(default_factory=dict)
    config: ConfigEdit | None = None


Layout = Callable[[Params, LayoutInputs], LayoutPlan]


def no_passes(params: Params, slots: frozenset[str]) -> tuple[StatisticsPass, ...]:
    return ()


@dataclass(frozen=True)
class Operator:
    name: str
    fn: Callable[..., Any]
    params: type[Params]
    signatures: tuple[Signature, ...]
    execution: str
    passes: Passes = no_passes
    key_passes: Passes = no_passes
    check: Callable[[Params, dict[str, int]], str | None] | None = None
    series: Callable[[Params, list[int]], list[int] | None] | None = None
    paper: str = ""
    anchor: Callable[[Params, int], int] | None = None
    elementwise: Callable[[Params], bool] = lambda params: False
    doc: str = field(default="")
    layout: Layout | None = None  # a layout operator: this plans its keys; it computes no tensor
    primary: Callable[[Params], str] | None = None  # the input whose files the result inherits, named by params
    check_inputs: Callable[[Params, dict[str, Any]], str | None] | None = None  # params that name inputs

    def signature_for(self, slot_names: set[str]) -> Signature | None:
        for sig in self.signatures:
            if set(sig.slots) == slot_names:
                return sig
        return None



REGISTRY: dict[str, Operator] = {}


def _add(op: Operator) -> Operator:
    if op.name in REGISTRY:
        raise ValueError(f"operator '{op.name}' registered twice")
    REGISTRY[op.name] = op
    return op


def check_slots(name: str, fn: Callable[..., Any], signatures: list[Signature]) -> None:
    """The function must take every slot of every signature, and need nothing a signature does not give.

    A mismatch is the operator author's error: caught here, at import, rather than as a raw TypeError
    in the middle of a user's run.
    """
    parameters = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for given in ("p", "ctx"):
        if given not in parameters:
            raise TypeError(f"operator '{name}': {fn.__name__} must take '{given}'")
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)} - {"p", "ctx"}
    for sig in signatures:
        unknown = [slot for slot in sig.slots if slot not in parameters and not takes_any]
        if unknown:
            raise TypeError(f"operator '{name}': signature {sig.describe()} has slot '{unknown[0]}', which "
                            f"{fn.__name__} does not take")
        missing = sorted(required - set(sig.slots))
        if missing:
            raise TypeError(f"operator '{name}': {fn.__name__} needs '{missing[0]}', which signature "
                            f"{sig.describe()} does not give")


class NoParams(Params):
    pass


def operator(
    name: str,
    *,
    signatures: list[Signature],
    params: type[Params] = NoParams,
    execution: str = "per-tensor",
    passes: Passes | tuple[StatisticsPass, ...] = (),
    key_passes: Passes = no_passes,
    check: Callable[[Params, dict[str, int]], str | None] | None = None,
    series: Callable[[Params, list[int]], list[int] | None] | None = None,
    paper: str = "",
    anchor: Callable[[Params, int], int] | None = None,
    elementwise: bool | Callable[[Params], bool] = False,
) -> Callable[[Callable[..., Any]], Operator]:
    """Register ``fn(**slots, p=params, ctx=KeyContext)`` under its recipe name.

    ``passes`` are the statistics passes the operator needs before its main pass: a tuple, or a
    function of the node's parameters and the names of its wired slots (TIES needs none with
    ``scope: per_tensor``; LiNeS needs one only for its automatic α from ``task_deltas``).

    The first slot of a signature is its primary input: an unselected key of a Checkpoint-valued
    node keeps that input's value (a Delta-valued node gives a zero delta), and the output dtype of a
    key is that input's dtype.
    ``check(params, list_lengths)`` catches parameter errors that depend on how many inputs a list has.
    ``paper`` cites what the operator implements (shown by ``mergebench ops`` and the docs).
    ``anchor(params, count)`` picks which model of the first list slot is primary (its shapes, dtypes and
    files make the output) for operators whose inputs may differ in shape, such as OT fusion into a
    narrower anchor; their inputs' shapes are then not required to agree.
    ``series(params, steps)`` is for sequence operators that can emit a series: the steps emitted for
    a run with these steps, or None for a single result; with a series the node yields a list of
    Checkpoints, one per emitted step, and an output writes each into ``PATH/step-N``.
    ``key_passes`` are statistics passes over one key at a time (a per-tensor top-k threshold): they
    run on the key's inputs already in memory, just before the key is computed, and their result is
    that key's ``ctx.stats``. Being passes, they let a per-tensor statistic be gathered slice by slice.
    ``elementwise`` (or a function of the parameters saying so) promises that each element of the
    result depends only on the same element of every input, the key and ``ctx.stats``: the executor
    may then compute a large tensor slice by slice, which keeps the float32 temporaries small and
    in cache instead of a model-sized tensor's worth of fresh memory per input.
    """

    def register(fn: Callable[..., Any]) -> Operator:
        check_slots(name, fn, signatures)
        op = Operator(
            name=name,
            fn=fn,
            params=params,
            signatures=tuple(signatures),
            execution=execution,
            passes=passes if callable(passes) else (lambda params, slots, fixed=tuple(passes): fixed),
            key_passes=key_passes,
            check=check,
            series=series,
            paper=paper,
            anchor=anchor,
            elementwise=elementwise if callable(elementwise) else (lambda params, fixed=elementwise: fixed),
            doc=(fn.__doc__ or "").strip(),
        )
        return _add(op)

    return register


def layout_operator(
    name: str,
    *,
    signatures: list[Signature],
    params: type[Params],
    check_inputs: Callable[[Params, dict[str, Any]], str | None],
    primary: Callable[[Params], str] | None = None,
    paper: str = "",
) -> Callable[[Layout], Operator]:
    """Register a layout operator: ``plan(params, LayoutInputs)`` says which input key each of its keys is.

    It moves tensors without computing any (a stack of layer ranges), so the engine carries it out
    by renaming keys (mergebench.engine.layout); ``primary(params)`` names the input whose config and
    files the result inherits (default: the first slot's); ``check_inputs(params, inputs)`` checks the
    inputs the parameters name.
    """

    def register(plan: Layout) -> Operator:
        op = Operator(name=name, fn=plan, params=params, signatures=tuple(signatures),
                      execution="layout (renames keys)", paper=paper, doc=(plan.__doc__ or "").strip(),
                      layout=plan, primary=primary, check_inputs=check_inputs)
        return _add(op)

    return register
