"""What a run holds in memory at its worst moment, estimated from the plan (``mergebench plan``)."""

from __future__ import annotations

from mergebench.engine.graph import Graph
from mergebench.engine.pipeline import COMPUTE_THREADS, PREFETCH_KEYS, WRITES_IN_FLIGHT


def peak_memory_estimate(graph: Graph) -> int:
    """Bytes held at the worst moment of a CPU run, keys in storage order: ``COMPUTE_THREADS`` keys computed
    side by side (their stored inputs, outputs and, unless computed in slices, a float32 value per model
    and node), ``PREFETCH_KEYS`` read ahead, and the outputs of the ``WRITES_IN_FLIGHT`` before them
    waiting for the writer.

    Pooled buffers keep the size of the largest tensor they held, so a model with outsized tensors
    (embeddings) peaks somewhat higher: medium bench models, 0.58 GB estimated, 0.75–0.77 GB measured.
    Tensors a layout makes before they stream (a MoE router run through its base model) add what making
    them holds."""
    preparing = sum(getattr(source, "preparation_bytes", 0) for source in graph.layouts.generated.values())
    return preparing + _streaming_peak(graph)


def _streaming_peak(graph: Graph) -> int:
    held = [_bytes_at(graph, key) for key in graph.keys]
    worst = 0
    for i in range(len(held)):
        computing = sum(stored + out + floats for stored, out, floats in held[i:i + COMPUTE_THREADS])
        read_ahead = sum(stored for stored, _, _ in held[i + COMPUTE_THREADS:i + COMPUTE_THREADS + PREFETCH_KEYS])
        written = sum(out for _, out, _ in held[max(0, i - WRITES_IN_FLIGHT):i])
        worst = max(worst, computing + read_ahead + written)
    return worst


def _bytes_at(graph: Graph, key: str) -> tuple[int, int, int]:
    """(stored inputs, outputs, float32 values) of one key."""
    models = [m for m in graph.sources if key in graph.sources[m].keys]
    stored = sum(graph.sources[m].info(key).nbytes for m in models)
    numel = graph.sources[models[0]].info(key).numel
    plans = [plan for plan in graph.outputs if key in plan.dtypes]
    out = sum(numel * plan.dtypes[key].itemsize for plan in plans)
    sliced = all(graph.is_elementwise(plan.output.node, key) for plan in plans)
    floats = 0 if sliced else (len(models) + len(graph.nodes) + 1) * numel * 4
    return stored, out, floats
