"""What a merge stage will cost on this machine, measured before it runs: time and peak private memory.

A merge's time is the sum of its tensors' times, each proportional to its entries for a given kind of
tensor (method, inputs, dtypes, small or blocked), or to what its method declares (``Operator.work``: an
SVD merge's time grows as m·n·min(m, n)), overlapped by the executor's workers. So the probe runs
the real executor (as the merge will: ``merge.stage_runner``) on one real tensor of each kind, cut to its
first rows (:data:`PROBE_ENTRIES` entries, so it takes the blocked path the whole tensor takes): CPU seconds
per entry of every kind on this machine, which barely move when other work shares it. One more run of the
largest kind on every worker at once says how many cores the workers get now, as CPU over wall seconds (two
vCPUs of a VM gave 1.5 when idle, and less while other jobs ran), and the executor's admission rule is
replayed with both. Input bytes that are not in the page cache (``mincore``: nothing is read to ask) cost
the disk's rate, sampled; the inputs' fingerprints (:mod:`gift_merge.io.origin`) one more read of every
local input after the merge.

Memory is measured the same way on numpy: ``tracemalloc`` sees every array numpy allocates, so two runs
of a kind's probe at two sizes give its bytes as fixed plus per entry, and the admission rule is replayed
with those sizes. torch's allocations are invisible to it, so a merge on torch takes the executor's own
estimate of its working sets. What the process holds before merging, and what the probe's imports added
(torch for a torch merge), come on top.

A probe costs the imports the merge needs anyway, then well under a second for the 0.5B benchmark
recipes on 2 cores; benchmarks/RESULTS.md ("plan estimate vs measured") holds the estimates against
measured runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from gift_merge.engine import blocks
from gift_merge.engine.executor import DEFAULT_MEMORY_BUDGET, run_order, work, working_sets
from gift_merge.inputs import ModelInfo
from gift_merge.io.origin import hub_origin, weight_files
from gift_merge.operators import get_operator
from gift_merge.plan import MergePlan, TensorJob

PROBE_ENTRIES = 1 << 21
"""Entries of each probe tensor: twice :data:`blocks.CHUNK_FROM`, so a cut tensor runs blocked as the whole
one does, and 4 MB per bf16 input, which one core merges in 10–150 ms."""
MEMORY_ENTRIES = 3 * PROBE_ENTRIES
"""Entries of the larger run of a kind that the memory probe draws its line through (0.2 s of TIES)."""
_SAMPLE_BYTES = 4 << 20
_DISK_SAMPLES = 4
_HASH_SAMPLES = 8
_DEFAULT_RATE = 2e9  # bytes/s where nothing could be sampled (no uncached, or no cached, 4 MB of input)

RunJobs = Callable[[MergePlan, Path, int], object]
"""Runs a plan's jobs into a folder with so many workers, as the merge will (``merge.stage_runner``)."""


