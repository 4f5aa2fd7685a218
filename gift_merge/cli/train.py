"""``gift-merge annotate`` and ``gift-merge train``: click commands over :mod:`gift_merge.train`.

Their flags are derived from the config dataclasses (name, help, default), so an option and its
default are written once. Only flags given on the command line reach the config, which lets them
override a YAML file's ``train:`` section. Importing this module loads click and the config only.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from gift_merge.cli.support import handle_errors
from gift_merge.train.config import AnnotateConfig, TrainConfig, _Config, field_docs, metavar, train_config_from_yaml

F = Callable[..., Any]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(hint: Any) -> Any:
    """``int`` for ``int | None``: an optional number is still parsed as a number on the command line."""
    args = typing.get_args(hint)
    rest = [a for a in args if a is not type(None)]
    return rest[0] if type(None) in args and len(rest) == 1 else hint


def _config_options(cls: type[_Config]) -> Callable[[F], F]:
    """Add one click option per config field, in field order."""
    hints = typing.get_type_hints(cls)

    def decorate(func: F) -> F:
        for name, default, help_text, aliases in reversed(field_docs(cls)):
            if default is dataclasses.MISSING:
                text = f"{help_text} [required]"
            elif default is None or isinstance(default, bool) or "[default" in help_text:
                text = help_text
            else:
                text = f"{help_text} [default: {default}]"
            hint = hints[name]
            if hint is bool:
                func = click.option(_flag(name), *aliases, name, is_flag=True, default=False, help=text)(func)
                continue
            kind = {int: click.INT, float: click.FLOAT}.get(_scalar(hint), click.STRING)
            meta = metavar(cls, name)
            func = click.option(_flag(name), *aliases, name, type=kind, default=None, help=text, metavar=meta)(func)
        return func

    return decorate


def _explicit(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """The options the user typed (not click's defaults)."""
    return {k: v for k, v in params.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}


def _quiet(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(obj.get("quiet")) if isinstance(obj, dict) else False


@click.command("annotate")
@_config_options(AnnotateConfig)
@click.pass_context
@handle_errors
def annotate(ctx: click.Context, **params: Any) -> None:
    """Score every response token with the instruct model: q_t = p(y_t | x, y_<t).

    Writes the input rows plus "scores": [[q, q], …] (the GIFT authors' format), one entry per response
    token. A rerun continues an interrupted one. Under torchrun each process scores a share of the
    batches and rank 0 writes OUT; --num-shards N --shard I splits the work over separate jobs.
    """
    import torch

    from gift_merge.train import distributed
    from gift_merge.train.annotation import annotate as annotate_rows

    config = AnnotateConfig.from_mapping(_explicit(ctx, params))
    ranks = distributed.setup(use_cuda=torch.cuda.is_available() and not config.device.startswith("cpu"))
    try:
        quiet = _quiet(ctx) or not ranks.is_main
        written = annotate_rows(config, quiet=quiet, ranks=ranks)
    finally:
        distributed.teardown(ranks)
    if quiet:
        return
    if written == Path(config.out):
        click.echo(f"annotated data written to {written}", err=True)
    else:
        click.echo(f"shard written to {written}; {config.out} appears when every shard is done", err=True)


@click.command("train")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML file with a `train:` section; flags given here override it.",
)
@_config_options(TrainConfig)
@click.pass_context
@handle_errors
def train(ctx: click.Context, config_file: Path | None, **params: Any) -> None:
    """Train a GIFT (or plain SFT) LoRA adapter on the base model.

    The loss per micro-batch is sum(w·ce)/sum(w) over response tokens with w = max(q, 1e-4)^γ, q the
    instruct model's probability of the token ("scores" in --data, or annotated first with --instruct).
    Runs data-parallel under torchrun. Writes a PEFT adapter, training_log.jsonl and gift.json.
    """
    from gift_merge.train.loop import train as train_adapter

    given = _explicit(ctx, params)
    config = train_config_from_yaml(config_file, given) if config_file is not None else TrainConfig.from_mapping(given)
    quiet = _quiet(ctx)
    result = train_adapter(config, quiet=quiet)
    if result.out is not None and not quiet:
        click.echo(f"adapter written to {result.out}", err=True)
