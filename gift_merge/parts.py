"""One merge split in parts by output shard: ``gift-merge run RECIPE OUT --part i/n``, then ``finalize``.

Every output tensor of a plan is independent and has its place fixed before any is computed: the writer's
shards are a pure function of the plan's tensor order and ``--out-shard-size``
(:func:`gift_merge.io.writer.shard_groups`), whatever the number of parts. Part ``i`` of ``n`` writes
shards ``i, i+n, i+2n, …`` (0-based), each with the writer's own header and offsets, so the shards of a
split run are the bytes of a whole run; random methods draw from a generator seeded by (seed, tensor name),
so they too give the same bytes however the work is split.

Parts are independent processes (a Slurm array, a Kubernetes indexed job, ``xargs -P``): they write into a
staging folder ``OUT.parts`` beside OUT, never into OUT. The first part to arrive writes everything but
the weights there (tokenizer, card, ``gift_merge.json``; ``config.json`` kept aside until finalizing, so
nothing loads the folder as a model) with a manifest of the planned shards; every later part checks that
it runs the same plan. Each shard is written under a lock (host and process
id, so parts on several machines sharing a file system see each other) into a temporary folder, renamed
into place, then recorded (``.gift-merge-parts/FILE.json``): a shard without its record is not done, and a
rerun of the part writes it again while skipping the recorded ones. Finalizing (``gift-merge finalize OUT``,
or the part that completes the set) checks every shard against the manifest (record, size, header), writes
the index and renames the staging folder to OUT: OUT exists only once complete, as with a single run.

A multi-stage recipe runs stage by stage: each ``--part`` run works on the first stage that is not built
yet, and finalizing it makes the next stage the one the parts run. Run the parts once per stage (a Slurm
array per stage, each after the previous one). A training stage is not split: build it with a plain run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gift_merge.errors import GiftMergeError
from gift_merge.io.disk import check_room
from gift_merge.io.finite import InputWatch, report_nonfinite_inputs, report_nonfinite_outputs
from gift_merge.io.locks import output_lock
from gift_merge.io.reader import INDEX_NAME, SINGLE_NAME
from gift_merge.io.writer import OutputTensor, check_output_free, header_bytes, shard_groups
from gift_merge.merge import (
    MergeOptions,
    StagePlan,
    output_dtypes,
    plan_recipe,
    refuse_inputs_as_output,
    run_plan,
    stage_folders,
    stage_is_current,
    stage_resolver,
    write_artifacts,
)
from gift_merge.plan import MergePlan, plan_stage
from gift_merge.recipe.loader import stage_dependencies
from gift_merge.recipe.schema import Recipe, Stage, TrainStage
from gift_merge.reuse import input_fingerprint, record_inputs

log = logging.getLogger("gift_merge")

RECORDS = ".gift-merge-parts"  # inside the staging folder: the manifest, each shard's record, the locks
MANIFEST = "manifest.json"
FORMAT = 1


def parse_part(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 ≤ i < n, the index 0-based as Slurm's and Kubernetes' array indices are) → ``(i, n)``."""
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise GiftMergeError(f"--part {text}: write it i/n, part i (0-based) of n, e.g. 0/4 … 3/4")
    i, n = int(index), int(count)
    if n < 1 or i >= n:
        raise GiftMergeError(f"--part {text}: the part index runs from 0 to n-1 ({max(n - 1, 0)} here)")
    return i, n


