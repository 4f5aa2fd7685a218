"""``gift-merge extract-lora``: the click layer over :func:`gift_merge.extract.extract_lora`."""

from __future__ import annotations

from pathlib import Path

import click

from gift_merge.cli.support import check_device, handle_errors


@click.command("extract-lora")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--base", required=True, help="The model the adapter will be applied to (folder or Hub id).")
@click.option("--tuned", required=True, help="The fine-tuned model whose difference from --base is extracted.")
@click.option("--rank", "-r", type=int, required=True, help="Largest LoRA rank; lower where a delta has lower rank.")
@click.option(
    "--rank-pattern",
    "rank_patterns",
    multiple=True,
    metavar="REGEX=RANK",
    help="Rank for modules matching REGEX (searched in module names, first match wins). Repeatable.",
)
@click.option(
    "--include",
    multiple=True,
    metavar="REGEX",
    help="Factor the Linear/Conv1D modules matching REGEX instead of those in the layers. Repeatable.",
)
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave out modules matching REGEX. Repeatable.")
@click.option(
    "--embeddings",
    type=click.Choice(["skip", "lora", "save"]),
    default="skip",
    show_default=True,
    help="Embeddings and lm_head: drop their deltas, factor them, or save them whole (modules_to_save).",
)
@click.option(
    "--save-undecomposable",
    is_flag=True,
    help="Keep norm and bias deltas: norms as modules_to_save, target biases as lora_B.bias when peft can.",
)
@click.option("--dtype", default=None, help="dtype of A and B [default: the tuned model's].")
@click.option(
    "--svd",
    type=click.Choice(["auto", "full", "randomized"]),
    default="auto",
    show_default=True,
    help="auto: checked randomized SVD when the rank is small, else the exact one.",
)
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run: cpu, cuda, cuda:1 …")
@click.option("--seed", default=0, show_default=True, help="Seed of the randomized SVD's sketch.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--quiet", "-q", "quiet_here", is_flag=True, help="No progress bar or table.")
@click.pass_context
@handle_errors
def extract_lora_command(ctx: click.Context, out: Path, base: str, tuned: str, rank: int,
                         rank_patterns: tuple[str, ...], include: tuple[str, ...], exclude: tuple[str, ...],
                         embeddings: str, save_undecomposable: bool, dtype: str | None, svd: str, device: str,
                         seed: int, overwrite: bool, quiet_here: bool) -> None:  # fmt: skip
    """Extract a PEFT LoRA adapter of rank ≤ RANK from TUNED − BASE into OUT."""
    from gift_merge.dtypes import parse_dtype
    from gift_merge.extract import ExtractOptions, extract_lora
    from gift_merge.extract.options import parse_rank_pattern

    quiet = quiet_here or bool((ctx.obj or {}).get("quiet"))
    options = ExtractOptions(
        rank=rank,
        rank_pattern=tuple(parse_rank_pattern(p) for p in rank_patterns),
        include=include,
        exclude=exclude,
        embeddings=embeddings,  # type: ignore[arg-type]  # click.Choice checked it
        save_undecomposable=save_undecomposable,
        dtype=parse_dtype(dtype, "--dtype").torch if dtype else None,
        device=check_device(device),
        svd=svd,  # type: ignore[arg-type]
        seed=seed,
        overwrite=overwrite,
        quiet=quiet,
    )
    report = extract_lora(base, tuned, out, options)
    if not quiet:
        click.echo(report.table())
