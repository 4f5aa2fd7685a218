"""The inputs of a vocabulary tensor re-indexed to a merged vocabulary, served as flat slices.

Each input becomes the matrix mergekit builds before the merge method runs (:mod:`gift_merge.vocab` says
where every row comes from: the input's own row, a fill shared by the inputs that lack the token, or for a
padding row the mean of the input's re-indexed token rows), so every method merges re-indexed embeddings
unchanged. Nothing is formed whole: rows are gathered a block at a time (the blocks elementwise methods
read), contiguous runs of the input's own rows with one read each; the padding mean takes a first pass
over the input's token rows, summed in float64 on the host so every backend gets the same bits. A
mean-of-inputs fill adds the inputs' rows in input order from zero and divides once, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from gift_merge.operators.base import Source
from gift_merge.plan import TensorJob
from gift_merge.vocab import FILL_MEAN, FILL_ZERO, OWN_FILL, OWN_PAD_MEAN, RowMap

from .backend import Backend
from .blocks import rows_per_block

if TYPE_CHECKING:
    from .sources import JobInputs

MEAN_ROWS = 256
"""Rows per group of the padding mean's float64 sum (fixed, unlike the blocks methods read)."""


class _Shared:
    """What the re-indexed inputs of one job share: each input's own tensor and the fills."""

    def __init__(self, backend: Backend, own: Sequence[Source[Any]], row_map: RowMap, width: int) -> None:
        self.backend, self.own, self.map, self.width = backend, own, row_map, width

    def rows(self, k: int, start: int, count: int) -> Any:
        """Rows ``start … start+count−1`` of input ``k``'s own tensor, flat."""
        return self.own[k].read(slice(start * self.width, (start + count) * self.width))

    def fill(self, t: int) -> Any | None:
        """The fill of output row ``t`` (``None`` for zeros)."""
        source = int(self.map.fill_from[t])
        if source >= 0:
            return self.rows(source, int(self.map.fill_row[t]), 1)
        if source == FILL_ZERO:
            return None
        assert source == FILL_MEAN
        total, count = None, 0
        for k, column in enumerate(self.map.own):
            if column[t] >= 0:
                row = self.rows(k, int(column[t]), 1)
                total = (self.backend.zeros_like(row) if total is None else total) + row
                count += 1
        assert total is not None, f"row {t}: a mean fill with no input holding the token"
        return total / self.backend.scalar(count, total)


class RemappedSource:
    """Input ``k`` of a job re-indexed to the merged vocabulary: a :class:`Source` of the job's shape."""

    def __init__(self, shared: _Shared, k: int, shape: tuple[int, ...]) -> None:
        self.shared, self.k, self.width = shared, k, shared.width
        self.out_rows = shape[0]
        self.block_rows = rows_per_block(shape)
        self.dtype = str(shared.own[k].read(slice(0, 0)).dtype).removeprefix("torch.")
        self._cached: tuple[int, Any] | None = None
        self._pad_mean: Any = None

    def read(self, part: slice) -> Any:
        start, stop, w, b = part.start or 0, part.stop, self.width, self.block_rows
        if stop <= start:
            return self.shared.backend.empty(0, self.dtype)
        first, last = start // w // b, (stop - 1) // w // b
        if first == last:
            offset = first * b * w
            return self._block(first)[start - offset : stop - offset]
        out = self.shared.backend.empty(stop - start, self.dtype)
        for index in range(first, last + 1):
            lo, hi = max(start, index * b * w), min(stop, (index + 1) * b * w)
            out[lo - start : hi - start] = self._block(index)[lo - index * b * w : hi - index * b * w]
        return out

    def _block(self, index: int) -> Any:
        if self._cached is None or self._cached[0] != index:
            start = index * self.block_rows
            self._cached = (index, self._gather(start, min(start + self.block_rows, self.out_rows)))
        return self._cached[1]

    def _gather(self, a: int, b: int, *, pad: bool = True) -> Any:
        """Rows ``a … b−1`` of the re-indexed input, flat; with ``pad`` false, padding rows are left zero."""
        shared, w = self.shared, self.width
        own = shared.map.own[self.k][a:b]
        n = b - a
        # runs: consecutive own rows, or consecutive padding rows; every fill row stands alone
        joined = ((own[1:] == own[:-1] + 1) & (own[:-1] >= 0)) | ((own[1:] == own[:-1]) & (own[:-1] == OWN_PAD_MEAN))
        starts = np.flatnonzero(np.concatenate(([True], ~joined)))
        ends = np.append(starts[1:], n)
        if len(starts) == 1 and own[0] >= 0:
            return shared.rows(self.k, int(own[0]), n)
        out = shared.backend.empty(n * w, self.dtype)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            kind = int(own[s])
            if kind >= 0:
                out[s * w : e * w] = shared.rows(self.k, kind, e - s)
            elif kind == OWN_FILL:
                value = shared.fill(a + s)
                out[s * w : e * w] = 0 if value is None else value
            elif pad:
                out[s * w : e * w].reshape(e - s, w)[:] = self.pad_mean()
            else:
                out[s * w : e * w] = 0
        return out

    def pad_mean(self) -> Any:
        """The mean of this input's re-indexed token rows (mergekit pads with it), summed in float64 over
        fixed groups of rows so that neither the backend nor the method's slicing changes its bits."""
        if self._pad_mean is None:
            shared, w = self.shared, self.width
            is_token = shared.map.is_token
            total = np.zeros(w, dtype=np.float64)
            for a in range(0, shared.map.rows, MEAN_ROWS):
                end = min(a + MEAN_ROWS, shared.map.rows)
                mask = is_token[a:end]
                if mask.any():
                    rows = shared.backend.to_host(self._gather(a, end, pad=False)).reshape(end - a, w)
                    total += rows[mask].sum(axis=0, dtype=np.float64)
            mean = (total / max(int(is_token.sum()), 1)).astype(self.dtype)
            self._pad_mean = shared.backend.from_host(mean)
        return self._pad_mean


def remap(backend: Backend, own: Sequence[Source[Any]], row_map: RowMap, shape: tuple[int, ...]) -> list[Any]:
    """Sources of ``shape`` that re-index the inputs ``own`` (each read from its own tensor, whole rows at any
    offset) by ``row_map``."""
    width = 1
    for d in shape[1:]:
        width *= d
    shared = _Shared(backend, own, row_map, width)
    return [RemappedSource(shared, k, shape) for k in range(len(own))]


def remapped_sources(inputs: JobInputs, job: TensorJob) -> list[Any]:
    """The job's sources (``job.sources`` order) re-indexed by its row map, each read from its input's own
    tensor (its adapter's ΔW formed whole, as rows are read at any offset)."""
    assert job.row_map is not None
    own = []
    for src in job.sources:
        shape = inputs.models[src.model].tensors[src.name][0]
        own.append(inputs.source(src, replace(job, shape=shape, rows=None, row_map=None), by_rows=False))
    return remap(inputs.backend, own, job.row_map, job.shape)