@dataclass(frozen=True)
class Shard:
    """One output file as the single-process writer lays it out: its name and tensors, in order."""

    file: str
    tensors: tuple[OutputTensor, ...]

    @property
    def header(self) -> bytes:
        return header_bytes(self.tensors)[0]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_shards(plan: MergePlan, max_shard_bytes: int) -> list[Shard]:
    """The output's shards: those :class:`~gift_merge.io.writer.ShardedWriter` writes for this plan."""
    tensors = [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs]
    groups = shard_groups(tensors, max_shard_bytes)
    count = len(groups)
    names = [SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    return [Shard(name, tuple(group)) for name, group in zip(names, groups, strict=True)]


def part_shards(shards: list[Shard], index: int, count: int) -> list[Shard]:
    """Part ``index`` of ``count``: shards ``index, index + count, …`` (about equal bytes: shards are
    full but the last)."""
    return shards[index::count]


def staging_folder(target: Path) -> Path:
    """Where the parts of ``target`` are written until it is finalized: ``OUT.parts`` beside it."""
    target = target.resolve()
    return target.parent / f"{target.name}.parts"


def plan_fingerprint(
    plan: MergePlan, shards: list[Shard], seed: int, full_recipe: str | None, inputs: dict[str, Any] | None = None
) -> str:
    """What decides the output's bytes: the stage, every job as resolved, the seed, the shard layout and the
    input files (``inputs``: :func:`~gift_merge.reuse.input_fingerprint`, names, sizes and times)."""
    text = json.dumps(
        {
            "format": FORMAT,
            "inputs": inputs,
            "stage": plan.stage.text,
            "recipe": full_recipe,
            "seed": seed,
            "config": plan.config,
            "jobs": [repr(job) for job in plan.jobs],
            "shards": [[s.file, hashlib.sha256(s.header).hexdigest()] for s in shards],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class PartOutcome:
    """What one ``--part`` run did: the stage it worked on, its shards, and whether the stage is finished."""

    stage: str
    target: Path
    written: int  # shards this run wrote
    skipped: int  # shards of this part already recorded by an earlier run
    present: int  # shards of the stage recorded now, all parts together
    total: int
    finalized: bool
    final: bool  # the stage is the recipe's last

    def describe(self, part: tuple[int, int]) -> str:
        done = f"stage {self.stage}, part {part[0]}/{part[1]}: {self.written} shard(s) written"
        done += f", {self.skipped} written before" if self.skipped else ""
        if not self.finalized:
            then = f"the last part, or `gift-merge finalize {self.target}`, makes {self.target.name}"
            return f"{done}; {self.present} of {self.total} shards present ({then})"
        if self.final:
            return f"{done}; merged model written to {self.target}"
        return f"{done}; stage finalized into {self.target}: run the parts again for the next stage"


# ---------------------------------------------------------------------------------------------------- locks


def _me() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


@contextmanager
def claim(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` (created exclusively, holding host and process id) for the block; refuse at once if a
    live process holds it. A claim left by a dead process of this host is taken over; one of another host is
    that host's to release (its run may still be going), so the message says which file to remove."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_claim(path)
            if holder is not None and holder[0] == socket.gethostname() and not _pid_alive(holder[1]):
                path.unlink(missing_ok=True)
                continue
            who = f"process {holder[1]} on {holder[0]}" if holder else "another process"
            raise GiftMergeError(
                f"{what}: {who} is writing it; wait for that run (if it died, remove {path})"
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(_me())
        break
    else:
        raise GiftMergeError(f"{path}: cannot take the lock of {what}")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _read_claim(path: Path) -> tuple[str, int] | None:
    try:
        host, _, pid = path.read_text().strip().rpartition(" ")
    except OSError:
        return None
    return (host, int(pid)) if host and pid.isdigit() else None


def _pid_alive(pid: int) -> bool:
    from gift_merge.io.locks import pid_alive

    return pid_alive(pid)


# ---------------------------------------------------------------------------------------------------- a part


def run_part(
    recipe: Recipe, destination: Path, options: MergeOptions, *, finalize_when_done: bool = True
) -> PartOutcome:
    """Write part ``options.part`` of the first stage of ``recipe`` that is not built yet.

    When this part's shards complete the stage's set, the stage is finalized here (unless another part is
    finalizing it, or ``finalize_when_done`` is false: the Ray executor finalizes from its driver).
    """
    assert options.part is not None
    if recipe.compare is not None:
        raise GiftMergeError("--part splits a merge, not a comparison (gift-merge compare builds the arms)")
    pending = next_stage(recipe, destination, options)
    if pending is None:
        raise GiftMergeError(f"{destination}: every stage is built already")
    stage, plan, target, fingerprint = pending
    final = stage is recipe.final
    full = recipe.text if final and len(recipe.stages) > 1 else None
    index, count = options.part
    label = stage.name or "merge"
    written, skipped = write_part(
        plan, target, options, index, count, label=label, full_recipe=full, inputs=fingerprint,
        overwrite=options.overwrite or not final,
    )  # fmt: skip
    total = len(plan_shards(plan, options.max_shard_bytes))
    if not staging_folder(target).exists():  # another part finalized the stage meanwhile
        return PartOutcome(label, target, written, skipped, total, total, True, final)
    present = total - len(missing_shards(target))
    finalized = False
    if present == total and finalize_when_done:
        try:
            finalize(target)
            finalized = True
        except PartsBusy as busy:
            log.info("%s", busy)
    return PartOutcome(label, target, written, skipped, present, total, finalized, final)


def next_stage(
    recipe: Recipe, destination: Path, options: MergeOptions
) -> tuple[Stage, MergePlan, Path, dict[str, Any]] | None:
    """The first stage not built yet, its plan (against the real outputs of the stages it reads), its
    folder and its inputs' fingerprint; ``None`` when the final output exists."""
    plans = plan_recipe(recipe, destination, options.intermediate_dir)
    refuse_inputs_as_output(plans, destination)
    planned: dict[int, StagePlan] = {id(s): p for s, p in zip(recipe.stages, plans, strict=True)}
    folders = stage_folders(recipe, destination, options.intermediate_dir)
    resolver = stage_resolver(recipe, folders)
    for stage in recipe.stages:
        final = stage is recipe.final
        target = destination if final else folders[stage.name or ""]
        fingerprint = input_fingerprint(stage, folders, recipe.folder)
        if not final and stage_is_current(target, stage, fingerprint):
            log.info("stage %s: up to date in %s", stage.name, target)
            continue
        if final and not staging_folder(destination).exists():
            check_output_free(destination, overwrite=options.overwrite)
        if isinstance(stage, TrainStage):
            raise GiftMergeError(
                f"stage {stage.name or 'final'} trains an adapter, which --part does not split: "
                "build it with a plain `gift-merge run` first"
            )
        ready = planned[id(stage)] if not stage_dependencies(stage) else None
        plan = ready if isinstance(ready, MergePlan) else plan_stage(stage, resolver)
        return stage, plan, target, fingerprint
    return None


def write_part(
    plan: MergePlan,
    target: Path,
    options: MergeOptions,
    index: int,
    count: int,
    *,
    label: str,
    full_recipe: str | None,
    inputs: dict[str, Any],
    overwrite: bool,
) -> tuple[int, int]:
    """Write shards ``index, index + count, …`` of ``plan`` into ``target``'s staging folder; return how many
    were written and how many were recorded already."""
    shards = plan_shards(plan, options.max_shard_bytes)
    fingerprint = plan_fingerprint(plan, shards, options.seed, full_recipe, inputs)
    staging = _open_staging(plan, target, options, shards, fingerprint, full_recipe, inputs, overwrite)
    mine = part_shards(shards, index, count)
    if not mine:
        log.info("stage %s: part %d/%d has no shards (the output has %d)", label, index, count, len(shards))
        return 0, 0
    for warning in plan.warnings:
        log.warning(warning)
    check_room(staging, sum(s.size for s in mine), f"part {index}/{count} of stage {label}")
    jobs = {job.name: job for job in plan.jobs}
    watch = InputWatch(strict=options.strict)
    written = skipped = 0
    for shard in mine:
        with claim(staging / RECORDS / f"{shard.file}.lock", f"{staging / shard.file}"):
            if _shard_done(staging, shard, fingerprint):
                skipped += 1
                log.info("stage %s: %s written already", label, shard.file)
                continue
            sub = replace(plan, jobs=[jobs[t.name] for t in shard.tensors])
            _write_shard(sub, shard, staging, options, watch, f"{label} {shard.file}", fingerprint)
            written += 1
    report_nonfinite_inputs(watch.found)
    return written, skipped


def _open_staging(
    plan: MergePlan,
    target: Path,
    options: MergeOptions,
    shards: list[Shard],
    fingerprint: str,
    full_recipe: str | None,
    inputs: dict[str, Any],
    overwrite: bool,
) -> Path:
    """The staging folder of ``target`` holding this plan's parts: made by the first part to arrive (the
    model's files but its weights, and the manifest, in a temporary folder renamed into place), checked by
    every later one."""
    staging = staging_folder(target)
    if not staging.exists():
        staging.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging.parent / f".{staging.name}.new-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / RECORDS).mkdir(parents=True)
        try:
            write_artifacts(plan, tmp, options, full_recipe)
            (tmp / "config.json").rename(tmp / RECORDS / "config.json")  # back at finalize: no loadable model before
            manifest = {
                "format": FORMAT,
                "fingerprint": fingerprint,
                "stage": plan.stage.name or "final",
                "overwrite": overwrite,
                "inputs": inputs,
                "total_size": plan.output_bytes,
                "shards": [{"file": s.file, "size": s.size, "tensors": [t.name for t in s.tensors]} for s in shards],
            }
            (tmp / RECORDS / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            os.rename(tmp, staging)  # fails if another part made it meanwhile: theirs stands
        except OSError:
            if not staging.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = read_manifest(staging)
    if manifest.get("fingerprint") != fingerprint:
        raise GiftMergeError(
            f"{staging}: holds parts of another plan (a different recipe, seed, inputs or --out-shard-size); "
            "remove it to start again"
        )
    return staging


def read_manifest(staging: Path) -> dict[str, Any]:
    path = staging / RECORDS / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GiftMergeError(
            f"{staging}: no parts of a merge here (run `gift-merge run RECIPE OUT --part i/n`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise GiftMergeError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GiftMergeError(f"{path}: not a manifest this gift-merge writes")
    return manifest


def _write_shard(
    plan: MergePlan, shard: Shard, staging: Path, options: MergeOptions, watch: InputWatch, label: str, fingerprint: str
) -> None:
    """Write one shard as the whole run would (its tensors alone make one file with the same header and
    offsets), rename it into place, then record it."""
    tmp = staging / RECORDS / f"{shard.file}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # one file: this shard's group, laid out as the whole run lays it out
        writer = run_plan(plan, tmp, options, label=label, watch=watch, max_shard_bytes=sys.maxsize)
        report_nonfinite_outputs(writer.nonfinite, output_dtypes(plan), strict=options.strict)
        if (tmp / SINGLE_NAME).stat().st_size != shard.size:
            raise GiftMergeError(
                f"{shard.file}: written with {(tmp / SINGLE_NAME).stat().st_size} bytes, planned {shard.size}"
            )
        os.replace(tmp / SINGLE_NAME, staging / shard.file)
        record = {
            "fingerprint": fingerprint,
            "file": shard.file,
            "size": shard.size,
            "nonfinite": {name: [c.nan, c.inf] for name, c in sorted(writer.nonfinite.items())},
        }
        _write_json_atomic(staging / RECORDS / f"{shard.file}.json", record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _shard_done(staging: Path, shard: Shard, fingerprint: str) -> bool:
    """Recorded by a part of this plan, with the planned size and header."""
    try:
        record = json.loads((staging / RECORDS / f"{shard.file}.json").read_text())
        header = shard.header
        with open(staging / shard.file, "rb") as handle:
            head = handle.read(len(header))
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("fingerprint") == fingerprint
        and record.get("size") == shard.size == size
        and head == header
    )


def _manifest_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    shards = manifest.get("shards")
    return shards if isinstance(shards, list) else []


def missing_shards(target: Path) -> list[str]:
    """The shards of ``target``'s staging folder not recorded complete (size and fingerprint; the header
    too when finalizing)."""
    staging = staging_folder(target)
    manifest = read_manifest(staging)
    missing = []
    for entry in _manifest_shards(manifest):
        file = entry["file"]
        try:
            record = json.loads((staging / RECORDS / f"{file}.json").read_text())
            size = (staging / file).stat().st_size
        except (OSError, ValueError):
            missing.append(file)
            continue
        if record.get("fingerprint") != manifest["fingerprint"] or not record.get("size") == entry["size"] == size:
            missing.append(file)
    return missing


def progress_bytes(target: Path) -> int:
    """Bytes of the shards recorded complete in ``target``'s staging folder (0 before it exists)."""
    staging = staging_folder(target)
    try:
        manifest = read_manifest(staging)
    except GiftMergeError:
        return 0
    done = 0
    for entry in _manifest_shards(manifest):
        if (staging / RECORDS / f"{entry['file']}.json").is_file():
            done += int(entry["size"])
    return done


# ---------------------------------------------------------------------------------------------------- finalize


class PartsBusy(GiftMergeError):
    """Another process is finalizing the same output."""


def finalize(target: Path, *, overwrite: bool = False) -> Path:
    """Check every shard of ``target``'s staging folder, write the index and the inputs' record, and rename
    it to ``target``: the output appears complete or not at all."""
    target = target.resolve()
    staging = staging_folder(target)
    if not staging.exists() and (target / "config.json").is_file():
        log.info("%s: finalized already", target)
        return target
    manifest = read_manifest(staging)
    try:
        with claim(staging / RECORDS / "finalize.lock", f"finalizing {target}"):
            return _finalize(target, staging, manifest, overwrite=overwrite or bool(manifest.get("overwrite")))
    except GiftMergeError as exc:
        if "is writing it" in str(exc):
            raise PartsBusy(str(exc)) from None
        raise


def _finalize(target: Path, staging: Path, manifest: dict[str, Any], *, overwrite: bool) -> Path:
    entries = _manifest_shards(manifest)
    missing = missing_shards(target)
    if missing:
        raise GiftMergeError(
            f"{target}: {len(missing)} of {len(entries)} shards are not written yet ({missing[0]} …); "
            "run the parts that write them (part i/n writes shards i, i+n, … counted from 0), then finalize"
        )
    weight_map: dict[str, str] = {}
    nonfinite: list[str] = []
    for entry in entries:
        file = entry["file"]
        header = _read_header(staging / file)
        if list(header) != [*entry["tensors"]]:
            raise GiftMergeError(f"{staging / file}: its tensors are not the planned ones; run its part again")
        for name in entry["tensors"]:
            weight_map[name] = file
        record = json.loads((staging / RECORDS / f"{file}.json").read_text())
        nonfinite += [
            f"tensor {name}: {nan} NaN, {inf} ±inf in the output" for name, (nan, inf) in record["nonfinite"].items()
        ]
    for line in nonfinite[:5]:
        log.warning("%s: an input tensor holds non-finite values, or the result overflows the output dtype", line)
    if len(entries) > 1:
        index = {"metadata": {"total_size": manifest["total_size"]}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    record_inputs(staging, manifest.get("inputs") or {})
    os.replace(staging / RECORDS / "config.json", staging / "config.json")
    with output_lock(target):
        check_output_free(target, overwrite=overwrite)
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(target / RECORDS, ignore_errors=True)
    log.info("%s: %d shards from their parts, finalized", target, len(entries))
    return target


def _read_header(path: Path) -> dict[str, Any]:
    """The tensors of one shard, in file order (``__metadata__`` left out)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = json.loads(handle.read(length))
    return {k: v for k, v in raw.items() if k != "__metadata__"}
