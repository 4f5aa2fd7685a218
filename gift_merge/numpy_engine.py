"""The torch-free merge path: numpy kernels fed straight from the memory-mapped files.

``import torch`` takes longer than a whole linear merge of a 0.5B model on a small CPU machine, and
torch's per-op overhead on cache-sized blocks is more than numpy's. A plan whose every job is a copy
or an operator with a numpy kernel (:attr:`Operator.numpy`: linear, task arithmetic, passthrough,
nearswap, gift; :attr:`Operator.numpy_stream`: slerp, model_stock, TIES, DARE, breadcrumbs), on the CPU,
with float16/bfloat16/float32 tensors and only additive adapter patches (LoRA, embedding LoRA, LoRA
bias), therefore runs here. It computes what the torch path computes, rounding for rounding,
on the same blocks of rows (:mod:`gift_merge.blocks`), and forms ΔW with the product the torch path uses
on the CPU too, so it writes the same bytes (tests/test_numpy_path.py compares them).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np

from gift_merge import blocks
from gift_merge.floatbits import NUMPY_FLOATS, narrow, stored_dtype, to_math
from gift_merge.io.reader import CheckpointReader
from gift_merge.operators import get_operator
from gift_merge.operators.base import MergeInputs, StreamInputs, generator_for
from gift_merge.plan import MergePlan, TensorJob, TensorSource


def numpy_unsupported(plan: MergePlan, device: str) -> str | None:
    """Why ``plan`` cannot run on the numpy path (the first reason found), or ``None`` when it can."""
    if device != "cpu":
        return f"the device is {device}"
    for job in plan.jobs:
        if job.copy:
            continue
        op = get_operator(job.operator)
        if op.numpy is None and op.numpy_stream is None:
            return f"{op.name} has no numpy kernel"
        if op.numpy is None and (
            job.base is None or any(src.name in plan.models[src.model].patches for src in job.sources)
        ):
            return f"tensor {job.name}: {op.name} runs on numpy only without adapters and with a base"
        for src in job.sources:
            model = plan.models[src.model]
            patch = model.patches.get(src.name)
            if patch is not None and not patch.additive:
                how = "replaces its weight" if patch.kind == "replace" else f"is {patch.kind}"
                saved = " over a saved base layer" if patch.base_layer else ""
                return f"tensor {job.name}: the adapter of {src.model} {how}{saved}, which is not a plain delta"
            stored = model.tensors[src.name][1]
            if stored not in NUMPY_FLOATS:
                return f"tensor {job.name}: input {src.model} stores {stored}"
        for dtype in (job.out_dtype, job.load_dtype or job.out_dtype):
            if dtype not in NUMPY_FLOATS:
                return f"tensor {job.name}: {dtype} output"
    return None


class NumpyEngine:
    """Computes jobs of a plan that :func:`numpy_unsupported` accepted; thread-safe (one job per thread)."""

    def __init__(self, plan: MergePlan, seed: int = 0) -> None:
        self.models = plan.models
        self.seed = seed
        used = {src.model for job in plan.jobs for src in job.sources}
        self._readers = {f: CheckpointReader(f) for f in {plan.models[label].folder for label in used}}

    def _bits(self, src: TensorSource, job: TensorJob) -> np.ndarray:
        bits = self._readers[self.models[src.model].folder].read_array(src.name)
        return bits[: job.rows] if job.rows is not None and bits.shape[0] > job.rows else bits

    def _rows(self, src: TensorSource, job: TensorJob, rows: slice) -> np.ndarray:
        """Rows of an input in the math dtype, with its adapter's ΔW for those rows added (or, for a delta
        input, that ΔW alone): ``execute._Readers.rows`` in numpy."""
        model = self.models[src.model]
        patch = model.patches.get(src.name)
        math = np.dtype(job.math_dtype.name)
        delta = model.adapter.delta_rows_array(patch, rows, math) if patch and model.adapter else None
        if src.delta:
            assert delta is not None  # the planner keeps only patched delta inputs
            return delta
        bits = self._bits(src, job)
        values = to_math(bits[rows] if bits.ndim else bits, model.tensors[src.name][1], math, job.load_dtype)
        return values if delta is None else values + delta

    def compute(self, job: TensorJob) -> np.ndarray:
        """One output tensor's bits (in ``job.out_dtype.storage``), block of rows by block of rows."""
        if job.copy:
            return self._bits(job.inputs[0], job)
        op = get_operator(job.operator)
        if op.numpy is None:
            return self._stream(job)
        kernel = op.numpy
        out = np.empty(job.shape, dtype=job.out_dtype.storage)
        for rows in blocks.row_blocks(job.shape):
            values = MergeInputs(
                tensors=[self._rows(src, job, rows) for src in job.inputs],
                base=self._rows(job.base, job, rows) if job.base is not None else None,
                model_params=job.model_params,
                params=job.params,
                tensor_name=job.name,
            )
            narrow(kernel(values), job.out_dtype, out[rows] if out.ndim else out)
        return out

    def _stream(self, job: TensorJob) -> np.ndarray:
        """An operator with whole-tensor statistics, on flat stored bits: its numpy ``stream`` kernel, for
        every size (the torch path's whole-tensor ``apply`` gives the same bits, tested)."""
        op = get_operator(job.operator)
        kernel = op.numpy_stream
        assert kernel is not None and job.base is not None
        math = np.dtype(job.math_dtype.name)
        stream = StreamInputs(
            tensors=[self._bits(s, job).reshape(-1) for s in job.inputs],
            base=self._bits(job.base, job).reshape(-1),
            widen=lambda bits: to_math(bits, stored_dtype(bits), math, job.load_dtype),
            out_dtype=job.out_dtype,
            shape=job.shape,
            model_params=job.model_params,
            params=job.params,
            generator=generator_for(self.seed, job.name) if op.random else None,
            tensor_name=job.name,
        )
        return kernel(stream).reshape(job.shape)

    @staticmethod
    def threads(workers: int) -> AbstractContextManager[object]:
        """Nothing to split: a numpy op runs on one core, and the executor's workers take one each."""
        return nullcontext()

    @staticmethod
    def working_set(job: TensorJob) -> int:
        """Inputs are views of the page cache and blocks are a few MB, so: the output buffer, plus for a
        stream the float32 |δ| buffer of one model and a bool mask per model."""
        if job.copy:
            return 0
        if get_operator(job.operator).numpy is not None:
            return job.nbytes
        return job.nbytes + job.numel * (4 + len(job.inputs))
