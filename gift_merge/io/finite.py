"""Counting NaN and ±inf in a tensor's stored bits: every output tensor the writer receives, and every
input tensor a merge reads (:class:`InputWatch`, fed by the checkpoint reader).

A NaN in one input tensor used to merge silently into an all-NaN output tensor, and a finite fp32
result that overflows fp16 becomes inf without a word. The output's count cannot say which model is
damaged, and it misses what never reaches the output (rows a vocabulary trim drops), so the inputs are
counted too. Reading the bits (an all-ones exponent) works for every float format the reader and the
writer meet, bf16 included, without converting anything, on blocks small enough to stay in cache.

Nearly every block is all finite, so a block is first tested with two read-only reductions that write
nothing: a non-finite value with its sign bit clear is at least the exponent mask as a *signed* integer,
and one with its sign bit set is at least sign|exponent as an *unsigned* integer. Only a block that fails
the test is counted exactly. On a 2-core EPYC the test costs about 0.1 ns per bf16 entry, close to the
cost of reading the memory at all (benchmarks/count_nonfinite.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gift_merge.dtypes import DType
from gift_merge.errors import GiftMergeError

log = logging.getLogger("gift_merge")
SHOWN = 5  # tensors named one per line in a warning; the rest are counted


@dataclass(frozen=True)
class _Format:
    """The bit layout of one IEEE-style format: integer views of its width, and its field masks."""

    unsigned: np.dtype
    signed: np.dtype
    exponent: int
    mantissa: int
    sign: int


_FORMATS: dict[str, _Format] = {
    "F64": _Format(np.dtype(np.uint64), np.dtype(np.int64), 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 1 << 63),
    "F32": _Format(np.dtype(np.uint32), np.dtype(np.int32), 0x7F800000, 0x007FFFFF, 1 << 31),
    "F16": _Format(np.dtype(np.uint16), np.dtype(np.int16), 0x7C00, 0x03FF, 1 << 15),
    "BF16": _Format(np.dtype(np.uint16), np.dtype(np.int16), 0x7F80, 0x007F, 1 << 15),
}
BLOCK = 1 << 18  # entries per pass: the block and its temporaries stay in cache


@dataclass(frozen=True)
class NonFinite:
    nan: int
    inf: int

    def __str__(self) -> str:
        parts = [f"{self.nan} NaN" if self.nan else "", f"{self.inf} ±inf" if self.inf else ""]
        return " and ".join(p for p in parts if p)


def counted(dtype: DType) -> bool:
    """Whether :func:`count_nonfinite` counts ``dtype`` (formats without infinities are not counted)."""
    return dtype.code in _FORMATS


def count_nonfinite(data: np.ndarray, dtype: DType) -> NonFinite | None:
    """NaN and ±inf among ``data`` (the tensor's bytes, any shape, as uint8), or None when all are finite.

    Formats without infinities (integers, fp8 e4m3) are not counted.
    """
    layout = _FORMATS.get(dtype.code)
    if layout is None:
        return None
    bits = data.reshape(-1).view(layout.unsigned)
    signed = bits.view(layout.signed)
    exponent = layout.unsigned.type(layout.exponent)
    mantissa = layout.unsigned.type(layout.mantissa)
    positive_limit = layout.signed.type(layout.exponent)
    negative_limit = layout.unsigned.type(layout.sign | layout.exponent)
    nan = inf = 0
    for start in range(0, bits.size, BLOCK):
        block = bits[start : start + BLOCK]
        if signed[start : start + BLOCK].max() < positive_limit and block.max() < negative_limit:
            continue  # all finite: the usual case, decided without writing a temporary
        special = (block & exponent) == exponent
        count = int(np.count_nonzero(special))
        if count:
            nans = int(np.count_nonzero(block[special] & mantissa))
            nan += nans
            inf += count - nans
    return NonFinite(nan, inf) if nan or inf else None


class InputWatch:
    """NaN and ±inf in the input tensors of one merge, each tensor counted once however often it is read.

    The engines read a large tensor once per block of rows, and several jobs may read one tensor, so the
    watch remembers which (file, tensor) it has counted: each input costs one pass over its bits per run.
    Thread-safe: the executor's workers read concurrently. With ``strict`` the first non-finite input
    raises in the job that read it, so a long merge stops at once rather than at its end.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._claimed: set[tuple[Path, str]] = set()
        self._found: dict[tuple[Path, str], str] = {}
        self._lock = threading.Lock()

    def check(self, file: Path, name: str, dtype: DType, data: np.ndarray) -> None:
        """Count tensor ``name`` of ``file`` (``data``: all its bytes, as uint8) unless counted already."""
        if not counted(dtype):
            return
        key = (file, name)
        with self._lock:
            if key in self._claimed:
                return
            self._claimed.add(key)
        counts = count_nonfinite(data, dtype)
        if counts is None:
            return
        line = f"{file}: tensor {name}: {counts} in the input ({data.size // dtype.itemsize} {dtype} values)"
        if self.strict:
            raise GiftMergeError(f"{line}; nothing was written (--strict)")
        with self._lock:
            self._found[key] = line

    def drain(self) -> dict[tuple[Path, str], str]:
        """The findings since the last drain, removed from this watch: a worker process's watch is a copy,
        and it hands what it found to the executor's watch (:meth:`absorb`) with each finished job."""
        with self._lock:
            found, self._found = self._found, {}
            return found

    def absorb(self, found: Mapping[tuple[Path, str], str]) -> None:
        """Add another watch's findings (see :meth:`drain`)."""
        with self._lock:
            self._claimed.update(found)
            self._found.update(found)

    @property
    def found(self) -> list[str]:
        """One line per input tensor holding NaN or ±inf, naming its file and the counts, in file order."""
        with self._lock:
            return [self._found[key] for key in sorted(self._found, key=lambda key: (str(key[0]), key[1]))]


def report_nonfinite_inputs(lines: list[str]) -> None:
    """Warn about input tensors holding NaN or ±inf (``lines``: :attr:`InputWatch.found`; with ``--strict``
    the watch has raised already).

    Said even when the output is finite (rows a vocabulary trim drops never reach it): the model they
    came from is damaged all the same.
    """
    why = "the model is damaged, whether or not the output shows it (--strict refuses)"
    for line in lines[:SHOWN]:
        log.warning("%s; %s", line, why)
    if len(lines) > SHOWN:
        log.warning("%d more input tensors hold non-finite values", len(lines) - SHOWN)


def report_nonfinite_outputs(found: Mapping[str, NonFinite], dtypes: Mapping[str, DType], *, strict: bool) -> None:
    """Warn about (with ``strict``: refuse) output tensors holding NaN or ±inf, naming them and the count.

    ``found``: the writer's counts by tensor name; ``dtypes``: each output tensor's stored dtype.
    """
    if not found:
        return
    lines = [f"tensor {name}: {counts} in the output ({dtypes[name]})" for name, counts in sorted(found.items())]
    why = "an input tensor holds non-finite values, or the result overflows the output dtype"
    if strict:
        more = f" (and {len(lines) - 1} more tensors)" if len(lines) > 1 else ""
        raise GiftMergeError(f"{lines[0]}{more}: {why}; nothing was written (--strict)")
    for line in lines[:SHOWN]:
        log.warning("%s: %s", line, why)
    if len(lines) > SHOWN:
        log.warning("%d more output tensors hold non-finite values", len(lines) - SHOWN)
