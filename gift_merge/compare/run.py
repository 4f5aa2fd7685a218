"""``gift-merge compare``: build every arm, evaluate it on every task and seed, then tabulate and plot.

Seeds vary what is random: a ``train:`` stage trains with the seed, DARE/DELLA merges draw with it, and
every stage that reads such a stage is built once per seed (``stages/seed-S/NAME``); deterministic
stages are built once (``stages/NAME``) and shared. Greedy evaluation of an arm that no seed changes
gives the same numbers every time, so such an arm is evaluated once. Stages are reused while their text
and inputs are unchanged, as in ``gift-merge run``; evaluations are reused while the evaluated folders
and the evaluation settings are unchanged (``evals/ARM/seed-S.json``, lm-eval's output kept there). The
rest run one after another here (:func:`evaluate_here`), or each as a Ray task (``--executor ray``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from gift_merge.compare.measure import measured
from gift_merge.compare.results import ArmRecord, Comparison, Score
from gift_merge.compare.spec import ArmSpec, CompareSpec
from gift_merge.errors import GiftMergeError
from gift_merge.evaluate.harness import EvalOptions
from gift_merge.evaluate.loading import EvalTarget, built_stage_target, model_target
from gift_merge.merge import MergeOptions, build_stage, stage_folders, stage_is_current, stage_resolver
from gift_merge.operators import get_operator
from gift_merge.recipe.loader import stage_dependencies
from gift_merge.recipe.schema import MergeStage, Recipe, Stage, TrainStage
from gift_merge.reuse import folder_files, input_fingerprint, record_inputs

log = logging.getLogger("gift_merge")

BUILD_RECORD = "gift-merge-build.json"
HEADLINE_PREFERENCE = ("acc", "rougeL", "exact_match", "acc_norm")


def run_compare(recipe: Recipe, out: Path, options: MergeOptions, evaluate: Evaluator | None = None) -> Path:
    """Build, evaluate and rank the arms of ``recipe.compare``; return the results folder.

    The caller (:func:`gift_merge.merge.run_recipe`, or the Ray executor) holds the output folder's lock.
    ``evaluate`` runs the evaluations not reused (default: :func:`evaluate_here`, one after another here).
    """
    spec = recipe.compare
    assert spec is not None
    from gift_merge.evaluate.harness import task_manager

    task_manager(spec.tasks)  # unknown task names fail before anything is built
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    seeded = seeded_stages(recipe)
    if any(isinstance(stage, TrainStage) for stage in recipe.stages):
        import gift_merge.train.loop  # noqa: F401  # torch, transformers, peft: once, not in the first arm's build time
    builds = _build_all(recipe, spec, out, options, seeded)
    evaluations = _evaluate_all(recipe, spec, out, options, seeded, evaluate or evaluate_here)
    comparison = _comparison(recipe, spec, builds, evaluations, seeded)
    comparison.meta["seconds_total"] = round(time.perf_counter() - started, 1)
    written = _write_results(comparison, out)
    from gift_merge.compare.report import terminal_table

    print(terminal_table(comparison))
    print(f"\nresults: {written['results.md']}")
    for plot in written.get("plots", []):
        print(f"plot: {plot}")
    return out


def seeded_stages(recipe: Recipe) -> set[str]:
    """Stages whose output a seed changes: training, random merges, and every stage reading one."""
    seeded: set[str] = set()
    for stage in recipe.stages:  # dependencies come first
        random = isinstance(stage, TrainStage) or (
            isinstance(stage, MergeStage) and get_operator(stage.merge_method).random
        )
        if random or stage_dependencies(stage) & seeded:
            seeded.add(stage.name or "")
    return seeded


def folders_for_seed(recipe: Recipe, out: Path, seed: int, seeded: set[str], options: MergeOptions) -> dict[str, Path]:
    shared = stage_folders(recipe, out, options.intermediate_dir)
    return {
        name: folder.parent / f"seed-{seed}" / folder.name if name in seeded else folder
        for name, folder in shared.items()
    }


def seeded_stage(stage: Stage, seed: int) -> Stage:
    """The stage as built for ``seed``: a train stage trains with it (its text records it, for reuse)."""
    if not isinstance(stage, TrainStage):
        return stage
    config = stage.config.replace(seed=seed)
    return dataclasses.replace(stage, config=config, text=f"{stage.text.rstrip()}\n# compare seed: {seed}\n")


BuildTable = dict[tuple[str, int], dict[str, Any]]  # (stage, seed) → {"seconds", "peak_rss_bytes", "rebuilt"}


def _build_all(recipe: Recipe, spec: CompareSpec, out: Path, options: MergeOptions, seeded: set[str]) -> BuildTable:
    builds: BuildTable = {}
    needed = _needed_stages(recipe, spec)
    for seed in spec.seeds:
        folders = folders_for_seed(recipe, out, seed, seeded, options)
        resolver = stage_resolver(recipe, folders)
        seed_options = dataclasses.replace(options, seed=seed)
        rebuilt: set[str] = set()
        for stage in recipe.stages:
            name = stage.name or ""
            if name not in needed:
                continue
            shared = None if name in seeded else builds.get((name, spec.seeds[0]))
            if shared is not None:  # built once, for the first seed
                builds[(name, seed)] = shared
                continue
            stage = seeded_stage(stage, seed)
            target = folders[name]
            label = f"{name} (seed {seed})" if name in seeded else name
            fingerprint = input_fingerprint(stage, folders, recipe.folder)
            if not (stage_dependencies(stage) & rebuilt) and stage_is_current(target, stage, fingerprint):
                log.info("compare: stage %s is up to date in %s", label, target)
                builds[(name, seed)] = {**_read_build_record(target), "rebuilt": False}
                continue
            log.info("compare: building stage %s …", label)
            with measured() as measurement:
                build_stage(stage, target, folders, resolver, seed_options, overwrite=True)
            record = {"seconds": round(measurement.seconds, 3), "peak_rss_bytes": measurement.peak_rss_bytes}
            (target / BUILD_RECORD).write_text(json.dumps(record) + "\n")
            record_inputs(target, fingerprint)
            builds[(name, seed)] = {**record, "rebuilt": True}
            rebuilt.add(name)
            log.info("compare: built %s in %.1f s", label, measurement.seconds)
    return builds


def _needed_stages(recipe: Recipe, spec: CompareSpec) -> set[str]:
    """The arms' stages and everything they read."""
    return set().union(*(_closure(recipe, arm.stage) for arm in spec.arms if arm.stage))


