"""``gift-merge run RECIPE OUT --executor ray``: each stage's parts (:mod:`gift_merge.parts`) as Ray tasks.

The driver plans the recipe, then for each stage not built yet submits its parts as tasks, each asking for
the CPUs of its thread pool and the memory the plan's estimate gives (:func:`estimated_peak`), shows one
progress bar over the shards all parts have recorded, and finalizes the stage before the next one is
planned against it. A part whose worker dies (killed, out of memory) or fails with an ``OSError`` is run
again by Ray; the shards it recorded before are kept, a half-written one is written again. The bytes are a
single-process run's: the parts write the writer's own shards. A comparison (``compare:``) builds every
stage its arms read, for every seed, as a task that starts once the stages it reads are built (arms, sweep
points and seeds side by side), then evaluates in the driver, reusing those builds. Ray is imported only
here, only when asked for; workers must see the inputs and OUT at the same paths (a shared file system).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gift_merge.engine.executor import default_workers, estimated_peak
from gift_merge.errors import GiftMergeError
from gift_merge.io.locks import output_lock
from gift_merge.io.writer import check_output_free
from gift_merge.merge import MergeOptions, resolve_output
from gift_merge.parts import finalize, next_stage, plan_shards, progress_bytes, run_part, staging_folder
from gift_merge.progress import progress
from gift_merge.recipe.schema import Recipe

log = logging.getLogger("gift_merge")

MAX_RETRIES = 2  # runs of a part after the first, when its worker dies or it fails with an OSError
LOCAL_OBJECT_STORE = 256 << 20  # tasks pass a recipe and two counts: no need for Ray's default (30% of RAM)
FAIL_ONCE_ENV = "GIFT_MERGE_RAY_FAIL_ONCE"  # tests: a marker path; the first part to see it missing dies


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise GiftMergeError("--executor ray needs Ray: pip install 'gift-merge[ray]'") from None
    return ray


def _part_task(recipe: Recipe, destination: Path, options: MergeOptions) -> tuple[int, int]:
    """One part in a Ray worker: the shards written and those recorded before."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and options.part is not None and options.part[0] == 0:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os._exit(1)  # a worker crash, as the OOM killer makes one: Ray runs the part again
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
            if recipe.compare is not None:  # every arm and seed built on Ray, then evaluated here
                build_compare_stages(ray, recipe, destination, options)
                from gift_merge.merge import run_recipe

                return run_recipe(recipe, destination, options)  # reuses every build
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
    task = ray.remote(_part_task).options(
        num_cpus=workers,
        memory=memory,
        max_retries=MAX_RETRIES,
        retry_exceptions=[OSError],
    )
    log.info(
        "stage %s: %d part(s) of %d shard(s) on Ray, each %d CPU(s) and %.2f GB", label, count, len(shards), workers,
        memory / 1e9,
    )  # fmt: skip
    quiet_parts = replace(options, quiet=True)
    refs = [task.remote(recipe, destination, replace(quiet_parts, part=(i, count))) for i in range(count)]
    names = {ref: i for i, ref in enumerate(refs)}
    bar = progress(total=plan.output_bytes, unit="B", unit_scale=True, desc=f"{label} on Ray", quiet=options.quiet)
    remaining = list(refs)
    shown = 0
    started = time.monotonic()
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1, timeout=1.0)
            for ref in ready:
                written, skipped = _result(ray, ref, f"stage {label}, part {names[ref]}/{count}")
                log.debug(
                    "stage %s: part %d/%d done (%d written, %d before)", label, names[ref], count, written, skipped
                )
            done = min(progress_bytes(target), plan.output_bytes)
            bar.update(done - shown)
            shown = done
            bar.set_postfix_str(f"{count - len(remaining)}/{count} parts", refresh=False)
    except BaseException:
        for ref in remaining:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    log.info("stage %s: %d part(s) done in %.1f s", label, count, time.monotonic() - started)


def _result(ray: Any, ref: Any, what: str) -> tuple[int, int]:
    """A finished part's result; a part that failed past its retries as one line."""
    try:
        written, skipped = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, GiftMergeError):
            raise GiftMergeError(f"{what}: {cause}") from None
        raise GiftMergeError(f"{what} failed {MAX_RETRIES + 1} times: {cause!r}") from exc
    except ray.exceptions.RayError as exc:  # the worker died each time, or the task could not run
        raise GiftMergeError(f"{what}: {type(exc).__name__} after {MAX_RETRIES + 1} tries ({exc})") from exc
    return int(written), int(skipped)


# ---------------------------------------------------------------------------------------------- comparisons


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
    task = ray.remote(_compare_build_task).options(
        num_cpus=workers, max_retries=MAX_RETRIES, retry_exceptions=[OSError]
    )
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
            labels[ref] = f"stage {name} (seed {seed})" if name in seeded else f"stage {name}"
    pending = list(labels)
    log.info("compare: %d stage build(s) on Ray, each %d CPU(s)", len(pending), workers)
    bar = progress(total=len(pending), desc="builds on Ray", quiet=options.quiet)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                seconds = _compare_result(ray, ref, labels[ref])
                log.info("compare: %s %s", labels[ref], f"built in {seconds:.1f} s" if seconds else "up to date")
                bar.update(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()


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


def _compare_result(ray: Any, ref: Any, what: str) -> float:
    try:
        return float(ray.get(ref))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, GiftMergeError):
            raise GiftMergeError(f"compare: {what}: {cause}") from None
        raise GiftMergeError(f"compare: {what} failed {MAX_RETRIES + 1} times: {cause!r}") from exc
    except ray.exceptions.RayError as exc:
        raise GiftMergeError(f"compare: {what}: {type(exc).__name__} after {MAX_RETRIES + 1} tries ({exc})") from exc
