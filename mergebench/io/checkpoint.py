"""Lazy checkpoints: headers are read when a model is opened, a tensor's bytes only when it is asked for.

A *source* is anything with ordered ``keys``, ``info(key)`` and ``read(key)``: a safetensors file, a
Hugging Face folder (single file or sharded index), or a state dict held in memory (the eager API).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from mergebench.errors import MergebenchError
from mergebench.io.safetensors_format import TensorInfo, tensor_info
from mergebench.io.weight_files import indexed_files, pickled_files, stored_tensors, weight_files
from mergebench.value_types import CHECKPOINT

MADV_POPULATE_READ = 22  # Linux 5.14+: map a range's cached pages now (not in the mmap module's constants)
MADV_DONTNEED = 4
WHOLE_MAPPING_BYTES = 64 * 2**20  # a larger tensor's pages come in as it is read, and go behind its readers
FINGERPRINT_SAMPLES = 64
FINGERPRINT_SAMPLE_BYTES = 4096
FINGERPRINT_HEAD_BYTES = 65536
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class MappedPages:
    """The pages of one large mapped input, which its reader faults in and lets go of a window at a time
    (``read_window``)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def _page(self, address: int) -> int:
        return self.start + min(address - self.start, self.end - self.start) // mmap.PAGESIZE * mmap.PAGESIZE

    def window(self, consumed: int, ahead: int) -> None:
        """Let go of the pages before ``consumed``, fault in those up to ``ahead`` (interpreter lock released)."""
        behind, front = self._page(consumed), self._page(ahead + mmap.PAGESIZE - 1)
        if behind > self.start:
            _LIBC.madvise(self.start, behind - self.start, MADV_DONTNEED)
        if front > behind:
            _populate(behind, front - behind)


def read_window(tensor: torch.Tensor, consumed: int, ahead: int) -> None:
    """For a large mapped input (a tensor ``Checkpoint.map`` returned) read slice by slice: let go of its pages
    before byte ``consumed`` — they leave the process's memory, stay in the page cache, and come back unchanged
    from the file if touched again — and fault in those up to byte ``ahead`` in one call. Any other tensor is
    left alone. The tensor holds its mapping, so the pages cannot belong to anything else meanwhile."""
    pages = getattr(tensor, "mapped_pages", None)
    if pages is not None:
        pages.window(tensor.data_ptr() + consumed, tensor.data_ptr() + ahead)


def _populate(address: int, length: int) -> int:
    """madvise(MADV_POPULATE_READ) through ctypes, which lets go of the interpreter lock meanwhile: the mmap
    module's own ``madvise`` holds it, so the compute threads stood still while a cold key was read from disk
    (the first pass over inputs larger than the page cache ran at compute time plus read time)."""
    return _LIBC.madvise(address, length, MADV_POPULATE_READ) if sys.platform == "linux" else -1


class Source(Protocol):
    """What the engine, the CLI and the analyses know of an input, whatever its kind.

    ``label`` names it in messages; ``folder`` is the model folder its companion files and tokenizer
    come from (None for a single file or memory); ``value_type`` is ``Checkpoint`` or an artifact's
    type; ``fingerprint()`` identifies its content cheaply (None in memory) and ``file_states()`` the
    files it reads (for descriptors and for what a resume may trust).
    """

    label: str
    folder: Path | None
    value_type: str

    @property
    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def read(self, key: str) -> torch.Tensor: ...

    def fingerprint(self) -> str | None: ...

    def file_states(self) -> dict[str, list[int]]: ...


class OneFileIdentity:
    """``fingerprint``, ``file_states`` and ``total_bytes`` of a source stored in the one file ``self.path``."""

    path: Path

    def fingerprint(self) -> str:
        return sampled_fingerprint([self.path])

    def file_states(self) -> dict[str, list[int]]:
        return file_states([self.path])

    @property
    def total_bytes(self) -> int:
        return self.path.stat().st_size


class InnerIdentity:
    """The same for a view of another source (``self.inner``): its files are the view's."""

    inner: Source

    def fingerprint(self) -> str | None:
        return self.inner.fingerprint()

    def file_states(self) -> dict[str, list[int]]:
        return self.inner.file_states()

    @property
    def total_bytes(self) -> int:
        return self.inner.total_bytes


