"""Compute one output tensor of a plan with its method's single implementation, on one backend.

On the CPU the backend is numpy and nothing imports torch; on a GPU it is torch on that device. A job
is a copy (non-float buffers, passed through as stored) or a method call: the job's inputs become
:class:`~gift_merge.operators.base.Source` objects, the method fills the output buffer slice by slice,
and the buffer (the output's stored bits) goes to the writer.
"""

from __future__ import annotations

from typing import Any

from gift_merge.io.finite import InputWatch
from gift_merge.operators import get_operator
from gift_merge.plan import MergePlan, TensorJob

from .backend import NUMPY, Backend
from .sources import JobInputs


def unsupported(plan: MergePlan, job: TensorJob) -> str | None:
    """Why the numpy backend cannot compute ``job`` (the first reason), or ``None`` when it can.

    The numpy backend reads and writes float16, bfloat16, float32 and float64; other float dtypes
    (float8, for one) take the torch backend."""
    if job.copy:
        return None
    for src in job.sources:
        model = plan.models[src.model]
        if src.delta:
            continue
        stored = model.tensors[src.name][1]
        if stored.name not in ("float32", "float16", "bfloat16", "float64"):
            return f"tensor {job.name}: input {src.model} stores {stored}"
    for dtype in (job.out_dtype, job.load_dtype or job.out_dtype):
        if dtype.name not in ("float32", "float16", "bfloat16", "float64"):
            return f"tensor {job.name}: {dtype} output"
    return None


def numpy_unsupported(plan: MergePlan, device: str) -> str | None:
    """Why ``plan`` cannot run wholly on the CPU's numpy backend, without torch (the first reason), or
    ``None``."""
    if device != "cpu":
        return f"the device is {device}"
    return next((why for why in (unsupported(plan, job) for job in plan.jobs) if why is not None), None)


class MethodEngine:
    """Computes jobs with their methods on one backend; thread-safe (one job per thread)."""

    def __init__(self, plan: MergePlan, seed: int, backend: Backend = NUMPY, watch: InputWatch | None = None) -> None:
        self.backend = backend
        self.inputs = JobInputs(plan.models, plan.jobs, backend, seed, watch=watch)

    def compute(self, job: TensorJob) -> Any:
        """One output tensor's stored values: numpy bits on the CPU, a tensor on a device."""
        if job.copy:
            return self.inputs.bits(job.inputs[0], job)
        operands = self.inputs.operands(job)
        get_operator(job.operator).merge(operands)
        return self.backend.to_writer(operands.out.values.reshape(job.shape))

    @staticmethod
    def working_set(job: TensorJob) -> int:
        """Inputs are views of the page cache and slices are a few MB, so: the output buffer, plus for a
        method with whole-tensor cuts a float32 |δ| buffer and a bool mask per model."""
        if job.copy:
            return 0
        if get_operator(job.operator).elementwise:
            return job.nbytes
        return job.nbytes + job.numel * (4 + len(job.inputs))
