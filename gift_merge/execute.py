"""Run a plan: read → operator (fp32) → cast → write, a few tensors in flight, never a model.

Two engines compute the jobs and write the same bytes: numpy (:mod:`gift_merge.numpy_engine`) for CPU
merges whose every method has a numpy kernel, which never imports torch, and torch for everything else
(any device, every method and adapter). Jobs run on a small thread pool. numpy and torch release the GIL
while they compute, so one job's reads overlap another's arithmetic, and each worker writes its finished
tensor at the planned offset whatever order jobs finish in. At most ``workers + 1`` jobs are in flight, and fewer when
their estimated working sets would exceed ``memory_budget`` (a job larger than the budget runs alone),
which is what bounds memory. Results do not depend on the order: operators are pure and random ones draw from a
generator seeded by (seed, tensor name).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from gift_merge import blocks
from gift_merge.errors import GiftMergeError
from gift_merge.io.adapter import AdapterReader, Patch
from gift_merge.io.reader import CheckpointReader
from gift_merge.io.writer import OutputTensor, ShardedWriter
from gift_merge.lazy import torch
from gift_merge.numpy_engine import NumpyEngine, numpy_unsupported
from gift_merge.operators import get_operator
from gift_merge.operators.base import MergeInputs, Operator, StreamInputs, generator_for
from gift_merge.plan import MergePlan, TensorJob, TensorSource
from gift_merge.progress import progress

log = logging.getLogger("gift_merge")


class _Readers:
    """One reader per model folder, and each model's adapter patches applied as tensors are loaded."""

    def __init__(self, plan: MergePlan) -> None:
        self.models = plan.models
        used = {src.model for job in plan.jobs for src in job.sources}
        folders = {plan.models[label].folder for label in used}
        self._readers = {folder: CheckpointReader(folder) for folder in folders}

    def load(self, src: TensorSource, job: TensorJob, device: torch.device) -> torch.Tensor:
        found = self.patch_for(src)
        if src.delta and found is not None and found[1].additive:
            # an additive delta needs only the adapter's factors, not the weight it lands on
            return found[0].delta(found[1], torch.empty(0, device=device, dtype=job.math_dtype.torch))
        tensor = self.raw(src, job)
        if job.copy:
            return tensor
        tensor = to_math(tensor, job, device)
        if found is None:
            return tensor
        adapter, patch = found
        return adapter.delta(patch, tensor) if src.delta else adapter.patched(patch, tensor)

    def raw(self, src: TensorSource, job: TensorJob) -> torch.Tensor:
        """The stored tensor as read (its own dtype, on the CPU), trimmed to the planned rows."""
        tensor = self._readers[self.models[src.model].folder].read(src.name)
        if job.rows is not None and tensor.shape[0] > job.rows:
            tensor = tensor[: job.rows]
        return tensor

    def patch_for(self, src: TensorSource) -> tuple[AdapterReader, Patch] | None:
        model = self.models[src.model]
        patch = model.patches.get(src.name)
        return (model.adapter, patch) if patch is not None and model.adapter is not None else None

    def path(self, job: TensorJob) -> str:
        """How a job runs: ``elementwise`` (row blocks), ``stream`` (the operator's own slicing) or ``whole``.

        The one place that decides, so the executor and the memory budget always agree.
        """
        if job.copy or job.numel < blocks.CHUNK_FROM or not job.shape:
            return "whole"
        op = get_operator(job.operator)
        patches = [found[1] for found in map(self.patch_for, job.sources) if found is not None]
        if op.elementwise and not op.random and all(p.additive for p in patches):
            return "elementwise"
        if op.stream is not None and job.base is not None and not patches:
            return "stream"
        return "whole"

    def rows(self, src: TensorSource, job: TensorJob, rows: slice, device: torch.device) -> torch.Tensor:
        """Rows of an input, widened to the math dtype, with its (additive) adapter patch applied."""
        found = self.patch_for(src)
        like = torch.empty(0, device=device, dtype=job.math_dtype.torch)
        if src.delta:
            assert found is not None  # the planner keeps only patched delta inputs
            return found[0].delta_rows(found[1], rows, like)
        tensor = to_math(self.raw(src, job)[rows], job, device)
        return tensor if found is None else tensor + found[0].delta_rows(found[1], rows, like)