@dataclass(frozen=True)
class StageEstimate:
    """A stage's estimated seconds and private memory on this machine, by part, and what the probe measured."""

    merge_s: float  # the executor's schedule replayed with the probed per-entry times
    read_s: float  # the input bytes not in the page cache now, at the rate sampled reading such bytes
    fingerprint_s: float  # with --hash-inputs: reading and hashing the local inputs once more, from the page cache
    setup_s: float  # one-time imports the probe paid (torch for a torch merge), which a run pays too
    kinds: int  # kinds of tensor probed
    cores_alone: float  # cores one job had (1 on an idle machine): CPU over wall seconds, measured
    cores_together: float  # cores the workers had together, measured the same way
    workers: int
    cold_bytes: int  # input bytes not in the page cache when measured
    working_sets: int  # bytes the jobs in flight hold together at the peak
    working_sets_measured: bool  # from the probe's allocations (numpy), else the executor's own estimate (torch)
    imported_bytes: int  # private memory the imports of the probe's first run added (torch for a torch merge)
    probe_s: float  # what measuring cost

    @property
    def seconds(self) -> float:
        """The stage from its first import to its card: :attr:`remaining_s` and the imports."""
        return self.setup_s + self.remaining_s

    @property
    def remaining_s(self) -> float:
        """After the probe (which paid the imports): reads and computing overlap (workers wait on page faults
        in turn), so the larger of the two counts, then the fingerprints."""
        return max(self.merge_s, self.read_s) + self.fingerprint_s

    def describe(self) -> str:
        """The parts and how they were measured, for a line after the total."""
        parts = [f"merge {format_seconds(self.merge_s)}"]
        if self.read_s > self.merge_s:
            parts[0] = f"reading the inputs {format_seconds(self.read_s)} (merge {format_seconds(self.merge_s)})"
        if self.fingerprint_s >= 0.05:
            parts.append(f"input hashes {format_seconds(self.fingerprint_s)}")
        if self.setup_s >= 0.05:
            parts.append(f"imports {format_seconds(self.setup_s)}")
        how = (
            f"measured on one tensor of each of {self.kinds} kind(s), cut to about {PROBE_ENTRIES >> 20}M entries, "
            f"{self.workers} worker{'s' if self.workers != 1 else ''} on {self.cores_together:.1f} cores, "
            f"{self.cold_bytes / 1e9:.2f} GB of input not "
            "cached; "
            f"the probe took {self.probe_s:.2f} s"
        )
        return f"{', '.join(parts)}; {how}"


def describe_memory(held: int, found: StageEstimate | str, modelled: int) -> str:
    """The peak private memory of a stage: what the process holds before merging (``held``, plus the imports
    the probe measured), and the working sets in flight: measured by the probe where it could, else
    ``modelled`` (the executor's own estimate)."""
    if isinstance(found, StageEstimate):
        held += found.imported_bytes
        sets = found.working_sets
        how = "measured" if found.working_sets_measured else "estimated"
    else:
        sets, how = modelled, "estimated"
    return (
        f"about {(held + sets) / 2**30:.2f} GiB of private memory at the peak: {sets / 2**30:.2f} GiB of working "
        f"sets in flight ({how}) and {held / 2**30:.2f} GiB the process holds before merging, beside the inputs' "
        "page cache"
    )


def format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def process_age() -> float | None:
    """Seconds since this process started (Linux), for the start-up a run pays before it merges."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def private_bytes() -> int:
    """This process's private resident memory now (``RssAnon``, Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def substitutes_for(plans: Iterable[object]) -> dict[str, ModelInfo]:
    """For a stage output not built yet, a real model with its tensor names to time the next stage on.

    An earlier merge stage's output has the tensors of its reference model (the base, else the first
    input), so that model's files stand in for it; chains of stages resolve to the first real one.
    """
    found: dict[str, ModelInfo] = {}
    for plan in plans:
        if not isinstance(plan, MergePlan) or not plan.stage.name:
            continue
        reference = plan.models[plan.reference]
        if reference.virtual:
            reference = found.get(reference.label, reference)
        if not reference.virtual:
            found[plan.stage.name] = reference
    return found


