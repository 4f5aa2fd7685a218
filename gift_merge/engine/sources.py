"""What feeds a method: each input of a job as a :class:`~gift_merge.operators.base.Source` of flat slices.

A source reads the stored bits of one tensor (memory-mapped by the reader, trimmed to the planned rows),
widens a slice to the math dtype (after rounding to the recipe's ``dtype``, as mergekit does on load) and
adds the slice's part of the model's adapter ΔW. ΔW is formed by blocks of rows for elementwise methods
(the blocks they read, so only a block of ΔW ever exists) and whole for the others, whose slices need not
align with rows. Nothing here computes a merge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gift_merge.dtypes import FLOAT64, DType
from gift_merge.io.adapter import AdapterReader, Patch
from gift_merge.io.finite import InputWatch
from gift_merge.io.reader import CheckpointReader
from gift_merge.lazy import torch
from gift_merge.operators import adapters, get_operator
from gift_merge.operators.adapters import Factor
from gift_merge.operators.base import NO_LIMIT, Operands, Output, Sink, generator_for
from gift_merge.plan import ModelInfo, TensorJob, TensorSource

from .backend import NUMPY, Backend, TorchBackend
from .blocks import rows_per_block


class StoredSource:
    """A stored tensor, widened a slice at a time, plus (if given) an adapter's ΔW for the same slice;
    with ``delta_only`` just the ΔW (what ``deltas`` methods such as GIFT receive)."""

    def __init__(
        self,
        backend: Backend,
        bits: Any,
        stored: DType,
        math: DType,
        load: DType | None,
        delta: Callable[[slice], Any] | None = None,
        delta_only: bool = False,
    ) -> None:
        self.backend, self.bits, self.stored, self.load, self.delta = backend, bits, stored, load, delta
        self.math = FLOAT64 if (load or stored) == FLOAT64 else math  # as torch's tensor.to(load).to(math)
        self.delta_only = delta_only

    def read(self, part: slice) -> Any:
        if self.delta_only:
            assert self.delta is not None
            return self.delta(part)
        values = self.backend.widen(self.bits[part], self.stored, self.math, self.load)
        return values if self.delta is None else values + self.delta(part)


def adapter_factor(backend: Backend, adapter: AdapterReader) -> Factor:
    """The adapter's factor tensors as ``backend`` computes with them. On the CPU they are numpy arrays
    whichever backend asks (the torch backend converts the product), so ΔW has one set of bits there."""
    if not isinstance(backend, TorchBackend) or backend.on_cpu:
        return lambda name, part, dtype: adapter.factor(name, part, _numpy_dtype(dtype))
    return lambda name, part, dtype: adapter.factor(name, part, dtype).to(backend.device)


def _numpy_dtype(dtype: Any) -> np.dtype:
    return dtype if isinstance(dtype, np.dtype) else np.dtype(str(dtype).removeprefix("torch."))


def _on_backend(backend: Backend, values: Any) -> Any:
    """A product formed in numpy, as the backend holds it."""
    return torch.from_numpy(values) if isinstance(backend, TorchBackend) and isinstance(values, np.ndarray) else values


class PatchedSource:
    """A tensor whose adapter changes it relative to itself (DoRA, ``modules_to_save``, a saved base layer):
    :func:`adapters.patched` of the whole tensor (with ``delta_only``, :func:`adapters.change`), formed on
    the first read, then read a slice at a time."""

    def __init__(
        self, backend: Backend, weight: StoredSource, shape: tuple[int, ...], adapter: AdapterReader, patch: Patch,
        *, delta_only: bool,
    ) -> None:  # fmt: skip
        self.backend, self.weight, self.shape, self.patch, self.delta_only = backend, weight, shape, patch, delta_only
        self.factor = adapter_factor(backend, adapter)
        self._whole: Any = None

    def read(self, part: slice) -> Any:
        if self._whole is None:
            numel = int(np.prod(self.shape)) if self.shape else 1
            weight = self.weight.read(slice(0, numel)).reshape(self.shape)
            form = adapters.change if self.delta_only else adapters.patched
            host = NUMPY if isinstance(self.backend, TorchBackend) and self.backend.on_cpu else self.backend
            if host is NUMPY and not isinstance(weight, np.ndarray):
                weight = weight.numpy()
            self._whole = _on_backend(self.backend, form(host, self.patch, weight, self.factor).reshape(-1))
        return self._whole[part]


class AdapterDelta:
    """Flat slices of one additive patch's ΔW (:func:`adapters.delta_rows`): by blocks of rows (``by_rows``:
    each slice lies within one of :mod:`~gift_merge.engine.blocks`' row blocks, which is formed alone, and
    kept while slices of it are read) or from the whole matrix formed once."""

    def __init__(
        self, backend: Backend, adapter: AdapterReader, patch: Patch, shape: tuple[int, ...], math: DType,
        *, by_rows: bool,
    ) -> None:  # fmt: skip
        self.backend, self.patch, self.by_rows = backend, patch, by_rows
        self.factor = adapter_factor(backend, adapter)
        on_host = not isinstance(backend, TorchBackend) or backend.on_cpu
        self.dtype = np.dtype(math.name) if on_host else math.torch
        self.width = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        self.block_rows = rows_per_block(shape)
        self._whole: Any = None
        self._block: tuple[int, Any] | None = None  # (block index, its ΔW, flat)

    def _rows(self, rows: slice) -> Any:
        return _on_backend(self.backend, adapters.delta_rows(self.patch, rows, self.factor, self.dtype).reshape(-1))

    def __call__(self, part: slice) -> Any:
        if not self.by_rows:
            if self._whole is None:
                self._whole = self._rows(slice(None))
            return self._whole[part]
        start, stop = part.start or 0, part.stop
        block_size = self.block_rows * self.width
        index = start // block_size
        if stop > (index + 1) * block_size:
            raise ValueError(f"slice {start}:{stop} crosses a block of {self.block_rows} rows of width {self.width}")
        if self._block is None or self._block[0] != index:
            self._block = (index, self._rows(slice(index * self.block_rows, (index + 1) * self.block_rows)))
        offset = index * block_size
        return self._block[1][start - offset : stop - offset]


class JobInputs:
    """The readers of a plan's models, and the :class:`Operands` of each of its jobs on one backend."""

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        jobs: list[TensorJob],
        backend: Backend,
        seed: int,
        *,
        watch: InputWatch | None = None,
    ) -> None:
        self.models, self.backend, self.seed = models, backend, seed
        used = {src.model for job in jobs for src in job.sources}
        folders = {models[label].folder for label in used}
        self._readers = {folder: CheckpointReader(folder, watch=watch) for folder in folders}

    def bits(self, src: TensorSource, job: TensorJob) -> Any:
        """The stored values of ``src`` as the reader maps them (numpy bits; a CPU tensor for the torch
        backend), trimmed to the planned rows."""
        reader = self._readers[self.models[src.model].folder]
        bits = reader.read(src.name) if isinstance(self.backend, TorchBackend) else reader.read_array(src.name)
        return bits[: job.rows] if job.rows is not None and bits.ndim and bits.shape[0] > job.rows else bits

    def source(self, src: TensorSource, job: TensorJob, *, by_rows: bool) -> StoredSource | PatchedSource:
        model = self.models[src.model]
        patch = model.patches.get(src.name)
        if patch is not None and model.adapter is not None and not patch.additive:
            weight = StoredSource(self.backend, self.bits(src, job).reshape(-1), model.tensors[src.name][1],
                                  job.math_dtype, job.load_dtype)  # fmt: skip
            return PatchedSource(self.backend, weight, job.shape, model.adapter, patch, delta_only=src.delta)
        delta = None
        if patch is not None and model.adapter is not None:
            delta = AdapterDelta(self.backend, model.adapter, patch, job.shape, job.math_dtype, by_rows=by_rows)
        bits = self.bits(src, job).reshape(-1) if not src.delta else None
        stored = model.tensors[src.name][1]
        return StoredSource(self.backend, bits, stored, job.math_dtype, job.load_dtype, delta, delta_only=src.delta)

    def operands(self, job: TensorJob, sink: Sink | None = None, buffer_limit: int = NO_LIMIT) -> Operands[Any]:
        """The method's view of ``job``; with a ``sink`` its output goes there slice by slice; cuts hold
        tensor-sized buffers up to ``buffer_limit`` bytes."""
        op = get_operator(job.operator)
        by_rows = op.elementwise
        if job.row_map is None:
            sources: list[Any] = [self.source(s, job, by_rows=by_rows) for s in job.sources]
        else:  # vocabulary rows re-indexed to a merged tokenizer's
            from .remap import remapped_sources

            sources = remapped_sources(self, job)
        wide = any(source.read(slice(0, 0)).dtype.itemsize == FLOAT64.itemsize for source in sources)
        return Operands(
            sources=sources[: len(job.inputs)],
            base=sources[-1] if job.base is not None else None,
            shape=job.shape,
            backend=self.backend,
            out=Output(self.backend, job.numel, job.out_dtype, sink),
            model_params=job.model_params,
            params=job.params,
            generator=generator_for(self.seed, job.name) if op.random else None,
            tensor_name=job.name,
            buffer_limit=buffer_limit,
            math_dtype=FLOAT64 if wide else job.math_dtype,
        )
