"""``gift-merge run RECIPE OUT --executor ray``: each stage's parts (:mod:`gift_merge.parts`) as Ray tasks.

The driver plans the recipe, then for each stage not built yet submits its parts as tasks, each asking for
the CPUs of its thread pool and the memory the plan's estimate gives (:func:`estimated_peak`), shows one
progress bar over the shards all parts have recorded, and finalizes the stage before the next one is
planned against it. A part whose worker dies (killed, out of memory) or fails with an ``OSError`` is run
again by Ray; the shards it recorded before are kept, a half-written one is written again. The bytes are a
single-process run's: the parts write the writer's own shards. A comparison (``compare:``) builds every
stage its arms read, for every seed, as a task that starts once the stages it reads are built (arms, sweep
points and seeds side by side), then evaluates each arm and seed not evaluated before as a task of its own
(a GPU each when the evaluation runs on one); the driver ranks, tabulates and plots as a local run does.
Ray is imported only here, only when asked for; workers must see the inputs and OUT at the same paths (a
shared file system).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gift_merge.engine.executor import default_workers, estimated_peak
from gift_merge.errors import GiftMergeError
from gift_merge.io.locks import output_lock
from gift_merge.io.writer import check_output_free
from gift_merge.merge import MergeOptions, resolve_output
from gift_merge.parts import finalize, next_stage, plan_shards, progress_bytes, run_part, staging_folder
from gift_merge.progress import progress
from gift_merge.recipe.schema import Recipe

if TYPE_CHECKING:
    from gift_merge.compare.run import EvalJob, Evaluations
    from gift_merge.compare.spec import CompareSpec

log = logging.getLogger("gift_merge")

MAX_RETRIES = 2  # runs of a task after the first, when its worker dies or it fails with an OSError
# tasks pass recipes, counts and evaluation records (lm-eval's output: megabytes), no need for Ray's 30% of RAM
LOCAL_OBJECT_STORE = 256 << 20
# tests: a marker path. The first part 0 to find it missing, and the first evaluation to find it with
# EVAL_MARKER_SUFFIX missing, create it and end their worker.
FAIL_ONCE_ENV = "GIFT_MERGE_RAY_FAIL_ONCE"
EVAL_MARKER_SUFFIX = ".eval"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise GiftMergeError("--executor ray needs Ray: pip install 'gift-merge[ray]'") from None
    return ray


def _die_once(suffix: str = "") -> None:
    """Tests: end the worker if the marker (``FAIL_ONCE_ENV`` + ``suffix``) is missing, creating it."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker + suffix, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)  # a worker crash, as the OOM killer makes one: Ray runs the task again


def _task(ray: Any, function: Callable[..., Any], **resources: Any) -> Any:
    """``function`` as a Ray task asking for ``resources``, run again (up to :data:`MAX_RETRIES` times) when
    its worker dies or it raises an ``OSError``: a part keeps the shards it recorded, a build or an
    evaluation starts over."""
    return ray.remote(function).options(**resources, max_retries=MAX_RETRIES, retry_exceptions=[OSError])


def _wait_all(
    ray: Any,
    labels: dict[Any, str],
    on_result: Callable[[Any, Any], None],
    every: Callable[[int], None] | None = None,
) -> None:
    """Wait for every task in ``labels`` (its ref → what it is, for messages), handing each result to
    ``on_result`` as it arrives, and the number finished to ``every`` about once a second. A task that failed
    past its retries stops the wait with one line, and the tasks not finished are cancelled."""
    remaining = list(labels)
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=1.0)
            for ref in ready:
                on_result(ref, _result(ray, ref, labels[ref]))
            if every is not None:
                every(len(labels) - len(remaining))
    except BaseException:
        for ref in remaining:
            ray.cancel(ref, force=True)
        raise