def estimate_stage(
    plan: MergePlan,
    run_jobs: RunJobs,
    *,
    workers: int,
    device: str = "cpu",
    engine: str = "auto",
    scratch: Path | None = None,
    substitutes: Mapping[str, ModelInfo] | None = None,
    hash_inputs: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> StageEstimate | str:
    """Measure and estimate; a string says why a stage cannot be estimated (an input not built yet).
    ``hash_inputs``: the run will hash every local input file (``run --hash-inputs``), one more read."""
    started = time.perf_counter()
    models = _probe_models(plan, substitutes or {})
    kinds = _kinds(plan.jobs)
    probes: dict[tuple[object, ...], TensorJob] = {}
    for key, jobs in kinds.items():
        probe = _probe_job(jobs, models)
        if probe is None:
            if _is_large(jobs[0]):
                return f"tensors such as {jobs[0].name} read inputs not built yet (an adapter not trained)"
            continue
        probes[key] = probe
    if not probes:
        return "no tensor can be read before the stages before it run"
    costs = working_sets(plan, device, engine, workers, memory_budget)
    files = _input_files(models)
    cold, disk_rate, hash_rate = _storage(files, hash_inputs)  # first: the probe's own reads cache what they touch
    traced = _engine(plan, device, engine) == "numpy" and not tracemalloc.is_tracing()
    with _Prober(plan, models, run_jobs, scratch, workers) as prober:
        tiny = min(probes.values(), key=lambda j: j.numel)
        before = private_bytes()
        first = prober.once([_renamed(tiny, "first")])  # with the imports and the engine's set-up
        imported = max(0, private_bytes() - before)
        one = prober.best([tiny], trace=traced)
        nine = prober.best([_renamed(tiny, f"nine{i}") for i in range(9)])
        per_job = max(0.0, (nine.cpu - one.cpu) / 8)  # CPU seconds of one small job
        call = Run(max(0.0, one.wall - per_job), max(0.0, one.cpu - per_job))  # a run's own set-up
        setup = max(0.0, first.wall - one.wall)
        runs = {key: one if job is tiny else prober.best([job], trace=traced) for key, job in probes.items()}
        per_entry = {key: max(runs[key].cpu - call.cpu, per_job) / work(probes[key]) for key in probes}
        for key in kinds:  # a small kind none of whose inputs exists yet: the slowest rate seen
            per_entry.setdefault(key, max(per_entry.values()))
        alone = _cores_used([runs[key] for key in probes], call, 1)
        largest = max(kinds, key=lambda k: per_entry[k] * sum(work(j) for j in kinds[k]))
        together = alone
        if workers > 1 and largest in probes:
            copies = [_renamed(probes[largest], f"w{i}") for i in range(workers)]
            together = max(alone, _cores_used([prober.best(copies)], call, workers))
        memory = {}
        if traced:
            fixed = prober.peaks[tiny.name]
            memory = {
                key: prober.memory(job, _memory_job(kinds[key], job, models), fixed) for key, job in probes.items()
            }
    key_of = {id(job): key for key, jobs in kinds.items() for job in jobs}
    durations = [max(per_entry[key_of[id(job)]] * work(job), per_job) for job in plan.jobs]  # CPU seconds
    if memory:
        for key in kinds:  # a small kind none of whose inputs exists yet: the largest per entry seen
            memory.setdefault(key, max(memory.values(), key=lambda m: m[1]))
        sizes = [int(memory[key_of[id(j)]][0] + memory[key_of[id(j)]][1] * j.numel) for j in plan.jobs]
        # A probe is small enough to buffer its cuts; a job the budget makes stream them holds what the model
        # of its streamed working set says, not the probe's buffers scaled to its size.
        unbounded = working_sets(plan, device, engine, workers, UNBOUNDED)
        sizes = [held_by(size, cost, whole) for size, cost, whole in zip(sizes, costs, unbounded, strict=True)]
    else:
        sizes = costs
    local = sum(f.stat().st_size for f in files if hub_origin(f.parent) is None)
    order = run_order(plan)  # the executor starts jobs in this order
    durations = [durations[i] for i in order]
    costs, sizes = [costs[i] for i in order], [sizes[i] for i in order]
    return StageEstimate(
        merge_s=replay(durations, costs, workers, together, alone=alone, budget=memory_budget),
        read_s=cold / disk_rate,
        fingerprint_s=local / hash_rate if hash_inputs else 0.0,
        setup_s=setup,
        kinds=len(probes),
        cores_alone=alone,
        cores_together=together,
        workers=workers,
        cold_bytes=cold,
        working_sets=peak_held(sizes, costs, workers, memory_budget),
        working_sets_measured=bool(memory),
        imported_bytes=imported,
        probe_s=time.perf_counter() - started,
    )


UNBOUNDED = 1 << 62
"""A memory budget no job passes: the working sets of jobs that buffer every cut."""


def held_by(measured: int, cost: int, buffered_cost: int) -> int:
    """The bytes a job holds: ``measured`` (the probe's allocations per entry, scaled to the job), unless the
    budget makes it stream its cuts (its modelled ``cost`` is below ``buffered_cost``, what it would hold
    buffering them): then at most ``cost``, as the probe buffered what the job streams."""
    return min(measured, cost) if cost < buffered_cost else measured


class Run(NamedTuple):
    """One probe run: wall seconds, and CPU seconds of the whole process (every thread, user and system)."""

    wall: float
    cpu: float


def _cores_used(runs: list[Run], call: Run, most: int) -> float:
    """Cores the jobs of these runs had, on average, beyond each run's own set-up: CPU seconds over wall
    seconds. One job alone gets at most one; below that, other work on the machine took the rest."""
    cpu = sum(max(r.cpu - call.cpu, 0.0) for r in runs)
    wall = sum(max(r.wall - call.wall, 1e-6) for r in runs)
    return min(float(most), max(0.05, cpu / wall))


class _Prober:
    """Runs probe plans in a scratch folder with the merge's worker count (so each job gets the threads it
    will get) and times them: the best of a few runs where runs are short, since a busy machine only ever
    adds time. The first run of a kind also reads its inputs from disk when they are not cached, which
    :func:`_storage` accounts for instead."""

    def __init__(
        self, plan: MergePlan, models: dict[str, ModelInfo], run_jobs: RunJobs, scratch: Path | None, workers: int
    ) -> None:
        self.plan, self.models, self.run_jobs, self.scratch, self.workers = plan, models, run_jobs, scratch, workers
        self.count = 0
        self.peaks: dict[str, int] = {}

    def __enter__(self) -> _Prober:
        self.folder = Path(tempfile.mkdtemp(prefix=".gift-merge-probe-", dir=_scratch(self.scratch)))
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def once(self, jobs: list[TensorJob], *, trace: bool = False) -> Run:
        """One run; with ``trace``, the peak bytes ``tracemalloc`` saw allocated go to :attr:`peaks` under the
        first job's name (numpy reports its arrays to it)."""
        self.count += 1
        target = self.folder / str(self.count)
        target.mkdir()
        if trace:
            tracemalloc.start()
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            self.run_jobs(replace(self.plan, jobs=jobs, models=self.models), target, self.workers)
            done = Run(time.perf_counter() - wall, time.process_time() - cpu)
            if trace:
                self.peaks[jobs[0].name] = tracemalloc.get_traced_memory()[1]
        finally:
            if trace:
                tracemalloc.stop()
        shutil.rmtree(target, ignore_errors=True)
        return done

    def memory(self, job: TensorJob, larger: TensorJob | None, fixed: int) -> tuple[float, float]:
        """Bytes a job of this kind allocates, as (fixed, per entry), from the peaks of traced runs: a line
        through the probe job (traced while timed) and a ``larger`` one of the kind, since blocks cost the same
        at any size; without one, ``fixed`` (a run of a tiny job) and the rest per entry."""
        small = self.peaks[job.name]
        if larger is None:
            return float(fixed), max(0, small - fixed) / job.numel
        self.once([larger], trace=True)
        large = self.peaks[larger.name]
        slope = max(0.0, (large - small) / (larger.numel - job.numel))
        return max(0.0, small - slope * job.numel), slope

    def best(self, jobs: list[TensorJob], *, trace: bool = False) -> Run:
        """The run of the fewest CPU seconds of up to three: CPU seconds, unlike wall seconds, barely move when
        other work shares the machine, and short runs are noisy. One of 0.2 s or more is not repeated,
        which keeps a probe of the slowest methods under a second. ``trace``: one more run first, for its
        memory only, since tracing slows a run (the engine's Python allocations) and it meets the first touches."""
        if trace:
            self.once(jobs, trace=True)
        runs = [self.once(jobs)]
        while len(runs) < 3 and min(r.wall for r in runs) < 0.2 and (len(runs) < 2 or runs[-1].wall < 0.05):
            runs.append(self.once(jobs))
        return min(runs, key=lambda r: r.cpu)


def replay(durations: list[float], costs: list[int], workers: int, together: float, *, alone: float = 1.0,
           budget: int = DEFAULT_MEMORY_BUDGET) -> float:  # fmt: skip
    """Wall seconds the executor takes for jobs of these CPU-second ``durations`` and working-set ``costs``.

    The executor's admission rule (at most ``workers + 1`` jobs submitted, no new one past ``budget``
    while others run, waiting for whichever finishes first) with a pool of ``workers`` workers taking jobs
    in order; k jobs running together share s(k) cores, s rising linearly from ``alone`` (one job) to
    ``together`` (``workers`` jobs).
    """
    clock = 0.0
    left: dict[int, float] = {}  # submitted, unfinished: remaining single-worker seconds, in submission order
    pending: dict[int, int] = {}  # submitted and not yet waited for: index → cost
    in_flight = 0

    def rate(k: int) -> float:
        if workers <= 1 or k <= 1:
            return alone
        return (alone + (together - alone) * (k - 1) / (workers - 1)) / k

    def wait_for_any() -> int:
        """Run the clock until a pending job has finished; that job's index."""
        nonlocal clock
        while True:
            finished = next((i for i in pending if i not in left), None)
            if finished is not None:
                return finished
            running = list(left)[:workers]
            step = rate(len(running))
            dt = min(left[i] for i in running) / step
            clock += dt
            for i in running:
                left[i] -= dt * step
                if left[i] <= 1e-12:
                    del left[i]

    for index, (duration, cost) in enumerate(zip(durations, costs, strict=True)):
        while pending and (len(pending) > workers or in_flight + cost > budget):
            in_flight -= pending.pop(wait_for_any())
        pending[index] = cost
        left[index] = duration
        in_flight += cost
    while pending:
        pending.pop(wait_for_any())
    return clock


def peak_held(sizes: list[int], costs: list[int], workers: int, budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """The largest sum of ``sizes`` of jobs in flight together when the executor admits jobs by their
    estimated working sets ``costs`` (:func:`gift_merge.engine.executor.peak_in_flight`'s rule, jobs finishing in
    order)."""
    pending: list[int] = []
    in_flight = held = peak = 0
    for index, (size, cost) in enumerate(zip(sizes, costs, strict=True)):
        while pending and (len(pending) > workers or in_flight + cost > budget):
            done = pending.pop(0)
            in_flight -= costs[done]
            held -= sizes[done]
        pending.append(index)
        in_flight += cost
        held += size
        peak = max(peak, held)
    return peak


def _engine(plan: MergePlan, device: str, engine: str) -> str:
    from gift_merge.engine.executor import choose_engine

    return choose_engine(plan, device, engine)


def _scratch(scratch: Path | None) -> str | None:
    """Beside the output when that folder exists and is writable (the same disk the merge writes to)."""
    if scratch is not None and scratch.is_dir() and os.access(scratch, os.W_OK):
        return str(scratch)
    return None


def _is_large(job: TensorJob) -> bool:
    return job.numel >= blocks.CHUNK_FROM


def _kinds(jobs: list[TensorJob]) -> dict[tuple[object, ...], list[TensorJob]]:
    """Jobs whose seconds per entry are alike: method, inputs, dtypes, and small (one block) or blocked."""
    kinds: dict[tuple[object, ...], list[TensorJob]] = {}
    for job in jobs:
        key = (
            job.operator,
            job.copy,
            _is_large(job),
            len(job.inputs),
            job.base is not None,
            tuple(src.delta for src in job.sources),
            str(job.out_dtype),
            str(job.load_dtype),
            str(job.math_dtype),
        )
        kinds.setdefault(key, []).append(job)
    return kinds


def _probe_models(plan: MergePlan, substitutes: Mapping[str, ModelInfo]) -> dict[str, ModelInfo]:
    """The plan's models, with stage outputs not built yet replaced by the real models standing for them."""
    models = dict(plan.models)
    for label, model in plan.models.items():
        if model.virtual and not model.planned_adapter and label in substitutes:
            stand_in = substitutes[label]
            models[label] = replace(model, folder=stand_in.folder, tensors=stand_in.tensors, virtual=False)
    return models


def _readable(job: TensorJob, models: Mapping[str, ModelInfo]) -> bool:
    """Every input of ``job`` exists now, with the shape the job reads (a vocabulary may have more rows)."""
    for src in job.sources:
        model = models[src.model]
        if model.virtual or src.name not in model.tensors:
            return False
        if src.name in model.patches and model.adapter is None:  # an adapter not trained yet
            return False
        stored = model.tensors[src.name][0]
        if stored[1:] != job.shape[1:] or (stored[:1] < job.shape[:1]):
            return False
    return True


def _probe_job(jobs: list[TensorJob], models: Mapping[str, ModelInfo]) -> TensorJob | None:
    """A readable job of this kind: for a blocked kind the smallest one of :data:`PROBE_ENTRIES` entries or more,
    cut to its first rows where its inputs allow, so that half of it is still blocked (the memory probe runs
    both); for a small kind the largest one."""
    readable = [j for j in jobs if _readable(j, models)]
    if not readable:
        return None
    if not _is_large(readable[0]):
        return _renamed(max(readable, key=lambda j: j.numel), "probe")
    big = [j for j in readable if j.numel >= PROBE_ENTRIES]
    job = min(big, key=lambda j: j.numel) if big else max(readable, key=lambda j: j.numel)
    rows = _rows_for(job, PROBE_ENTRIES)
    if rows < job.shape[0] and _cuttable(job, models):
        job = _cut(job, rows)
    return _renamed(job, "probe")


def _memory_job(jobs: list[TensorJob], probe: TensorJob, models: Mapping[str, ModelInfo]) -> TensorJob | None:
    """The largest readable job of a blocked kind, cut to :data:`MEMORY_ENTRIES` where its inputs allow, to
    take the kind's bytes per entry against the probe job: some methods keep their whole-tensor buffers
    only past a few million entries (TIES' |δ| at 0.5B: 2.0 bytes per entry between 1M and 2M entries, 5.0
    from 4M on). ``None`` where the kind has nothing twice the probe's size."""
    readable = [j for j in jobs if _is_large(j) and _readable(j, models)]
    if not readable:
        return None
    job = max(readable, key=lambda j: j.numel)
    rows = _rows_for(job, MEMORY_ENTRIES)
    if rows < job.shape[0] and _cuttable(job, models):
        job = _cut(job, rows)
    return _renamed(job, "memory") if job.numel >= 2 * probe.numel else None


def _rows_for(job: TensorJob, entries: int) -> int:
    """Rows of ``job`` that hold at least ``entries`` entries (all of them for a 1-D tensor)."""
    if len(job.shape) < 2:
        return job.shape[0] if job.shape else 1
    return max(1, math.ceil(entries / (job.numel // job.shape[0])))


def _cut(job: TensorJob, rows: int) -> TensorJob:
    """``job`` on the first ``rows`` rows of its inputs (the planner's vocabulary cut does the same)."""
    return replace(job, shape=(rows, *job.shape[1:]), rows=min(rows, job.rows or rows))


def _cuttable(job: TensorJob, models: Mapping[str, ModelInfo]) -> bool:
    """Whether the first rows of the inputs alone make a valid job: always without adapters; with them only
    where ΔW is formed block of rows by block of rows (an elementwise method and additive patches)."""
    patches = [models[s.model].patches[s.name] for s in job.sources if s.name in models[s.model].patches]
    if not patches:
        return True
    return get_operator(job.operator).elementwise and all(p.additive for p in patches)


def _renamed(job: TensorJob, tag: str) -> TensorJob:
    """A copy of ``job`` under a name of its own (the writer refuses a name twice)."""
    return replace(job, name=f"{job.name}#{tag}")


def _input_files(models: Mapping[str, ModelInfo]) -> list[Path]:
    """The weight files a stage reads: its models' and adapters' (an adapter standing as a model reads its
    receiving model's through that model's own entry)."""
    folders = set()
    for model in models.values():
        if not model.virtual and not model.adapter_only:
            folders.add(model.folder)
        if model.adapter is not None:
            folders.add(model.adapter.folder)
    return sorted({f for folder in folders if folder.is_dir() for f in weight_files(folder)})


def _storage(files: list[Path], hash_inputs: bool) -> tuple[int, float, float]:
    """Bytes of the input files not in the page cache now; the rate of reading such bytes; and the rate of
    reading and hashing cached ones, as the fingerprints will after the merge.

    Residency comes from ``mincore`` (no reading); the disk rate from reading a few uncached samples,
    which are all a merge of a cached model skips.
    """
    cold_ranges: list[tuple[Path, int]] = []  # (file, offset) of sample-sized blocks wholly out of the cache
    warm_ranges: list[tuple[Path, int]] = []  # and wholly in it
    cold = 0
    step = _SAMPLE_BYTES // mmap.PAGESIZE
    for path in files:
        pages = resident_pages(path)
        if pages is None:
            continue
        cold += pages.count(0) * mmap.PAGESIZE
        for first in range(0, len(pages) - step + 1, step):
            cached = pages.count(1, first, first + step)
            if cached == step:
                warm_ranges.append((path, first * mmap.PAGESIZE))
            elif cached == 0:
                cold_ranges.append((path, first * mmap.PAGESIZE))
    buffer = bytearray(_SAMPLE_BYTES)
    disk_rate = _DEFAULT_RATE
    if cold_ranges:
        picks = cold_ranges[:: max(1, len(cold_ranges) // _DISK_SAMPLES)][:_DISK_SAMPLES]
        disk_rate = _read_rate(picks, buffer, None)
    hash_rate = _DEFAULT_RATE
    if warm_ranges and hash_inputs:
        picks = warm_ranges[:: max(1, len(warm_ranges) // _HASH_SAMPLES)][:_HASH_SAMPLES]
        hash_rate = _read_rate(picks, buffer, hashlib.sha256())
    return cold, disk_rate, hash_rate


def _read_rate(ranges: list[tuple[Path, int]], buffer: bytearray, digest: Any) -> float:
    view = memoryview(buffer)
    read = 0
    begin = time.perf_counter()
    for path, offset in ranges:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(offset)
            got = handle.readinto(view)
            if digest is not None:
                digest.update(view[:got])
            read += got
    return max(read / max(time.perf_counter() - begin, 1e-6), 1e6)


def resident_pages(path: Path) -> bytes | None:
    """One byte per page of ``path``, 1 where the page is in the page cache (Linux ``mincore``), without
    reading the file; ``None`` where that cannot be asked."""
    size = path.stat().st_size
    libc = _libc()
    if size == 0 or libc is None:
        return None
    try:
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)  # copy-on-write: nothing is read
        try:
            vector = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                return None
            return bytes(vector).translate(_LOW_BIT)  # the other bits are reserved
        finally:
            mapped.close()
    except (OSError, ValueError, BufferError):
        return None


_LOW_BIT = bytes(i & 1 for i in range(256))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None
