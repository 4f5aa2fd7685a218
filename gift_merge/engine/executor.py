"""Run a plan: read → method (fp32) → round → write, a few tensors in flight, never a model.

Every job runs its method's single implementation (:mod:`gift_merge.engine.compute`) on a backend: numpy
on the CPU, which never imports torch, or torch on a GPU (and on the CPU for what numpy cannot read:
stored dtypes beyond float16/bfloat16/float32/float64, or ``--engine torch``). Each worker writes its
finished tensor at the planned offset whatever order jobs finish in. At most ``workers + 1`` jobs are in
flight, and fewer when their estimated working sets would exceed ``memory_budget`` (a job larger than the
budget runs alone), which is what bounds memory. Results do not depend on the order: methods are pure and
random ones draw from a generator seeded by (seed, tensor name).

The workers are threads, or on Linux, for a merge the numpy engine computes wholly and of at least
:data:`PROCESSES_FROM` output bytes, forked processes. numpy releases the GIL inside each operation, but
the methods' operations work on cache-sized pieces, so between them threads queue for the GIL: on a 2-core
machine two threads computed no faster than one (multislerp: 6.6 against 6.5 s), while two processes
took 0.75–0.8 of the time. A forked worker shares the parent's memory maps and open output shards, so
nothing is copied; it reports each finished tensor's NaN/±inf counts back, where the parent records them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from gift_merge.engine.backend import NUMPY, TorchBackend
from gift_merge.engine.compute import MethodEngine, numpy_unsupported, unsupported
from gift_merge.errors import GiftMergeError
from gift_merge.io.finite import InputWatch, NonFinite
from gift_merge.io.writer import OutputTensor, ShardedWriter
from gift_merge.lazy import torch
from gift_merge.operators import get_operator
from gift_merge.operators.base import cut_bytes
from gift_merge.plan import MergePlan, TensorJob
from gift_merge.progress import progress

log = logging.getLogger("gift_merge")

DEFAULT_MEMORY_BUDGET = 1 << 30
PROCESSES_FROM = 64 << 20
"""Output bytes from which a numpy merge's workers are processes (see the module docstring): below it,
starting them would cost more than they gain."""
PROCESSES_ENV = "GIFT_MERGE_PROCESSES"
"""``1``: worker processes whenever they can be used (the numpy engine on Linux, two or more workers),
whatever the size; ``0``: always threads; unset: by :data:`PROCESSES_FROM`."""


def peak_in_flight(costs: list[int], workers: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """The largest sum of working sets :func:`execute_plan` holds at once for jobs of these ``costs``.

    The same admission rule as the executor (at most ``workers + 1`` jobs in flight, and no new job past
    ``budget`` while others run), replayed with jobs finishing in the order they started, so ``plan`` can
    say beforehand what a merge will hold. (The executor frees whichever job finishes first; the budget
    bounds what it holds the same way.)
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


def work(job: TensorJob) -> float:
    """Units a job's CPU seconds are proportional to within its kind: its entries, or what its method
    declares (``Operator.work``: m·n·min(m, n) for an SVD merge, so a probe cut to fewer rows than columns
    says how much longer the whole square matrix takes, not just how many more entries it has)."""
    declared = get_operator(job.operator).work
    return declared(job.shape) if declared is not None and not job.copy else float(job.numel)


def run_order(plan: MergePlan) -> list[int]:
    """The order the executor starts the plan's jobs in (indices into ``plan.jobs``): the most work first
    (:func:`work` times the inputs read), else plan order. The jobs left to start at the end are then small,
    so no worker computes a large tensor alone while the others idle; the writer takes any order."""
    return sorted(range(len(plan.jobs)), key=lambda i: -work(plan.jobs[i]) * max(1, len(plan.jobs[i].inputs)))


