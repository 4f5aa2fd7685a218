"""Compute one output tensor of a plan with its method's single implementation, on one backend.

On the CPU the backend is numpy and nothing imports torch; on a GPU it is torch on that device. A job
is a copy (non-float buffers, passed through as stored) or a method call: the job's inputs become
:class:`~gift_merge.operators.base.Source` objects, and each slice the method writes is rounded to the
stored dtype and goes to the writer at its final offset.
"""

from __future__ import annotations

from gift_merge.io.finite import InputWatch
from gift_merge.io.writer import ShardedWriter
from gift_merge.operators import get_operator
from gift_merge.operators.base import CHUNK, NO_LIMIT, cut_bytes
from gift_merge.operators.held import held_fits
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

    def __init__(
        self,
        plan: MergePlan,
        seed: int,
        backend: Backend = NUMPY,
        watch: InputWatch | None = None,
        buffer_limit: int = NO_LIMIT,
    ) -> None:
        self.backend = backend
        self.inputs = JobInputs(plan.models, plan.jobs, backend, seed, watch=watch)
        self.buffer_limit = buffer_limit

    def compute(self, job: TensorJob, writer: ShardedWriter) -> None:
        """Compute one output tensor into ``writer``: a copy whole (a view of its input file), a method's
        result slice by slice as the method writes it."""
        if job.copy:
            writer.write(job.name, self.inputs.bits(job.inputs[0], job))
            return
        sink = writer.sink(job.name)
        get_operator(job.operator).merge(self.inputs.operands(job, sink, self.buffer_limit))
        sink.close()

    @staticmethod
    def working_set(job: TensorJob, buffer_limit: int = NO_LIMIT) -> int:
        """Inputs are views of the page cache, the output goes to disk a slice at a time, and slices are a
        few MB, so: a few float32 slices per input, plus what the method declares it holds
        (:data:`~gift_merge.operators.base.Memory`)."""
        if job.copy:
            return 0
        slices = CHUNK * 4 * (len(job.sources) + 3)
        memory = get_operator(job.operator).memory
        cuts = cut_bytes(job.numel, len(job.inputs))
        if memory == "cuts" or (memory == "stream_cuts" and cuts <= buffer_limit):
            return slices + cuts
        if memory == "held":
            count = len(job.inputs) + 1  # the most arrays multislerp and karcher hold (``Held``)
            fits = held_fits(count, job.numel, buffer_limit)
            return slices + (count * job.numel * job.math_dtype.itemsize if fits else 0)
        if memory == "whole":
            workspace = get_operator(job.operator).workspace
            extra = workspace(job.shape) if workspace is not None else 0
            return slices + job.numel * 4 * (len(job.sources) + 1) + extra
        return slices
