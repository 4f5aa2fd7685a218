"""The ``gift-merge`` command: a thin click layer over the library.

Each command parses its options, calls one library function, and turns :class:`GiftMergeError` into
one line on stderr and exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from gift_merge.cli.evaluate import eval_command
from gift_merge.cli.extract import extract_lora_command
from gift_merge.cli.support import check_device, handle_errors, terminate_like_interrupt
from gift_merge.cli.train import annotate as annotate_command
from gift_merge.cli.train import train as train_command
from gift_merge.engine.allocator import enable_huge_pages, one_blas_thread
from gift_merge.errors import GiftMergeError
from gift_merge.io.sizes import UNITS_HELP

enable_huge_pages()  # before anything imports torch: its allocator reads the switch once
one_blas_thread()  # before anything imports numpy: OpenBLAS reads it once


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or info messages.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    envvar="GIFT_MERGE_ALLOW_PICKLE",
    help="Read pickled .bin weights and adapters (loaded with weights_only; only for files you trust).",
)
@click.version_option(package_name="gift-merge")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool, allow_pickle: bool) -> None:
    """Merge language models and their weight deltas; transfer GIFT adapters."""
    import os

    if allow_pickle:
        os.environ["GIFT_MERGE_ALLOW_PICKLE"] = "1"  # read by io.reader wherever a checkpoint is opened
    terminate_like_interrupt()
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    level = logging.DEBUG if debug else logging.ERROR if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)


WORKERS_OPTION = click.option(
    "--workers", type=int, default=None, help="Tensors processed concurrently [default: cores, 2..8]."
)
MAX_MEMORY_OPTION = click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Private memory the merge engine may hold (1GiB, 500MB) [default: 1GiB, or half the available memory "
    "if less]; larger magnitude cuts then stream instead of buffering.",
)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="Where the math runs: cpu, cuda, cuda:1 …")
@click.option("--out-shard-size", default="5GB", show_default=True,
              help=f"Largest output shard, a number and a unit (500MB, 5GB, 1.5GiB). Units: {UNITS_HELP}.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--seed", default=0, show_default=True, help="Seed for random methods (DARE, DELLA).")
@WORKERS_OPTION
@MAX_MEMORY_OPTION
@click.option("--intermediate-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where earlier stages of a multi-document recipe go [default: OUT-stages].")  # fmt: skip
@click.option("--engine", type=click.Choice(["auto", "numpy", "torch"]), default="auto", show_default=True,
              help="numpy: the CPU without torch, every method; torch: the torch backend (a GPU's; on the CPU the "
                   "same bytes); auto: numpy on the CPU, torch only for stored dtypes numpy cannot read.")  # fmt: skip
@click.option("--strict", is_flag=True, help="Fail (write nothing) when an input or output tensor holds NaN or ±inf.")
@click.option("--hash-inputs", is_flag=True,
              help="Record each local input weight file's sha256 in the card (reads the inputs again).")  # fmt: skip
@click.option("--part", "part_text", default=None, metavar="I/N",
              help="Write only part I of N (0-based) of the output's shards into OUT.parts; the part that "
                   "completes the set (or `gift-merge finalize OUT`) makes OUT. One stage per run (README: "
                   "Scaling out).")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: each stage's parts as Ray tasks (needs gift-merge[ray]).")  # fmt: skip
@click.option(
    "--address", default=None, help="With --executor ray: the cluster to join [default: RAY_ADDRESS or local]."
)
@click.option("--parts", "parts_count", type=int, default=None,
              help="With --executor ray: parts per stage [default: one per output shard].")  # fmt: skip
@click.option("--quiet", "-q", "quiet_here", is_flag=True, help="No progress bar or info messages (warnings stay).")
@click.pass_context
@handle_errors
def run(ctx: click.Context, recipe: Path, out: Path | None, device: str, out_shard_size: str, overwrite: bool,
        seed: int, workers: int | None, max_memory: str | None, intermediate_dir: Path | None, engine: str,
        strict: bool, hash_inputs: bool, part_text: str | None, executor: str, address: str | None,
        parts_count: int | None, quiet_here: bool) -> None:  # fmt: skip
    """Merge the models in RECIPE into OUT (or the recipe's `output:`)."""
    from gift_merge.engine.allocator import reuse_large_buffers
    from gift_merge.io.sizes import parse_size
    from gift_merge.merge import MergeOptions, run_recipe
    from gift_merge.recipe import load_recipe
    from gift_merge.recipe.schema import TrainStage

    reuse_large_buffers()
    quiet = quiet_here or ctx.obj["quiet"]
    if quiet_here:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    part = None
    if part_text is not None:
        from gift_merge.parts import parse_part

        part = parse_part(part_text)
        if executor != "local":
            raise GiftMergeError("--part runs one part here; --executor ray runs every part itself: give one")
    if executor == "local" and (address is not None or parts_count is not None):
        raise GiftMergeError("--address and --parts go with --executor ray")
    if parts_count is not None and parts_count < 1:
        raise GiftMergeError(f"--parts {parts_count}: give at least 1")
    options = MergeOptions(
        device=check_device(device),
        seed=seed,
        max_shard_bytes=parse_size(out_shard_size, "--out-shard-size"),
        overwrite=overwrite,
        quiet=quiet,
        workers=workers,
        max_memory=parse_size(max_memory, "--max-memory") if max_memory is not None else None,
        intermediate_dir=intermediate_dir,
        engine=engine,
        strict=strict,
        hash_inputs=hash_inputs,
        part=part,
    )
    loaded = load_recipe(recipe)
    if executor == "ray":
        from gift_merge.ray_executor import run_on_ray

        destination = run_on_ray(loaded, out, options, address=address, parts=parts_count)
    elif part is not None:
        from gift_merge.merge import resolve_output
        from gift_merge.parts import run_part

        outcome = run_part(loaded, resolve_output(loaded, out), options)
        if not quiet:
            click.echo(outcome.describe(part))
        return
    else:
        destination = run_recipe(loaded, out, options)
    if not quiet and loaded.compare is None:
        what = "adapter" if isinstance(loaded.final, TrainStage) else "merged model"
        click.echo(f"{what} written to {destination}")


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@handle_errors
def finalize(out: Path, overwrite: bool) -> None:
    """Make OUT from the parts in OUT.parts (`run --part`): check every shard, write the index, rename.

    For a stage before the last, OUT is that stage's folder (OUT-stages/NAME by default).
    """
    from gift_merge.parts import finalize as finalize_parts

    click.echo(f"finalized: {finalize_parts(out, overwrite=overwrite)}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--device", default="cpu", show_default=True, help="Where merges and training run (evaluation: eval.device)."
)
@click.option("--workers", type=int, default=None, help="Tensors merged concurrently [default: cores, 2..8].")
@click.option("--engine", type=click.Choice(["auto", "numpy", "torch"]), default="auto", show_default=True)
@click.option("--intermediate-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the arms' stages are built [default: OUT/stages].")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: every arm, sweep point and seed built, then evaluated, as Ray tasks "
                   "(needs gift-merge[ray]).")  # fmt: skip
