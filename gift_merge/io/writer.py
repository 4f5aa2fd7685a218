"""Streaming, size-capped safetensors output with an all-or-nothing folder.

Every output tensor's name, shape and dtype are known from the plan before any tensor is computed, so
each shard's header can be written up front and each tensor's bytes go straight to their final offset
(``os.pwrite``) as soon as they exist, block by block as the engine computes them (:class:`TensorSink`).
Nothing is buffered: no output tensor, let alone a shard, is ever whole in memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gift_merge.dtypes import DType, of
from gift_merge.errors import GiftMergeError
from gift_merge.io.finite import NonFinite, count_nonfinite
from gift_merge.io.locks import output_lock, remove_leftovers
from gift_merge.io.reader import INDEX_NAME, SINGLE_NAME
from gift_merge.lazy import torch

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext

log = logging.getLogger("gift_merge")


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will receive: its final name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class _Slot:
    file: str
    offset: int  # absolute offset of the tensor's bytes in the file
    tensor: OutputTensor


def shard_groups(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """The output's shards: tensors in plan order, a new shard wherever the next would pass the size cap.
    A pure function of the plan and the cap, so every part of a split merge agrees (:mod:`gift_merge.parts`)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def header_bytes(group: Sequence[OutputTensor]) -> tuple[bytes, list[int]]:
    """A shard's safetensors header (padded as the format asks) and each tensor's offset after it."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    starts, pos = [], 0
    for t in group:
        header[t.name] = {
            "dtype": t.dtype.code,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        starts.append(pos)
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw, starts


class TensorSink:
    """One output tensor's bytes arriving in blocks of entries, in any order, each written at its final
    offset and counted for NaN/±inf; :meth:`close` checks that every byte arrived."""

    def __init__(self, writer: ShardedWriter, name: str) -> None:
        self.writer = writer
        self.name = name
        self.tensor = writer._slots[name].tensor
        self.received = 0
        self.nan = self.inf = 0

    def write(self, start: int, values: torch.Tensor | np.ndarray) -> None:
        """Entries ``start …`` of the flat tensor, as stored bits (numpy: bf16 as uint16) or a tensor of the
        planned dtype."""
        expected = self.tensor.dtype
        if isinstance(values, np.ndarray):
            dtype_ok = values.dtype == expected.storage
            data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
        else:
            dtype_ok = of(values.dtype) == expected
            data = values.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if not dtype_ok:
            raise GiftMergeError(f"tensor {self.name}: computed {values.dtype}, planned {expected}")
        if start * expected.itemsize + data.size > self.tensor.nbytes:
            raise GiftMergeError(f"tensor {self.name}: entries past its planned shape {self.tensor.shape}")
        counts = count_nonfinite(data, expected)
        if counts is not None:
            self.nan += counts.nan
            self.inf += counts.inf
        self.writer._put(self.name, data, start * expected.itemsize)
        self.received += data.size

    def close(self) -> None:
        if self.received != self.tensor.nbytes:
            raise GiftMergeError(f"tensor {self.name}: {self.received} of its {self.tensor.nbytes} bytes were computed")
        self.writer.finished(self.name, NonFinite(self.nan, self.inf) if self.nan or self.inf else None)


class ShardedWriter:
    """Writes a planned set of tensors into ``folder`` as sharded safetensors plus an index."""

    def __init__(self, folder: Path, tensors: Sequence[OutputTensor], max_shard_bytes: int) -> None:
        self.folder = folder
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise GiftMergeError("output plan names a tensor twice")
        groups = shard_groups(tensors, max_shard_bytes)
        count = len(groups)
        self.files = [
            SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self._slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        self._file_locks: dict[str, AbstractContextManager[Any]] = {}
        self._pending = set(names)
        self._lock = threading.Lock()
        self.nonfinite: dict[str, NonFinite] = {}  # tensors written with NaN or ±inf
        for file, group in zip(self.files, groups, strict=True):
            head, starts = header_bytes(group)
            try:
                fd = os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[file] = fd
                self._file_locks[file] = threading.Lock()
                os.pwrite(fd, head, 0)
                os.ftruncate(fd, len(head) + sum(t.nbytes for t in group))
            except OSError as exc:
                self.abort()
                raise GiftMergeError(f"{folder / file}: cannot write the shard's header ({exc.strerror})") from exc
            for t, start in zip(group, starts, strict=True):
                self._slots[t.name] = _Slot(file, len(head) + start, t)
        self.total_size = sum(t.nbytes for t in tensors)

    def write(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """Put one finished tensor's bytes at its place; thread-safe, any order.

        A numpy array holds the planned dtype's bits (see :attr:`DType.storage`): bf16 as uint16.
        """
        expected = self._slots[name].tensor
        if tuple(tensor.shape) != expected.shape:
            raise GiftMergeError(f"tensor {name}: computed {tuple(tensor.shape)}, planned {expected.shape}")
        sink = self.sink(name)
        sink.write(0, tensor)
        sink.close()

    def sink(self, name: str) -> TensorSink:
        """Where one tensor's bytes go block by block, each at its final offset: the engine writes an output
        tensor as its method computes it, so no output tensor is ever whole in memory."""
        return TensorSink(self, name)

    def _put(self, name: str, data: np.ndarray, start: int) -> None:
        """Write ``data`` (bytes) at byte ``start`` of tensor ``name``'s place.

        One writer at a time per shard: the filesystem serialises writes to one file anyway (ext4 holds the
        inode's lock), and a second writer would spin on that lock in the kernel, taking a core from the
        workers that compute. A thread waiting here sleeps instead.
        """
        slot = self._slots[name]
        written = 0
        view = memoryview(data)  # type: ignore[arg-type]  # numpy arrays are buffers
        try:
            with self._file_locks[slot.file]:
                while written < len(view):
                    written += os.pwrite(self._fds[slot.file], view[written:], slot.offset + start + written)
        except OSError as exc:  # disk full, quota, I/O error: name the file and the tensor
            raise GiftMergeError(f"{self.folder / slot.file}: cannot write tensor {name} ({exc.strerror})") from exc

    def share_with_processes(self, context: BaseContext) -> None:
        """Make the one-writer-per-shard rule hold across the worker processes ``context`` will start (call
        before they start): forked workers write into the same open shards."""
        self._file_locks = {file: context.Lock() for file in self._file_locks}

    def finished(self, name: str, counts: NonFinite | None) -> None:
        """Record that every byte of tensor ``name`` was written, with its NaN/±inf ``counts`` (None: none).

        A worker process's writer is a copy, so the executor records there what each worker reports.
        """
        with self._lock:
            self._pending.discard(name)
            if counts is not None:
                self.nonfinite[name] = counts

    def close(self) -> None:
        """Close the shards and write the index; refuses if any planned tensor is missing."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._pending:
            raise GiftMergeError(f"tensor {sorted(self._pending)[0]} was planned but never written")
        if len(self.files) > 1:
            weight_map = {name: slot.file for name, slot in self._slots.items()}
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@contextmanager
def atomic_output_folder(destination: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``destination``; rename it into place only on success.

    On any error or Ctrl-C the temporary folder is removed and ``destination`` is left as it was, so a
    folder at the destination always holds a complete merge.
    """
    destination = destination.resolve()
    with output_lock(destination):
        check_output_free(destination, overwrite=overwrite)
        destination.parent.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(destination):
            log.info("removed %s, left by a run that no longer exists", leftover)
        tmp = destination.parent / f".{destination.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = destination.parent / f".{destination.name}.old-{os.getpid()}"
        if destination.exists():
            destination.rename(old)
        tmp.rename(destination)
        shutil.rmtree(old, ignore_errors=True)


def check_output_free(destination: Path, *, overwrite: bool) -> None:
    """Fail early (before planning reads anything) when the output folder may not be replaced."""
    destination = destination.resolve()
    if destination.exists() and not destination.is_dir():
        raise GiftMergeError(f"{destination}: exists and is not a folder")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise GiftMergeError(f"{destination}: folder exists and is not empty (pass --overwrite to replace it)")
