"""What the planner knows about an input model without reading a single weight.

A model is its tensor names, shapes and dtypes (from safetensors headers), its ``config.json`` and its
layer layout. An earlier stage of a multi-document recipe that has not run yet is described by its plan
instead, so ``validate`` and ``plan`` can check a whole pipeline before anything is computed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gift_merge.architecture import LayerLayout, detect_layout
from gift_merge.errors import GiftMergeError
from gift_merge.io.locate import locate
from gift_merge.io.reader import CheckpointReader
from gift_merge.recipe.schema import ModelRef


@dataclass
class ModelInfo:
    label: str
    folder: Path
    tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    config: dict[str, Any]
    layout: LayerLayout
    virtual: bool = False

    def has(self, name: str) -> bool:
        return name in self.tensors


def read_config(folder: Path, label: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise GiftMergeError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise GiftMergeError(f"{path}: expected a JSON object")
    return config


def model_info_from_folder(folder: Path, label: str) -> ModelInfo:
    reader = CheckpointReader(folder)
    config = read_config(folder, label)
    tensors = {name: (reader.info(name).shape, reader.info(name).dtype) for name in reader.names}
    return ModelInfo(label, folder, tensors, config, detect_layout(tensors, config, label))


@dataclass
class ModelResolver:
    """Resolves recipe model references to :class:`ModelInfo`, once each.

    ``stage_folders`` maps a stage name to the folder its output goes to; ``virtual`` holds stage
    outputs described by their plans when the folder is not built yet.
    """

    recipe_folder: Path
    stage_folders: dict[str, Path] = field(default_factory=dict)
    virtual: dict[str, ModelInfo] = field(default_factory=dict)
    _cache: dict[str, ModelInfo] = field(default_factory=dict)

    def resolve(self, ref: ModelRef) -> ModelInfo:
        if ref.adapter:
            raise GiftMergeError(f"model {ref}: '+adapter' references are not supported yet")
        label = str(ref)
        if label in self._cache:
            return self._cache[label]
        if ref.stage is not None:
            folder = self.stage_folders.get(ref.stage)
            if folder is not None and (folder / "config.json").is_file():
                info = model_info_from_folder(folder, label)
            elif ref.stage in self.virtual:
                info = self.virtual[ref.stage]
            else:
                raise GiftMergeError(f"model {label}: stage {ref.stage!r} has not been planned")
        else:
            info = model_info_from_folder(locate(ref.path, ref.revision, relative_to=self.recipe_folder), label)
        self._cache[label] = info
        return info