@click.option(
    "--address", default=None, help="With --executor ray: the cluster to join [default: RAY_ADDRESS or local]."
)
@click.option("--quiet", "-q", "quiet_here", is_flag=True, help="No progress or info messages (the table stays).")
@click.pass_context
@handle_errors
def compare(ctx: click.Context, recipe: Path, out: Path | None, device: str, workers: int | None, engine: str,
            intermediate_dir: Path | None, executor: str, address: str | None, quiet_here: bool) -> None:  # fmt: skip
    """Build, evaluate and rank the arms of RECIPE's `compare:` document into OUT (or its `output:`).

    Writes results.md (the table, also printed), results.csv, results.json and PNG plots; arms' models go
    to OUT/stages, evaluations (with lm-eval's output) to OUT/evals. A rerun reuses what is unchanged.
    """
    from gift_merge.merge import MergeOptions, run_recipe
    from gift_merge.recipe import load_recipe

    loaded = load_recipe(recipe)
    if loaded.compare is None:
        raise GiftMergeError(f"{recipe}: no 'compare:' document (gift-merge run merges it)")
    if quiet_here:
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    options = MergeOptions(device=check_device(device), workers=workers, intermediate_dir=intermediate_dir,
                           engine=engine, quiet=quiet_here or ctx.obj["quiet"])  # fmt: skip
    if executor == "ray":
        from gift_merge.ray_executor import run_on_ray

        run_on_ray(loaded, out, options, address=address)
    elif address is not None:
        raise GiftMergeError("--address goes with --executor ray")
    else:
        run_recipe(loaded, out, options)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@handle_errors
def validate(recipe: Path) -> None:
    """Check RECIPE and every model it names, reading no weights."""
    from gift_merge.merge import plan_recipe
    from gift_merge.recipe import load_recipe
    from gift_merge.train_stage import TrainPlan

    plans = plan_recipe(load_recipe(recipe))
    jobs = sum(len(p.jobs) for p in plans if not isinstance(p, TrainPlan))
    trains = sum(1 for p in plans if isinstance(p, TrainPlan))
    training = f", {trains} to train" if trains else ""
    click.echo(f"{recipe}: ok ({len(plans)} stage(s){training}, {jobs} output tensors)")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@WORKERS_OPTION
