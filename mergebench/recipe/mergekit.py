"""mergekit's configuration dialect, translated into a native recipe (docs/mergekit.md).

A mergekit config (``merge_method``, ``models`` or ``slices``, ``base_model``, ``parameters``, ``dtype``, ...)
becomes nodes of the operators that compute the same arithmetic, with mergekit's parameter
semantics: its defaults per method, per-model ``weight`` and ``density``, ``normalize``, ``lambda``,
``rescale``, and its gradients and filters, whose precedence (a source's, then its slice's, then the
global value, first matching filter wins) is kept by concatenating them into one native schedule.
Slices whose sources differ in layer range are stacked (``stack``) into the same block numbering,
merged, and the merged slices stacked in order; keys before the blocks come from the first slice and
keys after them from the last, as mergekit plans them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebench.errors import MergebenchError
from mergebench.io.hub_cache import cached_snapshot, is_repo_id
from mergebench.recipe.yaml_lines import Locator

MERGEKIT_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template", "embed_slerp", "int8_mask", "modules"}
# method -> (mergekit's normalize default, rescale default, how it uses base_model)
# base: "required" (the base and the other models), "optional" (task vectors when given), "ignored" (linear: a
# model like the others when listed), "member" (karcher: one of the models averaged)
METHODS = {
    "linear": (True, False, "ignored"),
    "task_arithmetic": (False, False, "required"),
    "ties": (True, False, "required"),
    "dare_ties": (False, True, "required"),
    "dare_linear": (False, True, "required"),
    "breadcrumbs": (False, False, "required"),
    "breadcrumbs_ties": (False, False, "required"),
    "della": (True, True, "required"),
    "della_linear": (False, True, "required"),
    "slerp": (False, False, "required"),
    "nuslerp": (False, False, "optional"),
    "multislerp": (False, False, "optional"),
    "karcher": (False, False, "member"),
    "model_stock": (False, False, "required"),
    "nearswap": (False, False, "required"),
    "sce": (False, False, "required"),
    "arcee_fusion": (False, False, "required"),
    "passthrough": (False, False, "ignored"),
}
GTA = {"normalize", "lambda", "int8_mask", "rescale"}
METHOD_PARAMS = {  # what each method reads: global parameters, per-model ones
    "linear": ({"normalize"}, {"weight"}),
    "task_arithmetic": (GTA, {"weight", "density"}),
    "ties": (GTA, {"weight", "density"}),
    "dare_ties": (GTA, {"weight", "density"}),
    "dare_linear": (GTA, {"weight", "density"}),
    "breadcrumbs": (GTA, {"weight", "density", "gamma"}),
    "breadcrumbs_ties": (GTA, {"weight", "density", "gamma"}),
    "della": (GTA, {"weight", "density", "epsilon"}),
    "della_linear": (GTA, {"weight", "density", "epsilon"}),
    "slerp": ({"t"}, set()),
    "nuslerp": ({"nuslerp_row_wise", "nuslerp_flatten"}, {"weight"}),
    "multislerp": ({"normalize_weights", "eps"}, {"weight"}),
    "karcher": ({"max_iter", "tol"}, set()),
    "model_stock": ({"filter_wise"}, set()),
    "nearswap": ({"t"}, set()),
    "sce": ({"select_topk", "int8_mask"}, set()),
    "arcee_fusion": (set(), set()),
    "passthrough": (set(), set()),
}
# mergekit 0.1.5 reads gradients at t = 0 for the weights before the blocks and, since its modules planner,
# also for those after them (the final norm, the head); earlier versions read t = 1 there, as native
# recipes do (docs/mergekit.md)
MERGEKIT_OUTSIDE = {"schedule_outside": [0.0, 0.0]}
FRACTIONS = {"density", "gamma"}  # per-model parameters that are fractions of a tensor's entries
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit(data: Any) -> bool:
    """A mergekit config names a ``merge_method``; a native recipe has ``nodes``."""
    return isinstance(data, dict) and "merge_method" in data and "nodes" not in data


@dataclass
class _Source:
    model: str  # the native model name
    layers: tuple[int, int] | None  # None: every layer
    params: dict[str, Any]
    where: tuple[Any, ...]


@dataclass
class _Translation:
    config: dict[str, Any]
    where: Locator
    base_dir: Path
    models: dict[str, str | dict[str, str]] = field(default_factory=dict)  # native name -> path or {base, adapter}
    names: dict[str, str] = field(default_factory=dict)  # mergekit reference -> native name
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)


def translate(data: dict[str, Any], where: Locator, base_dir: Path, out: str | None) -> dict[str, Any]:
    """The native recipe a mergekit config means, writing to ``out`` (mergekit names its output on the command line)."""
    unknown = sorted(set(data) - MERGEKIT_KEYS)
    if unknown:
        raise where.error((unknown[0],), f"'{unknown[0]}' is not a mergekit config key (known: "
                                         f"{', '.join(sorted(MERGEKIT_KEYS))})")
    for unsupported, why in (("modules", "multi-module configs"), ("embed_slerp", "embed_slerp")):
        if data.get(unsupported) is not None:
            raise where.error((unsupported,), f"{why} are not translated yet; remove '{unsupported}' or write a "
                                              f"native recipe")
    method = data["merge_method"]
    if method not in METHODS:
        raise where.error(("merge_method",), f"merge_method '{method}' has no mergebench operator yet (translated: "
                                             f"{', '.join(METHODS)})")
    if out is None:
        raise MergebenchError(f"{where.file}: a mergekit config names no output: give --out DIR")
    if bool(data.get("models")) == bool(data.get("slices")):
        raise where.error((), "a mergekit config has exactly one of 'models' and 'slices'")
    work = _Translation(data, where, base_dir)
    base = work_model(work, data["base_model"], ("base_model",)) if data.get("base_model") else None
    if data.get("models"):
        sources = [_source(work, entry, ("models", i), whole=True) for i, entry in enumerate(data["models"])]
        final = _merge(work, method, sources, base, {}, "merge", ())
    else:
        merged = []
        for i, piece in enumerate(data["slices"]):
            if not isinstance(piece, dict) or not piece.get("sources"):
                raise where.error(("slices", i), "a slice is {sources: [{model, layer_range}, ...]}")
            sources = [_source(work, entry, ("slices", i, "sources", j), whole=False)
                       for j, entry in enumerate(piece["sources"])]
            merged.append((_merge(work, method, sources, base, piece.get("parameters") or {}, f"slice{i}",
                                  ("slices", i)), _length(work, sources, ("slices", i))))
        final = "merged"
        work.nodes[final] = {"op": "stack", "inputs": {"models": list(dict.fromkeys(ref for ref, _ in merged))},
                             "params": {"slices": [{"model": ref, "layers": [0, n]} for ref, n in merged],
                                        "base": merged[0][0], "head": merged[-1][0]}}
    output: dict[str, Any] = {"from": final, "path": out}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise where.error(("out_dtype" if data.get("out_dtype") else "dtype",),
                              f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        output["dtype"] = DTYPES[dtype]
    output["copy_files_from"] = base or next(iter(work.models))
    recipe: dict[str, Any] = {"models": work.models, "nodes": work.nodes, "outputs": [output]}
    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None:
        recipe["tokenizer"] = {"source": tokenizer if tokenizer in ("base", "union")
                               else work_model(work, tokenizer, ("tokenizer_source",))}
    if data.get("tokenizer") is not None:
        recipe["tokenizer"] = _tokenizer(work, data["tokenizer"])
    template = data.get("chat_template")
    if template is not None:
        recipe["chat_template"] = _chat_template(work, template)
    return recipe


def _tokenizer(work: _Translation, block: Any) -> dict[str, Any]:
    """mergekit's ``tokenizer: {source, tokens, pad_to_multiple_of}``; a token takes a model's rows (``force``)."""
    if not isinstance(block, dict):
        raise work.where.error(("tokenizer",), "the tokenizer block is {source, tokens, pad_to_multiple_of}")
    extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
    if extra:
        raise work.where.error(("tokenizer", extra[0]), f"'{extra[0]}' is not a key of mergekit's tokenizer block")
    source = block.get("source", "base")
    native: dict[str, Any] = {"source": source if source in ("base", "union")
                              else work_model(work, source, ("tokenizer", "source"))}
    if block.get("pad_to_multiple_of") is not None:
        native["pad_to_multiple_of"] = block["pad_to_multiple_of"]
    tokens = {}
    for token, entry in (block.get("tokens") or {}).items():
        where = ("tokenizer", "tokens", token)
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise work.where.error(where, f"token {token!r}: only a model as its source is translated ({{source: "
                                          f"MODEL, force: BOOL}}; not {{kind: zero}} or model_token)")
        tokens[token] = {"source": work_model(work, entry["source"], (*where, "source")),
                         "force": bool(entry.get("force", False))}
    if tokens:
        native["tokens"] = tokens
    return native


def _chat_template(work: _Translation, template: Any) -> str:
    """``auto``, a Jinja template, or a model reference; mergekit's built-in template names are not shipped here."""
    if not isinstance(template, str):
        raise work.where.error(("chat_template",), "chat_template is auto, a Jinja template or a model")
    if template == "auto" or "{{" in template or "{%" in template:
        return template
    if template in work.names or (work.base_dir / template).exists():
        return work_model(work, template, ("chat_template",))
    raise work.where.error(("chat_template",), f"chat_template '{template}': mergekit's built-in templates are not "
                                               f"shipped; give the Jinja text, 'auto' or a model")


