"""What every command shares: errors as one line and exit code 2, and a checked ``--device``.

A module of its own (click and the errors only), so the commands that live with their feature import
it directly, and ``gift_merge.cli`` can import them at the top.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from gift_merge.devices import torch_device
from gift_merge.errors import GiftMergeError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """A :class:`GiftMergeError` becomes ``error: …`` on stderr and exit 2 (``--debug``: the traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except GiftMergeError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def check_device(device: str) -> str:
    """The device, checked; plain ``cpu`` is accepted without importing torch (the numpy path needs none)."""
    if device != "cpu":
        torch_device(device)
    return device
