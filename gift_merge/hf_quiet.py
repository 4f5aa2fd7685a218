"""Silence transformers' progress bars and messages for one block, then restore the caller's settings."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def quiet_transformers(*, logs: bool = False) -> Iterator[None]:
    """Hide transformers' progress bars (and, with ``logs``, its info and warnings) inside the block.

    Both are process-wide switches of transformers, not of one call, so the caller's settings are put
    back afterwards: a library call must not silence the application that uses it.
    """
    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if logs:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if logs:
            hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
