"""What every command shares: errors as one line and exit code 2, and a checked ``--device``.

A module of its own (click and the errors only), so the commands that live with their feature import
it directly, and ``gift_merge.cli`` can import them at the top.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
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
            click.echo(f"error: {one_line(str(exc))}", err=True)
            sys.exit(2)
        except BrokenPipeError:  # `gift-merge methods | head`: the reader is done, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit
            sys.exit(141)  # 128 + SIGPIPE, as a shell reports a command killed by it
        except OSError as exc:
            if debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {one_line(f'{where}{exc.strerror or exc}')}", err=True)
            sys.exit(2)
        except Terminated:
            click.echo("terminated: no output was written", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def one_line(message: str) -> str:
    """The message with line breaks and other control characters escaped (a tensor name or a YAML key can
    hold them), so an error is always exactly one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so every temporary folder is removed on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def terminate_like_interrupt() -> None:
    """Make SIGTERM (``kill``, a scheduler's timeout) unwind as Ctrl-C does: cleanup runs, exit code 143."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def check_device(device: str) -> str:
    """The device, checked; plain ``cpu`` is accepted without importing torch (the numpy path needs none)."""
    if device != "cpu":
        torch_device(device)
    return device