def to_math(tensor: torch.Tensor, job: TensorJob, device: torch.device) -> torch.Tensor:
    """Round to the recipe's ``dtype`` as mergekit does on load, then widen to the math dtype (fp32 at least:
    bf16 subtraction cancels the small deltas fine-tuning leaves)."""
    if job.load_dtype is not None:
        tensor = tensor.to(job.load_dtype.torch)
    math_dtype = torch.float64 if tensor.dtype == torch.float64 else job.math_dtype.torch
    return tensor.to(device=device, dtype=math_dtype)


def _compute_elementwise(op: Operator, job: TensorJob, readers: _Readers, device: torch.device) -> torch.Tensor:
    """An elementwise operator over matching blocks of rows of its inputs, block by block.

    Inputs stay in their stored dtype (memory-mapped where the reader allows) and only one block of each
    is widened to fp32 at a time, with an adapter's ΔW formed for those rows only. A 32k-vocabulary
    embedding then costs its output buffer plus a few MB instead of several fp32 copies, and the arithmetic
    runs in cache. Same operations per entry as the whole-tensor call (for adapter deltas, up to the
    summation order of the small B·A product).
    """
    out = torch.empty(job.shape, dtype=job.out_dtype.torch)
    for rows in blocks.row_blocks(job.shape):
        inputs = MergeInputs(
            tensors=[readers.rows(s, job, rows, device) for s in job.inputs],
            base=readers.rows(job.base, job, rows, device) if job.base else None,
            model_params=job.model_params,
            params=job.params,
            tensor_name=job.name,
        )
        out[rows] = op.apply(inputs).to(dtype=job.out_dtype.torch).to("cpu")
    return out


def compute_job(job: TensorJob, readers: _Readers, device: torch.device, seed: int) -> torch.Tensor:
    """One output tensor, in its output dtype, on the CPU."""
    if job.copy:
        return readers.load(job.inputs[0], job, device).contiguous()
    op = get_operator(job.operator)
    path = readers.path(job)
    if path == "elementwise":
        return _compute_elementwise(op, job, readers, device)
    if path == "stream" and op.stream is not None and job.base is not None:
        stream = StreamInputs(
            tensors=[readers.raw(s, job).reshape(-1) for s in job.inputs],
            base=readers.raw(job.base, job).reshape(-1),
            widen=lambda t: to_math(t, job, device),
            out_dtype=job.out_dtype.torch,
            shape=job.shape,
            model_params=job.model_params,
            params=job.params,
            generator=generator_for(seed, job.name) if op.random else None,
            tensor_name=job.name,
        )
        return op.stream(stream).view(job.shape)
    inputs = MergeInputs(
        tensors=[readers.load(s, job, device) for s in job.inputs],
        base=readers.load(job.base, job, device) if job.base else None,
        model_params=job.model_params,
        params=job.params,
        generator=generator_for(seed, job.name) if op.random else None,
        tensor_name=job.name,
    )
    return op.apply(inputs).to(dtype=job.out_dtype.torch).to("cpu").contiguous()


DEFAULT_MEMORY_BUDGET = 1 << 30
_TEMPORARIES = 6  # fp32 tensor-sized temporaries an operator holds besides its inputs (TIES: deltas, masks, sums)


def working_set(job: TensorJob, path: str) -> int:
    """Rough peak bytes of one job on ``path``: inputs and temporaries in the math dtype, or for sliced
    jobs their output (plus, streamed, the |δ| buffer and its selection copy)."""
    if path == "elementwise":
        return job.numel * job.out_dtype.itemsize
    if path == "stream":
        return job.numel * (job.out_dtype.itemsize + 2 * job.math_dtype.itemsize)
    return job.numel * job.math_dtype.itemsize * (len(job.sources) + _TEMPORARIES)