def _read_build_record(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / BUILD_RECORD).read_text()))
    except (OSError, ValueError):
        return {"seconds": None, "peak_rss_bytes": None}


def _closure(recipe: Recipe, stage: str) -> set[str]:
    """``stage`` and every stage it reads, directly or through others."""
    by_name = {s.name: s for s in recipe.stages if s.name}
    found: set[str] = set()
    pending = [stage]
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending += sorted(stage_dependencies(by_name[name]))
    return found


Evaluations = dict[tuple[str, int], dict[str, Any]]  # (arm, seed) → eval record


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One arm evaluated for one seed: what to load, lm-eval's settings, and the file its record goes to.

    Self-contained (paths and settings, no loaded objects), so a Ray task can run it on another machine.
    """

    arm: str
    seed: int
    label: str  # for messages: the arm, and the seed when the arm is evaluated per seed
    target: EvalTarget
    options: EvalOptions
    key: str  # what the record is reused for: the evaluated files and the settings (:func:`_eval_key`)
    cache: Path


class Evaluator(Protocol):
    """Runs the evaluations not found in the cache; returns their records by (arm, seed)."""

    def __call__(self, jobs: list[EvalJob], spec: CompareSpec) -> Evaluations: ...


def evaluate_here(jobs: list[EvalJob], spec: CompareSpec) -> Evaluations:
    """The evaluations one after another, in this process."""
    evaluations: Evaluations = {}
    for job in jobs:
        log.info("compare: evaluating %s on %s …", job.label, ", ".join(spec.tasks))
        record = evaluate_job(job, spec.device, spec.dtype)
        evaluations[(job.arm, job.seed)] = record
        log.info("compare: %s: %s (%.1f s)", job.label, scores_line(spec, record), record["seconds"])
    return evaluations


def evaluate_job(job: EvalJob, device: str, dtype: str) -> dict[str, Any]:
    """Load the arm's model, run lm-eval on it, and write the record (lm-eval's output kept) to its cache file."""
    from gift_merge.evaluate.harness import run_harness
    from gift_merge.evaluate.loading import load_for_eval
    from gift_merge.evaluate.record import eval_record, write_json

    started = time.perf_counter()
    loaded = load_for_eval(job.target, device=device, dtype=dtype)
    run = run_harness(loaded.model, loaded.tokenizer, job.options, device=device)
    del loaded
    seconds = time.perf_counter() - started
    record = {**eval_record(job.target.label, job.options, run, seconds, keep_samples=True), "key": job.key}
    write_json(job.cache, record)
    return record


def scores_line(spec: CompareSpec, record: dict[str, Any]) -> str:
    """Each task's headline score in an evaluation record, for the log."""
    return ", ".join(f"{task} {_headline(spec, task, record['scores'][task])}" for task in spec.tasks)


