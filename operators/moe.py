"""``moe``: a mixture of experts built from dense models (mergekit-moe's job; semantics §13).

The base gives attention, norms, embeddings and head; each expert gives its MLP, block by block, as
one expert of a Mixtral (``MixtralForCausalLM``) or Qwen2-MoE (``Qwen2MoeForCausalLM``) checkpoint;
the router of every block is made from prompts (``hidden``, ``cheap_embed``) or drawn (``random``).
Nothing is computed per key: the keys are renamed (an expert may be any node, or the base itself)
and the router tensors are made by the io layer from the plain ``RouterSpec`` this plans.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergebench.operators.base import (
    CHECKPOINT,
    LayoutInputs,
    LayoutPlan,
    Params,
    layout_operator,
    list_of,
    signature,
)
from mergebench.surgery.layers import BlockIndex
from mergebench.surgery.moe import (
    ATTENTION_BIAS,
    MLP_ANY,
    MLP_KEY,
    PROJECTIONS,
    PROMPTED_MODES,
    Prompts,
    RouterSpec,
    expert_key,
    moe_config,
    router_key,
    shared_gate_key,
    shared_key,
)


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    positive: list[str] = Field(min_length=1, description="prompts this expert should get")
    negative: list[str] = Field(default_factory=list, description="prompts it should not get")


class MoeParams(Params):
    gate_mode: Literal["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"] = Field(
        "hidden", description="router rows: the base's MLP input at each block for each expert's prompts (last "
                              "token; hidden_avg: mean over tokens), the prompts' mean token embedding (every "
                              "block alike), or seeded N(0,1) / nn.Linear-uniform draws")
    experts_per_token: int = Field(2, ge=1, description="experts each token is routed to (top-k)")
    prompts: dict[str, PromptSet] = Field(default_factory=dict, description="per expert input (and the shared "
                                                                            "expert): {positive: [...], negative: "
                                                                            "[...]}")
    architecture: Literal["auto", "mixtral", "qwen2_moe"] = Field(
        "auto", description="output layout; auto: qwen2_moe with a shared expert or a base with q/k/v biases, "
                            "else mixtral")
    gate_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the base runs in for the hidden modes")

    @model_validator(mode="after")
    def _modes(self) -> MoeParams:
        if self.gate_mode not in PROMPTED_MODES and self.prompts:
            raise ValueError(f"gate_mode {self.gate_mode} uses no prompts; remove 'prompts' or choose one of "
                             f"{', '.join(PROMPTED_MODES)}")
        return self


def _check_inputs(p: MoeParams, inputs: dict[str, Any]) -> str | None:
    experts = list(inputs.get("experts") or [])
    shared = inputs.get("shared")
    if p.experts_per_token > len(experts):
        return f"experts_per_token {p.experts_per_token} is more than its {len(experts)} experts"
    for name in p.prompts:
        if name not in experts and name != shared:
            return f"prompts for '{name}', which is not among its experts ({', '.join(experts)})"
    if p.gate_mode in PROMPTED_MODES:
        for name in [*experts, *([shared] if shared else [])]:
            if name not in p.prompts:
                return f"gate_mode {p.gate_mode}: expert '{name}' has no prompts ({{positive: [...]}})"
        twice = sorted({name for name in experts if experts.count(name) > 1})
        if twice:
            return (f"expert '{twice[0]}' is listed twice: its prompts would give it two equal router rows; "
                    f"name the model twice under two names with prompts of their own")
    return None


@layout_operator(
    "moe",
    paper="mixture of experts from dense models (mergekit-moe, Goddard 2023; Mixtral: Jiang et al., "
          "arXiv:2401.04088; Qwen1.5-MoE)",
    signatures=[signature(CHECKPOINT, base=CHECKPOINT, experts=list_of(CHECKPOINT)),
                signature(CHECKPOINT, base=CHECKPOINT, experts=list_of(CHECKPOINT), shared=CHECKPOINT)],
    params=MoeParams,
    check_inputs=_check_inputs,
)
def moe(p: MoeParams, inputs: LayoutInputs) -> LayoutPlan:
    """Base's attention, norms and embeddings; per block each expert's MLP behind a router from prompts."""
    base, experts = str(inputs.slots["base"]), list(inputs.slots["experts"])
    shared = inputs.slots.get("shared")
    shared = str(shared) if shared is not None else None
    blocks = _mlp_blocks(base, inputs)
    qkv_bias = any(ATTENTION_BIAS.search(k) and not k.endswith("o_proj.bias") for k in inputs.keys[base])
    architecture = p.architecture
    if architecture == "auto":
        architecture = "qwen2_moe" if shared is not None or qkv_bias else "mixtral"
    _check_base(base, inputs, architecture, shared)
    hidden = inputs.shape(base, blocks[0][0] + "mlp.gate_proj.weight")[1]
    intermediate = _check_experts(experts, blocks, hidden, inputs)
    plan: dict[str, tuple[str, str]] = {}
    for key in inputs.keys[base]:
        if not MLP_ANY.search(key):
            plan[key] = (base, key)
    zeros: list[tuple[str, tuple[int, ...]]] = []
    for prefix, _ in blocks:
        for e, expert in enumerate(experts):
            for projection in PROJECTIONS:
                plan[expert_key(architecture, prefix, projection, e)] = (expert, f"{prefix}mlp.{projection}.weight")
        plan[router_key(architecture, prefix)] = ("router", router_key(architecture, prefix))
        if architecture == "qwen2_moe":
            zeros.extend(_route_shared_expert(plan, prefix, shared, hidden))
    shared_intermediate = _check_experts([shared], blocks, hidden, inputs) if shared is not None else None
    spec = RouterSpec(
        base=base, mode=p.gate_mode, seed=inputs.seed, hidden=hidden,
        router_keys=tuple(router_key(architecture, prefix) for prefix, _ in blocks),
        rows=tuple((name, _prompts(p, name)) for name in experts),
        shared_keys=tuple(shared_gate_key(prefix) for prefix, _ in blocks) if shared is not None else (),
        shared_row=(shared, _prompts(p, shared)) if shared is not None else None,
        zeros=tuple(zeros), gate_dtype=p.gate_dtype)
    return LayoutPlan(plan, [(base, block) for _, block in blocks], {"router": spec},
                      lambda config: moe_config(config, architecture, len(experts), p.experts_per_token,
                                                intermediate, shared_intermediate, qkv_bias))


def _route_shared_expert(plan: dict[str, tuple[str, str]], prefix: str, shared: str | None, hidden: int
                         ) -> list[tuple[str, tuple[int, ...]]]:
    """Route one block's Qwen2-MoE shared expert: the shared model's MLP, or (none given) zeros of width 1,
    which add nothing; its gate comes from the router. Returns the keys written as zeros, with their shapes."""
    zeros = []
    for projection in PROJECTIONS:
        if shared is not None:
            plan[shared_key(prefix, projection)] = (shared, f"{prefix}mlp.{projection}.weight")
        else:
            zeros.append((shared_key(prefix, projection), (hidden, 1) if projection == "down_proj" else (1, hidden)))
    if shared is None:
        zeros.append((shared_gate_key(prefix), (1, hidden)))
    plan[shared_gate_key(prefix)] = ("router", shared_gate_key(prefix))
    plan.update({key: ("router", key) for key, _ in zeros})
    return zeros


def _prompts(p: MoeParams, name: str) -> Prompts | None:
    given = p.prompts.get(name)
    return Prompts(tuple(given.positive), tuple(given.negative)) if given is not None else None


def _mlp_blocks(base: str, inputs: LayoutInputs) -> list[tuple[str, int]]:
    """(key prefix, block) of every block of the base, each with a gated MLP."""
    index = BlockIndex(inputs.keys[base])
    if len(index.stacks) != 1:
        raise ValueError(f"base '{base}' has {len(index.stacks)} stacks of blocks; a MoE is built from a "
                         f"decoder with one")
    prefixes = {}
    for key in inputs.keys[base]:
        match = MLP_KEY.match(key)
        if match:
            prefixes[index.position(key)[0]] = match.group(1)
    count = next(iter(index.stacks.values()))
    lacking = [b for b in range(count) if b not in prefixes]
    if lacking:
        raise ValueError(f"base '{base}' has no gated MLP (mlp.gate_proj/up_proj/down_proj) in block {lacking[0]}")
    return [(prefixes[b], b) for b in range(count)]


def _check_base(base: str, inputs: LayoutInputs, architecture: str, shared: str | None) -> None:
    for key in inputs.keys[base]:
        if MLP_ANY.search(key) and not MLP_KEY.match(key):
            raise ValueError(f"base '{base}' has '{key}', which no MoE expert holds (MLP biases?)")
        bias = ATTENTION_BIAS.search(key)
        if bias and (architecture == "mixtral" or bias.group(1) == "o"):
            raise ValueError(f"base '{base}' has '{key}', which {architecture}'s attention has no place for")
    if shared is not None and architecture != "qwen2_moe":
        raise ValueError(f"a shared expert ('{shared}') needs architecture qwen2_moe; mixtral has none")


def _check_experts(experts: list[str], blocks: list[tuple[str, int]], hidden: int, inputs: LayoutInputs) -> int:
    """The experts' common MLP width, after checking that each has the base's blocks and hidden size."""
    widths: dict[int, str] = {}
    for expert in experts:
        held = set(inputs.keys[expert])
        count = max(BlockIndex(held).stacks.values(), default=0)
        if count != len(blocks):
            raise ValueError(f"expert '{expert}' has {count} blocks and the base {len(blocks)}")
        for prefix, _ in blocks:
            for projection in PROJECTIONS:
                key = f"{prefix}mlp.{projection}.weight"
                if key not in held:
                    raise ValueError(f"expert '{expert}' has no '{key}': not a Llama-style model like the base")
                shape = inputs.shape(expert, key)
                width, size = (shape[1], shape[0]) if projection == "down_proj" else shape
                if size != hidden:
                    raise ValueError(f"expert '{expert}': '{key}' is {list(shape)}, not of the base's hidden size "
                                     f"{hidden}")
                widths.setdefault(width, f"'{expert}' ('{key}')")
    if len(widths) > 1:
        (a, first), (b, second) = list(widths.items())[:2]
        raise ValueError(f"the experts' MLPs differ in width: {a} in {first}, {b} in {second}")
    return next(iter(widths))
