"""Resumable training state: trainable weights, optimizer, schedule position, log so far.

A run is a pure function of its config and data (the data order and every dropout mask are seeded by
step and micro-batch, see :mod:`gift_merge.train.schedule`), so this is all a resumed run needs to end
with the very adapter an uninterrupted run writes. Each checkpoint folder is written beside the final
output as a temporary folder and renamed into place; only the newest is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gift_merge.errors import GiftMergeError

STATE = "state.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


@dataclass
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    log: list[dict[str, Any]]


def save_checkpoint(
    root: Path,
    *,
    step: int,
    fingerprint: dict[str, Any],
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    log: list[dict[str, Any]],
) -> Path:
    """Write ``root/step-NNNNNN`` atomically and delete older checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / OPTIMIZER)
    state = {"step": step, "fingerprint": fingerprint, "log": log}
    (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else its newest ``step-*`` folder."""
    path = Path(path).expanduser()
    if (path / STATE).is_file():
        return path
    candidates = sorted(p for p in path.glob("step-*") if (p / STATE).is_file())
    if not candidates:
        raise GiftMergeError(f"--resume {path}: no checkpoint there (expected {STATE} or step-* folders)")
    return candidates[-1]


def load_checkpoint(path: str | Path, fingerprint: dict[str, Any], device: torch.device) -> Checkpoint:
    """Read a checkpoint, refusing one made with settings that would change the result."""
    folder = find_checkpoint(path)
    state = json.loads((folder / STATE).read_text())
    previous = state["fingerprint"]
    for key in fingerprint | previous:  # both ways: a setting may be recorded only where it was set
        value = fingerprint.get(key)
        if previous.get(key) != value:
            raise GiftMergeError(
                f"--resume {folder}: was made with {key}={previous.get(key)!r}, this run has {value!r}"
            )
    extra = torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    weights = load_file(str(folder / WEIGHTS), device=str(device))
    return Checkpoint(state["step"], weights, extra["optimizer"], extra["scheduler"], state["log"])