def _evaluate_all(
    recipe: Recipe,
    spec: CompareSpec,
    out: Path,
    options: MergeOptions,
    seeded: set[str],
    evaluate: Evaluator,
) -> Evaluations:
    """Every arm's evaluations, reused where the cache holds them; the rest run by ``evaluate``. In arm and
    seed order, whatever order they finish in: the results list scores in this order."""
    cached: Evaluations = {}
    jobs: list[EvalJob] = []
    order: list[tuple[str, int]] = []
    greedy = spec.evaluation.sampling_temperature is None
    for arm in spec.arms:
        varies = arm.stage is not None and arm.stage in seeded
        seeds = spec.seeds if varies or not greedy else spec.seeds[:1]
        for seed in seeds:
            order.append((arm.name, seed))
            target = _arm_target(recipe, arm, out, seed, seeded, options)
            eval_options = dataclasses.replace(spec.evaluation, seed=seed)
            key = _eval_key(target, eval_options, spec)
            cache = out / "evals" / arm.name / f"seed-{seed}.json"
            record = _read_cached(cache, key)
            label = f"{arm.name} (seed {seed})" if len(seeds) > 1 else arm.name
            if record is not None:
                log.info("compare: %s evaluated before with the same model and settings; reusing", label)
                cached[(arm.name, seed)] = record
            else:
                jobs.append(EvalJob(arm.name, seed, label, target, eval_options, key, cache))
    fresh = evaluate(jobs, spec) if jobs else {}
    return {pair: cached[pair] if pair in cached else fresh[pair] for pair in order}


def _arm_target(
    recipe: Recipe, arm: ArmSpec, out: Path, seed: int, seeded: set[str], options: MergeOptions
) -> EvalTarget:
    if arm.model is not None:
        return model_target(arm.model, relative_to=recipe.folder)
    folders = folders_for_seed(recipe, out, seed, seeded, options)
    stage = next(s for s in recipe.stages if s.name == arm.stage)
    return built_stage_target(arm.name, stage, folders[arm.stage or ""], recipe.folder, folders)


