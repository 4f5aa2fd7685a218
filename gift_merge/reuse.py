"""When a built stage may be reused: same stage text, and the same inputs as when it was built.

The recipe text alone is not enough: a stage that reads ``./my-finetune`` must be rebuilt when that
folder's weights change, and a stage that reads an earlier stage must be rebuilt when that stage was
rebuilt in an earlier, interrupted run. Each built stage records a fingerprint of every input it read
(``gift_merge_inputs.json``: the name, size and modification time of each file of each input folder,
and of the training data), which costs a ``stat`` per file, never a read of the weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gift_merge.errors import GiftMergeError
from gift_merge.io import artifacts
from gift_merge.io.adapter import CONFIG_NAME
from gift_merge.recipe.loader import stage_references
from gift_merge.recipe.schema import Stage, TrainStage

log = logging.getLogger("gift_merge")

INPUTS_NAME = "gift_merge_inputs.json"


def input_fingerprint(stage: Stage, folders: dict[str, Path], recipe_folder: Path) -> dict[str, Any]:
    """``{input label: [[file, size, mtime_ns], …]}`` for every model, adapter and data file the stage reads."""
    from gift_merge.io.locate import locate

    found: dict[str, Any] = {}
    for ref in stage_references(stage):
        if ref.stage is not None:
            folder = folders.get(ref.stage)
            if folder is not None:
                found[f"stage {ref.stage}"] = folder_files(folder)
        else:
            try:
                found[ref.path] = folder_files(locate(ref.path, ref.revision, relative_to=recipe_folder))
            except GiftMergeError:
                found[ref.path] = None  # unresolvable now: planning will say why
        if ref.adapter is not None:
            try:
                adapter = locate(ref.adapter, ref.adapter_revision, relative_to=recipe_folder)
                found[f"adapter {ref.adapter}"] = folder_files(adapter)
            except GiftMergeError:
                found[f"adapter {ref.adapter}"] = None
    if isinstance(stage, TrainStage):
        data = Path(stage.config.data)
        found[f"data {data}"] = _stat(data) if data.is_file() else None
    return found


def record_inputs(folder: Path, fingerprint: dict[str, Any]) -> None:
    (folder / INPUTS_NAME).write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")


def stage_is_reusable(folder: Path, stage: Stage, fingerprint: dict[str, Any]) -> bool:
    """A finished output of this stage text whose recorded inputs are those of now; the log says why not."""
    marker = CONFIG_NAME if isinstance(stage, TrainStage) else "config.json"
    label = stage.name or "final"
    if not (folder / marker).is_file():
        return False
    if not artifacts.made_by_stage_text(folder, stage.text, marker):
        log.info("stage %s: rebuilt, its recipe text changed since %s was built", label, folder)
        return False
    try:
        recorded = json.loads((folder / INPUTS_NAME).read_text())
    except (OSError, ValueError):
        log.info("stage %s: rebuilt, %s has no record of the inputs it was built from", label, folder)
        return False
    current = json.loads(json.dumps(fingerprint, sort_keys=True))  # tuples → lists, as recorded
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    if changed:
        log.info("stage %s: rebuilt, input %s changed since it was built", label, changed[0])
        return False
    return True


def folder_files(folder: Path) -> list[list[Any]]:
    """Name, size and modification time of each file in ``folder``: changes whenever it is rebuilt."""
    return sorted([p.name, *_stat(p)] for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _stat(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]