def work_model(work: _Translation, reference: Any, where: tuple[Any, ...]) -> str:
    """The native name of a mergekit model reference (a local path, or a repo id in the Hugging Face cache)."""
    if not isinstance(reference, str):
        raise work.where.error(where, f"a model reference is a path or a repo id, got {reference!r}")
    if reference in work.names:
        return work.names[reference]
    entry: str | dict[str, str]
    if "+" in reference and not (work.base_dir / reference).exists():  # mergekit's MODEL+LORA: an adapted model
        model, lora = reference.split("+", 1)
        entry = {"base": resolve_model(model, work.base_dir, work.where, where),
                 "adapter": resolve_model(lora, work.base_dir, work.where, where)}
        name = f"{Path(model.rstrip('/')).name}+{Path(lora.rstrip('/')).name}"
    else:
        entry = resolve_model(reference, work.base_dir, work.where, where)
        same = [name for name, path in work.models.items() if path == entry]
        if same:  # another spelling of a model already named (./b and /abs/b)
            work.names[reference] = same[0]
            return same[0]
        name = Path(reference.rstrip("/")).name or "model"
    while name in work.models or name in ("merged", "merge") or name.startswith("slice"):
        name += "_"
    work.models[name] = entry
    work.names[reference] = name
    return name


def resolve_model(reference: str, base_dir: Path, where: Locator, loc: tuple[Any, ...]) -> str:
    """A local path as it is; a repo id (``org/name[@revision]``) from the local Hugging Face cache; else one error."""
    local = base_dir / reference
    if local.exists():
        return str(local.resolve())
    if is_repo_id(reference):
        try:
            return str(cached_snapshot(reference))
        except MergebenchError as exc:
            raise where.error(loc, str(exc)) from None
    raise where.error(loc, f"model '{reference}' is not a path that exists ({local})")