def _eval_key(target: EvalTarget, options: EvalOptions, spec: CompareSpec) -> str:
    material = {
        "model": folder_files(target.model),
        "adapter": folder_files(target.adapter) if target.adapter else None,
        "options": options.record(),
        "device": spec.device,
        "dtype": spec.dtype,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def _read_cached(path: Path, key: str) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def headline_metric(spec: CompareSpec, task: str, metrics: dict[str, float]) -> str:
    """The metric a task is ranked by: the recipe's choice, else accuracy, ROUGE-L … as reported."""
    chosen = spec.headline.get(task)
    if chosen is not None:
        if chosen not in metrics:
            raise GiftMergeError(
                f"{spec.where}.metrics.{task}: {chosen!r} is not reported (the task reports {', '.join(metrics)})"
            )
        return chosen
    for metric in HEADLINE_PREFERENCE:
        if metric in metrics:
            return metric
    if not metrics:
        raise GiftMergeError(f"task {task}: lm-eval reported no metric")
    return next(iter(metrics))


def _headline(spec: CompareSpec, task: str, metrics: dict[str, float]) -> str:
    metric = headline_metric(spec, task, metrics)
    return f"{metric} {metrics[metric]:.3f}"


def _comparison(
    recipe: Recipe, spec: CompareSpec, builds: BuildTable, evaluations: Evaluations, seeded: set[str]
) -> Comparison:
    scores = [
        Score(arm, task, metric, seed, float(value))
        for (arm, seed), record in evaluations.items()
        for task, metrics in record["scores"].items()
        for metric, value in metrics.items()
    ]
    first = next(iter(evaluations.values()))
    headline = {task: headline_metric(spec, task, first["scores"][task]) for task in spec.tasks}
    arms = []
    for arm in spec.arms:
        seconds, peak = _build_cost(recipe, arm, spec, builds)
        eval_times = [r["seconds"] for (name, _), r in evaluations.items() if name == arm.name]
        arms.append(
            ArmRecord(
                name=arm.name,
                source=arm.source,
                build_seconds=seconds,
                peak_rss_bytes=peak,
                eval_seconds=sum(eval_times) / len(eval_times) if eval_times else None,
                sweep=arm.sweep,
                family=arm.family,
                gate=arm.gate,
            )
        )
    comparison = Comparison(
        arms=arms,
        scores=scores,
        tasks=list(spec.tasks),
        headline=headline,
        reference=spec.reference,
        retention_task=spec.retention_task,
        target_task=spec.target_task,
        samples=spec.evaluation.samples,
        meta={
            "recipe": str(recipe.path) if recipe.path else None,
            "seeds": list(spec.seeds),
            "evaluation": {**spec.evaluation.record(), "device": spec.device, "dtype": spec.dtype},
            "seeded_stages": sorted(seeded),
            "stages": {f"{name}@seed-{seed}": b for (name, seed), b in sorted(builds.items())},
        },
    )
    comparison.gates = [
        dataclasses.replace(gate, value=comparison.summary(gate.arm, gate.task, gate.metric)[0]) for gate in spec.gates
    ]
    return comparison


def _build_cost(recipe: Recipe, arm: ArmSpec, spec: CompareSpec, builds: BuildTable) -> tuple[float | None, int | None]:
    """Mean over seeds of the seconds its stages took (shared ones counted in full), and their peak."""
    if arm.stage is None:
        return None, None
    stages = _closure(recipe, arm.stage)
    per_seed, peaks = [], []
    for seed in spec.seeds:
        records = [builds.get((name, seed), {}) for name in stages]
        if any(r.get("seconds") is None for r in records):
            return None, None
        per_seed.append(sum(r["seconds"] for r in records))
        peaks += [r["peak_rss_bytes"] for r in records if r.get("peak_rss_bytes")]
    return sum(per_seed) / len(per_seed), max(peaks) if peaks else None


def _write_results(comparison: Comparison, out: Path) -> dict[str, Any]:
    from gift_merge.compare.plots import write_plots
    from gift_merge.compare.report import write_tables

    written: dict[str, Any] = {path.name: path for path in write_tables(comparison, out).values()}
    written["plots"] = write_plots(comparison, out)
    return written