def _result(ray: Any, ref: Any, what: str) -> Any:
    """A finished task's result; a task that failed past its retries as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, GiftMergeError):
            raise GiftMergeError(f"{what}: {cause}") from None
        raise GiftMergeError(f"{what} failed {MAX_RETRIES + 1} times: {cause!r}") from exc
    except ray.exceptions.RayError as exc:  # the worker died each time, or the task could not run
        raise GiftMergeError(f"{what}: {type(exc).__name__} after {MAX_RETRIES + 1} tries ({exc})") from exc


def _part_task(recipe: Recipe, destination: Path, options: MergeOptions) -> tuple[int, int]:
    """One part in a Ray worker: the shards written and those recorded before."""
    if options.part is not None and options.part[0] == 0:
        _die_once()
    outcome = run_part(recipe, destination, options, finalize_when_done=False)
    return outcome.written, outcome.skipped


def run_on_ray(
    recipe: Recipe,
    out: str | Path | None,
    options: MergeOptions,
    *,
    address: str | None = None,
    parts: int | None = None,
) -> Path:
    """Build every stage of ``recipe`` with its parts on Ray; return the output folder."""
    ray = _import_ray()
    destination = resolve_output(recipe, out)
    if recipe.compare is None and not staging_folder(destination).exists():
        check_output_free(destination, overwrite=options.overwrite)
    started = not ray.is_initialized()
    if started and address is None and not os.environ.get("RAY_ADDRESS"):  # a local instance, just for this run
        ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=LOCAL_OBJECT_STORE)
    elif started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with output_lock(destination):  # one driver per output; its parts lock their shards
            if recipe.compare is not None:  # every arm and seed built, then evaluated, as Ray tasks
                return _run_compare(ray, recipe, destination, options)
            while True:
                pending = next_stage(recipe, destination, options)
                assert pending is not None  # the loop ends when the final stage is finalized
                stage, plan, target, _ = pending
                _run_stage_parts(ray, recipe, destination, options, plan, target, stage.name or "merge", parts)
                finalize(target)
                if stage is recipe.final:
                    return destination
    finally:
        if started:
            ray.shutdown()


def _run_stage_parts(
    ray: Any,
    recipe: Recipe,
    destination: Path,
    options: MergeOptions,
    plan: Any,
    target: Path,
    label: str,
    parts: int | None,
) -> None:
    shards = plan_shards(plan, options.max_shard_bytes)
    count = max(1, min(parts or len(shards), len(shards)))
    workers = options.workers or default_workers()
    held = estimated_peak(plan, options.device, options.engine, workers, options.memory_budget)
    memory = held + (256 << 20)  # + the process itself
    available = ray.cluster_resources().get("memory")
    if available:
        memory = min(memory, int(available))
    task = _task(ray, _part_task, num_cpus=workers, memory=memory)
    log.info(
        "stage %s: %d part(s) of %d shard(s) on Ray, each %d CPU(s) and %.2f GB", label, count, len(shards), workers,
        memory / 1e9,
    )  # fmt: skip
    quiet_parts = replace(options, quiet=True)
    labels = {
        task.remote(recipe, destination, replace(quiet_parts, part=(i, count))): f"stage {label}, part {i}/{count}"
        for i in range(count)
    }
    started = time.monotonic()
    with progress(
        total=plan.output_bytes, unit="B", unit_scale=True, desc=f"{label} on Ray", quiet=options.quiet
    ) as bar:

        def part_done(ref: Any, result: Any) -> None:
            written, skipped = result
            log.debug("%s done (%d shard(s) written, %d before)", labels[ref], written, skipped)

        def shards_written(finished: int) -> None:
            bar.update(min(progress_bytes(target), plan.output_bytes) - bar.n)
            bar.set_postfix_str(f"{finished}/{count} parts", refresh=False)

        _wait_all(ray, labels, part_done, shards_written)
    log.info("stage %s: %d part(s) done in %.1f s", label, count, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------- comparisons


def _run_compare(ray: Any, recipe: Recipe, destination: Path, options: MergeOptions) -> Path:
    """A comparison as :func:`gift_merge.merge.run_recipe` runs it, its builds and evaluations Ray tasks."""
    from gift_merge.compare.run import run_compare
    from gift_merge.evaluate.harness import task_manager
    from gift_merge.merge import plan_recipe

    assert recipe.compare is not None
    plan_recipe(recipe, destination, options.intermediate_dir)  # every stage checked before any is built
    task_manager(recipe.compare.tasks)  # unknown task names too
    build_compare_stages(ray, recipe, destination, options)
    return run_compare(recipe, destination, options, evaluate=partial(evaluate_on_ray, ray, options))


def build_compare_stages(ray: Any, recipe: Recipe, destination: Path, options: MergeOptions) -> None:
    """Every stage the arms of a comparison read, for every seed, each a Ray task that starts when the stages
    it reads are built: arms, sweep points and seeds run side by side. Each task builds its stage as
    :func:`gift_merge.compare.run.run_compare` does (its time and peak memory recorded), so the comparison
    that follows reuses them all."""
    from gift_merge.compare.run import _needed_stages, seeded_stages
    from gift_merge.recipe.loader import stage_dependencies

    spec = recipe.compare
    assert spec is not None
    seeded = seeded_stages(recipe)
    needed = _needed_stages(recipe, spec)
    workers = options.workers or default_workers()
    task = _task(ray, _compare_build_task, num_cpus=workers)
    refs: dict[tuple[str, int], Any] = {}
    labels: dict[Any, str] = {}
    for seed in spec.seeds:
        for stage in recipe.stages:
            name = stage.name or ""
            if name not in needed:
                continue
            if name not in seeded and seed != spec.seeds[0]:  # built once, shared by every seed
                refs[(name, seed)] = refs[(name, spec.seeds[0])]
                continue
            after = [refs[(d, seed)] for d in sorted(stage_dependencies(stage))]
            ref = task.remote(recipe, destination, replace(options, quiet=True), name, seed, *after)
            refs[(name, seed)] = ref
            labels[ref] = f"compare: stage {name} (seed {seed})" if name in seeded else f"compare: stage {name}"
    log.info("compare: %d stage build(s) on Ray, each %d CPU(s)", len(labels), workers)
    with progress(total=len(labels), desc="builds on Ray", quiet=options.quiet) as bar:

        def built(ref: Any, seconds: Any) -> None:
            log.info("%s %s", labels[ref], f"built in {seconds:.1f} s" if seconds else "up to date")
            bar.update(1)

        _wait_all(ray, labels, built)


def _compare_build_task(
    recipe: Recipe, destination: Path, options: MergeOptions, name: str, seed: int, *_after: object
) -> float:
    """Build one stage of a comparison for one seed (``_after``: the builds it reads, for Ray to wait on);
    the seconds it took, 0 when it was up to date."""
    import json

    from gift_merge.compare.measure import measured
    from gift_merge.compare.run import BUILD_RECORD, folders_for_seed, seeded_stage, seeded_stages
    from gift_merge.merge import build_stage, stage_is_current, stage_resolver
    from gift_merge.reuse import input_fingerprint, record_inputs

    folders = folders_for_seed(recipe, destination, seed, seeded_stages(recipe), options)
    stage = seeded_stage(next(s for s in recipe.stages if s.name == name), seed)
    target = folders[name]
    fingerprint = input_fingerprint(stage, folders, recipe.folder)
    if stage_is_current(target, stage, fingerprint):
        return 0.0
    with measured() as measurement:
        build_stage(
            stage, target, folders, stage_resolver(recipe, folders), replace(options, seed=seed), overwrite=True
        )
    record = {"seconds": round(measurement.seconds, 3), "peak_rss_bytes": measurement.peak_rss_bytes}
    (target / BUILD_RECORD).write_text(json.dumps(record) + "\n")
    record_inputs(target, fingerprint)
    return max(measurement.seconds, 1e-3)


def evaluate_on_ray(ray: Any, options: MergeOptions, jobs: list[EvalJob], spec: CompareSpec) -> Evaluations:
    """Each evaluation (an arm for a seed) a Ray task, all side by side, each asking for the CPUs of
    ``--workers`` and a GPU when the evaluation runs on one; their records by (arm, seed), each also
    written to its cache file by the task, as :func:`gift_merge.compare.run.evaluate_here` writes it."""
    from gift_merge.compare.run import scores_line

    workers = options.workers or default_workers()
    gpus = _evaluation_gpus(ray, spec.device)
    device = "cuda" if spec.device.startswith("cuda") else spec.device  # Ray shows a task its one GPU as cuda:0
    task = _task(ray, _evaluation_task, num_cpus=workers, num_gpus=gpus)
    labels = {task.remote(job, device, spec.dtype): job for job in jobs}
    log.info(
        "compare: %d evaluation(s) on Ray, each %d CPU(s)%s on %s", len(jobs), workers, " and a GPU" if gpus else "",
        ", ".join(spec.tasks),
    )  # fmt: skip
    evaluations: Evaluations = {}
    with progress(total=len(jobs), desc="evaluations on Ray", quiet=options.quiet) as bar:

        def evaluated(ref: Any, record: Any) -> None:
            job = labels[ref]
            evaluations[(job.arm, job.seed)] = record
            log.info("compare: %s: %s (%.1f s)", job.label, scores_line(spec, record), record["seconds"])
            bar.update(1)

        _wait_all(ray, {ref: f"compare: evaluating {job.label}" for ref, job in labels.items()}, evaluated)
    return evaluations


def _evaluation_gpus(ray: Any, device: str) -> int:
    """A GPU for an evaluation on ``cuda…``, or on ``auto`` where the cluster has GPUs; none on the CPU."""
    has_gpus = bool(ray.cluster_resources().get("GPU"))
    if device.startswith("cuda"):
        if not has_gpus:
            log.warning("compare: eval.device %s, but the Ray cluster has no GPU now: evaluations wait for one", device)
        return 1
    return 1 if device == "auto" and has_gpus else 0


def _evaluation_task(job: EvalJob, device: str, dtype: str) -> dict[str, Any]:
    """One evaluation in a Ray worker: its record, written to its cache file too."""
    from gift_merge.compare.run import evaluate_job

    _die_once(EVAL_MARKER_SUFFIX)
    return evaluate_job(job, device, dtype)
