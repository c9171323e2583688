"""Write a sharded safetensors checkpoint whose layout is fixed before the first tensor is computed.

Because every output shape and dtype is known from the plan, each shard's header is written up front
and its file preallocated; a tensor is written at its offset the moment it exists, so memory never
holds a shard. Everything goes to ``OUT.partial/``, which becomes ``OUT`` by one rename at the end:
an ``OUT`` that exists is always complete.

A journal in ``OUT.partial/`` lists the tensors whose bytes are on disk (fsynced), under the identity
of the run (recipe, inputs, layout). After a crash, ``resume`` reopens the shards and skips them; the
finished files are byte-identical to those of a run that never stopped. ``OUT.lock`` beside the
output keeps two runs from writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from mergebench.errors import MergebenchError
from mergebench.io.output_guard import MANIFEST_NAME, check_may_replace, check_scratch, write_manifest
from mergebench.io.safetensors_format import encode_header

INDEX_NAME = "model.safetensors.index.json"
JOURNAL_NAME = ".mergebench-journal"
# fsync and journal at least every this many bytes (MERGEBENCH_SYNC_BYTES overrides: smaller loses less on a crash)
JOURNAL_EVERY_BYTES = int(os.environ.get("MERGEBENCH_SYNC_BYTES", 256 * 2**20))


class OutputError(MergebenchError):
    """The output could not be written (disk full, permissions); the partial output is kept for --resume."""


class Writer(Protocol):
    """An output being written: a checkpoint folder (``CheckpointWriter``) or an artifact file
    (``ArtifactWriter``); the Ray executor's tasks write through the same classes.

    ``write`` puts one finished tensor; ``finish_weights`` makes the weights complete on disk;
    ``prepare`` does everything a commit does short of making the output visible, ``commit(replace)``
    makes it visible in one rename (replacing an earlier mergebench output only when ``replace``).
    Stopping early: ``close`` keeps whatever a ``--resume`` can use (a checkpoint's journalled shards;
    an artifact has nothing to resume, so its scratch file goes), ``abort`` removes everything the run
    wrote. ``done`` holds the keys already on disk from an interrupted run.
    """

    done: set[str] | frozenset[str]

    def write(self, key: str, tensor: torch.Tensor) -> int: ...

    def finish_weights(self) -> None: ...

    def prepare(self) -> None: ...

    def commit(self, replace: bool) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class PlannedTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], shard_size: int) -> list[Shard]:
    """Fill shards in order, starting a new one when the next tensor would overflow (as transformers does)."""
    shards: list[Shard] = [Shard("")]
    for tensor in tensors:
        if shards[-1].tensors and shards[-1].nbytes + tensor.nbytes > shard_size:
            shards.append(Shard(""))
        shards[-1].tensors.append(tensor)
    if len(shards) == 1:
        shards[0].name = "model.safetensors"
    else:
        for i, shard in enumerate(shards, 1):
            shard.name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
    return shards


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class CheckpointWriter:
    """Preallocated shards in ``OUT.partial``; ``write`` puts a tensor at its planned offset.

    ``identity`` names the run (recipe, inputs, layout); ``resume`` continues a partial output of the
    same identity, and ``done`` then holds the tensors already on disk.
    """

    def __init__(self, out: Path, tensors: list[PlannedTensor], shard_size: int, metadata: dict[str, str],
                 identity: str = "", resume: bool = False, inputs: dict[str, list[int]] | None = None):
        check_scratch(partial_path(out), (JOURNAL_NAME, MANIFEST_NAME))
        self.out = out
        self.metadata = metadata
        self._prepared = False
        self.partial = partial_path(out)
        self.shards = plan_shards(tensors, shard_size)
        self.identity = identity
        self.inputs = inputs or {}
        self.done: set[str] = set()
        self._where: dict[str, tuple[int, int, PlannedTensor]] = {}
        self._fds: list[int] = []
        self._unsynced: list[str] = []
        self._unsynced_bytes = 0
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebench-fsync")
        self._syncing: Future[None] | None = None  # the fsync of earlier writes, while later ones go on
        try:
            reopened = False
            if resume and (self.partial / JOURNAL_NAME).exists():
                self.done = self._read_journal()
                reopened = self._reopen_shards(metadata)
            if not reopened:
                if self.partial.exists():
                    shutil.rmtree(self.partial)
                self.partial.mkdir(parents=True)
                # the journal first: a partial folder of ours always holds it (check_scratch relies on that)
                self._append_journal({"identity": identity, "inputs": self.inputs})
                self._open_shards(metadata, fresh=True)
        except OSError as exc:
            raise _output_error(self.partial, exc) from None

    def _reopen_shards(self, metadata: dict[str, str]) -> bool:
        """Open the shards of an interrupted run; False when none was written yet and they are not all there
        (a kill may come between the journal and the shards): the run then starts afresh."""
        try:
            self._open_shards(metadata, fresh=False)
        except MergebenchError:
            if self.done:
                raise
            self._close_files()
            self._where.clear()
            return False
        return True

    def _open_shards(self, metadata: dict[str, str], fresh: bool) -> None:
        for shard in self.shards:
            header = encode_header([(t.key, t.dtype, t.shape) for t in shard.tensors], metadata)
            path = self.partial / shard.name
            if not fresh and not path.exists():
                raise MergebenchError(f"{path}: missing from the partial output; rerun without --resume")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fresh else os.O_RDWR, 0o644)
            self._fds.append(fd)
            if fresh:
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, len(header) + shard.nbytes)
            elif os.fstat(fd).st_size != len(header) + shard.nbytes or os.pread(fd, len(header), 0) != header:
                raise MergebenchError(f"{path}: does not match the planned layout; rerun without --resume")
            offset = len(header)
            for t in shard.tensors:
                self._where[t.key] = (fd, offset, t)
                offset += t.nbytes

    def _read_journal(self) -> set[str]:
        lines = (self.partial / JOURNAL_NAME).read_text().splitlines()
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by the crash: everything after it was never confirmed
        if not entries or entries[0].get("identity") != self.identity:
            raise MergebenchError(f"{self.partial}: was written by a different recipe or from different inputs; "
                                  f"cannot resume (rerun without --resume to start over)")
        journalled = entries[0].get("inputs", {})
        for file, state in self.inputs.items():
            if journalled.get(file) != state:
                change = "is new" if file not in journalled else _what_changed(journalled[file], state)
                raise MergebenchError(f"{file}: {change} since the interrupted run began, so the tensors it wrote "
                                      f"may be stale; cannot resume (rerun without --resume to start over)")
        return {key for entry in entries[1:] for key in entry.get("done", [])}

    def _append_journal(self, entry: dict) -> None:
        fd = os.open(self.partial / JOURNAL_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, key: str, tensor: torch.Tensor) -> int:
        """Write one finished tensor (on the CPU, planned dtype and shape); returns the bytes written."""
        fd, offset, planned = self._where[key]
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"'{key}': produced {tensor.dtype} {tuple(tensor.shape)}, planned {planned}")
        data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            raise _output_error(self.partial, exc) from None
        self._unsynced.append(key)
        self._unsynced_bytes += done
        if self._unsynced_bytes >= JOURNAL_EVERY_BYTES:
            self._wait_for_sync()  # one fsync at a time: writes never run more than twice the bytes ahead
            self._syncing = self._syncer.submit(self._make_durable, self._take_unsynced())
        return done

    def sync(self) -> None:
        """Make every written tensor durable, then record it in the journal."""
        self._wait_for_sync()
        self._make_durable(self._take_unsynced())

    def _take_unsynced(self) -> list[str]:
        keys, self._unsynced, self._unsynced_bytes = self._unsynced, [], 0
        return keys

    def _make_durable(self, keys: list[str]) -> None:
        """fsync the shards (every write so far, ``keys`` included), then journal ``keys``.

        Runs beside the writes that follow, so the disk's latency does not stall them.
        """
        if not keys:
            return
        try:
            for fd in self._fds:
                os.fsync(fd)
            self._append_journal({"done": keys})
        except OSError as exc:
            raise _output_error(self.partial, exc) from None
        self.done.update(keys)

    def _wait_for_sync(self) -> None:
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def finish_weights(self) -> None:
        """fsync every shard and write the index (only when there are several shards, as HF does)."""
        self.sync()
        self._close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.key: s.name for s in self.shards for t in s.tensors},
            }
            (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def prepare(self) -> None:
        """Write the manifest and make every file durable: all that a commit does short of its rename.

        A run with several outputs prepares them all before it renames any, so that an interruption
        rarely falls between two renames (each output still appears whole or not at all)."""
        try:
            write_manifest(self.partial, f"mergebench {self.metadata.get('mergebench_version', '')}".strip(),
                           self.identity, exclude={JOURNAL_NAME})
            _fsync_tree(self.partial)
        except OSError as exc:
            raise _output_error(self.partial, exc) from None
        self._prepared = True

    def commit(self, replace: bool) -> None:
        """Make the output visible in one rename; an older ``OUT`` is replaced only with ``replace``."""
        if not self._prepared:
            self.prepare()
        try:
            (self.partial / JOURNAL_NAME).unlink(missing_ok=True)
            if os.path.lexists(self.out):
                check_may_replace(self.out, replace, artifact=False)
                old = _unused_name(self.out, ".old")
                os.replace(self.out, old)
                shutil.rmtree(old)
            os.replace(self.partial, self.out)
            _fsync_dir(self.out.parent)
        except OSError as exc:
            raise _output_error(self.out, exc) from None

    def _close(self) -> None:
        with contextlib.suppress(OutputError):  # raised already, or the run is stopping for another reason
            self._wait_for_sync()  # its file descriptors must stay open until it is done
        self._syncer.shutdown()
        self._close_files()

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        """Remove the partial output (the run failed on its inputs: nothing to resume)."""
        self._close()
        shutil.rmtree(self.partial, ignore_errors=True)

    def close(self) -> None:
        """Leave the partial output for --resume (the run stopped on a write error or an interrupt)."""
        self._close()


def _what_changed(before: list[int], now: list[int]) -> str:
    fields = ("device", "inode (the file was replaced)", "size", "modification time", "change time (it was "
              "written to)")
    return "changed: its " + ", ".join(name for name, a, b in zip(fields, before, now) if a != b)


def _unused_name(path: Path, suffix: str) -> Path:
    """A sibling name that nothing uses yet (``OUT.old``, else ``OUT.old-1``, ...): never a user's file."""
    candidate, n = path.with_name(path.name + suffix), 0
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}{suffix}-{n}")
    return candidate


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"{path}: cannot write ({reason}); anything already written is kept: fix the cause and "
                       f"rerun with --resume")


class OutputLock:
    """An exclusive lock on ``OUT.lock`` for the duration of a run; a second run fails at once."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise MergebenchError(f"{self.path}: another mergebench run is writing this output") from None
                if _same_file(fd, self.path):  # not unlinked by a run that finished meanwhile
                    self._fd = fd
                    return self
                os.close(fd)
        except OSError as exc:
            raise _output_error(self.path.parent, exc) from None

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
