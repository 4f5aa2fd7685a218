"""Run a plan: read → method (fp32) → round → write, a few tensors in flight, never a model.

Every job runs its method's single implementation (:mod:`gift_merge.engine.compute`) on a backend: numpy
on the CPU, which never imports torch, or torch on a GPU (and on the CPU for what numpy cannot read:
stored dtypes beyond float16/bfloat16/float32/float64, or ``--engine torch``). Jobs run on a small
thread pool. numpy and torch release the GIL while they compute, so one job's reads overlap another's
arithmetic, and each worker writes its finished tensor at the planned offset whatever order jobs finish
in. At most ``workers + 1`` jobs are in flight, and fewer when their estimated working sets would exceed
``memory_budget`` (a job larger than the budget runs alone), which is what bounds memory. Results do not
depend on the order: methods are pure and random ones draw from a generator seeded by (seed, tensor name).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from gift_merge.engine.backend import NUMPY, TorchBackend
from gift_merge.engine.compute import MethodEngine, numpy_unsupported, unsupported
from gift_merge.errors import GiftMergeError
from gift_merge.io.finite import InputWatch
from gift_merge.io.writer import OutputTensor, ShardedWriter
from gift_merge.lazy import torch
from gift_merge.operators import get_operator
from gift_merge.operators.base import cut_bytes
from gift_merge.plan import MergePlan, TensorJob
from gift_merge.progress import progress

log = logging.getLogger("gift_merge")

DEFAULT_MEMORY_BUDGET = 1 << 30


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


def buffer_limit(memory_budget: int, workers: int) -> int:
    """Each job's share of the budget for tensor-sized buffers (a cut's |δ|, masks): the budget split
    between the ``workers + 1`` jobs that may be in flight. A cut too large for its share streams."""
    return memory_budget // (workers + 1)


def working_sets(
    plan: MergePlan,
    device: str = "cpu",
    engine: str = "auto",
    workers: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> list[int]:
    """Each job's working set as the executor admits it, in plan order."""
    choose_engine(plan, device, engine)
    limit = buffer_limit(memory_budget, workers or default_workers())
    return [MethodEngine.working_set(job, limit) for job in plan.jobs]


def estimated_peak(
    plan: MergePlan,
    device: str = "cpu",
    engine: str = "auto",
    workers: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """Bytes of working sets a merge of ``plan`` holds at its peak (inputs are page cache, not counted)."""
    workers = workers or default_workers()
    return peak_in_flight(working_sets(plan, device, engine, workers, memory_budget), workers, memory_budget)


def default_memory_budget() -> int:
    """:data:`DEFAULT_MEMORY_BUDGET`, or half the memory the machine has available if that is less."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return min(DEFAULT_MEMORY_BUDGET, int(line.split()[1]) * 1024 // 2)
    except (OSError, ValueError, IndexError):
        pass
    return DEFAULT_MEMORY_BUDGET


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


class _Engines:
    """The method engine on numpy for every job it can read on the CPU, on torch for the rest (a GPU,
    ``--engine torch``, or stored dtypes numpy cannot read)."""

    def __init__(
        self, plan: MergePlan, device: str, seed: int, engine: str, watch: InputWatch | None, limit: int
    ) -> None:
        forced = device != "cpu" or engine == "torch"
        self.main = MethodEngine(plan, seed, TorchBackend(device) if forced else NUMPY, watch, limit)
        self.on_torch = set() if forced else {job.name for job in plan.jobs if unsupported(plan, job) is not None}
        self.torch = MethodEngine(plan, seed, TorchBackend("cpu"), watch, limit) if self.on_torch else None
        self.limit = limit

    def compute(self, job: TensorJob, writer: ShardedWriter) -> None:
        engine = self.torch if self.torch is not None and job.name in self.on_torch else self.main
        engine.compute(job, writer)

    def working_set(self, job: TensorJob) -> int:
        return MethodEngine.working_set(job, self.limit)

    def threads(self, workers: int) -> AbstractContextManager[object]:
        """On the CPU, torch's operations split the cores between the concurrent jobs instead of each
        taking all of them; numpy's run on one core each."""
        engines = (self.main, self.torch)
        if not any(e is not None and isinstance(e.backend, TorchBackend) and e.backend.on_cpu for e in engines):
            return nullcontext()
        return _intra_op_threads(max(1, (os.cpu_count() or 1) // workers))


def _say_what_streams(plan: MergePlan, limit: int, memory_budget: int, workers: int) -> None:
    """Log which cuts the memory budget makes stream (slower, the same bytes), so a slow merge says why."""
    streamed = [
        job
        for job in plan.jobs
        if not job.copy
        and get_operator(job.operator).memory == "stream_cuts"
        and cut_bytes(job.numel, len(job.inputs)) > limit
    ]
    if streamed:
        log.info(
            "memory budget %.2f GiB for %d workers: %d tensor(s) too large for cut buffers (%s …) stream their "
            "cuts (the same bytes; --max-memory raises the budget)",
            memory_budget / 2**30, workers, len(streamed), streamed[0].name,
        )  # fmt: skip


def _say_what_passes_the_budget(plan: MergePlan, limit: int, memory_budget: int) -> None:
    """Warn when a tensor's method needs more than the whole budget (the SVD merges hold whole matrices):
    such a job runs alone, and the merge's private memory is that job's, not the budget."""
    over = [(MethodEngine.working_set(job, limit), job) for job in plan.jobs]
    over = [(cost, job) for cost, job in over if cost > memory_budget]
    if over:
        cost, job = max(over, key=lambda pair: pair[0])
        log.warning(
            "tensor %s: %s needs about %.2f GiB for it, above the %.2f GiB memory budget (%d tensor(s) do): each "
            "such tensor runs alone, so the merge needs about that much memory",
            job.name, job.operator, cost / 2**30, memory_budget / 2**30, len(over),
        )  # fmt: skip


ENGINES = ("auto", "numpy", "torch")
"""``auto``: numpy on the CPU wherever it can read a job's tensors, torch for the rest; ``numpy``: all of
it on numpy, without torch, or an error saying why not; ``torch``: the torch backend for every job."""


def choose_engine(plan: MergePlan, device: str, engine: str = "auto") -> str:
    """``numpy`` or ``torch`` for this plan (``torch`` when any job needs it); asking for numpy where it
    cannot run is an error saying why."""
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
    watch: InputWatch | None = None,
) -> ShardedWriter:
    """Write the plan's tensors into ``folder`` (a temporary folder the caller renames on success).

    ``watch`` goes to every checkpoint reader, so either engine's reads of the inputs are counted for
    NaN and ±inf; the writer counts the outputs.
    """
    choose_engine(plan, device, engine)
    workers = workers or default_workers()
    limit = buffer_limit(memory_budget, workers)
    if not quiet:
        _say_what_streams(plan, limit, memory_budget, workers)
    _say_what_passes_the_budget(plan, limit, memory_budget)
    runner = _Engines(plan, device, seed, engine, watch, limit)
    writer = ShardedWriter(folder, [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs], max_shard_bytes)
    bar = progress(total=plan.output_bytes, unit="B", unit_scale=True, desc=label, quiet=quiet)
    pending: deque[tuple[TensorJob, Future[None]]] = deque()
    done = 0
    in_flight = 0

    def compute_and_write(job: TensorJob) -> None:
        runner.compute(job, writer)  # in the worker: writes overlap other jobs' compute

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
