"""Which statistics passes a run needs, in which order, and which of them share a read."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mergebench.engine.graph import Graph
from mergebench.operators.base import StatisticsPass


@dataclass(frozen=True)
class Stage:
    """One streamed read of the inputs, during which each (node, pass) listed accumulates."""

    passes: tuple[tuple[str, StatisticsPass], ...]
    backwards: bool = False  # visit the keys last to first (see ``statistics_stages``)

    @property
    def reorderable(self) -> bool:
        """Whether the keys may be visited in any order: passes that combine states promise that."""
        return all(stat_pass.combine is not None and stat_pass.order is None for _, stat_pass in self.passes)

    @property
    def may_skip(self) -> bool:
        """Whether a run may skip this read: every pass in it may find earlier ones settled its result."""
        return all(stat_pass.skip is not None for _, stat_pass in self.passes)


def statistics_stages(graph: Graph) -> list[Stage]:
    """The statistics passes of every node, scheduled into as few reads as their dependencies allow.

    A node's passes run in sequence after every pass of the nodes upstream of it; passes of
    different nodes at the same step share one read. A pass that visits keys in an order of its
    own (alignment planning) gets a read to itself.

    Reads alternate direction, the last one before the main (forward) pass running backwards, where
    the passes allow it: when the inputs do not fit in the page cache, each read then begins with the
    keys the previous one read last, still cached, instead of those it read first, long evicted. A read
    that may be skipped is planned as skipped: it takes the direction of the one before it.
    """
    last: dict[str, int] = {}  # the last stage used by a node or anything upstream of it
    scheduled: dict[tuple[int, str], list[tuple[str, StatisticsPass]]] = {}
    for name, node in graph.nodes.items():  # topological order
        if graph.is_renamed(name):
            continue  # it merges with its origin's statistics
        upstream = max((last[r] for r in node.refs() if r in last), default=-1)
        passes = node.op.passes(node.params, frozenset(node.inputs))
        for i, stat_pass in enumerate(passes):
            slot = (upstream + 1 + i, name if stat_pass.order else "")
            scheduled.setdefault(slot, []).append((name, stat_pass))
        last[name] = upstream + len(passes)
    stages = [Stage(tuple(scheduled[k])) for k in sorted(scheduled)]
    next_backwards = False  # the main pass reads forwards
    for index in reversed(range(len(stages))):
        backwards = not next_backwards and stages[index].reorderable
        stages[index] = replace(stages[index], backwards=backwards)
        if not stages[index].may_skip:
            next_backwards = backwards
    return stages


def reads_per_model(graph: Graph) -> dict[str, int]:
    """How many times a run reads each of the recipe's models: once per statistics stage whose nodes depend on
    it, and once in the main pass (for every model an output depends on)."""
    reads = {name: 0 for name in graph.recipe.models}
    for stage in statistics_stages(graph):
        for model in {m for name, _ in stage.passes for m in graph.recipe_models(graph.models_of(name))}:
            reads[model] = reads.get(model, 0) + 1
    for model in {m for plan in graph.outputs for m in graph.recipe_models(plan.models)}:
        reads[model] = reads.get(model, 0) + 1
    return reads
