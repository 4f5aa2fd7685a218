"""Recipe → merged model folders: plan every stage first, then run them in order.

The whole pipeline is planned before any tensor is read (stages not yet built are described by their
plans), so a typo in the last document of a multi-document recipe fails in a second, not after an hour
of merging or training. Each stage's output appears only when complete. A stage whose folder holds the
output of the same stage text is reused, unless a stage it depends on was rebuilt in this run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gift_merge.architecture import detect_layout
from gift_merge.dtypes import DType
from gift_merge.engine.executor import (
    choose_engine,
    default_memory_budget,
    default_workers,
    estimated_peak,
    execute_plan,
)
from gift_merge.errors import GiftMergeError
from gift_merge.estimate import RunJobs, StageEstimate, describe_memory, estimate_stage, format_seconds, private_bytes
from gift_merge.inputs import ModelInfo, ModelResolver
from gift_merge.io import artifacts, origin
from gift_merge.io.disk import check_room
from gift_merge.io.finite import InputWatch, report_nonfinite_inputs, report_nonfinite_outputs
from gift_merge.io.locks import output_lock
from gift_merge.io.writer import ShardedWriter, atomic_output_folder, check_output_free
from gift_merge.plan import MergePlan, plan_stage
from gift_merge.recipe.loader import stage_dependencies
from gift_merge.recipe.schema import Recipe, Stage, TrainStage
from gift_merge.reuse import input_fingerprint, record_inputs, stage_is_reusable
from gift_merge.train.output import PROVENANCE_NAME
from gift_merge.train_stage import TrainPlan, plan_training, run_training, training_is_current

log = logging.getLogger("gift_merge")
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"
    seed: int = 0
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    quiet: bool = False
    workers: int | None = None
    intermediate_dir: Path | None = None
    engine: str = "auto"
    strict: bool = False  # non-finite input or output values are an error, not a warning
    hash_inputs: bool = False  # record the sha256 of every local input weight file (one more read of each)
    max_memory: int | None = None  # bytes of private memory the engine may hold (default_memory_budget())
    part: tuple[int, int] | None = None  # (i, n): write only part i of n of the output's shards (gift_merge.parts)

    @property
    def memory_budget(self) -> int:
        return self.max_memory or default_memory_budget()


def resolve_output(recipe: Recipe, out: str | Path | None) -> Path:
    """The output folder: the command line's, else the recipe's ``output:`` (relative to the recipe)."""
    if out is not None:
        return Path(out).resolve()
    declared = recipe.compare.output if recipe.compare is not None else recipe.final.output
    if declared:
        return (recipe.folder / declared).resolve()
    raise GiftMergeError("no output folder: give OUT on the command line or 'output:' in the recipe")


def stage_folders(recipe: Recipe, out: Path, intermediate: Path | None) -> dict[str, Path]:
    """Where each named stage but the last is built: ``intermediate``, or ``OUT-stages`` beside OUT.

    A comparison has no final stage: every stage is built, into ``OUT/stages`` by default.
    """
    if recipe.compare is not None:
        root = intermediate or out / "stages"
        return {s.name: root / s.name for s in recipe.stages if s.name}
    root = intermediate or out.parent / f"{out.name}-stages"
    return {s.name: root / s.name for s in recipe.stages[:-1] if s.name}


def _virtual_output(plan: MergePlan, folder: Path, name: str) -> ModelInfo:
    tensors = {j.name: (j.shape, j.out_dtype) for j in plan.jobs}
    layout = detect_layout(tensors, plan.config, name)
    tokenizer = plan.vocabulary.vocabulary if plan.vocabulary is not None else plan.models[plan.tokenizer_model]
    return ModelInfo(name, folder, tensors, plan.config, layout, virtual=True, tokenizer=tokenizer)


StagePlan = MergePlan | TrainPlan


def stage_resolver(recipe: Recipe, folders: dict[str, Path]) -> ModelResolver:
    trains = {s.name for s in recipe.stages if isinstance(s, TrainStage) and s.name}
    return ModelResolver(recipe.folder, folders, adapter_stages=trains)


def plan_recipe(recipe: Recipe, out: Path | None = None, intermediate: Path | None = None) -> list[StagePlan]:
    """Plan every stage without reading a tensor; later stages see earlier ones' planned outputs."""
    out = out or Path.cwd() / "merged"
    resolver = stage_resolver(recipe, stage_folders(recipe, out, intermediate))
    plans: list[StagePlan] = []
    for stage in recipe.stages:
        if isinstance(stage, TrainStage):
            train_plan = plan_training(stage, resolver)
            plans.append(train_plan)
            if stage.name:
                resolver.planned_adapters[stage.name] = train_plan.patches
            continue
        plan = plan_stage(stage, resolver)
        plans.append(plan)
        if stage.name and stage is not recipe.final:
            resolver.virtual[stage.name] = _virtual_output(plan, resolver.stage_folders[stage.name], stage.name)
    return plans


