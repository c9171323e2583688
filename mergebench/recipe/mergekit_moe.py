"""mergekit-moe's configuration format, translated into a native recipe with one ``moe`` node (docs/mergekit.md).

``base_model``, ``experts: [{source_model, positive_prompts, negative_prompts}]``, ``gate_mode``,
``experts_per_token`` (mergekit's default 2), ``shared_experts`` (at most one: Qwen2-MoE),
``architecture`` and ``dtype``. An expert named twice (one model, two prompt sets) becomes two model
names for the same path, so that each keeps its prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergebench.errors import MergebenchError
from mergebench.recipe.mergekit import DTYPES, _Translation, work_model
from mergebench.recipe.yaml_lines import Locator

MOE_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts"}
GATE_MODES = {"hidden": "hidden", "hidden_last": "hidden", "hidden_avg": "hidden_avg", "cheap_embed": "cheap_embed",
              "random": "random", "uniform_random": "uniform_random"}
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe"}


def is_mergekit_moe(data: Any) -> bool:
    """A mergekit-moe config has ``base_model`` and ``experts`` and neither ``merge_method`` nor ``nodes``."""
    return (isinstance(data, dict) and "experts" in data and "base_model" in data
            and "merge_method" not in data and "nodes" not in data)


def translate_moe(data: dict[str, Any], where: Locator, base_dir: Path, out: str | None) -> dict[str, Any]:
    """The native recipe a mergekit-moe config means, writing to ``out``."""
    unknown = sorted(set(data) - MOE_KEYS)
    if unknown:
        raise where.error((unknown[0],), f"'{unknown[0]}' is not a mergekit-moe config key (known: "
                                         f"{', '.join(sorted(MOE_KEYS))})")
    if out is None:
        raise MergebenchError(f"{where.file}: a mergekit-moe config names no output: give --out DIR")
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise where.error(("gate_mode",), f"gate_mode '{mode}' is not one of {', '.join(GATE_MODES)}")
    work = _Translation(data, where, base_dir)
    base = work_model(work, data["base_model"], ("base_model",))
    prompted = GATE_MODES[mode] not in ("random", "uniform_random")
    prompts: dict[str, dict[str, list[str]]] = {}
    experts_list = data.get("experts")
    if not isinstance(experts_list, list) or not experts_list:
        raise where.error(("experts",), "experts is a list of {source_model, positive_prompts, negative_prompts}")
    experts = [_expert(work, entry, ("experts", i), prompts, prompted) for i, entry in enumerate(experts_list)]
    params: dict[str, Any] = {"gate_mode": GATE_MODES[mode], "experts_per_token": data.get("experts_per_token", 2)}
    inputs: dict[str, Any] = {"base": base, "experts": experts}
    shared = data.get("shared_experts") or []
    if len(shared) > 1:
        raise where.error(("shared_experts",), f"{len(shared)} shared experts: Qwen2-MoE has one")
    if shared:
        inputs["shared"] = _expert(work, shared[0], ("shared_experts", 0), prompts, prompted)
    if prompted:
        params["prompts"] = prompts
    architecture = data.get("architecture")
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise where.error(("architecture",), f"architecture '{architecture}' is not translated (one of "
                                                 f"{', '.join(ARCHITECTURES)})")
        params["architecture"] = ARCHITECTURES[architecture]
    output: dict[str, Any] = {"from": "moe", "path": out, "copy_files_from": base}
    dtype = data.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise where.error(("dtype",), f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        output["dtype"] = DTYPES[dtype]
    return {"models": work.models, "nodes": {"moe": {"op": "moe", "inputs": inputs, "params": params}},
            "outputs": [output]}


def _expert(work: _Translation, entry: Any, where: tuple[Any, ...], prompts: dict[str, dict[str, list[str]]],
            prompted: bool) -> str:
    """An expert's native model name (a fresh name for a model already an expert), its prompts recorded."""
    if not isinstance(entry, dict) or "source_model" not in entry:
        raise work.where.error(where, "an expert is {source_model: PATH, positive_prompts: [...], "
                                      "negative_prompts: [...]}")
    extra = sorted(set(entry) - EXPERT_KEYS)
    if extra:
        raise work.where.error((*where, extra[0]), f"'{extra[0]}' is not translated (an expert takes "
                                                   f"{', '.join(sorted(EXPERT_KEYS))})")
    name = work_model(work, entry["source_model"], (*where, "source_model"))
    if name in prompts:
        alias = name
        while alias in work.models:
            alias += "_"
        work.models[alias] = work.models[name]
        name = alias
    if prompted and not entry.get("positive_prompts"):
        raise work.where.error(where, f"expert '{entry['source_model']}' has no positive_prompts, which gate_mode "
                                      f"{work.config.get('gate_mode', 'hidden')} needs")
    if prompted:
        prompts[name] = {"positive": list(entry.get("positive_prompts") or []),
                         "negative": list(entry.get("negative_prompts") or [])}
    else:
        prompts[name] = {}  # marks the name as taken
    return name
