"""What a run holds in memory at its worst moment, estimated from the plan (``mergebench plan``)."""

from __future__ import annotations

from mergebench.engine.graph import Graph
from mergebench.engine.pipeline import COMPUTE_THREADS, PREFETCH_KEYS, WRITES_IN_FLIGHT
from mergebench.engine.slicing import RELEASE_EVERY, SLICE_ELEMENTS
from mergebench.io.checkpoint import WHOLE_MAPPING_BYTES


def peak_memory_estimate(graph: Graph) -> int:
    """Bytes held at the worst moment of a CPU run, keys in storage order: ``COMPUTE_THREADS`` keys computed
    side by side (their stored inputs, outputs and, unless computed in slices, a float32 value per model
    and node), ``PREFETCH_KEYS`` read ahead, and the outputs of the ``WRITES_IN_FLIGHT`` before them
    waiting for the writer.

    Pooled buffers keep the size of the largest tensor they held: one output buffer of the largest size
    is counted on top (xl bench models, linear and global TIES: 0.93 GB estimated beyond the interpreter,
    0.85 and 0.88 GB measured). Tensors a layout makes before they stream (a MoE router run through its
    base model) add what making them holds."""
    preparing = sum(getattr(source, "preparation_bytes", 0) for source in graph.layouts.generated.values())
    return preparing + _streaming_peak(graph)


def _streaming_peak(graph: Graph) -> int:
    held = [_bytes_at(graph, key) for key in graph.keys]
    kept = max((out for _, _, out, _ in held), default=0)  # the pool's largest output buffer
    peaks = []
    for i in range(len(held)):
        computing = sum(stored + out + floats for stored, _, out, floats in held[i:i + COMPUTE_THREADS])
        read_ahead = sum(ahead for _, ahead, _, _ in held[i + COMPUTE_THREADS:i + COMPUTE_THREADS + PREFETCH_KEYS])
        written = sum(out for _, _, out, _ in held[max(0, i - WRITES_IN_FLIGHT):i])
        peaks.append(computing + read_ahead + written)
    return kept + max(peaks, default=0)


def _bytes_at(graph: Graph, key: str) -> tuple[int, int, int, int]:
    """(stored inputs while computed, stored inputs while read ahead, outputs, float32 values) of one key.

    A large mapped input of a key computed in slices holds only a window of slices (its pages come in as
    they are read and go behind them, ``read_window``), and nothing while it waits to be computed."""
    models = [m for m in graph.sources if key in graph.sources[m].keys]
    infos = [graph.sources[m].info(key) for m in models]
    numel = infos[0].numel
    plans = [plan for plan in graph.outputs if key in plan.dtypes]
    out = sum(numel * plan.dtypes[key].itemsize for plan in plans)
    sliced = all(graph.is_elementwise(plan.output.node, key) for plan in plans)
    stored = ahead = 0
    for model, info in zip(models, infos):
        streamed = (sliced and info.nbytes > WHOLE_MAPPING_BYTES
                    and getattr(graph.sources[model], "mappable", False))
        stored += min(info.nbytes, 2 * RELEASE_EVERY * SLICE_ELEMENTS * info.dtype.itemsize) if streamed else \
            info.nbytes
        ahead += 0 if streamed else info.nbytes
    floats = 0 if sliced else (len(models) + len(graph.nodes) + 1) * numel * 4
    return stored, ahead, out, floats
