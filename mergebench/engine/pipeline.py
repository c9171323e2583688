"""The threads of a pass: read ahead, compute keys side by side, write behind.

One thread reads the next keys (``PREFETCH_KEYS``) while ``COMPUTE_THREADS`` keys are computed side
by side, and a writer thread puts finished keys on disk while the next ones compute; at most
``WRITES_IN_FLIGHT`` finished keys wait for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, Protocol, TypeVar

import torch

from mergebench.engine.buffers import BufferPool
from mergebench.engine.graph import Graph
from mergebench.engine.staging import start_compute_thread

PREFETCH_KEYS = 1  # keys read ahead of the one being computed: overlap without doubling memory twice
WRITES_IN_FLIGHT = 2  # finished tensors waiting for the writer thread: with one, handing over a key often waited
COMPUTE_THREADS = 2  # keys computed side by side on the CPU: each holds its inputs and outputs in memory
GPU_COMPUTE_THREADS = 4  # on a GPU: more keys' host work (DARE's draws) overlaps the copies and kernels

Result = TypeVar("Result")
Value = Any  # a tensor, or a list of tensors for list-valued nodes


class Sink(Protocol):
    def write(self, key: str, value: Value) -> int: ...


class DictSink:
    """A sink keeping every key's value in memory (an eager call, a sweep point scored without writing)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def write(self, key: str, value: Value) -> int:
        self.values[key] = value
        return sum(v.nbytes for v in value) if isinstance(value, list) else value.nbytes


def compute_threads(device: torch.device) -> int:
    """Keys computed at once: one per thread torch may use, at most ``COMPUTE_THREADS`` (``GPU_COMPUTE_THREADS``).

    torch's thread count is the core budget: all cores by default, what ``OMP_NUM_THREADS`` says
    otherwise (Ray sets it to a task's CPUs). On a GPU each thread queues its key on a stream of its
    own, so one key's copies and host work (DARE's draws) overlap the others' kernels.
    """
    most = COMPUTE_THREADS if device.type == "cpu" else GPU_COMPUTE_THREADS
    return max(1, min(most, torch.get_num_threads()))


def side_by_side(items: Iterable[tuple[str, dict[str, torch.Tensor]]],
                  work: Callable[[str, dict[str, torch.Tensor]], Result], device: torch.device,
                  workers: int) -> Iterator[tuple[str, Result]]:
    """(key, work(key, raw)) for each (key, raw) of ``items``, up to ``workers`` keys at once, as each is done.

    A key done before an older one is handed on at once, and the thread that computed it takes the
    next: an embedding matrix, many times the size of the keys after it, would otherwise leave the
    other threads idle until it is done. Keys are written at their planned offsets, in any order.

    ``items`` is closed when this ends, however it ends: a read-ahead generator left suspended after an
    error would otherwise be finalised by the garbage collector in whatever thread happens to run it,
    and its thread pool's shutdown there can deadlock a thread that is starting.
    """
    try:
        with _ComputePool(workers, device) as computing:
            in_flight: dict[Future[Result], str] = {}
            for key, raw in items:
                in_flight[computing.submit(work, key, raw)] = key
                del raw  # the worker holds it until the key is done
                if len(in_flight) >= workers:
                    done = next(as_completed(in_flight))
                    yield in_flight.pop(done), done.result()
            for done in as_completed(list(in_flight)):
                yield in_flight.pop(done), done.result()
    finally:
        if isinstance(items, Generator):
            items.close()


def _start_compute_thread(workers: int, device: torch.device) -> None:
    if workers > 1:
        torch.set_num_threads(1)
    start_compute_thread(device)


class _ComputePool(ThreadPoolExecutor):
    """Threads that compute whole keys side by side, each with one intra-op torch thread when there are several.

    Slices are too small for torch's thread pool to pay off, and a key's sweeps run in order
    (random draws continue from slice to slice), so cores are used by computing several keys at
    once; torch releases the interpreter lock inside its kernels. A single worker keeps torch's
    threads for what it computes whole. On a GPU each thread has a stream of its own (``staging``).
    """

    def __init__(self, workers: int, device: torch.device):
        self.threads = torch.get_num_threads()
        super().__init__(max_workers=workers, thread_name_prefix="mergebench-compute",
                         initializer=_start_compute_thread, initargs=(workers, device))

    def __exit__(self, *exc_info: object) -> bool | None:
        self.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.threads)  # where torch's thread count is process-wide, not per thread
        return None


class WriteBehind:
    """Sink writes in one background thread, so writing a key overlaps computing the next.

    At most ``WRITES_IN_FLIGHT`` tensors wait (their memory is the price of the overlap); a write
    error surfaces at the next submission or when the block ends. One thread keeps each sink's
    writes in submission order, which the journal of a resumable run relies on.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-write")
        self.in_flight: deque[Future[int]] = deque()
        self.bytes_written = 0

    def __enter__(self) -> WriteBehind:
        return self

    def submit(self, sink: Sink, key: str, value: Value) -> None:
        while len(self.in_flight) >= WRITES_IN_FLIGHT:
            self.bytes_written += self.in_flight.popleft().result()
        self.in_flight.append(self.pool.submit(sink.write, key, value))

    def after_writes(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the writer thread once every write submitted so far is done."""
        self.pool.submit(action)

    def __exit__(self, *exc_info: object) -> None:
        try:
            while self.in_flight:
                future = self.in_flight.popleft()
                if exc_info[0] is None:
                    self.bytes_written += future.result()
                else:
                    future.cancel()
        finally:
            self.pool.shutdown(wait=True)


def prefetch(graph: Graph, keys: list[str], needed: Callable[[str], set[str]], pool: BufferPool | None = None
              ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield each key with its input tensors, read in a background thread a few keys ahead.

    A ``pool`` says the caller keeps no input past its key: files are then seen in place (mapped)
    for the CPU, or read into the pool's pinned buffers for a GPU, which the caller gives back.
    """

    def read_one(source: Any, key: str) -> torch.Tensor:
        if pool is None or not getattr(source, "mappable", False):
            return source.read(key)
        if pool.pinned:  # a GPU copies from page-locked memory asynchronously
            return source.read(key, pool.take(source.info(key).nbytes))
        return source.map(key)

    def read(key: str) -> dict[str, torch.Tensor]:
        sources = graph.sources
        return {model: read_one(sources[model], key) for model in sorted(needed(key)) if key in sources[model].keys}

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-read") as reader:
        pending: deque = deque()
        upcoming = iter(keys)
        for key in upcoming:
            pending.append((key, reader.submit(read, key)))
            if len(pending) >= PREFETCH_KEYS:
                break
        while pending:
            key, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, reader.submit(read, following)))
            yield key, future.result()


def give_back(pool: BufferPool | None, values: Iterable[Any]) -> None:
    """Return the pooled buffers among ``values`` (an adapter's low-rank update holds none)."""
    if pool is not None:
        for value in values:
            if isinstance(value, torch.Tensor):
                pool.give(value)