def run_recipe(recipe: Recipe, out: str | Path | None = None, options: MergeOptions | None = None) -> Path:
    """Merge every stage of ``recipe``; return the final output folder.

    The output folder is locked for the whole run, so a second run into it refuses at once.
    """
    options = options or MergeOptions()
    destination = resolve_output(recipe, out)
    if options.part is not None:  # parts run at once, each locking the shards it writes, not the output
        from gift_merge.parts import run_part

        run_part(recipe, destination, options)
        return destination
    with output_lock(destination):
        if recipe.compare is not None:  # builds, evaluates and ranks arms; reruns reuse what is unchanged
            from gift_merge.compare.run import run_compare

            plan_recipe(recipe, destination, options.intermediate_dir)  # every stage checked before any is built
            return run_compare(recipe, destination, options)
        check_output_free(destination, overwrite=options.overwrite)
        plans = plan_recipe(recipe, destination, options.intermediate_dir)
        refuse_inputs_as_output(plans, destination)
        final = plans[-1]
        if isinstance(final, MergePlan):  # before any stage runs: the output is what must fit at the end
            check_room(destination.parent, final.output_bytes, "the merged model")
        _run_stages(recipe, destination, options, plans)
    return destination


def _run_stages(recipe: Recipe, destination: Path, options: MergeOptions, plans: list[StagePlan]) -> None:
    """Build each stage that is not current, in order. A stage that reads no earlier stage runs the plan
    made up front; one that does is planned again once those stages exist (their real outputs, and a trained
    adapter's real patches, replace what their plans promised)."""
    planned = {id(stage): plan for stage, plan in zip(recipe.stages, plans, strict=True)}
    folders = stage_folders(recipe, destination, options.intermediate_dir)
    resolver = stage_resolver(recipe, folders)
    rebuilt: set[str] = set()
    for stage in recipe.stages:
        final = stage is recipe.final
        target = destination if final else folders[stage.name or ""]
        fresh_inputs = not (stage_dependencies(stage) & rebuilt)
        fingerprint = input_fingerprint(stage, folders, recipe.folder)
        if not final and fresh_inputs and stage_is_current(target, stage, fingerprint):
            log.info("stage %s: up to date in %s", stage.name, target)
            continue
        rebuilt.add(stage.name or "")
        full = recipe.text if final and len(recipe.stages) > 1 else None  # every stage that led to the output
        ready = planned[id(stage)] if not stage_dependencies(stage) else None
        build_stage(
            stage, target, folders, resolver, options, overwrite=options.overwrite or not final, full_recipe=full,
            plan=ready,
        )  # fmt: skip
        record_inputs(target, fingerprint)


def build_stage(
    stage: Stage,
    target: Path,
    folders: dict[str, Path],
    resolver: ModelResolver,
    options: MergeOptions,
    *,
    overwrite: bool,
    full_recipe: str | None = None,
    plan: StagePlan | None = None,
) -> None:
    """Train or merge one stage into ``target``; the stages it reads are built already. ``plan``, when
    given, is the stage's plan made before any stage ran (valid while the stage reads no earlier stage).

    ``full_recipe``, for the last stage of a multi-document recipe, goes into the output's card and
    ``gift_merge.json`` so the output says how to rebuild it from scratch.
    """
    if isinstance(stage, TrainStage):
        log.info("stage %s: training an adapter into %s", stage.name or "final", target)
        run_training(stage, target, folders, overwrite=overwrite, quiet=options.quiet)
        return
    if not isinstance(plan, MergePlan):
        plan = plan_stage(stage, resolver)  # against the real outputs of the earlier stages it reads
    for warning in plan.warnings:
        log.warning(warning)
    _write_merge(plan, target, options, overwrite=overwrite, label=stage.name or "merge", full_recipe=full_recipe)


def refuse_inputs_as_output(plans: list[StagePlan], destination: Path) -> None:
    """The output may not be, contain, or lie inside any input: replacing it would destroy that input."""
    destination = destination.resolve()
    for plan in plans:
        for label, path in _input_paths(plan):
            path = path.resolve()
            if path == destination or destination in path.parents:
                raise GiftMergeError(f"{destination}: the output folder is or contains input {label} ({path})")
            if path in destination.parents:
                raise GiftMergeError(f"{destination}: the output folder lies inside input {label} ({path})")


