"""Computing a large key a slice at a time: when it may, and the slices of its inputs.

When every operator behind an output is elementwise, a key holding more than ``SLICE_ELEMENTS``
elements is computed that many at a time: the float32 temporaries stay small, in cache and reused,
instead of a tensor-sized upcast per input. The bytes are those of the whole-tensor computation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mergebench.engine.graph import Graph, OutputPlan
from mergebench.io.checkpoint import read_window
from mergebench.value_types import ARTIFACT_TYPES, is_list_type

# float32 slices of 512 KiB: below the allocator's mmap threshold (engine.allocator), so their temporaries are
# reused from the heap; half as many slices as 256 KiB ones, whose per-slice dispatch cost (the interpreter lock,
# shared by the compute threads) made global TIES 30 % slower; 1 MiB ones would be mmapped and zeroed every time
SLICE_ELEMENTS = 1 << 17
RELEASE_EVERY = 64  # slices (8 Mi elements) between two releases of the input pages behind them


def in_slices(graph: Graph, key: str, refs: list[str], raw: dict[str, torch.Tensor], device: torch.device) -> bool:
    """Whether ``refs`` at ``key`` are elementwise computations on same-shaped inputs all held in ``raw``.

    Then they may be computed ``SLICE_ELEMENTS`` at a time: each slice's float32 values are small
    enough to be reused from the heap and stay in cache, where whole-tensor upcasts would fault in
    fresh memory for every input of every key.
    """
    if device.type != "cpu" or not raw or not all(isinstance(t, torch.Tensor) for t in raw.values()):
        return False  # an adapter's update (factors) is not elementwise
    numel = next(iter(raw.values())).numel()
    if numel <= SLICE_ELEMENTS or any(t.numel() != numel for t in raw.values()):
        return False
    if any(graph.is_embedding(key, model) for model in raw):
        return False
    return all(graph.is_elementwise(ref, key) and graph.needed(ref, key) <= raw.keys() for ref in refs)


def sliceable_output(graph: Graph, plan: OutputPlan, key: str) -> bool:
    node = graph.nodes.get(plan.output.node)
    return (plan.output.kind not in ARTIFACT_TYPES and plan.dtypes[key].is_floating_point
            and not (node is not None and is_list_type(node.result) and plan.element is None)
            and graph.needed_for_output(plan, key) == graph.needed(plan.output.node, key))


def slices(raw: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """{model: its flat elements [start, start + SLICE_ELEMENTS)} for each start over the key's elements.

    Every ``RELEASE_EVERY`` slices the pages of large mapped inputs behind the slices done are let go and
    those of the next ``RELEASE_EVERY`` faulted in (``read_window``): a key's inputs then hold memory for a
    window of slices, not for the whole tensor."""
    flat = {model: tensor.reshape(-1) for model, tensor in raw.items()}
    numel = next(iter(flat.values())).numel()
    for index, start in enumerate(range(0, numel, SLICE_ELEMENTS)):
        if index % RELEASE_EVERY == 0:
            for tensor in raw.values():
                size = tensor.element_size()
                read_window(tensor, start * size, (start + RELEASE_EVERY * SLICE_ELEMENTS) * size)
        yield {model: tensor[start:start + SLICE_ELEMENTS] for model, tensor in flat.items()}


@contextmanager
def one_thread() -> Iterator[None]:
    """Slices are too small for torch's thread pool to pay off; the other cores read and write meanwhile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
