"""Permutation symmetries of networks, and weight matching (Git Re-Basin; semantics §4).

Hidden units can be reordered without changing what a network computes, provided every tensor that
reads or writes them is permuted alike. A *spec* lists, for each group of hidden units, the
(tensor, axis) pairs it permutes. Weight matching finds, group by group, the permutation of model B
that best lines its weights up with model A's (``scipy.optimize.linear_sum_assignment``), by
coordinate ascent on Σ⟨W_A, π(W_B)⟩.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from mergebench.errors import MergebenchError
from mergebench.surgery.numerics import draw_seed

ORDER_STREAM = "weight_matching_order"
FFN_PATTERNS = {  # per block: (key suffix, axis of the FFN neurons)
    "llama": ((r"mlp\.gate_proj\.weight", 0), (r"mlp\.up_proj\.weight", 0), (r"mlp\.down_proj\.weight", 1),
              (r"mlp\.gate_proj\.bias", 0), (r"mlp\.up_proj\.bias", 0)),
    "gpt2": ((r"mlp\.c_fc\.weight", 1), (r"mlp\.c_fc\.bias", 0), (r"mlp\.c_proj\.weight", 0)),  # Conv1D: [in, out]
    "bert": ((r"intermediate\.dense\.weight", 0), (r"intermediate\.dense\.bias", 0), (r"output\.dense\.weight", 1)),
}
HEAD_PATTERNS = {  # per block: (key suffix, axis of the heads); a unit is a key/value head with its query heads
    "llama": tuple((rf"self_attn\.{name}\.{kind}", 0) for name in ("q_proj", "k_proj", "v_proj")
                   for kind in ("weight", "bias")) + ((r"self_attn\.o_proj\.weight", 1),),
    "bert": tuple((rf"attention\.self\.{name}\.{kind}", 0) for name in ("query", "key", "value")
                  for kind in ("weight", "bias")) + ((r"attention\.output\.dense\.weight", 1),),
}


@dataclass(frozen=True)
class PermutationSpec:
    groups: dict[str, tuple[tuple[str, int], ...]]  # group -> (key, axis) pairs it permutes
    units: dict[str, int] = field(default_factory=dict)  # groups whose unit owns a block of each axis (heads)

    def size(self, group: str, tensors: dict[str, torch.Tensor]) -> int:
        """How many units the group permutes: given, or the length of its first tensor's axis. Every
        member's axis must hold a whole number of units (a flattened axis holds several entries per unit)."""
        key, axis = self.groups[group][0]
        units = self.units.get(group) or tensors[key].shape[axis]
        for member, member_axis in self.groups[group]:
            length = tensors[member].shape[member_axis]
            if units == 0 or length % units:
                raise MergebenchError(f"permutation group '{group}': axis {member_axis} of '{member}' has {length} "
                                      f"entries, not a multiple of the group's {units} units (axis {axis} of '{key}')")
        return units

    def axes(self, key: str) -> list[tuple[str, int]]:
        return [(group, axis) for group, members in self.groups.items() for k, axis in members if k == key]

    @property
    def keys(self) -> set[str]:
        return {key for members in self.groups.values() for key, _ in members}


def independent_groups(spec: PermutationSpec) -> set[str]:
    """Groups none of whose tensors another group touches: each is solved by one assignment, on its own."""
    owners: dict[str, set[str]] = {}
    for group, members in spec.groups.items():
        for key, _ in members:
            owners.setdefault(key, set()).add(group)
    return {g for g, members in spec.groups.items() if all(owners[key] == {g} for key, _ in members)}