def _input_paths(plan: StagePlan) -> list[tuple[str, Path]]:
    """Every file and folder a stage reads that exists before the run (not earlier stages' outputs)."""
    if isinstance(plan, TrainPlan):
        paths = [] if plan.base.virtual else [(plan.base.label, plan.base.folder)]
        return [*paths, (f"data {plan.stage.config.data}", Path(plan.stage.config.data))]
    paths = []
    for model in plan.models.values():
        if not model.virtual:
            paths.append((model.label, model.folder))
        if model.adapter is not None and not model.virtual:
            paths.append((f"adapter of {model.label}", model.adapter.folder))
    return paths


def stage_is_current(folder: Path, stage: Stage, fingerprint: dict[str, Any]) -> bool:
    """Built from this stage text and these inputs (``fingerprint``: :func:`~gift_merge.reuse.input_fingerprint`)."""
    if isinstance(stage, TrainStage) and not training_is_current(folder, stage):
        return False
    return stage_is_reusable(folder, stage, fingerprint)


def _write_merge(
    plan: MergePlan, destination: Path, options: MergeOptions, *, overwrite: bool, label: str, full_recipe: str | None
) -> None:
    check_room(destination.parent, plan.output_bytes, f"stage {label}")
    if not options.quiet:
        log_estimate(plan, destination, options, label)
    watch = InputWatch(strict=options.strict)
    with atomic_output_folder(destination, overwrite=overwrite) as tmp:
        writer = run_plan(plan, tmp, options, label=label, watch=watch)
        report_nonfinite_inputs(watch.found)
        report_nonfinite_outputs(writer.nonfinite, output_dtypes(plan), strict=options.strict)
        write_artifacts(plan, tmp, options, full_recipe)


def output_dtypes(plan: MergePlan) -> dict[str, DType]:
    """Each output tensor's stored dtype, by name: what the non-finite reports name."""
    return {job.name: job.out_dtype for job in plan.jobs}


def run_plan(
    plan: MergePlan,
    folder: Path,
    options: MergeOptions,
    *,
    label: str,
    watch: InputWatch,
    max_shard_bytes: int | None = None,
    workers: int | None = None,
    quiet: bool | None = None,
) -> ShardedWriter:
    """:func:`~gift_merge.engine.executor.execute_plan` with this run's options (a whole stage, one part's
    shard, or the estimate's probe, which override the shard size, workers or quiet)."""
    return execute_plan(
        plan,
        folder,
        max_shard_bytes=max_shard_bytes or options.max_shard_bytes,
        device=options.device,
        seed=options.seed,
        quiet=options.quiet if quiet is None else quiet,
        workers=workers or options.workers,
        label=label,
        engine=options.engine,
        watch=watch,
        memory_budget=options.memory_budget,
    )


def write_artifacts(plan: MergePlan, tmp: Path, options: MergeOptions, full_recipe: str | None) -> None:
    """Everything of a merged model but its weights: config, generation config, tokenizer, chat template,
    the stage's recipe, ``gift_merge.json`` and the card (written once, also for a merge split in parts)."""
    reference = plan.models[plan.reference]
    artifacts.write_json(tmp / "config.json", plan.config)
    artifacts.copy_generation_config(reference.folder, tmp)
    write_tokenizer(plan, tmp)
    if plan.stage.chat_template:
        artifacts.set_chat_template(tmp, plan.stage.chat_template, [m.folder for m in plan.models.values()])
    (tmp / artifacts.RECIPE_NAME).write_text(plan.stage.text)
    stage = plan.stage
    recipe_text = full_recipe or stage.text
    inputs = describe_inputs(plan, hash_files=options.hash_inputs)
    provenance = {
        "gift_merge_version": artifacts.package_versions("gift-merge")["gift-merge"],
        "method": stage.merge_method,
        "seed": options.seed,
        "engine": choose_engine(plan, options.device, options.engine),
        "device": options.device,
        "inputs": inputs,
        "hub_inputs": hub_inputs(inputs),
        "license": origin.agreed_license(_folder_records(inputs)) or None,
        "recipe": recipe_text,
    }
    artifacts.write_json(tmp / artifacts.PROVENANCE_NAME, provenance)
    artifacts.write_model_card(
        tmp,
        method=stage.merge_method,
        base=str(stage.base_model) if stage.base_model else None,
        inputs=[m.label for m in plan.models.values()],
        recipe_text=recipe_text,
        trained=_training_records(plan),
        provenance=provenance,
    )


def stage_runner(options: MergeOptions) -> RunJobs:
    """Runs jobs of a plan as :func:`_write_merge` does, for the time probe (:mod:`gift_merge.estimate`)."""

    def run_jobs(plan: MergePlan, folder: Path, workers: int) -> object:
        # each job on the backend the merge gives it
        return run_plan(
            plan, folder, options, label="probe", watch=InputWatch(strict=False), workers=workers, quiet=True
        )

    return run_jobs