def _source(work: _Translation, entry: Any, where: tuple[Any, ...], whole: bool) -> _Source:
    if not isinstance(entry, dict) or "model" not in entry:
        raise work.where.error(where, "a model entry is {model: PATH, parameters: {...}}")
    extra = sorted(set(entry) - {"model", "parameters", "layer_range"})
    if extra:
        raise work.where.error((*where, extra[0]), f"'{extra[0]}' is not a key of a mergekit model entry")
    layers = None
    if not whole:
        span = entry.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                and 0 <= span[0] < span[1]):
            raise work.where.error((*where, "layer_range"), f"layer_range is [START, END) with START < END, got "
                                                            f"{span!r}")
        layers = (span[0], span[1])
    return _Source(work_model(work, entry["model"], (*where, "model")), layers, entry.get("parameters") or {},
                   where)


def _length(work: _Translation, sources: list[_Source], where: tuple[Any, ...]) -> int:
    lengths = {s.layers[1] - s.layers[0] for s in sources}
    if len(lengths) != 1:
        raise work.where.error(where, f"every source of a slice spans the same number of layers, got "
                                      f"{sorted(lengths)}")
    return lengths.pop()


def _rules(value: Any) -> list[dict[str, Any]]:
    """A mergekit setting as native filtered values (a number or a gradient matches every key)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [dict(v) for v in value]
    if isinstance(value, dict):
        return [dict(value)]
    return [{"value": value}]


def _setting(work: _Translation, name: str, levels: list[tuple[dict[str, Any], tuple[Any, ...]]]) -> Any:
    """One parameter through mergekit's levels (most specific first) as one native value or schedule."""
    rules: list[dict[str, Any]] = []
    for params, _ in levels:
        if name in params:
            rules.extend(_rules(params[name]))
    if not rules:
        return None
    if len(rules) == 1 and rules[0].get("filter") in (None, "*"):
        return rules[0]["value"]
    if any(isinstance(rule.get("value"), bool) for rule in rules):
        raise work.where.error(_at(levels, name), f"'{name}' cannot vary by layer or filter")
    return rules