def solve_alone(group: str, spec: PermutationSpec, a: dict[str, torch.Tensor],
                b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The permutation of an independent group (no other group can change its similarity)."""
    alone = PermutationSpec({group: spec.groups[group]}, {group: spec.units[group]} if group in spec.units else {})
    return match_group(group, alone, a, b, {group: torch.arange(spec.size(group, a))})[0]


def mlp_chain(layers: list[str], keys: Iterable[str]) -> PermutationSpec:
    """Layer prefixes in forward order: the outputs of layer l (weight rows, bias) are the inputs of l + 1."""
    keys = set(keys)
    groups = {}
    for i, (layer, following) in enumerate(zip(layers, layers[1:])):
        members = [(f"{layer}.weight", 0), (f"{following}.weight", 1)]
        if f"{layer}.bias" in keys:
            members.append((f"{layer}.bias", 0))
        missing = [k for k, _ in members if k not in keys]
        if missing:
            raise MergebenchError(f"layer spec: no tensor '{missing[0]}'")
        groups[f"hidden{i}"] = tuple(members)
    return PermutationSpec(groups)


def sequential_chain(keys: Iterable[str]) -> PermutationSpec | None:
    """``nn.Sequential`` numbering (``0.weight``, ``2.weight``, ...): the linear layers in index order."""
    keys = list(keys)
    indices = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"(\d+)\.weight", k))})
    return mlp_chain([str(i) for i in indices], keys) if len(indices) >= 2 else None


def _per_block(keys: Iterable[str], architectures: dict[str, tuple[tuple[str, int], ...]],
               suffix: str = "") -> dict[str, tuple[tuple[str, int], ...]]:
    """Group name (the block's prefix + ``suffix``) -> (key, axis) members, for the first architecture
    whose patterns match any key; empty when none does."""
    keys = list(keys)
    for patterns in architectures.values():
        groups: dict[str, list[tuple[str, int]]] = {}
        for key in keys:
            for pattern, axis in patterns:
                match = re.fullmatch(rf"(.*\.(?:layers|layer|h)\.\d+)\.{pattern}", key)
                if match:
                    groups.setdefault(match.group(1) + suffix, []).append((key, axis))
        if groups:
            return {name: tuple(members) for name, members in groups.items()}
    return {}


def transformer_ffn(keys: Iterable[str]) -> PermutationSpec | None:
    """The feed-forward neurons of every block of a Llama, GPT-2 or BERT model: one group per block."""
    groups = _per_block(keys, FFN_PATTERNS)
    return PermutationSpec(groups) if groups else None


def attention_heads(keys: Iterable[str], heads: int) -> PermutationSpec:
    """The attention heads of every block of a Llama or BERT model: one group of ``heads`` units per block.

    A unit owns a block of rows of the query, key and value projections and of columns of the output
    projection. With grouped-query attention ``heads`` is the number of key/value heads, and a unit
    carries the query heads that share it (they are contiguous), so the function is unchanged.
    """
    groups = _per_block(keys, HEAD_PATTERNS, suffix=".heads")
    if not groups:
        raise MergebenchError("attention_heads: no Llama or BERT attention projections among the tensors")
    return PermutationSpec(groups, dict.fromkeys(groups, heads))


def build_spec(spec: str | dict[str, list[list]], layers: list[str] | None, keys: list[str],
               heads: int | None = None) -> PermutationSpec:
    """From a recipe: explicit ``layers``, a ``spec`` mapping group -> [[key, axis], ...], or ``auto``;
    with ``heads``, the attention heads of every block too."""
    found = _base_spec(spec, layers, keys)
    if heads is None:
        return found
    with_heads = attention_heads(keys, heads)
    return PermutationSpec({**found.groups, **with_heads.groups}, {**found.units, **with_heads.units})


def _base_spec(spec: str | dict[str, list[list]], layers: list[str] | None, keys: list[str]) -> PermutationSpec:
    if layers:
        return mlp_chain(layers, keys)
    if isinstance(spec, dict):
        known = set(keys)
        for group, members in spec.items():
            if not members:
                raise MergebenchError(f"permutation spec group '{group}': no [key, axis] members")
            if len({m[0] for m in members}) < len(members):
                raise MergebenchError(f"permutation spec group '{group}': a tensor is listed twice (a group permutes "
                                      f"one axis of each of its tensors)")
            for key, axis in members:
                if key not in known:
                    raise MergebenchError(f"permutation spec group '{group}': no tensor '{key}'")
                if isinstance(axis, bool) or not isinstance(axis, int):
                    raise MergebenchError(f"permutation spec group '{group}': axis {axis!r} of '{key}' is not an "
                                          f"integer")
        return PermutationSpec({g: tuple((k, int(a)) for k, a in members) for g, members in spec.items()})
    found = transformer_ffn(keys) if spec in ("auto", "ffn") else None
    found = found or (sequential_chain(keys) if spec in ("auto", "mlp") else None)
    if found is None:
        raise MergebenchError("no permutation spec: give 'layers' (an MLP chain) or 'spec' (group -> [[key, axis]])")
    return found


def _expanded(perm: torch.Tensor, size: int) -> torch.Tensor:
    """A unit permutation as an index on an axis of ``size``: the axis itself, or, after a flatten,
    units × positions in channel-major order (unit u owns entries u·P … u·P + P − 1)."""
    if size == len(perm):
        return perm
    if size % len(perm):
        raise MergebenchError(f"an axis of {size} entries does not flatten {len(perm)} permuted units")
    block = size // len(perm)
    return (perm.unsqueeze(1) * block + torch.arange(block)).reshape(-1)


def permute(tensor: torch.Tensor, key: str, spec: PermutationSpec, perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """π(W)[key]: every axis the spec ties to a group, reordered by that group's permutation."""
    for group, axis in spec.axes(key):
        tensor = tensor.index_select(axis, _expanded(perms[group], tensor.shape[axis]).to(tensor.device))
    return tensor


def _as_rows(tensor: torch.Tensor, axis: int, units: int) -> torch.Tensor:
    """One row per unit: the axis (its flattened positions folded into the row) first, the rest after."""
    return tensor.movedim(axis, 0).reshape(units, -1)


def match_group(group: str, spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                perms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """The best permutation of one group given the others: (perm, new score, old score)."""
    similarity = None
    units = len(perms[group])
    for key, axis in spec.groups[group]:
        b_other = b[key]
        for other_group, other_axis in spec.axes(key):
            if other_group != group:
                b_other = b_other.index_select(other_axis, _expanded(perms[other_group], b_other.shape[other_axis]))
        term = _as_rows(a[key].double(), axis, units) @ _as_rows(b_other.double(), axis, units).T
        similarity = term if similarity is None else similarity + term
    from scipy.optimize import linear_sum_assignment  # scipy's import is slow: paid only by weight matching

    rows, cols = linear_sum_assignment(similarity.numpy(), maximize=True)
    new = torch.as_tensor(cols, dtype=torch.int64)
    old = perms[group]
    index = torch.arange(len(new))
    return new, float(similarity[index, new].sum()), float(similarity[index, old].sum())


def weight_matching(spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0, tol: float = 1e-12) -> dict[str, torch.Tensor]:
    """Permutations of B's units onto A's (unit i of A <-> unit perm[i] of B), by coordinate ascent."""
    perms = {g: torch.arange(spec.size(g, a)) for g in spec.groups}
    names = list(spec.groups)
    for iteration in range(max_iter):
        generator = torch.Generator().manual_seed(draw_seed(seed, ORDER_STREAM, iteration, ""))
        progress = False
        for index in torch.randperm(len(names), generator=generator).tolist():
            group = names[index]
            new, new_score, old_score = match_group(group, spec, a, b, perms)
            if new_score > old_score + tol:
                progress = True
            perms[group] = new
        if not progress:
            break
    return perms