def estimate(
    plan: MergePlan, destination: Path, options: MergeOptions, substitutes: dict[str, ModelInfo] | None = None
) -> StageEstimate | str:
    """The stage's time and memory on this machine (:func:`gift_merge.estimate.estimate_stage`), or why there is
    no estimate."""
    return estimate_stage(
        plan,
        stage_runner(options),
        workers=options.workers or default_workers(),
        device=options.device,
        engine=options.engine,
        scratch=destination.parent,
        substitutes=substitutes,
        hash_inputs=options.hash_inputs,
        memory_budget=options.memory_budget,
    )


def log_estimate(plan: MergePlan, destination: Path, options: MergeOptions, label: str) -> None:
    """Say at a stage's start what it will cost on this machine: time and peak private memory, from a probe."""
    held = private_bytes()  # before the probe's own buffers
    found = estimate(plan, destination, options)
    modelled = estimated_peak(plan, options.device, options.engine, options.workers, options.memory_budget)
    memory = describe_memory(held, found, modelled)
    if isinstance(found, str):
        log.info("stage %s: %s; time not estimated: %s", label, memory, found)
    else:
        log.info("stage %s: about %s left (%s); %s", label, format_seconds(found.remaining_s), found.describe(), memory)


def describe_inputs(plan: MergePlan, *, hash_files: bool = False) -> dict[str, dict[str, Any]]:
    """Every input of a stage for ``gift_merge.json``: a Hub id at its commit, or a folder with the sizes (with
    ``hash_files``, the sha256) of its weight files (:func:`gift_merge.io.origin.describe_folder`), and its
    licence.

    A ``model+adapter`` reference records both folders; an adapter standing as a model records the adapter
    (its receiving model is an input of its own). Each folder is fingerprinted once.
    """
    seen: dict[Path, dict[str, Any]] = {}

    def folder(path: Path) -> dict[str, Any]:
        path = path.resolve()
        if path not in seen:
            seen[path] = origin.describe_folder(path, hash_files=hash_files)
        return dict(seen[path])

    records: dict[str, dict[str, Any]] = {}
    for model in plan.models.values():
        if model.virtual and model.adapter is None:
            records[model.label] = {"path": None}
        elif model.adapter is not None and model.adapter_only:
            records[model.label] = folder(model.adapter.folder)
        else:
            records[model.label] = folder(model.folder)
            if model.adapter is not None:
                records[model.label]["adapter"] = folder(model.adapter.folder)
    return records


def hub_inputs(records: dict[str, dict[str, Any]]) -> list[dict[str, str | None]]:
    """Every Hub model behind the inputs, each once: the inputs' own, then those behind earlier stages and
    trained adapters (their ``gift_merge.json`` / ``gift.json``), so a multi-stage output names them all."""
    found: dict[tuple[str, str | None], dict[str, str | None]] = {}
    for record in _folder_records(records):
        if record.get("hub_id"):
            entry = {"id": record["hub_id"], "revision": record.get("revision")}
            found.setdefault((entry["id"], entry["revision"]), entry)
    for record in _folder_records(records):
        if record.get("path") and not record.get("hub_id"):
            for entry in origin.upstream_hub_inputs(Path(record["path"])):
                found.setdefault((str(entry["id"]), entry["revision"]), entry)
    return list(found.values())


def _folder_records(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The record of every folder read: each input's, and the adapter of a ``model+adapter`` input."""
    flat = []
    for record in records.values():
        flat.append(record)
        if isinstance(record.get("adapter"), dict):
            flat.append(record["adapter"])
    return flat


def _training_records(plan: MergePlan) -> dict[str, dict]:
    """The ``gift.json`` of every adapter input that gift-merge trained."""
    records = {}
    for model in plan.models.values():
        record = model.adapter.folder / PROVENANCE_NAME if model.adapter is not None else None
        if record is not None and record.is_file():
            try:
                records[model.label] = json.loads(record.read_text())
            except ValueError:
                log.warning("%s: not valid JSON; the model card will not say how the adapter was trained", record)
    return records


def write_tokenizer(plan: MergePlan, out: Path) -> None:
    """The output's tokenizer: the merged one where the stage's vocabulary differs from its tokenizer model's
    (:mod:`gift_merge.vocab`), else a copy of that model's tokenizer files."""
    merged, home = plan.vocabulary, plan.models[plan.tokenizer_model].folder
    if merged is None or not merged.rebuild:
        artifacts.copy_tokenizer(home, out)
        return
    from gift_merge.io.tokenizer_files import write_tokenizer as write_merged

    write_merged(out, home, limit=merged.limit, additions=merged.additions, expected=merged.ids)
