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
from typing import TYPE_CHECKING, Any

from gift_merge.architecture import LayerLayout, detect_layout
from gift_merge.dtypes import DType
from gift_merge.errors import GiftMergeError
from gift_merge.io.adapter import AdapterReader, Patch, is_adapter_folder
from gift_merge.io.locate import locate
from gift_merge.io.reader import CheckpointReader
from gift_merge.recipe.schema import ModelRef

if TYPE_CHECKING:
    from gift_merge.io.tokenizer_files import TokenizerVocab


@dataclass
class ModelInfo:
    label: str
    folder: Path
    tensors: Mapping[str, tuple[tuple[int, ...], DType]]
    config: dict[str, Any]
    layout: LayerLayout
    virtual: bool = False
    adapter: AdapterReader | None = None
    patches: Mapping[str, Patch] = field(default_factory=dict)
    adapter_only: bool = False  # an adapter folder standing as a model: its receiving model plus ΔW
    planned_adapter: bool = False  # a recipe's train stage not yet run: ``patches`` say what it will touch
    # a planned stage's output: the vocabulary its tokenizer will hold, or the model whose files it copies
    tokenizer: TokenizerVocab | ModelInfo | None = None

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None or self.planned_adapter


def read_config(folder: Path, *, strict: bool = True) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; ``{}`` when there is none.

    Planning a merge fails on a broken file (``strict``), since the config decides the layer layout and
    the merged model's own config. LoRA extraction passes ``strict=False`` and reads a broken file as
    ``{}``: it can fall back to guessing the layout from tensor names, as it does for unknown models.
    """
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        if not strict:
            return {}
        raise GiftMergeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        if not strict:
            return {}
        raise GiftMergeError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        if not strict:
            return {}
        raise GiftMergeError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        if not strict:
            return {}
        raise GiftMergeError(f"{path}: expected a JSON object")
    return config


def require_output_config(model: ModelInfo, *, from_base: bool) -> None:
    """Refuse a config the merged model cannot be loaded from; the merged model's ``config.json`` is this one.

    The output's config is the reference model's (the ``base_model``, else the first model or slice
    source), as in mergekit, so that model needs a ``config.json`` transformers can load: a JSON object
    with a ``model_type`` (``AutoConfig`` refuses one without). The other inputs may lack one: their
    layers are found from their tensor names. ``from_base`` says which rule chose ``model``, for the fix.
    """
    if not model.virtual and not (model.folder / "config.json").is_file():
        problem = "no config.json"
    elif not model.config:
        problem = "config.json is empty"
    elif not isinstance(model.config.get("model_type"), str) or not model.config["model_type"]:
        problem = "config.json has no model_type"
    else:
        return
    if from_base:
        fix = "it is the base_model, so copy in the config.json of the model it was made from"
    else:
        fix = "it is the first model (there is no base_model), so list a model with a config.json first or copy one in"
    where = model.label if model.virtual else str(model.folder)
    raise GiftMergeError(f"{where}: {problem}; the merged model's config.json is copied from it, and {fix}")


def model_info_from_folder(folder: Path, label: str) -> ModelInfo:
    reader = CheckpointReader(folder)
    config = read_config(folder)
    tensors = {name: (reader.info(name).shape, reader.info(name).dtype) for name in reader.names}
    return ModelInfo(label, folder, tensors, config, detect_layout(tensors, config, label))


@dataclass
class ModelResolver:
    """Resolves recipe model references to :class:`ModelInfo`, once each.

    ``stage_folders`` maps a stage name to the folder its output goes to; ``virtual`` holds stage
    outputs described by their plans when the folder is not built yet; ``planned_adapters`` the LoRA
    patches that a train stage not yet run will produce (base weight name → patch).
    """

    recipe_folder: Path
    stage_folders: dict[str, Path] = field(default_factory=dict)
    virtual: dict[str, ModelInfo] = field(default_factory=dict)
    adapter_stages: set[str] = field(default_factory=set)
    planned_adapters: dict[str, dict[str, Patch]] = field(default_factory=dict)
    _cache: dict[str, ModelInfo] = field(default_factory=dict)

    warnings: list[str] = field(default_factory=list)

    def resolve(self, ref: ModelRef, receiver: ModelInfo | None = None) -> ModelInfo:
        """``ref`` as a model; an adapter folder becomes ``receiver`` plus the adapter's deltas."""
        label = str(ref)
        if ref.adapter:
            base = self.resolve(ref.model_only)
            adapter_folder = locate(ref.adapter, ref.adapter_revision, relative_to=self.recipe_folder)
            return self._with_adapter(label, base, adapter_folder, adapter_only=False)
        if ref.stage is not None and ref.stage in self.adapter_stages:
            return self._stage_adapter(ref, receiver)
        local_adapter = self._local_adapter(ref) if ref.stage is None else None
        if local_adapter is not None:
            if receiver is None:
                raise GiftMergeError(f"model {label}: an adapter stands as a model only in a recipe with a base_model")
            return self._with_adapter(label, receiver, local_adapter, adapter_only=True)
        if label in self._cache:
            return self._cache[label]
        if ref.stage is not None:
            stage_folder = self.stage_folders.get(ref.stage)
            if stage_folder is not None and (stage_folder / "config.json").is_file():
                info = model_info_from_folder(stage_folder, label)
            elif ref.stage in self.virtual:
                info = self.virtual[ref.stage]
            else:
                raise GiftMergeError(f"model {label}: stage {ref.stage!r} has not been planned")
        else:
            info = model_info_from_folder(locate(ref.path, ref.revision, relative_to=self.recipe_folder), label)
        self._cache[label] = info
        return info

    def _stage_adapter(self, ref: ModelRef, receiver: ModelInfo | None) -> ModelInfo:
        """A train stage's adapter: the trained folder, or the patches its plan promises."""
        label = str(ref)
        if receiver is None:
            raise GiftMergeError(f"model {label}: an adapter stands as a model only in a recipe with a base_model")
        assert ref.stage is not None
        folder = self.stage_folders.get(ref.stage)
        if folder is not None and is_adapter_folder(folder):
            return self._with_adapter(label, receiver, folder, adapter_only=True)
        if ref.stage not in self.planned_adapters:
            raise GiftMergeError(f"model {label}: stage {ref.stage!r} has not been planned")
        patches = self.planned_adapters[ref.stage]
        for name, patch in patches.items():
            if name not in receiver.tensors:
                raise GiftMergeError(f"adapter stage {ref.stage!r} trains {patch.module}, which {receiver.label} lacks")
        return ModelInfo(
            label,
            receiver.folder,
            receiver.tensors,
            receiver.config,
            receiver.layout,
            virtual=True,
            patches=patches,
            adapter_only=True,
            planned_adapter=True,
        )

    def _local_adapter(self, ref: ModelRef) -> Path | None:
        for folder in (self.recipe_folder / ref.path, Path(ref.path).expanduser()):
            if folder.is_dir() and is_adapter_folder(folder):
                return folder.resolve()
        return None

    def _with_adapter(self, label: str, base: ModelInfo, folder: Path, *, adapter_only: bool) -> ModelInfo:
        key = f"{label}\0{base.label}"
        if key not in self._cache:
            adapter = AdapterReader(folder, label)
            shapes = {name: shape for name, (shape, _) in base.tensors.items()}
            patches = adapter.check_against(shapes, base.label)
            self._warn_if_unrelated(adapter, base)
            self._cache[key] = ModelInfo(
                label, base.folder, base.tensors, base.config, base.layout, base.virtual, adapter, patches, adapter_only
            )
        return self._cache[key]

    def _warn_if_unrelated(self, adapter: AdapterReader, base: ModelInfo) -> None:
        trained_on = adapter.base_model_name
        if not trained_on:
            return
        config_arch = (base.config.get("architectures") or [None])[0]
        # only Hub ids say what a model is; local folder names ("base", "instruct") say nothing
        hub_ids = _looks_like_hub_id(base.label) and _looks_like_hub_id(trained_on)
        if hub_ids and _family(trained_on) != _family(base.label):
            self.warnings.append(
                f"adapter {adapter.label} was trained on {trained_on}; applying it to {base.label}"
                + (f" ({config_arch})" if config_arch else "")
            )


_VARIANT_SUFFIXES = ("-instruct", "-chat", "-it", "-base", "-sft", "-hf", "-dpo", "-rlhf")


def _family(name: str) -> str:
    """``Qwen/Qwen2.5-0.5B-Instruct`` → ``qwen2.5-0.5b``: base and instruct models share a family."""
    stem = name.rstrip("/").split("/")[-1].lower()
    changed = True
    while changed:
        changed = False
        for suffix in _VARIANT_SUFFIXES:
            if stem.endswith(suffix):
                stem, changed = stem[: -len(suffix)], True
    return stem


def _looks_like_hub_id(label: str) -> bool:
    return label.count("/") == 1 and not label.startswith((".", "/", "~"))