def _at(levels: list[tuple[dict[str, Any], tuple[Any, ...]]], name: str) -> tuple[Any, ...]:
    """Where in the config the most specific level setting ``name`` sets it."""
    return next((*where, name) for params, where in levels if name in params)


def _scalar(work: _Translation, name: str, levels: list[tuple[dict[str, Any], tuple[Any, ...]]], default: Any) -> Any:
    value = _setting(work, name, levels)
    if isinstance(value, list):
        raise work.where.error(_at(levels, name), f"'{name}' is one value for the whole merge in mergebench")
    return default if value is None else value


def _merge(work: _Translation, method: str, sources: list[_Source], base: str | None, slice_params: dict[str, Any],
           name: str, where: tuple[Any, ...]) -> str:
    """The node merging one slice's sources (each first stacked to its layer range when it has one)."""
    global_params = work.config.get("parameters") or {}
    levels_global = [(slice_params, (*where, "parameters")), (global_params, ("parameters",))]
    allowed_global, allowed_model = METHOD_PARAMS[method]
    for params, loc in levels_global:
        for key in params:
            if key not in allowed_global | allowed_model:
                raise work.where.error((*loc, key), f"merge_method '{method}' takes no parameter '{key}' (it reads "
                                                    f"{', '.join(sorted(allowed_global | allowed_model)) or 'none'})")
    for s in sources:
        for key in s.params:
            if key not in allowed_model:
                raise work.where.error((*s.where, "parameters", key), f"merge_method '{method}' takes no per-model "
                                                                      f"parameter '{key}'")
    refs = [_ranged(work, s) for s in sources]
    if method == "passthrough":
        if len(sources) != 1:
            raise work.where.error(where, "passthrough takes one source per slice (or one model)")
        return refs[0]
    names = [s.model for s in sources]
    base_ref = None
    policy = METHODS[method][2]
    if policy == "required" and base is None:
        raise work.where.error(("merge_method",), f"merge_method '{method}' needs a base_model")
    if policy != "ignored" and base is not None:
        if base not in names:
            if sources[0].layers is not None:
                raise work.where.error(where, f"base_model '{base}' is not among this slice's sources")
            sources, refs, names = [*sources, _Source(base, None, {}, ("base_model",))], [*refs, base], [*names, base]
        base_ref = refs[names.index(base)]
    others = [(s, r) for s, r in zip(sources, refs) if s.model != base or policy in ("ignored", "member")]
    build = _Build(work, method, where, levels_global, others, base_ref)
    op, inputs, params = BUILDERS.get(method, _task_arithmetic_family)(build)
    work.nodes[name] = {"op": op, "inputs": inputs, "params": params, **MERGEKIT_OUTSIDE}
    return name