@MAX_MEMORY_OPTION
@handle_errors
def plan(recipe: Path, workers: int | None, max_memory: str | None) -> None:
    """Print the resolved job of every output tensor, and what the run will cost on this machine (with the
    `run` options that change it: --workers, --max-memory)."""
    from gift_merge.engine.allocator import reuse_large_buffers
    from gift_merge.engine.compute import numpy_unsupported
    from gift_merge.engine.executor import estimated_peak
    from gift_merge.estimate import (
        StageEstimate,
        describe_memory,
        format_seconds,
        private_bytes,
        process_age,
        substitutes_for,
    )
    from gift_merge.io.sizes import parse_size
    from gift_merge.merge import MergeOptions, estimate, plan_recipe, resolve_output
    from gift_merge.plan import describe_job
    from gift_merge.recipe import load_recipe
    from gift_merge.train_stage import TrainPlan

    reuse_large_buffers()  # the probe runs under the allocator settings `run` uses
    loaded = load_recipe(recipe)
    plans = plan_recipe(loaded)
    try:
        out = resolve_output(loaded, None)
    except GiftMergeError:  # no `output:`: the run's OUT argument decides
        out = Path.cwd() / "merged"
    startup, held = process_age(), private_bytes()  # before any probe: what a run holds before it merges
    substitutes = substitutes_for(plans)
    options = MergeOptions(
        workers=workers, max_memory=parse_size(max_memory, "--max-memory") if max_memory is not None else None
    )
    seconds, untimed = 0.0, []
    for stage_plan in plans:
        name = stage_plan.stage.name or "final"
        if isinstance(stage_plan, TrainPlan):
            click.echo(f"# stage {name}: {stage_plan.describe()}")
            untimed.append(f"training {name}")
            continue
        size = stage_plan.output_bytes / 1e9
        click.echo(f"# stage {name}: {stage_plan.operator.name}, {len(stage_plan.jobs)} tensors, {size:.3f} GB")
        why_not = numpy_unsupported(stage_plan, "cpu")
        click.echo(f"# engine on the CPU: {'numpy' if why_not is None else f'torch ({why_not})'}")
        found = estimate(stage_plan, out, options, substitutes)
        peak = estimated_peak(stage_plan, workers=options.workers, memory_budget=options.memory_budget)
        click.echo(f"# memory: {describe_memory(held, found, peak)}")
        if isinstance(found, StageEstimate):
            seconds += found.seconds
            click.echo(f"# time: about {format_seconds(found.seconds)} ({found.describe()})")
        else:
            untimed.append(f"stage {name}")
            click.echo(f"# time: not estimated: {found}; `run` states it when the stage starts")
        for warning in stage_plan.warnings:
            click.echo(f"# warning: {warning}")
        for job in stage_plan.jobs:
            click.echo(describe_job(job))
    total = sum(p.output_bytes for p in plans if not isinstance(p, TrainPlan))
    if total and loaded.compare is None:
        from gift_merge.io.disk import free_bytes

        click.echo(
            f"# disk: the outputs need {total / 1e9:.3f} GB; {free_bytes(out.parent) / 1e9:.1f} GB free at {out.parent}"
        )
    if seconds:
        begin = f"start-up and planning {startup:.1f} s (this process), " if startup is not None else ""
        more = f"; {', '.join(untimed)} not estimated" if untimed else ""
        evaluation = "; evaluating the arms not estimated" if loaded.compare is not None else ""
        click.echo(
            f"# time on this machine: about {format_seconds((startup or 0.0) + seconds)} for `gift-merge run` "
            f"({begin}merging {format_seconds(seconds)}{more}{evaluation})"
        )


@main.command()
@handle_errors
def methods() -> None:
    """List every merge method with its parameters and defaults."""
    from gift_merge.operators import OPERATORS

    for op in OPERATORS.values():
        base = {"required": "needs base_model", "optional": "base_model optional", "ignored": "no base"}[op.base]
        click.echo(f"{op.name}: {op.summary} [{base}]")
        if op.paper:
            click.echo(f"    paper: {op.paper}")
        for p in op.params:
            scope = "per model" if p.per_model else "per tensor"
            default = "required" if p.required else f"default {p.default}"
            click.echo(f"    {p.name} ({scope}, {default}){': ' + p.doc if p.doc else ''}")


@main.command()
@click.argument("model")
@click.option("--revision", default=None, help="Hub revision.")
@handle_errors
def inspect(model: str, revision: str | None) -> None:
    """Show MODEL's tensors: names, shapes, dtypes and sizes."""
    from gift_merge.dtypes import dtype_name
    from gift_merge.io.locate import locate
    from gift_merge.io.reader import CheckpointReader

    reader = CheckpointReader(locate(model, revision))
    for name in reader.names:
        info = reader.info(name)
        click.echo(f"{name}\t{list(info.shape)}\t{dtype_name(info.dtype)}\t{info.nbytes}")
    count = sum(reader.info(n).numel for n in reader.names)
    click.echo(f"# {len(reader.names)} tensors, {count:,} parameters, {reader.total_bytes / 1e9:.3f} GB")


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing) [default: main].")
@click.option("--message", default=None, help="Commit message.")
@handle_errors
def upload(out: Path, repo_id: str, private: bool, revision: str | None, message: str | None) -> None:
    """Upload a finished output (merged model or adapter) in OUT to the Hub repository REPO_ID.

    Refuses an output that is still being written, a temporary folder, or weights that do not open.
    Authenticates as huggingface_hub does (HF_TOKEN or `hf auth login`).
    """
    from gift_merge.io.upload import upload as upload_folder

    click.echo(f"uploaded: {upload_folder(out, repo_id, private=private, revision=revision, message=message)}")


# Commands that live with their feature.
main.add_command(annotate_command)
main.add_command(train_command)
main.add_command(extract_lora_command)
main.add_command(eval_command)