def estimated_peak(
    plan: MergePlan,
    device: str = "cpu",
    engine: str = "auto",
    workers: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """Bytes of working sets a merge of ``plan`` holds at its peak (inputs are page cache, not counted)."""
    workers = workers or default_workers()
    costs = working_sets(plan, device, engine, workers, memory_budget)
    return peak_in_flight([costs[i] for i in run_order(plan)], workers, memory_budget)


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

    @property
    def numpy_only(self) -> bool:
        """Whether every job runs on the numpy backend (what a forked worker may compute)."""
        return self.torch is None and not isinstance(self.main.backend, TorchBackend)

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


def _say_what_passes_the_budget(plan: MergePlan, costs: list[int], memory_budget: int) -> None:
    """Warn when a tensor's method needs more than the whole budget (the SVD merges hold whole matrices):
    such a job runs alone, and the merge's private memory is that job's, not the budget. ``costs``: each
    job's working set, in plan order."""
    over = [(cost, job) for cost, job in zip(costs, plan.jobs, strict=True) if cost > memory_budget]
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
    runner = _Engines(plan, device, seed, engine, watch, limit)
    costs = [runner.working_set(job) for job in plan.jobs]
    _say_what_passes_the_budget(plan, costs, memory_budget)
    writer = ShardedWriter(folder, [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs], max_shard_bytes)
    pending: dict[Future[_Finished | None], int] = {}
    try:
        # the workers start before the progress bar's thread: a process forks while it has one thread
        workforce = _Workforce(plan, runner, writer, watch, workers) if _use_processes(plan, runner, workers) else None
    except BaseException:
        writer.abort()
        raise
    bar = progress(total=plan.output_bytes, unit="B", unit_scale=True, desc=label, quiet=quiet)
    done = 0
    in_flight = 0

    def compute_and_write(job: TensorJob) -> _Finished | None:
        runner.compute(job, writer)  # in the worker: writes overlap other jobs' compute
        return None  # the writer and watch saw it themselves

    def finish_one() -> None:
        """Wait for any job to finish (not the oldest: a long job must not idle the other workers)."""
        nonlocal done, in_flight
        finished_now, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished_now:
            index = pending.pop(future)
            finished = future.result()
            if finished is not None:  # from a worker process: what its copies of the writer and watch saw
                writer.finished(plan.jobs[index].name, finished.nonfinite)
                if watch is not None:
                    watch.absorb(finished.inputs)
            in_flight -= costs[index]
            done += 1
            bar.update(plan.jobs[index].nbytes)
        bar.set_postfix_str(f"{done}/{len(plan.jobs)} tensors", refresh=False)

    threads = ThreadPoolExecutor(workers, "gift-merge") if workforce is None else None

    def submit(index: int) -> Future[_Finished | None]:
        if threads is not None:
            return threads.submit(compute_and_write, plan.jobs[index])
        assert workforce is not None
        return workforce.submit(index)

    try:
        with runner.threads(workers):
            for index in run_order(plan):
                while pending and (len(pending) > workers or in_flight + costs[index] > memory_budget):
                    finish_one()
                pending[submit(index)] = index
                in_flight += costs[index]
            while pending:
                finish_one()
        if workforce is not None:
            workforce.close()
        if threads is not None:
            threads.shutdown()
        writer.close()
    except BaseException:
        for future in pending:
            future.cancel()
        if workforce is not None:
            workforce.stop()
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
        writer.abort()
        raise
    finally:
        bar.close()
    return writer


def _use_processes(plan: MergePlan, runner: _Engines, workers: int) -> bool:
    """Whether this merge's workers are processes (the module docstring says why and when)."""
    if sys.platform != "linux" or workers < 2 or not runner.numpy_only:
        return False
    chosen = os.environ.get(PROCESSES_ENV, "")
    if chosen in ("0", "1"):
        return chosen == "1"
    return plan.output_bytes >= PROCESSES_FROM


@dataclass(frozen=True)
class _Finished:
    """What a worker process reports for one finished job: the output tensor's NaN/±inf counts and the
    inputs its copy of the watch found non-finite."""

    nonfinite: NonFinite | None
    inputs: dict[tuple[Path, str], str] = field(default_factory=dict)


_WORKER_STATE: dict[int, tuple[_Engines, ShardedWriter, MergePlan, InputWatch | None]] = {}
"""What forked workers compute with, by merge: they inherit it at the fork, so nothing is pickled but a
job's index and its report."""
_merges = itertools.count()


class _Workforce:
    """Forked worker processes computing one plan's jobs into the shards its writer has open."""

    def __init__(
        self, plan: MergePlan, runner: _Engines, writer: ShardedWriter, watch: InputWatch | None, workers: int
    ) -> None:
        context = multiprocessing.get_context("fork")
        writer.share_with_processes(context)
        self.key = next(_merges)
        _WORKER_STATE[self.key] = (runner, writer, plan, watch)
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_started)
        self.pool.submit(int).result()  # Python 3.11+ forks every worker now (3.10 forks as jobs arrive)

    def submit(self, index: int) -> Future[_Finished | None]:
        return self.pool.submit(_compute_in_worker, self.key, index)

    def close(self) -> None:
        """Let the workers finish and exit (after the last job)."""
        self.pool.shutdown()
        _WORKER_STATE.pop(self.key, None)

    def stop(self) -> None:
        """Stop at once (an error or an interrupt): jobs in progress are abandoned with their output."""
        terminate = getattr(self.pool, "terminate_workers", None)  # Python 3.14+
        if terminate is not None:
            terminate()
        else:
            processes = list((self.pool._processes or {}).values())  # no public list before 3.14
            for process in processes:
                process.terminate()
            for process in processes:
                process.join()
            self.pool.shutdown(wait=True, cancel_futures=True)
        _WORKER_STATE.pop(self.key, None)


def _worker_started() -> None:
    """In each worker: Ctrl-C reaches the whole process group, but the parent alone decides to stop (it
    terminates the workers), and a worker whose parent dies is killed with it rather than left computing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _compute_in_worker(key: int, index: int) -> _Finished:
    runner, writer, plan, watch = _WORKER_STATE[key]
    job = plan.jobs[index]
    runner.compute(job, writer)
    return _Finished(writer.nonfinite.get(job.name), watch.drain() if watch is not None else {})