@dataclass
class _Build:
    """What a method's builder needs: the slice's models, base and parameter levels."""

    work: _Translation
    method: str
    where: tuple[Any, ...]
    levels: list[tuple[dict[str, Any], tuple[Any, ...]]]
    others: list[tuple[_Source, str]]
    base: str | None

    def per_model(self, key: str, default: Any) -> list[Any]:
        """One value (or schedule) per merged model: its own, else its slice's, else the global one."""
        values = []
        for source, _ in self.others:
            levels = [(source.params, (*source.where, "parameters")), *self.levels]
            value = _setting(self.work, key, levels)
            if value is None and default is None:
                raise self.work.where.error(source.where, f"merge_method '{self.method}' needs '{key}' for model "
                                                          f"'{source.model}'")
            if key in FRACTIONS and not all(0 <= v <= 1 for v in _numbers(value)):
                raise self.work.where.error(_at(levels, key), f"'{key}' of model '{source.model}' must lie in [0, 1]")
            values.append(default if value is None else value)
        return values

    def scalar(self, key: str, default: Any) -> Any:
        return _scalar(self.work, key, self.levels, default)

    def setting(self, key: str) -> Any:
        return _setting(self.work, key, self.levels)

    @property
    def models(self) -> list[str]:
        return [ref for _, ref in self.others]

    def with_base(self, **inputs: Any) -> dict[str, Any]:
        return {**({"base": self.base} if self.base is not None else {}), **inputs}

    def one_other(self) -> str:
        if len(self.others) != 1:
            raise self.work.where.error(self.where, f"{self.method} merges base_model with exactly one other model")
        return self.others[0][1]

    def required(self, key: str) -> Any:
        value = self.setting(key)
        if value is None:
            raise self.work.where.error(self.where, f"{self.method} needs '{key}'")
        return value

    def normalize(self) -> Any:
        return self.scalar("normalize", METHODS[self.method][0])

    def rescale(self) -> Any:
        return self.scalar("rescale", METHODS[self.method][1])


def _task_arithmetic_family(b: _Build) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """task_arithmetic, ties, dare_*, breadcrumbs*, della*: mergekit's generalized task arithmetic."""
    method, normalize, rescale = b.method, b.normalize(), b.rescale()
    densities = b.per_model("density", 1.0)
    params: dict[str, Any] = {"weights": b.per_model("weight", None), "lambda": b.scalar("lambda", 1.0)}
    if method in ("ties", "breadcrumbs", "breadcrumbs_ties") and rescale:
        raise b.work.where.error(("parameters", "rescale"), f"{method} with rescale is not translated yet")
    if method == "task_arithmetic":
        params["normalize"] = normalize
    elif method.startswith("breadcrumbs"):
        params.update(normalize=normalize, density=_shared(b.work, "density", densities, b.others),
                      gamma=_shared(b.work, "gamma", b.per_model("gamma", 0.01), b.others))
    elif method == "ties":
        params.update(densities=densities, scope="per_tensor", agg="mean" if normalize else "sum")
    elif method.startswith("della"):
        params.update(normalize=normalize, rescale=bool(rescale),
                      density=_shared(b.work, "density", densities, b.others),
                      epsilon=_shared(b.work, "epsilon", b.per_model("epsilon", 0.15), b.others))
    else:
        params.update(p=_drop_rate(b.work, densities, b.others), rescale=bool(rescale))
        if method == "dare_ties":
            params.update(scope="per_tensor", agg="mean" if normalize else "sum")
        else:
            params["normalize"] = normalize
    return method, {"base": b.base, "models": b.models}, params


