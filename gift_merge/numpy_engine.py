"""The torch-free merge path: elementwise methods in numpy, straight from the memory-mapped files.

``import torch`` takes longer than a whole linear merge of a 0.5B model on a small CPU machine, and
torch's per-op overhead on cache-sized blocks is more than numpy's. A plan whose every job is a copy
or an operator with a numpy kernel (:attr:`Operator.numpy`: linear, task arithmetic, passthrough), on
the CPU, with float16/bfloat16/float32 inputs and outputs and no adapter, therefore runs here. It writes
the same bytes as the torch path (tests/test_numpy_path.py compares them); anything else runs on torch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np

from gift_merge.dtypes import DType
from gift_merge.floatbits import NUMPY_FLOATS, narrow, to_float32
from gift_merge.io.reader import CheckpointReader
from gift_merge.operators import get_operator
from gift_merge.operators.base import MergeInputs
from gift_merge.plan import MergePlan, TensorJob, TensorSource

CHUNK = 1 << 18
"""Entries per block: a few 1 MB float32 temporaries per input, resident in cache."""


def numpy_unsupported(plan: MergePlan, device: str) -> str | None:
    """Why ``plan`` cannot run on the numpy path (the first reason found), or ``None`` when it can."""
    if device != "cpu":
        return f"the device is {device}"
    for job in plan.jobs:
        if job.copy:
            continue
        op = get_operator(job.operator)
        if op.numpy is None:
            return f"{op.name} has no numpy kernel"
        for src in job.sources:
            model = plan.models[src.model]
            if src.delta or src.name in model.patches:
                return f"tensor {job.name}: input {src.model} carries an adapter"
            stored = model.tensors[src.name][1]
            if stored not in NUMPY_FLOATS:
                return f"tensor {job.name}: input {src.model} stores {stored}"
        for dtype in (job.out_dtype, job.load_dtype or job.out_dtype):
            if dtype not in NUMPY_FLOATS:
                return f"tensor {job.name}: {dtype} output"
    return None


class NumpyEngine:
    """Computes jobs of a plan that :func:`numpy_unsupported` accepted; thread-safe (one job per thread)."""

    def __init__(self, plan: MergePlan) -> None:
        self.models = plan.models
        used = {src.model for job in plan.jobs for src in job.sources}
        self._readers = {f: CheckpointReader(f) for f in {plan.models[label].folder for label in used}}

    def _bits(self, src: TensorSource, job: TensorJob) -> np.ndarray:
        bits = self._readers[self.models[src.model].folder].read_array(src.name)
        return bits[: job.rows] if job.rows is not None and bits.shape[0] > job.rows else bits

    def compute(self, job: TensorJob) -> np.ndarray:
        """One output tensor's bits (in ``job.out_dtype.storage``), block by block of ``CHUNK`` entries."""
        if job.copy:
            return self._bits(job.inputs[0], job)
        kernel = get_operator(job.operator).numpy
        assert kernel is not None
        out = np.empty(job.shape, dtype=job.out_dtype.storage)
        flat_out = out.reshape(-1)

        def flat(src: TensorSource) -> tuple[np.ndarray, DType]:
            return self._bits(src, job).reshape(-1), self.models[src.model].tensors[src.name][1]

        inputs = [flat(src) for src in job.inputs]
        base = flat(job.base) if job.base is not None else None
        for start in range(0, flat_out.size, CHUNK):
            part = slice(start, start + CHUNK)
            values = MergeInputs(
                tensors=[to_float32(bits[part], stored, job.load_dtype) for bits, stored in inputs],
                base=to_float32(base[0][part], base[1], job.load_dtype) if base else None,
                model_params=job.model_params,
                params=job.params,
                tensor_name=job.name,
            )
            narrow(kernel(values), job.out_dtype, flat_out[part])
        return out

    @staticmethod
    def threads(workers: int) -> AbstractContextManager[object]:
        """Nothing to split: a numpy op runs on one core, and the executor's workers take one each."""
        return nullcontext()

    @staticmethod
    def working_set(job: TensorJob) -> int:
        """The output buffer: inputs are views of the page cache and blocks are a few MB."""
        return 0 if job.copy else job.nbytes
