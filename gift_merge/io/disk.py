"""Whether the disk can hold an output, asked before hours of merging rather than found out at the end."""

from __future__ import annotations

import shutil
from pathlib import Path

from gift_merge.errors import GiftMergeError

MARGIN_BYTES = 64 * 2**20
"""Room left beyond the tensors: headers, index, config, tokenizer and card."""


def free_bytes(folder: Path) -> int:
    """Free space on the file system that ``folder`` is (or will be created) on."""
    probe = folder.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_room(folder: Path, needed: int, what: str) -> None:
    """Refuse when the disk under ``folder`` has less free space than ``needed`` bytes plus a margin."""
    free = free_bytes(folder)
    if free < needed + MARGIN_BYTES:
        raise GiftMergeError(
            f"{folder}: {what} needs {needed / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free; "
            "free some space or write elsewhere"
        )