def _linear(b: _Build) -> tuple[str, dict[str, Any], dict[str, Any]]:
    return "linear", {"models": b.models}, {"weights": b.per_model("weight", None), "normalize": b.normalize()}


def _slerp(b: _Build) -> tuple[str, dict[str, Any], dict[str, Any]]:
    return "slerp", {"a": b.base, "b": b.one_other()}, {"t": b.required("t")}


def _nuslerp(b: _Build) -> tuple[str, dict[str, Any], dict[str, Any]]:
    params = {"weights": b.per_model("weight", None), "row_wise": b.scalar("nuslerp_row_wise", False),
              "flatten": b.scalar("nuslerp_flatten", True)}
    return "nuslerp", b.with_base(models=b.models), params


def _multislerp(b: _Build) -> tuple[str, dict[str, Any], dict[str, Any]]:
    params = {"weights": b.per_model("weight", None), "normalize_weights": b.scalar("normalize_weights", True),
              "eps": b.scalar("eps", 1e-8)}
    return "multislerp", b.with_base(models=b.models), params


BUILDERS = {
    "linear": _linear,
    "slerp": _slerp,
    "nuslerp": _nuslerp,
    "multislerp": _multislerp,
    "karcher": lambda b: ("karcher", {"models": b.models},
                          {"max_iter": b.scalar("max_iter", 10), "tol": b.scalar("tol", 1e-5)}),
    "model_stock": lambda b: ("model_stock", {"base": b.base, "models": b.models},
                              {"filter_wise": b.scalar("filter_wise", False)}),
    "nearswap": lambda b: ("nearswap", {"base": b.base, "model": b.one_other()}, {"t": b.required("t")}),
    "sce": lambda b: ("sce", {"base": b.base, "models": b.models}, {"select_topk": b.scalar("select_topk", 1.0)}),
    "arcee_fusion": lambda b: ("arcee_fusion", {"base": b.base, "fine_tuned": b.one_other()}, {}),
}


def _shared(work: _Translation, name: str, values: list[Any], others: list[tuple[_Source, str]]) -> Any:
    """A per-model parameter the operator takes once for all models: the models must agree on it."""
    if any(v != values[0] for v in values):
        raise work.where.error(others[0][0].where, f"a different '{name}' per model is not translated yet for this "
                                                   f"method")
    return values[0]


def _numbers(value: Any) -> list[float]:
    """Every number a setting writes (a number, a gradient, filtered values)."""
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return _numbers(value.get("value"))
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _drop_rate(work: _Translation, densities: list[Any], others: list[tuple[_Source, str]]) -> Any:
    """DARE's drop rate p = 1 − density, one for all models (a number or a schedule)."""
    density = _shared(work, "density", densities, others)
    if isinstance(density, list):
        return [{**r, "value": [1 - v for v in r["value"]] if isinstance(r["value"], list) else 1 - r["value"]}
                for r in _rules(density)] if isinstance(density[0], dict) else [1 - v for v in density]
    return 1 - density


def _ranged(work: _Translation, source: _Source) -> str:
    """The source's model, or a stack of its layer range renumbered from 0."""
    if source.layers is None:
        return source.model
    start, end = source.layers
    name = f"{source.model}[{start}:{end}]"
    work.nodes.setdefault(name, {"op": "stack", "inputs": {"models": [source.model]},
                                 "params": {"slices": [{"model": source.model, "layers": [start, end]}]}})
    return name