class Checkpoint:
    """A safetensors checkpoint on disk; opening it reads and validates headers only.

    ``keys`` are in storage order (shard by shard, offset by offset) so that a pass over them reads
    every file sequentially. ``reads`` counts tensor reads per key, which tests use to prove each
    input tensor is read once.
    """

    mappable = True  # ``read`` into a caller's buffer and ``map`` in place: the executor's pooled reads

    def __init__(self, path: str | os.PathLike[str]):
        self._fds: dict[Path, int] = {}
        self._fingerprint: str | None = None
        self.path = Path(path)
        self.label = str(path)
        self.folder = self.path if self.path.is_dir() else None
        self.value_type = CHECKPOINT
        self._files = weight_files(self.path)
        self._infos = {key: tensor_info(stored) for key, stored in stored_tensors(self.path, self._files).items()}
        self._keys = list(self._infos)
        self.reads: Counter[str] = Counter()

    @property
    def keys(self) -> list[str]:
        return self._keys

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def read(self, key: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in its stored dtype, in ``buffer`` (uint8, its size in bytes) or a fresh one (pread, no mmap)."""
        info = self._infos[key]
        self.reads[key] += 1
        if buffer is None:
            buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            _pread_into(self._fd(info.file), buffer.numpy(), info.offset, info.file)
        return buffer.view(info.dtype).reshape(info.shape)

    def map(self, key: str) -> torch.Tensor:
        """The tensor in its stored dtype, seen in place in the file's cached pages (no copy).

        Copying a model out of the page cache costs a CPU core about a second per 5 GB; mapping the
        same pages costs a tenth of that. The mapping is private (a write to the tensor copies the
        page, the file never changes) and is unmapped when the tensor is freed: hold it no longer
        than the key, since the file must not shrink while it is mapped.
        """
        info = self._infos[key]
        if not info.nbytes:
            return self.read(key)
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < info.offset + info.nbytes:
            raise _ended_early(info.file)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        try:
            pages = mmap.mmap(fd, info.offset + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError:  # a file system that cannot map files
            return self.read(key)
        self.reads[key] += 1
        data = torch.frombuffer(pages, dtype=torch.uint8, offset=info.offset - start, count=info.nbytes)
        address = data.data_ptr() - (info.offset - start)
        tensor = data.view(info.dtype).reshape(info.shape)
        if len(pages) > WHOLE_MAPPING_BYTES and sys.platform == "linux":
            pages.madvise(mmap.MADV_WILLNEED)  # read ahead in the kernel; its readers fault pages in as they go
            tensor.mapped_pages = MappedPages(address, address + len(pages))
        elif _populate(address, len(pages)) != 0:  # fault the pages in, here
            pages.madvise(mmap.MADV_WILLNEED)  # an older kernel: at least start reading ahead
        return tensor

    def fingerprint(self) -> str:
        """sha256 over every shard's header, size and sampled data (see ``sampled_fingerprint``); computed once."""
        if self._fingerprint is None:
            self._fingerprint = sampled_fingerprint([file for file, _ in self._files])
        return self._fingerprint

    def file_states(self) -> dict[str, list[int]]:
        return file_states([file for file, _ in self._files])

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._infos.values())

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


DESCRIPTOR_MARGIN = 64  # for the outputs' shards, journals, the interpreter and libraries


def reserve_descriptors(files: int) -> None:
    """Make sure a run may hold every input file open at once (each source keeps its shards open).

    Raises the soft RLIMIT_NOFILE up to the hard limit when needed; past that, one error that says
    how many descriptors the run needs instead of a failure halfway through.
    """
    import resource

    needed = files + DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise MergebenchError(f"the inputs are {files} weight files, and a run keeps each open: it needs about {needed} "
                          f"file descriptors, but this process may open only {hard} (raise it with ulimit -n)")


def file_states(files: list[Path]) -> dict[str, list[int]]:
    """(device, inode, size, mtime_ns, ctime_ns) of each file: what a resume checks before trusting a journal.

    The kernel sets ctime on every write and no user call can set it back, so a file rewritten in
    place, even to the same size with its mtime restored, shows a new ctime; a file replaced by
    another shows a new inode. Unlike a hash of every tensor, this costs nothing on the hot path.
    """
    states = {}
    for file in files:
        info = file.stat()
        states[str(file)] = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    return states


def sampled_fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size, first 64 KiB (the header) and 64 samples of 4 KiB of its data.

    Fine-tunes of one model share headers byte for byte, so the header alone cannot tell them apart;
    sampled data does, without reading gigabytes to fill a model card or check a resume.
    """
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with open(file, "rb") as f:
            digest.update(f.read(FINGERPRINT_HEAD_BYTES))
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(size * i // FINGERPRINT_SAMPLES)
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def _pread_into(fd: int, buffer, offset: int, file: Path) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise _ended_early(file)
        done += n


class StateDictSource:
    """A state dict in memory seen as a source, so the eager API runs through the same executor."""

    folder: Path | None = None
    value_type = CHECKPOINT

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str):
        self.label = label
        self._tensors = dict(tensors)
        for key, value in self._tensors.items():
            if not isinstance(value, torch.Tensor):
                raise MergebenchError(f"{label}: value of '{key}' is a {type(value).__name__}, not a tensor")

    @property
    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(key, t.dtype, tuple(t.shape), None, 0, t.numel() * t.element_size())

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def fingerprint(self) -> str | None:
        return None  # in memory: nothing on disk to identify

    def file_states(self) -> dict[str, list[int]]:
        return {}


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the unpickler refuses is a bad input, not a bug
        raise MergebenchError(f"{file}: refused by torch.load(weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MergebenchError(f"{file}: not a state dict of tensors")
    return state


class PickledCheckpoint(StateDictSource):
    """Pickled PyTorch weights (``.bin``/``.pt``), only with ``--allow-pickle``.

    They load through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers, memory-mapped where the file format allows so a shard is not read whole.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.folder = self.path if self.path.is_dir() else None
        if self.path.is_dir():
            indexes = sorted(self.path.glob("*.bin.index.json"))
            files = [f for f, _ in indexed_files(indexes[0])] if indexes else pickled_files(self.path)
        else:
            files = [self.path]
        if not files:
            raise MergebenchError(f"{self.path}: no pickled weights found")
        self._files = files
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(_load_pickle(file))
        super().__init__(tensors, str(path))
        self.reads: Counter[str] = Counter()

    def read(self, key: str) -> torch.Tensor:
        self.reads[key] += 1
        return super().read(key).contiguous()

    def fingerprint(self) -> str:
        return sampled_fingerprint(self._files)

    def file_states(self) -> dict[str, list[int]]:
        return file_states(self._files)

    @property
    def total_bytes(self) -> int:
        return sum(self.info(k).nbytes for k in self._tensors)


def _ended_early(file: Path) -> MergebenchError:
    return MergebenchError(f"{file}: file ended early (truncated?)")