def peak_in_flight(costs: list[int], workers: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """The largest sum of working sets :func:`execute_plan` holds at once for jobs of these ``costs``.

    The same admission rule as the executor (at most ``workers + 1`` jobs in flight, and no new job past
    ``budget`` while others run), replayed with jobs finishing in order, so ``plan`` can say beforehand
    what a merge will hold.
    """
    pending: deque[int] = deque()
    in_flight = peak = 0
    for cost in costs:
        while pending and (len(pending) > workers or in_flight + cost > budget):
            in_flight -= pending.popleft()
        pending.append(cost)
        in_flight += cost
        peak = max(peak, in_flight)
    return peak


def estimated_peak(plan: MergePlan, device: str = "cpu", engine: str = "auto", workers: int | None = None) -> int:
    """Bytes of working sets a merge of ``plan`` holds at its peak (inputs are page cache, not counted)."""
    if choose_engine(plan, device, engine) == "numpy":
        costs = [NumpyEngine.working_set(job) for job in plan.jobs]
    else:
        readers = _Readers(plan)
        costs = [working_set(job, readers.path(job)) for job in plan.jobs]
    return peak_in_flight(costs, workers or default_workers())


def default_workers() -> int:
    """One job per core (at least two, so reading overlaps computing), at most eight."""
    return max(2, min(8, os.cpu_count() or 1))


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """Split the cores between concurrent jobs instead of letting each job's ops use all of them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _TorchEngine:
    """The general path: every operator, adapters, any device."""

    def __init__(self, plan: MergePlan, device: str, seed: int) -> None:
        self.device = torch.device(device)
        self.readers = _Readers(plan)
        self.seed = seed

    def compute(self, job: TensorJob) -> torch.Tensor:
        return compute_job(job, self.readers, self.device, self.seed)

    def working_set(self, job: TensorJob) -> int:
        return working_set(job, self.readers.path(job))

    def threads(self, workers: int) -> AbstractContextManager[object]:
        if self.device.type != "cpu":
            return nullcontext()
        return _intra_op_threads(max(1, (os.cpu_count() or 1) // workers))


ENGINES = ("auto", "numpy", "torch")
"""``auto``: numpy where :func:`numpy_unsupported` allows it, else torch."""


def choose_engine(plan: MergePlan, device: str, engine: str = "auto") -> str:
    """``numpy`` or ``torch`` for this plan; asking for numpy where it cannot run is an error saying why."""
    if engine not in ENGINES:
        raise GiftMergeError(f"--engine {engine}: use one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    reason = numpy_unsupported(plan, device)
    if reason is not None and engine == "numpy":
        raise GiftMergeError(f"--engine numpy: {reason}")
    if reason is not None:
        log.info("merging with torch: %s", reason)
    return "numpy" if reason is None else "torch"


def execute_plan(
    plan: MergePlan,
    folder: Path,
    *,
    max_shard_bytes: int,
    device: str = "cpu",
    seed: int = 0,
    quiet: bool = False,
    workers: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    label: str = "merge",
    engine: str = "auto",
) -> ShardedWriter:
    """Write the plan's tensors into ``folder`` (a temporary folder the caller renames on success)."""
    runner: _TorchEngine | NumpyEngine
    runner = (
        NumpyEngine(plan, seed) if choose_engine(plan, device, engine) == "numpy" else _TorchEngine(plan, device, seed)
    )
    writer = ShardedWriter(folder, [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs], max_shard_bytes)
    workers = workers or default_workers()
    bar = progress(total=plan.output_bytes, unit="B", unit_scale=True, desc=label, quiet=quiet)
    pending: deque[tuple[TensorJob, Future[None]]] = deque()
    done = 0
    in_flight = 0

    def compute_and_write(job: TensorJob) -> None:
        writer.write(job.name, runner.compute(job))  # in the worker: writes overlap other jobs' compute

    def finish(job: TensorJob, future: Future[None]) -> None:
        nonlocal done, in_flight
        future.result()
        in_flight -= runner.working_set(job)
        done += 1
        bar.update(job.nbytes)
        bar.set_postfix_str(f"{done}/{len(plan.jobs)} tensors", refresh=False)

    try:
        with runner.threads(workers), ThreadPoolExecutor(workers, thread_name_prefix="gift-merge") as pool:
            for job in plan.jobs:
                cost = runner.working_set(job)
                while pending and (len(pending) > workers or in_flight + cost > memory_budget):
                    finish(*pending.popleft())
                pending.append((job, pool.submit(compute_and_write, job)))
                in_flight += cost
            while pending:
                finish(*pending.popleft())
        writer.close()
    except BaseException:
        for _, future in pending:
            future.cancel()
        writer.abort()
        raise
    finally:
        bar.close()
    return writer
